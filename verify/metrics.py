"""Error metrics of a target's output against the oracle's reference.

`compare` reports, for a target output in a low-precision format:
absolute, componentwise relative (with a floor), normwise relative, RMSE
(the FlashAttention-3 paper's metric), ULPs against the correctly rounded
reference and bits of error log2(ulps + 1) (Herbie's measure), and where
the NaNs and Infs are. `naive_attention` is the same-precision baseline of
FlashAttention's own tests, and `baseline_ratio` the rule they apply.

>>> import numpy as np
>>> ulp_distance(np.array([1.0]), np.array([1.0 + 2**-10]), "fp16").tolist()
[1]
>>> ulp_distance(np.array([-2**-24]), np.array([2**-24]), "fp16").tolist()  # across zero
[2]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from flashcheck.kernels.precision import format_of, round_to, to_float64
from flashcheck.verify._xp import NUMPY

__all__ = [
    "ROW_FLOOR_FRACTION",
    "Metrics",
    "baseline_ratio",
    "bits_of_error",
    "compare",
    "naive_attention",
    "ulp_distance",
]

#: Default floor of the relative error: 2**-10 of the row's largest |ref|
#: (and never below the format's smallest normal). Attention outputs of a
#: row share one scale; entries far below it come from cancellation, where
#: any kernel's error is an absolute error at the row's scale.
ROW_FLOOR_FRACTION = 2.0**-10
_MAX_POSITIONS = 5

_BITS = {"fp16": (np.uint16, 15), "bf16": (np.uint16, 15), "fp32": (np.uint32, 31), "fp64": (np.uint64, 63)}


def _ordinal(x: np.ndarray, fmt) -> np.ndarray:
    """Integers that number the values of ``fmt`` in order (-0 and +0 both
    0; +-inf one step beyond the largest finite value). ``x`` must be
    representable in ``fmt``."""
    fmt = format_of(fmt)
    if fmt.name not in _BITS:
        raise ValueError(f"ULPs need a storage format (fp16, bf16, fp32, fp64), got {fmt.name}")
    utype, sign_bit = _BITS[fmt.name]
    bits = np.ascontiguousarray(x.astype(fmt.storage)).view(utype)
    mag = (bits & utype((1 << sign_bit) - 1)).astype(object if fmt.name == "fp64" else np.int64)
    negative = (bits >> utype(sign_bit)).astype(bool)
    return np.where(negative, -mag, mag)


def ulp_distance(target, ref, fmt) -> np.ndarray:
    """Number of ``fmt`` values between ``target`` (representable in ``fmt``)
    and ``ref`` correctly rounded to ``fmt``: 0 when the target is the
    correctly rounded result. Exact across binades, zero and signs. NaN in
    either gives -1 (count those separately).

    >>> ulp_distance(np.array([2.0]), np.array([1.0]), "bf16").tolist()  # 2**7 bf16 values in [1, 2)
    [128]
    """
    fmt = format_of(fmt)
    t = to_float64(target)
    r = to_float64(ref)
    if t.shape != r.shape:
        raise ValueError(f"target shape {t.shape} differs from reference shape {r.shape}")
    nan = np.isnan(t) | np.isnan(r)
    t = np.where(nan, 0.0, t)
    if not np.array_equal(round_to(t, fmt), t):
        bad = np.argwhere(round_to(t, fmt) != t)[0]
        raise ValueError(f"target value {t[tuple(bad)]!r} at {tuple(int(i) for i in bad)} is not "
                         f"representable in {fmt.name}")
    rr = round_to(np.where(nan, 0.0, r), fmt)
    d = np.abs(_ordinal(t, fmt) - _ordinal(rr, fmt))
    if fmt.name == "fp64":
        return np.where(nan, -1, d)  # object array of Python ints
    return np.where(nan, -1, d).astype(np.int64)


def bits_of_error(ulps) -> np.ndarray:
    """log2(ulps + 1): 0 for a correctly rounded result, 1 for one ulp off.

    >>> bits_of_error(np.array([0, 1, 3])).tolist()
    [0.0, 1.0, 2.0]
    """
    u = np.asarray(ulps, dtype=np.float64)
    if (u < 0).any():
        raise ValueError("ulps must be non-negative (NaN positions must be removed first)")
    return np.log2(u + 1)


@dataclass(frozen=True)
class Metrics:
    """Errors of one target output (see `compare`); NaN entries of the
    target are counted in ``nan_count`` and left out of every statistic,
    Inf entries are included (so the errors become inf)."""

    dtype: str
    size: int
    max_abs_err: float
    max_abs_err_at: tuple
    max_rel_err: float
    rel_floor: str
    normwise_rel_err: float
    rmse: float
    max_ulp: int
    max_ulp_at: tuple
    mean_ulp: float
    max_bits: float
    mean_bits: float
    ulp_uncertain: int  # entries whose correct rounding the reference's bound cannot decide
    max_ref_err_bound: float
    nan_count: int
    nan_at: tuple
    inf_count: int
    inf_at: tuple

    def as_dict(self) -> dict:
        """Plain JSON types."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return d


def _positions(mask: np.ndarray) -> tuple:
    return tuple(tuple(int(i) for i in p) for p in np.argwhere(mask)[:_MAX_POSITIONS])


def compare(target_out, ref, dtype, *, ref_err_bound=None, rel_floor=None) -> Metrics:
    """Metrics of ``target_out`` against ``ref`` (an `AttentionResult` or an
    array of reference values) in the target's format ``dtype``.

    Relative errors divide by max(|ref|, floor); the floor is ``rel_floor``
    if given (a non-negative number), else, row by row along the last axis,
    max(format's smallest normal, ROW_FLOOR_FRACTION * max |ref| of the row).

    >>> m = compare(np.array([[1.0, 2.0]], np.float16), np.array([[1.0, 2.0 + 2**-11]]), "fp16")
    >>> m.max_ulp, m.max_abs_err  # 2 is the correctly rounded value: 0 ulps
    (0, 0.00048828125)
    """
    fmt = format_of(dtype)
    from flashcheck.verify.oracle import AttentionResult

    if isinstance(ref, AttentionResult):
        if ref_err_bound is None:
            ref_err_bound = ref.err_bound
        ref = ref.out
    t = to_float64(target_out)
    r = to_float64(ref)
    if t.shape != r.shape:
        raise ValueError(f"target shape {t.shape} differs from reference shape {r.shape}")
    if t.size == 0 or t.ndim == 0:
        raise ValueError(f"need a non-empty array with at least one axis, got shape {t.shape}")
    if not np.isfinite(r).all():
        raise ValueError("the reference contains NaN or Inf")
    bound = np.zeros_like(r) if ref_err_bound is None else to_float64(ref_err_bound)
    if bound.shape != r.shape:
        raise ValueError(f"ref_err_bound shape {bound.shape} differs from reference shape {r.shape}")
    if not (bound >= 0).all():
        raise ValueError("ref_err_bound must be non-negative and not NaN")
    if rel_floor is not None and (not isinstance(rel_floor, (int, float)) or not rel_floor >= 0):
        raise ValueError(f"rel_floor must be a non-negative number, got {rel_floor!r}")

    nan = np.isnan(t)
    inf = np.isinf(t)
    ok = ~nan
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(ok, np.abs(t - r), 0.0)
        if rel_floor is None:
            floor = np.maximum(fmt.tiny, ROW_FLOOR_FRACTION * np.abs(r).max(axis=-1, keepdims=True))
            floor_text = f"row: max(tiny, {ROW_FLOOR_FRACTION:g} * max|ref|)"
        else:
            floor = float(rel_floor)
            floor_text = f"fixed: {floor:g}"
        denom = np.maximum(np.abs(r), floor)
        rel = np.where(ok, err / np.where(denom > 0, denom, 1.0), 0.0)
        rel = np.where(ok & (denom == 0) & (err > 0), np.inf, rel)
        rnorm = math.sqrt(float((r[ok] ** 2).sum()))
        enorm = math.sqrt(float((err**2).sum()))
        normwise = enorm / rnorm if rnorm > 0 else (0.0 if enorm == 0 else math.inf)
        n_ok = int(ok.sum())
        rmse = math.sqrt(float((err**2).sum()) / n_ok) if n_ok else math.nan
    ulps = ulp_distance(np.where(nan, 0.0, t), r, fmt)
    ulps = np.where(nan, 0, ulps)
    lo, hi = round_to(r - bound, fmt), round_to(r + bound, fmt)
    uncertain = int((ok & (lo != hi)).sum())
    bits = bits_of_error(ulps.astype(np.float64))
    flat_ulp = int(np.argmax(ulps.astype(np.float64)))
    return Metrics(
        dtype=fmt.name, size=int(t.size),
        max_abs_err=float(err.max()),
        max_abs_err_at=tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), t.shape)),
        max_rel_err=float(rel.max()), rel_floor=floor_text,
        normwise_rel_err=normwise, rmse=rmse,
        max_ulp=int(ulps.max()), max_ulp_at=tuple(int(i) for i in np.unravel_index(flat_ulp, t.shape)),
        mean_ulp=float(ulps.astype(np.float64)[ok].mean()) if n_ok else math.nan,
        max_bits=float(bits.max()), mean_bits=float(bits[ok].mean()) if n_ok else math.nan,
        ulp_uncertain=uncertain, max_ref_err_bound=float(bound.max()),
        nan_count=int(nan.sum()), nan_at=_positions(nan),
        inf_count=int(inf.sum()), inf_at=_positions(inf),
    )


def baseline_ratio(target_err, baseline_err) -> float:
    """target_err / baseline_err: FlashAttention's tests require the fused
    kernel's error to be at most twice that of a same-precision naive
    attention (ratio <= 2). 0/0 counts as 1; x/0 as inf.

    >>> baseline_ratio(3e-4, 1.5e-4)
    2.0
    """
    vals = []
    for name, x in (("target_err", target_err), ("baseline_err", baseline_err)):
        if isinstance(x, Metrics):
            x = x.max_abs_err
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name} must be a number or Metrics, got {type(x).__name__}")
        x = float(x)
        if math.isnan(x) or x < 0:
            raise ValueError(f"{name} must be a non-negative number, got {x}")
        vals.append(x)
    t, b = vals
    if b == 0:
        return 1.0 if t == 0 else math.inf
    return t / b


def naive_attention(q, k, v, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    dtype=None) -> np.ndarray:
    """Attention the way FlashAttention's tests build their same-precision
    baseline: every step's result rounded to ``dtype`` (default: q's
    format). q is scaled first (as FlashAttention's ``attention_ref`` does),
    each matrix product is computed in float64 and rounded once (a
    slightly better fp32-accumulating GEMM), the softmax is computed in
    float64 and rounded. Returns float64 values representable in ``dtype``
    (fully masked rows give 0).
    """
    from flashcheck.verify.oracle import _prepare

    pr = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, None)
    fmt = format_of(dtype if dtype is not None else getattr(q, "dtype", None))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        qs = round_to(pr.q * pr.scale, fmt)
        s = round_to(qs @ pr.k.swapaxes(-1, -2), fmt)
        allowed, add = pr.masks(NUMPY, s, 0, s.shape[2])  # the causal mask too (built from row indices)
        if add is not None:
            s = round_to(s + add, fmt)
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(m == -np.inf, 0.0, m)
        e = np.exp(s - m)
        ell = e.sum(axis=-1, keepdims=True)
        p = round_to(e / np.where(ell == 0, 1.0, ell), fmt)
        return round_to(p @ pr.v, fmt)
