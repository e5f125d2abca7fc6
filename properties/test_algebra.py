"""Properties 2, 3, 4, 6: the NumPy algebra against the oracle.

Every comparison is against the certified oracle within the bound derived
from the precision model the emulation follows (verify/bounds.py), never
against a fixed tolerance.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from flashcheck.kernels import numpy_attention as na
from flashcheck.kernels.models import get_model
from flashcheck.properties import strategies as fs
from flashcheck.properties._support import assert_within, models
from flashcheck.properties.case import Case
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound

pytestmark = pytest.mark.fuzz

REGRESSIONS = Path(__file__).parent / "regressions"

SMALL = dict(max_seq=48, max_scores=2**12, max_batch=2, max_heads=4)


def _opts(case):
    return dict(attn_mask=case.attn_mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa)


@st.composite
def case_and_model(draw, online_only=False, **kw):
    case = draw(fs.cases(block_kind="numpy", **{**SMALL, **kw}))
    model = draw(models(case.dtype, online_only=online_only))
    return case, model


@given(case_and_model())
# Found by this property: tf32 rounding of subnormal fp32 inputs is an
# absolute error, which the bound first treated as relative.
@example((Case.load(REGRESSIONS / "tf32-subnormal-inputs.npz"), get_model("fp32-tf32", "fp32")))
def test_tiled_attention_matches_oracle_within_bound(args):
    """Property 6, for every precision model (the math backend's too), tile
    size and mask."""
    case, model = args
    ref = oracle.attention_case(case, keep=True)
    b = attention_bound(ref, model, attn_mask=case.attn_mask, block_n=case.block_n)
    try:
        out, lse = na.tiled_attention(case.q, case.k, case.v, **_opts(case), block_m=case.block_m,
                                      block_n=case.block_n, model=model, return_lse=True)
    except ValueError:
        # Only where the model itself overflows (e.g. tf32 rounding of fp32's
        # largest values) may the emulation refuse; the bound must say so.
        assert not np.isfinite(b.out).all(), "emulation failed on a case the model covers"
        event("model overflows: not applicable")
        return
    assert_within(f"tiled/{model.name}/{case.dtype}", out, ref.out, b.out + ref.err_bound, case=case)
    lse_ref = np.where(np.isneginf(ref.lse), 0.0, ref.lse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref.lse)), "LSE is -inf exactly on fully masked rows"
    assert_within(f"tiled-lse/{model.name}/{case.dtype}", np.where(np.isneginf(lse), 0.0, lse), lse_ref,
                  b.lse + ref.lse_err_bound, case=case)


@st.composite
def partitions(draw, nk):
    """A partition of range(nk) into 1..4 parts (possibly empty), in a drawn order."""
    parts = draw(st.integers(1, 4))
    owner = draw(st.lists(st.integers(0, parts - 1), min_size=nk, max_size=nk))
    order = draw(st.permutations(range(parts)))
    return [np.flatnonzero(np.asarray(owner, dtype=np.int64) == p) for p in order]


@given(case_and_model(online_only=True), st.data())
def test_split_kv_matches_oracle_within_bound(args, data):
    """Property 3: any partition of the keys, merged in any order."""
    case, model = args
    parts = data.draw(partitions(case.k.shape[2]))
    ref = oracle.attention_case(case, keep=True)
    b = attention_bound(ref, model, attn_mask=case.attn_mask, partition=parts)
    try:
        out = na.split_kv_attention(case.q, case.k, case.v, parts, **_opts(case), block_n=case.block_n, model=model)
    except ValueError:
        assert not np.isfinite(b.out).all(), "emulation failed on a case the model covers"
        event("model overflows: not applicable")
        return
    assert_within(f"split/{model.name}", out, ref.out, b.out + ref.err_bound, case=case)


@given(case_and_model(online_only=True), st.data())
def test_merge_is_associative_commutative_with_identity(args, data):
    """Property 2: on partial states of three key sets; the finalized results
    of every bracketing and order agree with the oracle within the split
    bound, and merging the empty state changes nothing at all."""
    case, model = args
    nk = case.k.shape[2]
    parts = data.draw(partitions(nk).filter(lambda p: len(p) == 3) | st.just(None))
    if parts is None:
        cut = sorted(data.draw(st.lists(st.integers(0, nk), min_size=2, max_size=2)))
        parts = [np.arange(0, cut[0]), np.arange(cut[0], cut[1]), np.arange(cut[1], nk)]
    ref = oracle.attention_case(case, keep=True)
    bound = attention_bound(ref, model, attn_mask=case.attn_mask, partition=parts).out + ref.err_bound
    try:
        a, b, c = (na.partial_state(case.q, case.k, case.v, p, **_opts(case), block_n=case.block_n, model=model)
                   for p in parts)
    except ValueError:
        # As in the tiled property: only where the model overflows.
        assert not np.isfinite(bound).all(), "emulation failed on a case the model covers"
        event("model overflows: not applicable")
        return
    merge = lambda x, y: na.merge(x, y, model=model)  # noqa: E731
    results = {
        "(ab)c": merge(merge(a, b), c),
        "a(bc)": merge(a, merge(b, c)),
        "(ba)c": merge(merge(b, a), c),
        "c(ab)": merge(c, merge(a, b)),
    }
    for name, state in results.items():
        out, _ = na.finalize(state, model=model)
        assert_within(f"merge {name}/{model.name}", out, ref.out, bound, case=case)
    empty = na.empty_state(a.m.shape[:-1], a.m.shape[-1], a.o.shape[-1])
    for x in (a, b, c):
        for y in (merge(x, empty), merge(empty, x)):
            assert np.array_equal(y.m, x.m) and np.array_equal(y.l, x.l) and np.array_equal(y.o, x.o), \
                "the empty state must be an exact identity of merge"


@given(case_and_model(), st.data())
def test_key_permutation_invariance(args, data):
    """Property 4: permuting K, V and the mask's key axis together."""
    case, model = args
    nk = case.k.shape[2]
    perm = np.asarray(data.draw(st.permutations(range(nk))), dtype=np.int64)
    B, H, Nq, _ = case.q.shape
    # Causality is a mask over key positions: make it explicit before permuting.
    if case.is_causal:
        mask = np.tril(np.ones((Nq, nk), dtype=bool))
    elif case.attn_mask is not None:
        mask = np.broadcast_to(case.attn_mask, case.attn_mask.shape[:-1] + (nk,))
    else:
        mask = None
    permuted = case.replace(k=case.k[:, :, perm], v=case.v[:, :, perm], is_causal=False,
                            attn_mask=None if mask is None else np.ascontiguousarray(mask[..., perm]))
    ref = oracle.attention_case(case, keep=True)
    ref_p = oracle.attention_case(permuted, keep=True)
    kw = dict(block_m=case.block_m, block_n=case.block_n, model=model)
    b = attention_bound(ref, model, attn_mask=case.attn_mask).out
    b_p = attention_bound(ref_p, model, attn_mask=permuted.attn_mask).out
    try:
        out = na.tiled_attention(case.q, case.k, case.v, **_opts(case), **kw)
        out_p = na.tiled_attention(permuted.q, permuted.k, permuted.v, **_opts(permuted), **kw)
    except ValueError:
        assert not np.isfinite(b).all(), "emulation failed on a case the model covers"
        event("model overflows: not applicable")
        return
    assert_within(f"permutation/{model.name}", out_p, out, b + b_p + ref.err_bound + ref_p.err_bound, case=case)
