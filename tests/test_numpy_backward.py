"""flashcheck.kernels.numpy_backward: the exact path against torch autograd and the
oracle, GQA summation, validation; flashcheck.verify.grad_bounds validation."""

import numpy as np
import pytest
import torch

from flashcheck.kernels.models import get_model
from flashcheck.kernels.numpy_attention import tiled_attention
from flashcheck.kernels.numpy_backward import attention_backward
from flashcheck.kernels.precision import from_float64, round_to
from flashcheck.verify import oracle
from flashcheck.verify.grad_bounds import gradient_bound

# Two float64 evaluations of the same gradients in different orders differ
# by a few float64 roundings of sums of at most ~100 terms: 1e-12 relative
# to the largest magnitude is far above that and far below any real bug.
F64_TOL = 1e-12


def _inputs(B=1, H=2, Hkv=2, Nq=5, Nk=7, D=4, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D))
    k = rng.standard_normal((B, Hkv, Nk, D))
    v = rng.standard_normal((B, Hkv, Nk, D))
    do = rng.standard_normal((B, H, Nq, D))
    return q, k, v, do


def _torch_grads(q, k, v, do, **opts):
    t = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    mask = opts.pop("attn_mask", None)
    if mask is not None:
        mask = torch.tensor(mask)
    out = torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=mask, **opts)
    out.backward(torch.tensor(do))
    return [x.grad.numpy() for x in t]


def _assert_close(got, want):
    tol = F64_TOL * max(1.0, float(np.abs(want).max()))
    np.testing.assert_array_less(np.abs(got - want), tol)


SHAPES_AND_OPTIONS = {
    "plain": (dict(), dict()),
    "causal-square": (dict(Nq=6, Nk=6), dict(is_causal=True)),
    "causal-nq-gt-nk": (dict(Nq=8, Nk=5), dict(is_causal=True)),
    "causal-nq-lt-nk": (dict(Nq=3, Nk=9), dict(is_causal=True)),
    "gqa": (dict(H=4, Hkv=2), dict(enable_gqa=True)),
    "mqa-causal": (dict(H=3, Hkv=1, Nq=6, Nk=6), dict(enable_gqa=True, is_causal=True)),
    "scale": (dict(), dict(scale=0.37)),
}


@pytest.mark.parametrize("name", sorted(SHAPES_AND_OPTIONS))
def test_exact_path_matches_torch_autograd(name):
    shape, opts = SHAPES_AND_OPTIONS[name]
    q, k, v, do = _inputs(**shape)
    out, lse = tiled_attention(q, k, v, **opts, return_lse=True)
    grads = attention_backward(q, k, v, out, lse, do, **opts)
    for got, want in zip(grads, _torch_grads(q, k, v, do, **opts)):
        assert got.shape == want.shape
        _assert_close(got, want)


def test_exact_path_with_bool_and_additive_masks():
    q, k, v, do = _inputs(Nq=4, Nk=6)
    rng = np.random.default_rng(3)
    allowed = rng.random((1, 2, 4, 6)) < 0.6
    allowed[..., 0] = True  # every row sees a key: torch gives NaN otherwise
    additive = np.where(allowed, rng.standard_normal(allowed.shape), -np.inf)
    for mask in (allowed, additive):
        out, lse = tiled_attention(q, k, v, attn_mask=mask, return_lse=True)
        grads = attention_backward(q, k, v, out, lse, do, attn_mask=mask)
        for got, want in zip(grads, _torch_grads(q, k, v, do, attn_mask=mask)):
            _assert_close(got, want)


def test_exact_path_matches_oracle_with_fully_masked_rows():
    q, k, v, do = _inputs(Nq=4, Nk=5)
    mask = np.ones((1, 1, 4, 5), dtype=bool)
    mask[..., 2, :] = False  # row 2 sees nothing: its dq is 0 and it adds nothing to dk, dv
    out, lse = tiled_attention(q, k, v, attn_mask=mask, return_lse=True)
    grads = attention_backward(q, k, v, out, lse, do, attn_mask=mask)
    ref = oracle.attention(q, k, v, attn_mask=mask, dout=do)
    assert np.all(grads[0][:, :, 2] == 0.0)
    for got, want, err in zip(grads, (ref.dq, ref.dk, ref.dv), (ref.dq_err_bound, ref.dk_err_bound, ref.dv_err_bound)):
        assert np.all(np.abs(got - want) <= err + F64_TOL * np.abs(want).max())


def test_gqa_gradients_are_sums_over_the_group():
    q, k, v, do = _inputs(H=4, Hkv=2)
    grouped = attention_backward(q, k, v, *tiled_attention(q, k, v, enable_gqa=True, return_lse=True), do,
                                 enable_gqa=True)
    ke, ve = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    dq, dk, dv = attention_backward(q, ke, ve, *tiled_attention(q, ke, ve, return_lse=True), do)
    assert grouped[1].shape == k.shape and grouped[2].shape == v.shape
    _assert_close(grouped[0], dq)
    _assert_close(grouped[1], dk.reshape(1, 2, 2, 7, 4).sum(axis=2))
    _assert_close(grouped[2], dv.reshape(1, 2, 2, 7, 4).sum(axis=2))


def test_model_path_outputs_are_in_the_input_format_and_blocks_change_nothing():
    model = get_model("fa2+gpu", "bf16")
    q, k, v, do = (from_float64(a, "bf16") for a in _inputs(Nq=9, Nk=11))
    out, lse = tiled_attention(q, k, v, is_causal=True, model=model, return_lse=True)
    g1 = attention_backward(q, k, v, out, lse, do, is_causal=True, model=model, block_m=1, block_n=3)
    g2 = attention_backward(q, k, v, out, lse, do, is_causal=True, model=model)
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b)
        assert np.array_equal(round_to(a, "bf16"), a)
    exact = attention_backward(q, k, v, *tiled_attention(q, k, v, is_causal=True, return_lse=True), do,
                               is_causal=True)
    assert any(not np.array_equal(a, b) for a, b in zip(g1, exact))  # the model does round


def test_validation_errors():
    q, k, v, do = _inputs()
    out, lse = tiled_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="out must have"):
        attention_backward(q, k, v, out[:, :, :3], lse, do)
    with pytest.raises(ValueError, match="do must have"):
        attention_backward(q, k, v, out, lse, do[..., :2])
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_backward(q, k, v, out, lse[..., :2], do)
    with pytest.raises(ValueError, match="lse contains NaN"):
        attention_backward(q, k, v, out, np.full_like(lse, np.nan), do)
    with pytest.raises(ValueError, match="do contains NaN at index"):
        attention_backward(q, k, v, out, lse, np.full_like(do, np.nan))
    with pytest.raises(ValueError, match="visible keys"):
        attention_backward(q, k, v, out, np.full_like(lse, -np.inf), do)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention_backward(q, k[:, :1], v[:, :1], out, lse, do)
    with pytest.raises(ValueError, match="block_m"):
        attention_backward(q, k, v, out, lse, do, block_m=0)
    with pytest.raises(TypeError, match="model must be"):
        attention_backward(q, k, v, out, lse, do, model="fa2")
    with pytest.raises(TypeError, match="NumPy array or torch tensor"):
        attention_backward(q, k, v, out, lse.tolist(), do)
    model = get_model("fa2", "fp16")
    q16, k16, v16 = (from_float64(a, "fp16") for a in (q, k, v))
    out16, lse16 = tiled_attention(q16, k16, v16, model=model, return_lse=True)
    with pytest.raises(ValueError, match="do .* not representable"):
        attention_backward(q16, k16, v16, out16, lse16, do, model=model)  # do is not fp16


def test_gradient_bound_validation():
    q, k, v, do = (from_float64(a, "fp16") for a in _inputs())
    model = get_model("fa2", "fp16")
    with pytest.raises(ValueError, match="keep=True"):
        gradient_bound(oracle.attention(q, k, v, dout=do), model, dout=do)
    ref = oracle.attention(q, k, v, keep=True, dout=do)
    with pytest.raises(TypeError, match="PrecisionModel"):
        gradient_bound(ref, "fa2", dout=do)
    with pytest.raises(ValueError, match="dout must have shape"):
        gradient_bound(ref, model, dout=do[..., :2])
    with pytest.raises(ValueError, match="out_target contains NaN"):
        gradient_bound(ref, model, dout=do, out_target=np.full(ref.out.shape, np.nan))
    with pytest.raises(ValueError, match="dout is required"):
        gradient_bound(ref, model, dout=None)


def test_gradient_bound_is_finite_and_covers_the_emulation():
    """A fixed smoke case (the property test fuzzes this)."""
    model = get_model("fa2+gpu", "fp16")
    q, k, v, do = (from_float64(a, "fp16") for a in _inputs(H=4, Hkv=2, Nq=6, Nk=6))
    out, lse = tiled_attention(q, k, v, is_causal=True, enable_gqa=True, model=model, return_lse=True)
    grads = attention_backward(q, k, v, out, lse, do, is_causal=True, enable_gqa=True, model=model)
    ref = oracle.attention(q, k, v, is_causal=True, enable_gqa=True, keep=True, dout=do)
    b = gradient_bound(ref, model, dout=do, out_target=out, lse_target=lse)
    b_fwd = gradient_bound(ref, model, dout=do)  # forward errors from the forward bound instead
    for got, want, bb, bf, e in zip(grads, (ref.dq, ref.dk, ref.dv), (b.dq, b.dk, b.dv),
                                    (b_fwd.dq, b_fwd.dk, b_fwd.dv),
                                    (ref.dq_err_bound, ref.dk_err_bound, ref.dv_err_bound)):
        assert np.isfinite(bb).all() and np.isfinite(bf).all()
        assert np.all(np.abs(got - want) <= bb + e)
        assert np.all(np.abs(got - want) <= bf + e)
