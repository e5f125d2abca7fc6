"""The oracle's escalation tiers: the per-format certification target of
`attention_case` (`case_rtol_target`) and the compensated-logit tier that
certifies large-logit rows before the multiple-precision path."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from flashcheck.properties.case import Case
from flashcheck.verify import oracle


def big_common(seed, dtype, B=1, H=2, Nq=24, Nk=24, D=16, mag=200.0, spread=20.0):
    """q, k with a large common component (logits ~ D mag**2 scale), v normal."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(D) * mag
    q = (base + rng.standard_normal((B, H, Nq, D)) * spread).astype(dtype)
    k = (base + rng.standard_normal((B, H, Nk, D)) * spread).astype(dtype)
    v = rng.standard_normal((B, H, Nk, D)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize(("dtype", "u"), [(np.float16, 2.0**-11), (ml_dtypes.bfloat16, 2.0**-8),
                                          (np.float32, 2.0**-24), (np.float64, 2.0**-53)])
def test_case_rtol_target_per_format(dtype, u):
    assert oracle.case_rtol_target(np.dtype(dtype)) == max(1e-3 * u, oracle.MIN_RTOL_TARGET)
    q = np.zeros((1, 1, 2, 4), dtype)
    assert oracle.case_rtol_target(Case(q, q, q)) == max(1e-3 * u, oracle.MIN_RTOL_TARGET)


def test_fp16_case_default_needs_fewer_mp_rows():
    q, k, v = big_common(0, np.float16)
    old = oracle.attention(q, k, v, refine=False)  # fp32 target, float pass and mpmath only
    assert old.mp_rows > 0 and old.certified
    r = oracle.attention_case(Case(q, k, v))
    assert r.rtol_target == 1e-3 * 2.0**-11
    assert r.certified and r.mp_rows < old.mp_rows
    assert oracle.crosscheck(r, q, k, v, rows=6).ok
    # an explicit target wins
    assert oracle.attention_case(Case(q, k, v), rtol_target=oracle.DEFAULT_RTOL_TARGET,
                                 refine=False).mp_rows == old.mp_rows


def assert_within(a, b):
    for name, bound in (("out", "err_bound"), ("lse", "lse_err_bound")):
        x, y = getattr(a, name), getattr(b, name)
        with np.errstate(invalid="ignore"):
            ok = (x == y) | (np.abs(x - y) <= getattr(a, bound) + getattr(b, bound))
        assert ok.all(), (name, np.argwhere(~ok)[:3])


@pytest.mark.parametrize(("mag", "spread"), [(100.0, 10.0), (1000.0, 100.0)])  # logits ~6e4, ~6e6
def test_refined_tier_certifies_large_offset_rows(mag, spread):
    q, k, v = big_common(1, np.float32, Nq=16, Nk=40, D=64, mag=mag, spread=spread)
    old = oracle.attention(q, k, v, refine=False)
    assert old.mp_rows > 0 and old.refined_rows == 0
    r = oracle.attention(q, k, v)
    assert r.certified and r.refined_rows > 0 and r.mp_rows < old.mp_rows
    assert r.refined_rows + r.mp_rows == old.mp_rows
    rep = oracle.crosscheck(r, q, k, v, rows=32)  # every row, at 256 bits
    assert rep.ok and len(rep.rows) == 32, rep.failures[:3]
    assert_within(r, old)
    t = oracle.attention(q, k, v, device="cpu", tile_rows=5)
    assert t.refined_rows == r.refined_rows and t.certified
    assert_within(r, t)


def test_refined_tier_all_negative_logits_with_masks():
    q, k, v = big_common(2, np.float32, Nq=12, Nk=30, D=32, mag=200.0, spread=20.0)
    k = -k  # logits ~ -1e5
    rng = np.random.default_rng(3)
    add = rng.standard_normal((12, 30)) * 1e3
    add[rng.random(add.shape) < 0.3] = -np.inf
    for kw in ({"is_causal": True}, {"attn_mask": add}, {"attn_mask": add > 0}):
        r = oracle.attention(q, k, v, keep=True, **kw)
        assert r.certified and r.refined_rows > 0, kw
        assert oracle.crosscheck(r, q, k, v, rows=24, **kw).ok, kw
        t = oracle.attention(q, k, v, device="cpu", **kw)
        assert_within(r, t)
        # the kept P of refined rows is the refined one
        assert np.allclose(np.nansum(r.p, axis=-1)[r.lse > -np.inf], 1.0)


def test_beyond_the_tier_goes_to_mpmath():
    """Cancelling products of 2**40: logits ~1 but sum |q_k k_k| ~ 2**81,
    out of reach of doubled precision too."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 1, 6, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 9, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 9, 16)).astype(np.float32)
    q[..., :2], k[..., 0], k[..., 1] = 2.0**40, 2.0**40, -(2.0**40)
    r = oracle.attention(q, k, v)
    assert r.mp_rows == 6 and r.refined_rows == 0 and r.certified
    assert oracle.crosscheck(r, q, k, v, rows=6).ok


def test_float64_inputs_skip_the_tier_and_dout_sends_rows_to_mpmath():
    q, k, v = big_common(5, np.float32, Nq=6, Nk=8, D=16, mag=300.0, spread=30.0)
    r64 = oracle.attention(q.astype(np.float64), k.astype(np.float64), v)
    assert r64.refined_rows == 0 and r64.mp_rows > 0 and r64.certified
    dout = np.ones(q.shape, np.float32)
    rg = oracle.attention(q, k, v, dout=dout)
    assert rg.refined_rows == 0 and rg.mp_rows > 0 and rg.certified
