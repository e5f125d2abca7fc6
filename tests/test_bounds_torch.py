"""The error bounds on torch float64 tensors, and their row locality.

`attention_bound` and `gradient_bound` are one source for NumPy and torch
(`flashcheck.verify._xp`): a ref whose s, p, q, k, v are torch tensors must
give the NumPy ref's bounds to float64 rounding (torch may sum in another
order), as host NumPy arrays. The forward bound is row-local: the bound of
query rows i0:i1 alone equals those rows of the whole case's bound, which
is what lets a long case be bounded tile by tile on a GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashcheck.kernels.models import MODELS_FOR_DTYPE, get_model  # noqa: E402
from flashcheck.kernels.precision import format_of, from_float64  # noqa: E402
from flashcheck.properties.case import Case  # noqa: E402
from flashcheck.properties.grads import DoDealer, with_output_gradient  # noqa: E402
from flashcheck.properties.plans import (  # noqa: E402
    CHOICE_MAX,
    N_CHOICES,
    PlanDealer,
    case_from_plan,
    feature_values,
)
from flashcheck.verify import bounds as bounds_mod  # noqa: E402
from flashcheck.verify.bounds import attention_bound, rescale_counts  # noqa: E402
from flashcheck.verify.grad_bounds import gradient_bound  # noqa: E402
from flashcheck.verify.oracle import attention, attention_case  # noqa: E402

RTOL = 1e-12
# The LSE bound's core is log(sum_j P_j e^{e_j}) with the sum ~ 1: summed in
# another order its float64 value moves by a few ulps of 1 (absolute), which
# is ~1e-10 relative to a bound of ~1e-6. Both libraries' values are equally
# good; this is the evaluation's own resolution, not a difference of formula.
LSE_ATOL = 8 * np.finfo(np.float64).eps
# The gradient bound reads X = dO V^T - rowsum(dO O), a cancelling difference
# whose float64 value depends on the matmul's summation order (the bound
# charges that explicitly, gamma_{Dv+2}(2^-53) of the magnitudes); where
# |X| is small the bounds of the two libraries agree to ~1e-11 relative.
GRAD_RTOL = 1e-10
# Row locality holds formula by formula; the float64 values of a row may
# differ in the last bits when a matrix product has fewer rows.
ROW_RTOL = 1e-14


def _cases(n, seed, max_scores=2**10):
    """``n`` generated cases with an output gradient (dealt over every feature)
    and their oracle results; cases the oracle declines (NaN inputs) skipped."""
    dealer, dos = PlanDealer(feature_values(), seed=seed), DoDealer(seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        case = case_from_plan(dealer.deal(), rng.integers(0, CHOICE_MAX + 1, N_CHOICES), block_kind="numpy",
                              max_scores=max_scores)
        try:
            case = with_output_gradient(case, dos.deal())
            out.append((case, attention_case(case, keep=True, with_grad=True)))
        except ValueError:
            continue
    return out


def _hand_case():
    """GQA, Nq != Nk, an additive bf16 mask with a fully masked row (and one
    -inf key), bf16 inputs."""
    rng = np.random.default_rng(7)
    fmt = "bf16"
    q, k, v, do = (from_float64(rng.standard_normal(shape), fmt) for shape in
                   ((1, 4, 5, 16), (1, 2, 9, 16), (1, 2, 9, 8), (1, 4, 5, 8)))
    mask = rng.standard_normal((1, 1, 5, 9)) * 3
    mask[..., 2, :] = -np.inf
    mask[..., 0, 3] = -np.inf
    case = Case(q=q, k=k, v=v, attn_mask=from_float64(mask, fmt), enable_gqa=True, do=do, mask_kind="additive")
    return case, attention_case(case, keep=True, with_grad=True)


N_GENERATED = 14  # two rounds of the mask deck, more than one of every other feature
_CASES = None


def _all_cases():
    global _CASES
    if _CASES is None:
        _CASES = _cases(N_GENERATED, seed=3) + [_hand_case()]
    return _CASES


def _torch_ref(ref):
    """The ref with its large intermediates as torch float64 CPU tensors (out,
    lse and the certified errors stay NumPy, as a GPU caller may pass them)."""
    return dataclasses.replace(ref, **{n: torch.from_numpy(getattr(ref, n)) for n in ("s", "p", "q", "k", "v")})


def _close(a, b, what, atol=0.0, rtol=RTOL):
    assert isinstance(b, np.ndarray), f"{what}: torch path returned {type(b).__name__}, expected a NumPy array"
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype == bool:
        np.testing.assert_array_equal(a, b, err_msg=what)
        return
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what)
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b), err_msg=what)
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=what)
    fin = np.isfinite(a)
    np.testing.assert_allclose(b[fin], a[fin], rtol=rtol, atol=atol, err_msg=what)


def _close_terms(a, b, what, rtol=RTOL):
    assert a.keys() == b.keys()
    for key in a:
        assert isinstance(b[key], (int, float)), (what, key, type(b[key]))
        _close(np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float), f"{what} terms[{key}]",
               rtol=rtol, atol=LSE_ATOL if key == "saved_lse" else 0.0)


def _models(case):
    fmt = format_of(case.q.dtype).name
    return [get_model(name, fmt) for name in MODELS_FOR_DTYPE[fmt]]


@pytest.mark.parametrize("index", range(N_GENERATED + 1))
def test_torch_bounds_match_numpy(index):
    case, ref = _all_cases()[index]
    tref = _torch_ref(ref)
    nk = case.k.shape[-2]
    mask_t = None if case.attn_mask is None else torch.from_numpy(np.asarray(case.attn_mask, dtype=np.float64)
                                                                  if case.attn_mask.dtype != bool else case.attn_mask)
    for model in _models(case):
        what = f"{model.name} {case.q.shape}/{case.k.shape} mask={case.mask_kind}"
        a = attention_bound(ref, model, attn_mask=case.attn_mask, block_n=case.block_n)
        # The mask as a NumPy array of the input dtype once, as a tensor once.
        for mask in (case.attn_mask, mask_t):
            b = attention_bound(tref, model, attn_mask=mask, block_n=case.block_n)
            for field in ("out", "lse", "fallback"):
                _close(getattr(a, field), getattr(b, field), f"{what} forward {field}",
                       atol=LSE_ATOL if field == "lse" else 0.0)
            _close_terms(a.terms, b.terms, what)
        if model.softmax == "online" and nk > 1:
            parts = [np.arange(0, nk, 2), np.arange(1, nk, 2)]
            a = attention_bound(ref, model, attn_mask=case.attn_mask, partition=parts)
            b = attention_bound(tref, model, attn_mask=case.attn_mask, partition=parts)
            _close(a.out, b.out, f"{what} split-KV out")
            _close(a.lse, b.lse, f"{what} split-KV lse", atol=LSE_ATOL)
        targets = [{}]
        if model.softmax == "online":
            targets.append({"out_target": from_float64(ref.out, case.q.dtype),
                            "lse_target": torch.from_numpy(ref.lse.astype(np.float32))})
        for kw in targets:
            ga = gradient_bound(ref, model, dout=case.do, attn_mask=case.attn_mask, **kw)
            gb = gradient_bound(tref, model, dout=torch.from_numpy(case.do.astype(np.float32)),
                                attn_mask=case.attn_mask, **kw)
            for field in ("dq", "dk", "dv"):
                _close(getattr(ga, field), getattr(gb, field), f"{what} gradient {field} {sorted(kw)}",
                       rtol=GRAD_RTOL)
            _close_terms(ga.terms, gb.terms, what, rtol=GRAD_RTOL)


def _row_slice(ref, mask, i0, i1):
    rows = {n: getattr(ref, n)[..., i0:i1, :] for n in ("s", "p", "q", "out", "err_bound")}
    rows["lse"] = ref.lse[..., i0:i1]
    if mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
        mask = mask[..., i0:i1, :]
    return dataclasses.replace(ref, **rows), mask


def _check_row_local(case, ref, splits, to_torch=False):
    nq, nk = case.q.shape[-2], case.k.shape[-2]
    cuts = [0, *sorted(set(splits)), nq]
    for model in _models(case):
        parts = [None]
        if model.softmax == "online" and nk > 2:
            parts.append([np.arange(0, nk // 3), np.arange(nk // 3, nk)])
        for partition in parts:
            full = attention_bound(_torch_ref(ref) if to_torch else ref, model, attn_mask=case.attn_mask,
                                   block_n=case.block_n, partition=partition)
            for i0, i1 in zip(cuts, cuts[1:]):
                if i0 == i1:
                    continue
                sub, mask = _row_slice(ref, case.attn_mask, i0, i1)
                part = attention_bound(_torch_ref(sub) if to_torch else sub, model, attn_mask=mask,
                                       block_n=case.block_n, partition=partition)
                what = f"{model.name} rows {i0}:{i1} of {nq}, mask={case.mask_kind}, split={partition is not None}"
                # Equal up to the last bits of matrix products (BLAS rounds a product
                # of fewer rows differently); the inf / fallback pattern exactly.
                _close(full.out[..., i0:i1, :], part.out, what, rtol=ROW_RTOL)
                _close(full.lse[..., i0:i1], part.lse, what, rtol=ROW_RTOL, atol=LSE_ATOL)
                np.testing.assert_array_equal(part.fallback, full.fallback[..., i0:i1], err_msg=what)


@pytest.mark.parametrize("index", range(N_GENERATED + 1))
def test_forward_bound_is_row_local(index):
    case, ref = _all_cases()[index]
    nq = case.q.shape[-2]
    _check_row_local(case, ref, [1, nq // 2, nq - 1] if nq > 2 else [1])


def test_row_local_causal_gqa_blocked(monkeypatch):
    """Causal GQA with Nq != Nk, the centred sum evaluated in several row
    blocks: rows alone equal rows of the whole, NumPy and torch."""
    rng = np.random.default_rng(11)
    q = from_float64(rng.standard_normal((2, 4, 13, 32)), "fp16")
    k = from_float64(rng.standard_normal((2, 2, 21, 32)), "fp16")
    v = from_float64(rng.standard_normal((2, 2, 21, 16)), "fp16")
    case = Case(q=q, k=k, v=v, is_causal=True, enable_gqa=True, block_n=16, mask_kind="causal")
    ref = attention_case(case, keep=True)
    monkeypatch.setattr(bounds_mod, "_BLOCK_ELEMENTS", 2 * 4 * 21 * 3)  # three rows per block
    _check_row_local(case, ref, [1, 5, 6, 12])
    _check_row_local(case, ref, [4, 9], to_torch=True)


def test_centred_sum_blocks_and_coarse_form(monkeypatch):
    """The blocked exact centred sum equals the one-block one; above
    CENTRED_ROW_WORK the coarse |V| + |O| form is used, on both libraries."""
    case, ref = _cases(1, seed=5)[0]
    model = get_model("math" if case.q.dtype == np.float32 else "fa2", format_of(case.q.dtype).name)
    whole = attention_bound(ref, model, attn_mask=case.attn_mask)
    monkeypatch.setattr(bounds_mod, "_BLOCK_ELEMENTS", 1)
    blocked = attention_bound(ref, model, attn_mask=case.attn_mask)
    np.testing.assert_array_equal(whole.out, blocked.out)
    monkeypatch.setattr(bounds_mod, "CENTRED_ROW_WORK", 0)
    coarse = attention_bound(ref, model, attn_mask=case.attn_mask)
    coarse_t = attention_bound(_torch_ref(ref), model, attn_mask=case.attn_mask)
    _close(coarse.out, coarse_t.out, "coarse centred sum")
    fin = np.isfinite(whole.out)
    assert np.all(coarse.out[fin] >= whole.out[fin])


def test_rescale_counts_torch():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 7, 40))
    s[..., 5] = -np.inf
    tol = np.full(s.shape[:-1], 0.3)
    a = rescale_counts(s, tol)
    b = rescale_counts(torch.from_numpy(s), torch.from_numpy(tol))
    assert b.dtype == torch.int64
    np.testing.assert_array_equal(a, b.numpy())
    parts = [np.arange(0, 40, 3), np.arange(1, 40, 3), np.arange(2, 40, 3)]
    np.testing.assert_array_equal(rescale_counts(s, tol, parts),
                                  rescale_counts(torch.from_numpy(s), torch.from_numpy(tol), parts).numpy())


def test_bad_inputs_name_the_fix():
    rng = np.random.default_rng(1)
    q, k, v, do = (rng.standard_normal((1, 1, 4, 8)).astype(np.float16) for _ in range(4))
    model = get_model("fa2", "fp16")
    plain = attention(q, k, v)
    with pytest.raises(ValueError, match="keep=True"):
        attention_bound(plain, model)
    with pytest.raises(ValueError, match="keep=True"):
        gradient_bound(plain, model, dout=do)
    ref = attention(q, k, v, keep=True, dout=do)
    tref = _torch_ref(ref)
    with pytest.raises(TypeError, match="PrecisionModel"):
        attention_bound(tref, "fa2")
    with pytest.raises(ValueError, match="dout must have shape"):
        gradient_bound(tref, model, dout=torch.zeros(1, 1, 3, 8))
    with pytest.raises(ValueError, match="dout contains NaN"):
        gradient_bound(tref, model, dout=np.full((1, 1, 4, 8), np.nan))
    with pytest.raises(TypeError, match="dout must be a NumPy array or torch tensor"):
        gradient_bound(tref, model, dout=[[0.0]])
