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
    old = oracle.attention(q, k, v)  # fp32 target
    assert old.mp_rows > 0 and old.certified
    r = oracle.attention_case(Case(q, k, v))
    assert r.rtol_target == 1e-3 * 2.0**-11
    assert r.certified and r.mp_rows < old.mp_rows
    assert oracle.crosscheck(r, q, k, v, rows=6).ok
    # an explicit target wins
    assert oracle.attention_case(Case(q, k, v), rtol_target=oracle.DEFAULT_RTOL_TARGET).mp_rows == old.mp_rows
