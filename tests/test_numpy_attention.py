"""Tests of the NumPy flash-attention algebra and its precision emulation.

The reference is a direct float64 softmax(Q K^T scale + mask) V written
here, sharing no code with the module under test.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from flashcheck.kernels.numpy_attention import (
    State,
    attention_1pass,
    empty_state,
    finalize,
    merge,
    partial_state,
    softmax_3pass,
    softmax_online,
    split_kv_attention,
    tiled_attention,
)
from flashcheck.kernels.precision import PrecisionModel, round_to

# -- the direct reference ------------------------------------------------------


def direct_softmax(x, axis=-1):
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    m = x.max(axis=-1, keepdims=True)
    dead = m == -np.inf
    e = np.exp(x - np.where(dead, 0.0, m))
    y = np.where(dead, 0.0, e / np.where(dead, 1.0, e.sum(axis=-1, keepdims=True)))
    return np.moveaxis(y, -1, axis)


def direct_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(Q K^T scale + mask) V and its LSE in float64, GQA by repeating heads."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask.astype(np.float64)
    m = s.max(axis=-1, keepdims=True)
    dead = m == -np.inf
    e = np.exp(s - np.where(dead, 0.0, m))
    total = e.sum(axis=-1, keepdims=True)
    out = np.where(dead, 0.0, np.einsum("bhij,bhjd->bhid", e, v) / np.where(dead, 1.0, total))
    with np.errstate(divide="ignore"):
        lse = np.where(dead, -np.inf, m + np.log(np.where(dead, 1.0, total)))[..., 0]
    return out, lse


def rel_err(x, ref):
    return np.abs(x - ref).max() / np.abs(ref).max()


def make_qkv(rng, B=2, H=2, Hkv=2, Nq=13, Nk=17, D=8, Dv=None, dtype=np.float64):
    q = rng.standard_normal((B, H, Nq, D))
    k = rng.standard_normal((B, Hkv, Nk, D))
    v = rng.standard_normal((B, Hkv, Nk, D if Dv is None else Dv))
    return tuple(a.astype(dtype) for a in (q, k, v))


# Each config: keyword arguments of make_qkv, and a function of (rng, shapes) giving SDPA options.
CONFIGS = {
    "plain": (dict(), lambda rng, s: {}),
    "causal_nq_lt_nk": (dict(Nq=9, Nk=23), lambda rng, s: {"is_causal": True}),
    "causal_nq_gt_nk": (dict(Nq=23, Nk=9), lambda rng, s: {"is_causal": True}),
    "bool_mask_2d": (dict(), lambda rng, s: {"attn_mask": rng.random((s["Nq"], s["Nk"])) < 0.7}),
    "bool_mask_4d": (dict(), lambda rng, s: {"attn_mask": rng.random((2, 1, s["Nq"], s["Nk"])) < 0.5}),
    "additive_mask": (
        dict(),
        lambda rng, s: {"attn_mask": np.where(rng.random((1, 2, 1, s["Nk"])) < 0.3, -np.inf,
                                              rng.standard_normal((1, 2, 1, s["Nk"])))},
    ),
    "gqa": (dict(H=4, Hkv=2), lambda rng, s: {"enable_gqa": True}),
    "mqa_causal": (dict(H=3, Hkv=1), lambda rng, s: {"enable_gqa": True, "is_causal": True}),
    "batch3_dv_ne_d": (dict(B=3, D=8, Dv=5), lambda rng, s: {"scale": 0.3}),
}


def setup_case(name, seed=0):
    shape_kw, options = CONFIGS[name]
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, **shape_kw)
    opts = options(rng, {"Nq": q.shape[2], "Nk": k.shape[2]})
    return q, k, v, opts


def run_variant(variant, q, k, v, opts):
    if variant == "1pass":
        return attention_1pass(q, k, v, **opts, return_lse=True)
    if variant.startswith("tiled"):
        bm, bn = (int(t) for t in variant.split("_")[1:])
        return tiled_attention(q, k, v, **opts, block_m=bm, block_n=bn, return_lse=True)
    nk = k.shape[2]
    if variant == "split_sizes":
        return split_kv_attention(q, k, v, [5, 0, nk - 5], order=[2, 0, 1], block_n=3, **opts,
                                  return_lse=True)
    perm = np.random.default_rng(1).permutation(nk)
    parts = [perm[:4], perm[4:11], perm[11:]]
    return split_kv_attention(q, k, v, parts, order=[1, 2, 0], block_n=2, **opts, return_lse=True)


VARIANTS = ["1pass", "tiled_64_64", "tiled_1_1", "tiled_3_3", "tiled_7_7", "tiled_5_1000", "tiled_1000_7",
            "split_sizes", "split_indices"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_exact_variants_match_direct(variant, config):
    q, k, v, opts = setup_case(config)
    out, lse = run_variant(variant, q, k, v, opts)
    ref, ref_lse = direct_attention(q, k, v, **opts)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert rel_err(out, ref) < 1e-12
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-12


def test_torch_inputs_equal_numpy_inputs():
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, dtype=np.float32)
    mask = rng.random((13, 17)) < 0.6
    model = PrecisionModel()
    from_numpy = tiled_attention(q, k, v, attn_mask=mask, model=model, block_n=5)
    from_torch = tiled_attention(*(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch.from_numpy(mask),
                                 model=model, block_n=5)
    np.testing.assert_array_equal(from_numpy, from_torch)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_low_precision_inputs_are_read_exactly(dtype):
    rng = np.random.default_rng(6)
    q, k, v = make_qkv(rng, dtype=dtype)
    ref, _ = direct_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert rel_err(tiled_attention(q, k, v, block_n=4), ref) < 1e-12


# -- softmax -------------------------------------------------------------------


@pytest.mark.parametrize("softmax", [softmax_3pass, softmax_online])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_matches_direct(softmax, axis):
    x = np.random.default_rng(7).standard_normal((5, 6, 7)) * 4
    x[1, 2, :] = -np.inf  # a fully masked row along the last axis
    x[2, :, 3] = -np.inf
    x[3, 1, :] = -np.inf
    x[3, 1, 4] = 2.0  # one survivor
    y, ref = softmax(x, axis=axis), direct_softmax(x, axis=axis)
    assert not np.any(np.isnan(y))
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-15)
    if axis == -1:
        assert np.all(y[1, 2] == 0.0) and y[3, 1, 4] == 1.0


@pytest.mark.parametrize("softmax", [softmax_3pass, softmax_online])
def test_softmax_emulation_rounds(softmax):
    x = round_to(np.random.default_rng(8).standard_normal((64, 50)) * 3, "fp32")
    ref = direct_softmax(x)
    err32 = rel_err(softmax(x, model=PrecisionModel()), ref)
    y16 = softmax(x, model=PrecisionModel(p="bf16"))
    np.testing.assert_array_equal(round_to(y16, "bf16"), y16)  # outputs really are bf16 values
    assert 0 < err32 < 1e-6
    assert rel_err(y16, ref) > 100 * err32
    assert rel_err(softmax(x, model=PrecisionModel(exp_impl="exp2")), ref) < 1e-6


def test_softmax_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        softmax_3pass(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        softmax_online(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="axis"):
        softmax_3pass(np.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="not representable"):
        softmax_3pass(np.array([0.1, 0.2]), model=PrecisionModel(logits="fp16"))
    with pytest.raises(TypeError, match="NumPy array"):
        softmax_online([1.0, 2.0])


# -- the state algebra ---------------------------------------------------------


def test_merge_equals_attention_over_union():
    rng = np.random.default_rng(9)
    q, k, v = make_qkv(rng, Nq=11, Nk=30)
    mask = rng.random((11, 30)) < 0.8
    a_keys, b_keys = np.array([3, 17, 5, 29, 0]), np.arange(8, 16)
    union = np.concatenate([a_keys, b_keys])
    merged = merge(partial_state(q, k, v, a_keys, attn_mask=mask, block_n=2),
                   partial_state(q, k, v, b_keys, attn_mask=mask, block_n=3))
    whole = partial_state(q, k, v, union, attn_mask=mask)
    out, lse = finalize(merged)
    out_whole, lse_whole = finalize(whole)
    # reference: direct attention with every key outside the union masked out
    only_union = mask & np.isin(np.arange(30), union)[None, :]
    ref, ref_lse = direct_attention(q, k, v, attn_mask=only_union)
    for o, ls in ((out, lse), (out_whole, lse_whole)):
        assert rel_err(o, ref) < 1e-12
        finite = np.isfinite(ref_lse)
        np.testing.assert_array_equal(np.isfinite(ls), finite)
        assert rel_err(ls[finite], ref_lse[finite]) < 1e-12


IDENTITY_MODELS = [None, PrecisionModel(p="bf16", exp_impl="exp2"), PrecisionModel(acc_rounding="zero")]


@pytest.mark.parametrize("model", IDENTITY_MODELS)
def test_empty_state_is_an_exact_identity(model):
    rng = np.random.default_rng(10)
    q, k, v = make_qkv(rng, D=4, Dv=3, dtype=np.float32)
    s = partial_state(q, k, v, slice(2, 12), is_causal=True, model=model)
    e = empty_state((2, 2), 13, 3)
    for merged in (merge(e, s, model), merge(s, e, model)):
        for field in ("m", "l", "o"):
            np.testing.assert_array_equal(getattr(merged, field), getattr(s, field))


def test_empty_merge_empty_is_empty_without_nan():
    e = empty_state((2,), 3, 4)
    for model in (None, PrecisionModel(exp_impl="exp2")):
        with np.errstate(all="raise"):  # not even a NaN in an intermediate
            z = merge(e, e, model)
            out, lse = finalize(z, model)
        assert np.all(z.m == -np.inf) and np.all(z.l == 0) and np.all(z.o == 0)
        assert np.all(out == 0) and np.all(lse == -np.inf)


def test_state_and_merge_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        State(np.zeros(3), np.zeros(4), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="State.o"):
        State(np.zeros(3), np.zeros(3), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="different shapes"):
        merge(empty_state((), 3, 2), empty_state((), 3, 5))
    with pytest.raises(TypeError, match="State"):
        merge(empty_state((), 3, 2), (1, 2, 3))
    with pytest.raises(ValueError, match="positive"):
        finalize(State(np.zeros(1), np.zeros(1), np.zeros((1, 1))))
    with pytest.raises(ValueError, match="non-negative"):
        empty_state((2,), -1, 3)


MASKED_MODELS = [None, PrecisionModel(), PrecisionModel(p="bf16", exp_impl="exp2", out="bf16")]


@pytest.mark.parametrize("model", MASKED_MODELS)
def test_fully_masked_rows_give_zero_and_minus_inf(model):
    rng = np.random.default_rng(11)
    q, k, v = make_qkv(rng, dtype=np.float32)
    bool_mask = rng.random((2, 2, 13, 17)) < 0.5
    bool_mask[0, 1, 4] = False
    bool_mask[1, 0, 0] = False
    additive = np.where(bool_mask, np.float32(0.5), np.float32(-np.inf)).astype(np.float32)
    ref, ref_lse = direct_attention(q, k, v, attn_mask=bool_mask)
    for mask in (bool_mask, additive):
        for out, lse in (
            tiled_attention(q, k, v, attn_mask=mask, block_n=4, model=model, return_lse=True),
            split_kv_attention(q, k, v, [3, 3, 11], attn_mask=mask, model=model, return_lse=True),
        ):
            assert not np.any(np.isnan(out)) and not np.any(np.isnan(lse))
            assert np.all(out[0, 1, 4] == 0) and np.all(out[1, 0, 0] == 0)
            assert lse[0, 1, 4] == -np.inf and lse[1, 0, 0] == -np.inf
            np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
            assert rel_err(out, ref) < (1e-12 if model is None else 2e-2)


# -- validation ----------------------------------------------------------------


def _qkv(dtype=np.float32, **kw):
    return make_qkv(np.random.default_rng(12), dtype=dtype, **kw)


def _bad_calls():
    q, k, v = _qkv()
    q4, k2, v2 = _qkv(H=4, Hkv=2)
    q3, k2b, v2b = _qkv(H=3, Hkv=2)
    return [
        ("rank", ValueError, lambda: tiled_attention(q[0], k[0], v[0])),
        ("batch sizes differ", ValueError, lambda: tiled_attention(q, k[:1], v[:1])),
        ("head dims differ", ValueError, lambda: tiled_attention(q, k[..., :4], v)),
        ("k and v shapes differ", ValueError, lambda: tiled_attention(q, k, v[:, :, :5])),
        ("agree in heads and length", ValueError, lambda: tiled_attention(q, k, v[:, :1], enable_gqa=True)),
        ("enable_gqa=True", ValueError, lambda: tiled_attention(q4, k2, v2)),
        ("multiple", ValueError, lambda: tiled_attention(q3, k2b, v2b, enable_gqa=True)),
        ("block_n", ValueError, lambda: tiled_attention(q, k, v, block_n=0)),
        ("block_m", ValueError, lambda: tiled_attention(q, k, v, block_m=-3)),
        ("block_n", TypeError, lambda: tiled_attention(q, k, v, block_n=2.0)),
        ("block_m", TypeError, lambda: tiled_attention(q, k, v, block_m=True)),
        ("unsupported dtype", ValueError, lambda: tiled_attention(q.astype(np.int32), k, v)),
        ("share one dtype", TypeError, lambda: tiled_attention(q, k.astype(np.float16), v)),
        ("broadcast", ValueError, lambda: tiled_attention(q, k, v, attn_mask=np.ones((13, 16), dtype=bool))),
        ("broadcast", ValueError,
         lambda: tiled_attention(q, k, v, attn_mask=np.ones((1, 1, 1, 13, 17), bool))),
        ("bool or the query dtype", TypeError,
         lambda: tiled_attention(q, k, v, attn_mask=np.ones((13, 17), np.int8))),
        ("query dtype", TypeError, lambda: tiled_attention(q, k, v, attn_mask=np.zeros((13, 17)))),
        ("NaN", ValueError,
         lambda: tiled_attention(q, k, v, attn_mask=np.full((13, 17), np.nan, np.float32))),
        ("finite and positive", ValueError, lambda: tiled_attention(q, k, v, scale=0.0)),
        ("finite and positive", ValueError, lambda: tiled_attention(q, k, v, scale=-1.0)),
        ("finite and positive", ValueError, lambda: tiled_attention(q, k, v, scale=float("inf"))),
        ("scale", TypeError, lambda: tiled_attention(q, k, v, scale="0.5")),
        ("mutually exclusive", ValueError,
         lambda: tiled_attention(q, k, v, attn_mask=np.ones((13, 17), bool), is_causal=True)),
        ("q contains NaN at index", ValueError, lambda: tiled_attention(np.where(q > 1, np.nan, q), k, v)),
        ("not representable", ValueError,
         lambda: tiled_attention(q, k, v, model=PrecisionModel(input="fp16"))),
        ("PrecisionModel", TypeError, lambda: tiled_attention(q, k, v, model="fp32")),
        ("NumPy array or torch", TypeError, lambda: tiled_attention(q.tolist(), k, v)),
        ("is_causal", TypeError, lambda: tiled_attention(q, k, v, is_causal=1)),
        ("cover each", ValueError, lambda: split_kv_attention(q, k, v, [np.arange(10), np.arange(9, 17)])),
        ("sum to", ValueError, lambda: split_kv_attention(q, k, v, [5, 5])),
        ("permutation", ValueError, lambda: split_kv_attention(q, k, v, [10, 7], order=[0, 0])),
        ("lie in", ValueError, lambda: partial_state(q, k, v, [0, 17])),
        ("repeated", ValueError, lambda: partial_state(q, k, v, [1, 1])),
        ("1-D", ValueError, lambda: partial_state(q, k, v, np.zeros((2, 2), dtype=int))),
        ("integers", TypeError, lambda: partial_state(q, k, v, np.array([0.0, 1.0]))),
    ]


BAD_CALLS = _bad_calls()


BAD_IDS = [f"{i}-{c[0]}" for i, c in enumerate(BAD_CALLS)]


@pytest.mark.parametrize("match, error, call", BAD_CALLS, ids=BAD_IDS)
def test_validation_errors(match, error, call):
    with pytest.raises(error, match=match):
        call()


# -- the emulation really rounds -----------------------------------------------


@pytest.fixture(scope="module")
def fp32_case():
    q, k, v = make_qkv(np.random.default_rng(13), B=1, H=2, Nq=48, Nk=64, D=32, dtype=np.float32)
    ref, ref_lse = direct_attention(q, k, v, is_causal=True)
    return q, k, v, ref, ref_lse


def test_precision_models_give_distinct_errors(fp32_case):
    q, k, v, ref, ref_lse = fp32_case
    out32, lse32 = tiled_attention(q, k, v, is_causal=True, block_n=16, model=PrecisionModel(),
                                   return_lse=True)
    out_bf16p = tiled_attention(q, k, v, is_causal=True, block_n=16, model=PrecisionModel(p="bf16"))
    err32, err_bf16p = rel_err(out32, ref), rel_err(out_bf16p, ref)
    assert 0 < err32 < 1e-6
    assert err_bf16p > 10 * err32
    assert 0 < rel_err(lse32, ref_lse) < 1e-6
    np.testing.assert_array_equal(round_to(lse32, "fp32"), lse32)

    # fp16 inputs and P: the reference is computed on the same (fp16) inputs.
    q16, k16, v16 = (a.astype(np.float16) for a in (q, k, v))
    ref16, _ = direct_attention(q16, k16, v16, is_causal=True)
    model16 = PrecisionModel(input="fp16", p="fp16", out="fp16")
    out16 = tiled_attention(q16, k16, v16, is_causal=True, block_n=16, model=model16)
    np.testing.assert_array_equal(round_to(out16, "fp16"), out16)
    err16 = rel_err(out16, ref16)
    assert err16 > 10 * err32
    assert err_bf16p > err16  # bf16 keeps 8 significand bits, fp16 11


def test_accumulator_format_and_rounding_mode_matter(fp32_case):
    q, k, v, ref, ref_lse = fp32_case
    base = PrecisionModel()
    out32 = tiled_attention(q, k, v, is_causal=True, model=base)
    out16acc = tiled_attention(q, k, v, is_causal=True, model=base.replace(qk_acc="fp16"))
    assert not np.array_equal(out16acc, out32)
    assert rel_err(out16acc, ref) > 10 * rel_err(out32, ref)
    tf32 = tiled_attention(q, k, v, is_causal=True, model=base.replace(tf32=True))
    assert rel_err(tf32, ref) > 10 * rel_err(out32, ref)
    # with P in bf16 (already tf32 values), tf32 can only act through the Q K^T operands
    bf16p = base.replace(p="bf16")
    assert not np.array_equal(tiled_attention(q, k, v, is_causal=True, model=bf16p.replace(tf32=True)),
                              tiled_attention(q, k, v, is_causal=True, model=bf16p))
    exp2, lse2 = tiled_attention(q, k, v, is_causal=True, model=base.replace(exp_impl="exp2"),
                                 return_lse=True)
    assert not np.array_equal(exp2, out32) and rel_err(exp2, ref) < 1e-6
    assert rel_err(lse2, ref_lse) < 1e-6  # converted back to natural log


def test_row_sum_uses_p_before_rounding_to_model_p(fp32_case):
    q, k, v, _, _ = fp32_case
    s32 = partial_state(q, k, v, slice(None), is_causal=True, block_n=16, model=PrecisionModel())
    s16 = partial_state(q, k, v, slice(None), is_causal=True, block_n=16, model=PrecisionModel(p="bf16"))
    # m and l never see model.p (FlashAttention-2 sums P in fp32); o does
    np.testing.assert_array_equal(s16.m, s32.m)
    np.testing.assert_array_equal(s16.l, s32.l)
    assert not np.array_equal(s16.o, s32.o)


def test_truncating_accumulation_is_biased():
    rng = np.random.default_rng(14)
    q, k, _ = make_qkv(rng, B=1, H=2, Nq=32, Nk=96, D=16, dtype=np.float32)
    v = rng.uniform(1.0, 2.0, size=(1, 2, 96, 16)).astype(np.float32)  # positive: P V only grows
    ref, _ = direct_attention(q, k, v)
    nearest = tiled_attention(q, k, v, block_n=32, model=PrecisionModel())
    zero = tiled_attention(q, k, v, block_n=32, model=PrecisionModel(acc_rounding="zero"))
    signed_nearest = np.mean((nearest - ref) / ref)
    signed_zero = np.mean((zero - ref) / ref)
    assert signed_zero < 0 and abs(signed_zero) > 5 * abs(signed_nearest)
    assert np.mean(zero < ref) > 0.9  # truncation pulls nearly every output down


def test_block_m_never_changes_numbers_and_1pass_is_block_n_1(fp32_case):
    q, k, v, _, _ = fp32_case
    model = PrecisionModel(p="bf16", exp_impl="exp2")
    outs = [tiled_attention(q, k, v, is_causal=True, block_m=bm, block_n=16, model=model)
            for bm in (1, 7, 64, 500)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_array_equal(attention_1pass(q, k, v, is_causal=True, model=model),
                                  tiled_attention(q, k, v, is_causal=True, block_n=1, model=model))
    # block_n changes the order of roundings, so the bits (not the accuracy) differ
    other = tiled_attention(q, k, v, is_causal=True, block_n=5, model=model)
    assert not np.array_equal(other, outs[0])


def test_split_kv_under_a_model_stays_close(fp32_case):
    q, k, v, ref, _ = fp32_case
    model = PrecisionModel()
    out = split_kv_attention(q, k, v, [20, 20, 24], order=[2, 1, 0], is_causal=True, block_n=8, model=model)
    assert 0 < rel_err(out, ref) < 1e-6


def test_state_values_lie_in_their_formats(fp32_case):
    q, k, v, _, _ = fp32_case
    model = PrecisionModel(logits="bf16", l_acc="fp16", pv_acc="bf16", exp="fp16", p="fp16")
    s = partial_state(q, k, v, np.arange(63, -1, -1), is_causal=True, block_n=9, model=model)
    for values, fmt in ((s.m, "bf16"), (s.l, "fp16"), (s.o, "bf16")):
        finite = values[np.isfinite(values)]
        np.testing.assert_array_equal(round_to(finite, fmt), finite)
    out, lse = finalize(s, model)
    np.testing.assert_array_equal(round_to(out, "fp32"), out)
    ref, ref_lse = direct_attention(q, k, v, is_causal=True)
    assert 1e-4 < rel_err(out, ref) < 0.1  # coarse formats: visibly wrong, still attention
