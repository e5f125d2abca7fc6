"""Exact attention inputs built in NumPy: q, k, v of a magnitude class, and
rows of logits for the softmax-only properties.

Every array is built in float64 and stored with
`flashcheck.kernels.precision.from_float64` (one correct rounding), so its
values are exactly those of the low-precision format the kernel sees. The
same arguments (shape, dtype, class, seed) always give the same arrays:
the strategies draw only those choices, never elements.

>>> t = qkv(dict(B=1, H=2, Hkv=1, Nq=3, Nk=5, D=8, Dv=8), "fp16", "one-hot", 0)
>>> t.q.dtype, t.k.shape
(dtype('float16'), (1, 1, 5, 8))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flashcheck.kernels.precision import FORMATS, from_float64, round_to, to_float64
from flashcheck.properties.validation import check_scale, check_shape, input_format

__all__ = [
    "FP32_EXP_OVERFLOW", "LOGIT_CLASSES", "MAGNITUDES", "ONE_HOT_GAP", "QKV", "logit_values", "qkv",
]

#: ln(largest fp32): exp of anything larger overflows fp32.
FP32_EXP_OVERFLOW = math.log(FORMATS["fp32"].max)  # 88.72...

#: Magnitude classes of q, k, v; docs/strategies.md says which bug each targets.
MAGNITUDES = (
    "normal",
    "fa3-outliers",
    "near-overflow-logits",
    "near-max-input",
    "all-negative-logits",
    "large-offset",
    "uniform",
    "one-hot",
    "subnormal",
    "v-cancellation",
    "nan-inf",
)

#: Classes of `logit_values` (and of the `logit_rows` strategy).
LOGIT_CLASSES = (
    "normal",
    "large-offset",
    "near-overflow",
    "all-negative",
    "uniform",
    "one-hot",
    "neg-inf-entries",
    "full-neg-inf-rows",
)

#: In "one-hot" cases the dominant logit of each row beats every other logit
#: of the row by at least this much, so the others weigh < Nk * e**-24.
ONE_HOT_GAP = 24.0

# Logit targets of the extreme classes (drawn log-uniformly in these ranges).
_OVERFLOW_RANGE = (90.0, 4096.0)  # every row's max logit exceeds 88.72
_NEGATIVE_RANGE = (110.0, 4096.0)  # exp(-110) underflows even fp32 subnormals
_OFFSET_RANGE = (100.0, 10000.0)


class QKV(NamedTuple):
    """Exact q, k, v arrays (storage dtype) and tags describing them."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    tags: dict


def _logits64(q, k, scale):
    """scale * q k^T in float64, k's heads repeated for GQA (as torch does)."""
    q64, k64 = to_float64(q), to_float64(k)
    group = q64.shape[1] // k64.shape[1]
    if group > 1:
        k64 = np.repeat(k64, group, axis=1)
    return scale * (q64 @ np.swapaxes(k64, -1, -2))


def _log_uniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _pow2_split(q, k, e, fmt):
    """Multiply q by 2**ceil(e/2) and k by 2**floor(e/2); exact unless a value
    becomes subnormal, and then correctly rounded."""
    eq = -((-e) // 2)
    with np.errstate(over="ignore"):
        q2 = from_float64(np.ldexp(to_float64(q), eq), fmt)
        k2 = from_float64(np.ldexp(to_float64(k), e - eq), fmt)
    if not (np.isfinite(to_float64(q2)).all() and np.isfinite(to_float64(k2)).all()):
        raise ValueError(
            f"cannot reach the target logits in {fmt} at this scale without overflowing the inputs; "
            "use a larger scale"
        )
    return q2, k2


def _signed_logits(rng, shape, fmt, scale, sign_of_key, target_lo, target_hi, nearest_to_zero):
    """q, k whose logits all share the sign pattern of ``sign_of_key`` and
    are rescaled (by powers of two) so that the smallest row maximum (or the
    logit nearest zero) reaches the target magnitude."""
    B, H, Hkv, Nq, Nk, D = (shape[x] for x in ("B", "H", "Hkv", "Nq", "Nk", "D"))
    # q_d * k_d has the sign of the key's sign for every d: the dot product does too.
    sigma = rng.choice([-1.0, 1.0], size=D)
    q = sigma * (np.abs(rng.standard_normal((B, H, Nq, D))) + 0.25)
    k = sign_of_key[..., None] * sigma * (np.abs(rng.standard_normal((B, Hkv, Nk, D))) + 0.25)
    q, k = from_float64(q, fmt), from_float64(k, fmt)
    s = _logits64(q, k, scale)
    ref = np.abs(s.max(axis=-1)).min() if not nearest_to_zero else np.abs(s.max())
    target = float(_log_uniform(rng, target_lo, target_hi))
    e = math.ceil(math.log2(target / ref))
    q, k = _pow2_split(q, k, e, fmt)
    return q, k, target


def qkv(shape: dict, dtype, magnitude: str, seed: int, *, scale: float | None = None) -> QKV:
    """Build exact q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) of
    magnitude class ``magnitude`` from ``seed``.

    ``scale`` is the softmax scale the case will use (None: 1/sqrt(D)); the
    logit-shaping classes need it. The same arguments give the same arrays.

    >>> t = qkv(dict(B=1, H=2, Hkv=1, Nq=3, Nk=5, D=8, Dv=8), "fp16", "one-hot", 0)
    >>> t.q.dtype, t.k.shape
    (dtype('float16'), (1, 1, 5, 8))
    """
    shape = check_shape(shape)
    fmt = input_format(dtype)
    if magnitude not in MAGNITUDES:
        raise ValueError(f"unknown magnitude class {magnitude!r}; expected one of {MAGNITUDES}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    scale = check_scale(scale)
    s = scale if scale is not None else 1.0 / math.sqrt(shape["D"])
    q, k, v, tags = _MAKERS[magnitude](np.random.default_rng(int(seed)), shape, fmt, s)
    return QKV(q, k, v, tags)


def _qs(shape):
    return (shape["B"], shape["H"], shape["Nq"], shape["D"])


def _ks(shape):
    return (shape["B"], shape["Hkv"], shape["Nk"], shape["D"])


def _vs(shape):
    return (shape["B"], shape["Hkv"], shape["Nk"], shape["Dv"])


def _normal3(rng, shape, fmt):
    return tuple(from_float64(rng.standard_normal(f(shape)), fmt) for f in (_qs, _ks, _vs))


def _make_normal(rng, shape, fmt, s):
    return (*_normal3(rng, shape, fmt), {})


def _make_fa3_outliers(rng, shape, fmt, s):
    # FlashAttention-3 (Shah et al. 2024), section 4.3: N(0,1) + N(0,100) * Bernoulli(0.001).
    out, count = [], 0
    for f in (_qs, _ks, _vs):
        size = f(shape)
        hit = rng.random(size) < 0.001
        count += int(hit.sum())
        out.append(from_float64(rng.standard_normal(size) + 10.0 * rng.standard_normal(size) * hit, fmt))
    return (*out, {"outliers": count})


def _make_near_overflow(rng, shape, fmt, s):
    signs = rng.choice([-1.0, 1.0], size=(shape["B"], shape["Hkv"], shape["Nk"]))
    # One positive key per (batch, kv head), so every row has a large positive logit.
    hot = rng.integers(shape["Nk"], size=(shape["B"], shape["Hkv"]))
    np.put_along_axis(signs, hot[..., None], 1.0, axis=-1)
    q, k, _ = _signed_logits(rng, shape, fmt, s, signs, *_OVERFLOW_RANGE, nearest_to_zero=False)
    logits = _logits64(q, k, s)
    row_max = logits.max(axis=-1)
    _internal(row_max.min() > FP32_EXP_OVERFLOW, "near-overflow rows below 88.7")
    v = from_float64(rng.standard_normal(_vs(shape)), fmt)
    return q, k, v, {"min_row_max_logit": float(row_max.min()), "max_logit": float(logits.max())}


def _make_all_negative(rng, shape, fmt, s):
    signs = -np.ones((shape["B"], shape["Hkv"], shape["Nk"]))
    q, k, _ = _signed_logits(rng, shape, fmt, s, signs, *_NEGATIVE_RANGE, nearest_to_zero=True)
    top = float(_logits64(q, k, s).max())
    _internal(top <= -_NEGATIVE_RANGE[0], "all-negative logits not negative enough")
    v = from_float64(rng.standard_normal(_vs(shape)), fmt)
    return q, k, v, {"max_logit": top}


def _near_max_values(rng, size, top):
    """Values with magnitude in [top/2, top], random signs."""
    return rng.choice([-1.0, 1.0], size=size) * rng.uniform(0.5, 1.0, size) * top


def _make_near_max(rng, shape, fmt, s):
    f = FORMATS[fmt]
    # Keep scale * x finite too, for kernels that pre-scale q in the input format.
    top = f.max / 2.0 ** max(0, math.ceil(math.log2(s)))
    if fmt == "fp16":
        # fp16 max**2 * D * scale stays far below fp32's max: both sides may be huge.
        which = str(rng.choice(["q", "k", "qk"]))
        other = rng.standard_normal
    else:
        # bf16/fp32 max squared overflows fp32: pair the huge side with values
        # just above the smallest normal, so products stay near 1.
        which = str(rng.choice(["q", "k"]))

        def other(size):
            return rng.choice([-1.0, 1.0], size=size) * rng.uniform(1.0, 4.0, size) * f.tiny

    q = _near_max_values(rng, _qs(shape), top) if "q" in which else other(_qs(shape))
    k = _near_max_values(rng, _ks(shape), top) if "k" in which else other(_ks(shape))
    # V near the max, leaving room for Nk terms of an unnormalised fp32 sum.
    v_top = f.max if fmt == "fp16" else f.max / 2.0 ** math.ceil(math.log2(shape["Nk"]) + 1)
    q, k = from_float64(q, fmt), from_float64(k, fmt)
    v = from_float64(_near_max_values(rng, _vs(shape), v_top), fmt)
    logits = _logits64(q, k, s)
    _internal(np.abs(logits).max() < FORMATS["fp32"].max, "near-max logits overflow fp32")
    return q, k, v, {"near_max": which, "max_abs_logit": float(np.abs(logits).max())}


def _make_large_offset(rng, shape, fmt, s):
    f = FORMATS[fmt]
    D = shape["D"]
    # Logits = c_i + small: q's component d0 times a constant component of k.
    d0 = int(rng.integers(D))
    rest = (s * math.sqrt(max(D - 1, 1))) ** -0.5  # makes the small part about N(0, 1)
    q = rng.standard_normal(_qs(shape)) * rest
    k = rng.standard_normal(_ks(shape)) * rest
    offsets = rng.choice([-1.0, 1.0], size=_qs(shape)[:3]) * _log_uniform(rng, *_OFFSET_RANGE, _qs(shape)[:3])
    kappa = 2.0 ** round(math.log2(math.sqrt(_OFFSET_RANGE[1] / s)))
    q[..., d0] = offsets / (s * kappa)
    k[..., d0] = kappa
    if max(kappa, np.abs(q[..., d0]).max()) > f.max / 8:
        raise ValueError(f"scale={s} is too small for large-offset logits in {fmt}")
    q, k = from_float64(q, fmt), from_float64(k, fmt)
    v = from_float64(rng.standard_normal(_vs(shape)), fmt)
    return q, k, v, {"offset_dim": d0}


def _make_uniform(rng, shape, fmt, s):
    q, k, v = _normal3(rng, shape, fmt)
    variant = str(rng.choice(["q=0", "k constant"]))
    if variant == "q=0":
        q = np.zeros_like(q)
    else:
        k = np.broadcast_to(k[:, :, :1, :], k.shape).copy()
    return q, k, v, {"uniform": variant}


def _make_one_hot(rng, shape, fmt, s):
    B, H, Hkv, Nq, Nk, D = (shape[x] for x in ("B", "H", "Hkv", "Nq", "Nk", "D"))
    group = H // Hkv
    q = from_float64(rng.standard_normal(_qs(shape)), fmt).astype(np.float64)
    k = from_float64(rng.standard_normal(_ks(shape)), fmt).astype(np.float64)
    plan = []
    # Each (batch, kv head) gets r hot keys, each owning one dimension that no
    # other key and no query (except through its own hot key) uses.
    for b in range(B):
        for g in range(Hkv):
            r = int(rng.integers(1, min(D, Nk, 8) + 1))
            keys = rng.choice(Nk, r, replace=False)
            dims = rng.choice(D, r, replace=False)
            k[b, g][:, dims] = 0.0
            k[b, g][keys, dims] = 1.0
            heads = slice(g * group, (g + 1) * group)
            q[b, heads][..., dims] = 0.0
            choice = rng.integers(r, size=(group, Nq))
            plan.append((b, heads, keys[choice], dims[choice]))
    base = _logits64(q, k, s)  # hot dimensions contribute nothing yet
    for b, heads, hot_key, hot_dim in plan:
        rows = base[b, heads]
        hot_logit = np.take_along_axis(rows, hot_key[..., None], axis=-1)[..., 0]
        others = rows.copy()
        np.put_along_axis(others, hot_key[..., None], -np.inf, axis=-1)
        need = ONE_HOT_GAP + others.max(axis=-1) - hot_logit  # -inf when Nk == 1
        need = np.where(np.isfinite(need), np.maximum(need, ONE_HOT_GAP), ONE_HOT_GAP)
        # A power of two at least need / scale: exact in every format.
        value = np.exp2(np.ceil(np.log2(need / s)))
        qb = q[b, heads]
        np.put_along_axis(qb, hot_dim[..., None], value[..., None], axis=-1)
        q[b, heads] = qb
    f = FORMATS[fmt]
    if np.abs(q).max() > f.max:
        raise ValueError(f"scale={s} is too small for one-hot logits in {fmt}")
    q, k = from_float64(q, fmt), from_float64(k, fmt)
    v = from_float64(rng.standard_normal(_vs(shape)), fmt)
    return q, k, v, {"one_hot_gap": ONE_HOT_GAP}


def _make_subnormal(rng, shape, fmt, s):
    f = FORMATS[fmt]
    out = []
    for size in (_qs(shape), _ks(shape), _vs(shape)):
        mant = rng.integers(1, 2 ** (f.p - 1), size=size).astype(np.float64)
        x = rng.choice([-1.0, 1.0], size=size) * mant * f.smallest_subnormal
        # A quarter just above the subnormal range, so results straddle it.
        normal = rng.random(size) < 0.25
        normal.flat[rng.integers(normal.size)] = False  # at least one subnormal
        x = np.where(normal, np.sign(x) * rng.uniform(1.0, 4.0, size) * f.tiny, x)
        out.append(from_float64(x, fmt))
    return (*out, {})


def _make_v_cancellation(rng, shape, fmt, s):
    B, Hkv, Nk, Dv = shape["B"], shape["Hkv"], shape["Nk"], shape["Dv"]
    q = from_float64(rng.standard_normal(_qs(shape)), fmt)
    k = to_float64(from_float64(rng.standard_normal(_ks(shape)), fmt))
    big = 2.0 ** int(rng.integers(8, 13))
    v = np.clip(rng.standard_normal(_vs(shape)), -2.0, 2.0)  # the part that survives
    # Keys are grouped in pairs (a triple last when Nk is odd) with equal k
    # rows, hence equal weights for every query; within a group the v rows
    # sum to a small value, so P V is tiny next to P |V|.
    perm = np.argsort(rng.random((B, Hkv, Nk)), axis=-1)
    if Nk > _LOOP_MAX_KEYS:
        return q, *_v_cancellation_pairs(rng, k, v, perm, big, fmt), {"v_cancellation_scale": big}
    groups = [perm[..., i : i + 2] for i in range(0, Nk - 3, 2)]
    if Nk >= 2:
        groups.append(perm[..., 2 * len(groups) :])
    for group in groups:
        lead = group[..., :1, None]
        np.put_along_axis(k, group[..., None], np.take_along_axis(k, lead, axis=2), axis=2)
        size = (B, Hkv, group.shape[-1] - 1, Dv)
        # Magnitudes in [big, 4 big): at most 2**14 per value, 2**15 per sum (fp16-safe).
        large = round_to(rng.choice([-1.0, 1.0], size=size) * rng.uniform(1.0, 4.0, size) * big, fmt)
        last = group[..., -1:, None]
        closing = np.take_along_axis(v, last, axis=2) - large.sum(axis=2, keepdims=True)
        np.put_along_axis(v, group[..., :-1, None], large, axis=2)
        np.put_along_axis(v, last, closing, axis=2)
    return q, from_float64(k, fmt), from_float64(v, fmt), {"v_cancellation_scale": big}


#: Longest key axis `_make_v_cancellation` builds group by group (every
#: stratum before the CUDA long-context ones): beyond it the groups are
#: built at once, which draws the random numbers in another order, so the
#: seeds of the shorter cases keep giving the same inputs.
_LOOP_MAX_KEYS = 4096


def _v_cancellation_pairs(rng, k, v, perm, big, fmt):
    """`_make_v_cancellation`'s groups, all at once: pairs, the last group a
    triple when Nk is odd. Same construction, another draw order."""
    B, Hkv, Nk, Dv = v.shape
    m = (Nk - 1) // 2  # groups; the last takes the remaining 2 or 3 keys
    lead = perm[..., 0 : 2 * m : 2]
    last_group = perm[..., 2 * (m - 1) :]
    seconds = perm[..., 1 : 2 * (m - 1) : 2]
    np.put_along_axis(k, seconds[..., None], np.take_along_axis(k, lead[..., : m - 1, None], axis=2), axis=2)
    np.put_along_axis(k, last_group[..., 1:, None], np.take_along_axis(k, last_group[..., :1, None], axis=2),
                      axis=2)
    size = (B, Hkv, m - 1, Dv)
    large = round_to(rng.choice([-1.0, 1.0], size=size) * rng.uniform(1.0, 4.0, size) * big, fmt)
    closing = np.take_along_axis(v, seconds[..., None], axis=2) - large
    np.put_along_axis(v, lead[..., : m - 1, None], large, axis=2)
    np.put_along_axis(v, seconds[..., None], closing, axis=2)
    g = last_group.shape[-1]
    size = (B, Hkv, g - 1, Dv)
    large = round_to(rng.choice([-1.0, 1.0], size=size) * rng.uniform(1.0, 4.0, size) * big, fmt)
    closing = np.take_along_axis(v, last_group[..., -1:, None], axis=2) - large.sum(axis=2, keepdims=True)
    np.put_along_axis(v, last_group[..., :-1, None], large, axis=2)
    np.put_along_axis(v, last_group[..., -1:, None], closing, axis=2)
    return from_float64(k, fmt), from_float64(v, fmt)


def _make_nan_inf(rng, shape, fmt, s):
    arrays = dict(zip(("q", "k", "v"), _normal3(rng, shape, fmt)))
    chosen = {}
    for _ in range(int(rng.integers(1, 4))):
        name = str(rng.choice(["q", "k", "v"]))
        index = tuple(int(rng.integers(n)) for n in arrays[name].shape)
        chosen[(name, index)] = str(rng.choice(["nan", "inf", "-inf"]))
    for (name, index), kind in chosen.items():
        arrays[name][index] = float(kind)
    nonfinite = [(name, index, kind) for (name, index), kind in sorted(chosen.items())]
    return arrays["q"], arrays["k"], arrays["v"], {"nonfinite": nonfinite}


def _internal(ok, message):
    if not ok:
        raise RuntimeError(f"internal error in flashcheck.properties.strategies: {message}")


_MAKERS = {
    "normal": _make_normal,
    "fa3-outliers": _make_fa3_outliers,
    "near-overflow-logits": _make_near_overflow,
    "near-max-input": _make_near_max,
    "all-negative-logits": _make_all_negative,
    "large-offset": _make_large_offset,
    "uniform": _make_uniform,
    "one-hot": _make_one_hot,
    "subnormal": _make_subnormal,
    "v-cancellation": _make_v_cancellation,
    "nan-inf": _make_nan_inf,
}
assert set(_MAKERS) == set(MAGNITUDES)


def logit_values(rng, kind: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float64 array of logits of class ``kind`` (`LOGIT_CLASSES`)
    drawn from ``rng``; not yet rounded to any format."""
    if kind not in LOGIT_CLASSES:
        raise ValueError(f"unknown logit class {kind!r}; expected one of {LOGIT_CLASSES}")
    return _logit_values(rng, kind, rows, cols)


def _logit_values(rng, kind, rows, cols):
    x = rng.standard_normal((rows, cols))
    if kind == "normal":
        return x * float(rng.choice([1.0, 4.0]))
    if kind == "large-offset":
        offset = rng.choice([-1.0, 1.0], size=(rows, 1)) * _log_uniform(rng, *_OFFSET_RANGE, (rows, 1))
        return offset + x
    if kind == "near-overflow":
        top = _log_uniform(rng, *_OVERFLOW_RANGE, rows)
        x = top[:, None] - 4.0 * np.abs(x)
        x[np.arange(rows), rng.integers(cols, size=rows)] = top  # the row max itself
        return x
    if kind == "all-negative":
        return -_log_uniform(rng, *_NEGATIVE_RANGE, (rows, 1)) - 4.0 * np.abs(x)
    if kind == "uniform":
        return np.broadcast_to(10.0 * x[:, :1], (rows, cols)).copy()
    if kind == "one-hot":
        x[np.arange(rows), rng.integers(cols, size=rows)] = x.max(axis=1) + ONE_HOT_GAP + 1.0
        return x
    if kind == "neg-inf-entries":
        dead = rng.random((rows, cols)) < rng.uniform(0.1, 0.9)
        dead[np.arange(rows), rng.integers(cols, size=rows)] = False  # one finite entry per row
        return np.where(dead, -np.inf, 2.0 * x)
    # full-neg-inf-rows
    dead_rows = rng.random(rows) < 0.5
    dead_rows[rng.integers(rows)] = True
    x[dead_rows] = -np.inf
    return x
