"""Hypothesis strategies that build attention test cases.

Flash-attention bugs hide in tails: huge and tiny logits, fully masked rows,
odd sequence lengths, grouped heads, non-contiguous memory. These strategies
aim there on purpose.

Tensors are never drawn element by element. Hypothesis draws the *choices*
(dtype, shape, magnitude class, mask kind, layout, block sizes) and a seed;
NumPy's ``default_rng(seed)`` then fills the arrays. Shrinking therefore works
on the choices and the seed, and large tensors cost nothing to draw. Every
array is built in float64 and stored with `flashcheck.kernels.precision.from_float64`
(one correct rounding), so its values are exactly those of the low-precision
format the kernel sees.

Each drawn class is reported with `hypothesis.event`, so
``pytest --hypothesis-show-statistics`` shows what a run covered.

>>> from hypothesis import given
>>> @given(cases(max_seq=64))
... def test_something(case):
...     q, k, v, mask = case.to_torch()
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

from flashcheck.kernels.precision import FORMATS, format_of, from_float64, round_to, to_float64
from flashcheck.verify.case import LAYOUTS, Case

__all__ = [
    "FP32_EXP_OVERFLOW",
    "LOGIT_CLASSES",
    "MAGNITUDES",
    "MASK_KINDS",
    "MASK_SHAPES",
    "ONE_HOT_GAP",
    "QKV",
    "SPECIAL_HEAD_DIMS",
    "TRITON_BLOCK_SIZES",
    "block_sizes",
    "cases",
    "dtypes",
    "head_dims",
    "layouts",
    "logit_rows",
    "magnitudes",
    "masks",
    "qkv",
    "qkv_arrays",
    "scales",
    "seq_lens",
    "shapes",
]

#: Block sizes the Triton kernel accepts (powers of two; tl.arange needs them).
TRITON_BLOCK_SIZES = (16, 32, 64, 128)

#: ln(largest fp32): exp of anything larger overflows fp32.
FP32_EXP_OVERFLOW = math.log(FORMATS["fp32"].max)  # 88.72...

#: Head dimensions seen in real models that are not powers of two.
SPECIAL_HEAD_DIMS = (59, 80, 96, 111, 160)

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

#: Mask kinds drawn by `masks`.
MASK_KINDS = ("none", "causal", "bool-random", "additive", "sliding-window", "fully-masked-rows")

#: Broadcast shapes of an explicit mask, by name.
MASK_SHAPES = ("Nq,Nk", "1,1,Nq,Nk", "1,H,Nq,Nk", "B,1,Nq,Nk", "B,H,Nq,Nk", "B,1,1,Nk")

#: Classes of `logit_rows`.
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

_SHAPE_KEYS = ("B", "H", "Hkv", "Nq", "Nk", "D", "Dv")
_INPUT_DTYPES = ("fp16", "bf16", "fp32")


# -- argument checking ------------------------------------------------------

def _check_int(name, value, *, min_value=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{name}={value!r} must be an integer, not {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise InvalidArgument(f"{name}={value!r} must be at least {min_value}")


def _check_range(lo_name, lo, hi_name, hi, *, floor=1):
    _check_int(lo_name, lo, min_value=floor)
    _check_int(hi_name, hi, min_value=floor)
    if lo > hi:
        raise InvalidArgument(f"{lo_name}={lo} is larger than {hi_name}={hi}")


def _check_choices(name, values, known):
    """``values`` as a tuple of members of ``known``; None means all."""
    if values is None:
        return tuple(known)
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise InvalidArgument(f"{name} must not be empty")
    for v in values:
        if v not in known:
            raise InvalidArgument(f"unknown {name} entry {v!r}; expected some of {tuple(known)}")
    return values


def _input_format(dtype, *, error=ValueError):
    """Name of an input format with a storage dtype ("fp16", "bf16", "fp32")."""
    try:
        fmt = format_of(dtype)
    except (TypeError, ValueError) as exc:
        raise error(f"bad dtype {dtype!r}: {exc}") from None
    if fmt.name not in _INPUT_DTYPES:
        raise error(f"dtype {fmt.name!r} is not an input format; expected one of {_INPUT_DTYPES}")
    return fmt.name


def _check_shape(shape, *, error=ValueError):
    """Validate a shape dict as `shapes` draws it; return it with Dv filled in."""
    if not isinstance(shape, dict):
        raise TypeError(f"shape must be a dict with keys {_SHAPE_KEYS}, got {type(shape).__name__}")
    shape = dict(shape)
    shape.setdefault("Dv", shape.get("D"))
    missing = [k for k in _SHAPE_KEYS if k not in shape]
    if missing:
        raise error(f"shape is missing {missing}; expected keys {_SHAPE_KEYS}")
    for key in _SHAPE_KEYS:
        value = shape[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise error(f"shape[{key!r}]={value!r} must be a positive integer")
        shape[key] = int(value)
    if shape["H"] % shape["Hkv"]:
        raise error(f"Hkv={shape['Hkv']} does not divide H={shape['H']}")
    return shape


def _check_scale(scale, *, error=ValueError):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise error(f"scale={scale!r} must be a positive finite number")
    return scale


# -- sizes ------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _primes_upto(n: int) -> tuple:
    if n < 2:
        return ()
    sieve = np.ones(n + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return tuple(int(p) for p in np.flatnonzero(sieve))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _length_class(n: int) -> str:
    """The most telling class of a sequence length, for events."""
    if n == 1:
        return "1"
    if n & (n - 1) == 0:
        return "2^k"
    if (n - 1) & (n - 2) == 0:
        return "2^k+1"
    if (n + 1) & n == 0:
        return "2^k-1"
    if _is_prime(n):
        return "prime"
    if n % 16:
        return "not a multiple of 16"
    if n % 128:
        return "multiple of 16, not of 128"
    return "multiple of 128"


def _in_range(values, lo, hi):
    return [v for v in values if lo <= v <= hi]


def _seq_len_options(lo: int, hi: int) -> list:
    """(class name, strategy) pairs that can produce a length in [lo, hi]."""
    options = []
    if lo == 1:
        options.append(("1", st.just(1)))
    powers = [1 << k for k in range(hi.bit_length() + 1)]
    for name, values in (
        ("prime", _in_range(_primes_upto(1 << hi.bit_length()), lo, hi)),
        ("2^k", _in_range(powers, lo, hi)),
        ("2^k+1", _in_range([p + 1 for p in powers if p >= 2], lo, hi)),
        ("2^k-1", _in_range([p - 1 for p in powers if p >= 4], lo, hi)),
    ):
        if values:
            options.append((name, st.sampled_from(values)))
    # Not a multiple of any usual tile: 16 a + b with 0 < b < 16.
    if any(n % 16 for n in range(lo, min(hi, lo + 16) + 1)):
        options.append(("off-tile", st.integers(lo, hi).filter(lambda n: n % 16 != 0)))
    # Multiples of 16 but not of 32: full 16-tiles, ragged 32..128 tiles.
    odd16 = [16 * m for m in range(max(1, -(-lo // 16)), hi // 16 + 1) if m % 2]
    if odd16:
        options.append(("16*odd", st.sampled_from(odd16)))
    options.append(("uniform", st.integers(lo, hi)))
    return options


@st.composite
def _lengths(draw, lo, hi, label):
    options = _seq_len_options(lo, hi)
    index = draw(st.integers(0, len(options) - 1))
    n = draw(options[index][1])
    if label:
        event(f"{label}: {_length_class(n)}")
    return n


def seq_lens(*, min_value: int = 1, max_value: int = 4096) -> SearchStrategy[int]:
    """Sequence lengths that stress tiling: 1, primes, powers of two and
    their neighbours 2^k +- 1, lengths that are not multiples of 16, odd
    multiples of 16, and uniform draws from [min_value, max_value].

    >>> from hypothesis import find
    >>> n = find(seq_lens(max_value=100), lambda n: n > 64 and n % 16 != 0)
    >>> 64 < n <= 100
    True
    """
    _check_range("min_value", min_value, "max_value", max_value)
    return _lengths(int(min_value), int(max_value), "N")


def head_dims(*, min_value: int = 1, max_value: int = 256) -> SearchStrategy[int]:
    """Head dimensions: powers of two, the odd sizes of real models
    (59, 80, 96, 111, 160, where in range) and uniform draws.

    >>> from hypothesis import find
    >>> d = find(head_dims(), lambda d: d > 128)
    >>> 128 < d <= 256
    True
    """
    _check_range("min_value", min_value, "max_value", max_value)
    lo, hi = int(min_value), int(max_value)
    options = [st.integers(lo, hi)]
    powers = _in_range([1 << k for k in range(hi.bit_length())], lo, hi)
    if powers:
        options.insert(0, st.sampled_from(powers))
    specials = _in_range(SPECIAL_HEAD_DIMS, lo, hi)
    if specials:
        options.insert(1, st.sampled_from(specials))
    return st.one_of(options)


def _head_dim_class(D: int) -> str:
    if D & (D - 1) == 0:
        return "2^k"
    return "real-model size" if D in SPECIAL_HEAD_DIMS else "other"


def _head_kind(H: int, Hkv: int) -> str:
    if Hkv == H:
        return "MHA"
    return "MQA" if Hkv == 1 else "GQA"


@st.composite
def _shapes(draw, max_batch, max_heads, min_seq, max_seq, head_dim_st, gqa, max_scores, distinct_dv):
    hmax = min(max_heads, max_scores // (min_seq * min_seq))
    kinds = ["MHA"]
    if gqa and hmax >= 2:
        kinds.append("MQA")
    if gqa and hmax >= 4:
        kinds.append("GQA")
    kind = draw(st.sampled_from(kinds))
    if kind == "MHA":
        H = draw(st.integers(1, hmax))
        Hkv = H
    elif kind == "MQA":
        H, Hkv = draw(st.integers(2, hmax)), 1
    else:
        Hkv = draw(st.integers(2, hmax // 2))
        H = Hkv * draw(st.integers(2, hmax // Hkv))
    B = draw(st.integers(1, max(1, min(max_batch, max_scores // (H * min_seq * min_seq)))))
    budget = max_scores // (B * H)  # for Nq * Nk

    same = math.isqrt(budget) >= min_seq and draw(st.integers(0, 2)) == 0  # Nq != Nk two times in three
    if same:
        Nq = Nk = draw(_lengths(min_seq, min(max_seq, math.isqrt(budget)), None))
    else:
        first_cap = min(max_seq, budget // min_seq)
        if draw(st.booleans()):
            Nq = draw(_lengths(min_seq, first_cap, None))
            Nk = draw(_lengths(min_seq, min(max_seq, budget // Nq), None))
        else:
            Nk = draw(_lengths(min_seq, first_cap, None))
            Nq = draw(_lengths(min_seq, min(max_seq, budget // Nk), None))
    D = draw(head_dim_st)
    Dv = draw(head_dim_st) if distinct_dv and draw(st.integers(0, 3)) == 0 else D
    for name, value in (("D", D), ("Dv", Dv)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidArgument(f"head_dims strategy produced {name}={value!r}; need positive integers")

    event(f"heads: {_head_kind(H, Hkv)}")
    event(f"Nq: {_length_class(Nq)}")
    event(f"Nk: {_length_class(Nk)}")
    event("Nq == Nk" if Nq == Nk else "Nq != Nk")
    event("Dv == D" if Dv == D else "Dv != D")
    event(f"D: {_head_dim_class(D)}")
    return {"B": B, "H": H, "Hkv": Hkv, "Nq": Nq, "Nk": Nk, "D": int(D), "Dv": int(Dv)}


def shapes(
    *,
    max_batch: int = 2,
    max_heads: int = 4,
    min_seq: int = 1,
    max_seq: int = 256,
    head_dims: SearchStrategy[int] | None = None,
    gqa: bool = True,
    max_scores: int = 2**16,
    distinct_dv: bool = True,
) -> SearchStrategy[dict]:
    """Attention shapes as dicts with keys B, H, Hkv, Nq, Nk, D, Dv.

    Heads are MHA (Hkv = H), MQA (Hkv = 1 < H) or GQA (1 < Hkv < H, Hkv
    dividing H); MQA and GQA only when ``gqa``. Nq and Nk come from the
    same classes as `seq_lens`. The work is
    capped: B * H * Nq * Nk <= ``max_scores``, so CPU tests stay quick
    while GPU runs can raise the cap. Nq and Nk differ about two times in
    three. Dv differs from D in about a quarter
    of draws when ``distinct_dv``.

    >>> from hypothesis import find
    >>> s = find(shapes(), lambda s: 1 < s["Hkv"] < s["H"])  # smallest GQA shape
    >>> s["H"], s["Hkv"]
    (4, 2)
    """
    _check_int("max_batch", max_batch, min_value=1)
    _check_int("max_heads", max_heads, min_value=1)
    _check_range("min_seq", min_seq, "max_seq", max_seq)
    _check_int("max_scores", max_scores, min_value=1)
    if max_scores < min_seq * min_seq:
        raise InvalidArgument(
            f"max_scores={max_scores} is below min_seq**2={min_seq * min_seq}: no shape fits"
        )
    if not isinstance(gqa, bool):
        raise InvalidArgument(f"gqa={gqa!r} must be a bool")
    if not isinstance(distinct_dv, bool):
        raise InvalidArgument(f"distinct_dv={distinct_dv!r} must be a bool")
    if head_dims is None:
        head_dims = _head_dims_strategy()
    elif not isinstance(head_dims, SearchStrategy):
        raise InvalidArgument(
            f"head_dims must be a Hypothesis strategy of integers, got {type(head_dims).__name__}"
        )
    return _shapes(
        int(max_batch), int(max_heads), int(min_seq), int(max_seq), head_dims, gqa, int(max_scores),
        distinct_dv,
    )


_head_dims_strategy = head_dims


def block_sizes(*, kind: str = "numpy", max_value: int = 512) -> SearchStrategy[int]:
    """Tile sizes for a blocked implementation.

    ``kind="numpy"``: any positive integer up to ``max_value`` (1, primes,
    powers of two, and sizes larger than the sequence), since the NumPy
    tiled algebra has no hardware constraint. ``kind="triton"``: one of
    `TRITON_BLOCK_SIZES`.

    >>> from hypothesis import find
    >>> find(block_sizes(kind="triton"), lambda b: b > 16)
    32
    """
    if kind == "triton":
        return st.sampled_from(TRITON_BLOCK_SIZES)
    if kind != "numpy":
        raise InvalidArgument(f"kind={kind!r}; expected 'numpy' or 'triton'")
    _check_int("max_value", max_value, min_value=1)
    hi = int(max_value)
    options = [st.just(1), st.integers(1, hi)]
    primes = _primes_upto(hi)
    if primes:
        options.append(st.sampled_from(primes[:64]))
    options.append(st.sampled_from([1 << k for k in range(hi.bit_length())]))
    return st.one_of(options)


def _block_class(block: int, n: int) -> str:
    if block >= n:
        return "covers the sequence"
    if block == 1:
        return "1"
    return "2^k" if block & (block - 1) == 0 else "not 2^k"


# -- simple choices -----------------------------------------------------------

def _labelled(values, label):
    return st.sampled_from(values).map(lambda v: (event(f"{label}: {v}"), v)[1])


def dtypes(*, allowed=("fp16", "bf16", "fp32")) -> SearchStrategy[str]:
    """Names of input formats ("fp16", "bf16", "fp32"); aliases such as
    "bfloat16" are accepted in ``allowed`` and normalised.

    >>> from hypothesis import find
    >>> find(dtypes(allowed=("float16", "bfloat16")), lambda d: d != "fp16")
    'bf16'
    """
    if isinstance(allowed, str):
        allowed = (allowed,)
    allowed = tuple(allowed)
    if not allowed:
        raise InvalidArgument("allowed must name at least one dtype")
    names = []
    for d in allowed:
        name = _input_format(d, error=InvalidArgument)
        if name not in names:
            names.append(name)
    return _labelled(names, "dtype")


def layouts(*, allowed=LAYOUTS) -> SearchStrategy[str]:
    """Memory layouts of `flashcheck.verify.case.LAYOUTS`: "contiguous", "bnhd", "strided"."""
    return _labelled(_check_choices("layout", allowed, LAYOUTS), "layout")


def magnitudes(dtype, *, allowed=None, allow_nonfinite: bool = False) -> SearchStrategy[str]:
    """Magnitude-class names for ``dtype`` (see `MAGNITUDES`). "nan-inf" is
    only drawn with ``allow_nonfinite=True``.

    >>> magnitudes("fp16", allowed=("normal", "subnormal"))  # doctest: +SKIP
    """
    _input_format(dtype, error=InvalidArgument)
    known = MAGNITUDES if allow_nonfinite else tuple(m for m in MAGNITUDES if m != "nan-inf")
    if allowed is not None and "nan-inf" in allowed and not allow_nonfinite:
        raise InvalidArgument("magnitude 'nan-inf' needs allow_nonfinite=True")
    return _labelled(_check_choices("magnitude", allowed, known), "magnitude")


def scales(*, head_dim: int | None = None, min_value: float = 0.01, max_value: float = 10.0):
    """Softmax scales: None (the kernel's default 1/sqrt(D)), 1.0,
    1/sqrt(head_dim) given explicitly, or log-uniform in [min_value, max_value].

    >>> scales(head_dim=64)  # doctest: +SKIP
    """
    for name, value in (("min_value", min_value), ("max_value", max_value)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{name}={value!r} must be a number")
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"{name}={value!r} must be positive and finite")
    if min_value > max_value:
        raise InvalidArgument(f"min_value={min_value} is larger than max_value={max_value}")
    if head_dim is not None:
        _check_int("head_dim", head_dim, min_value=1)
    lo, hi = math.log(min_value), math.log(max_value)
    log_uniform = st.floats(lo, hi).map(lambda t: min(max(math.exp(t), min_value), max_value))
    options = [
        st.just(None).map(lambda s: (event("scale: default"), s)[1]),
        st.just(1.0).map(lambda s: (event("scale: 1.0"), s)[1]),
        log_uniform.map(lambda s: (event("scale: log-uniform"), s)[1]),
    ]
    if head_dim is not None:
        options.insert(2, st.just(1.0 / math.sqrt(head_dim)).map(lambda s: (event("scale: 1/sqrt(D)"), s)[1]))
    return st.one_of(options)


# -- q, k, v ------------------------------------------------------------------

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
    shape = _check_shape(shape)
    fmt = _input_format(dtype)
    if magnitude not in MAGNITUDES:
        raise ValueError(f"unknown magnitude class {magnitude!r}; expected one of {MAGNITUDES}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    scale = _check_scale(scale)
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

_seeds = st.integers(0, 2**32 - 1)


def qkv_arrays(shape: dict, dtype, *, magnitudes=None, scale: float | None = None,
               allow_nonfinite: bool = False) -> SearchStrategy[QKV]:
    """Strategy wrapper of `qkv`: draws the magnitude class and the seed.

    >>> qkv_arrays(dict(B=1, H=1, Hkv=1, Nq=4, Nk=4, D=8, Dv=8), "bf16")  # doctest: +SKIP
    """
    try:
        shape = _check_shape(shape, error=InvalidArgument)
        scale = _check_scale(scale, error=InvalidArgument)
    except TypeError as exc:
        raise InvalidArgument(str(exc)) from None
    classes = _magnitudes_strategy(dtype, allowed=magnitudes, allow_nonfinite=allow_nonfinite)
    return st.tuples(classes, _seeds).map(lambda ms: qkv(shape, dtype, ms[0], ms[1], scale=scale))


_magnitudes_strategy = magnitudes


# -- masks --------------------------------------------------------------------

def _mask_dims(name, shape):
    table = {"Nq": shape["Nq"], "Nk": shape["Nk"], "B": shape["B"], "H": shape["H"], "1": 1}
    return tuple(table[part] for part in name.split(","))


def _full_view(mask, shape):
    """Mask broadcast to (B, H, Nq, Nk), True where a key is visible."""
    visible = mask if mask.dtype == np.bool_ else to_float64(mask) != -np.inf
    return np.broadcast_to(visible, (shape["B"], shape["H"], shape["Nq"], shape["Nk"]))


def _build_mask(shape, fmt, kind, mask_shape, seed):
    rng = np.random.default_rng(seed)
    dims = _mask_dims(mask_shape, shape)
    Nq, Nk = shape["Nq"], shape["Nk"]
    tags = {}
    if kind == "bool-random":
        mask = rng.random(dims) < rng.uniform(0.05, 0.95)
    elif kind == "additive":
        mask = _additive(rng, dims, fmt)
    elif kind == "sliding-window":
        left, right = int(rng.integers(0, Nk + 1)), int(rng.integers(0, Nk + 1)) * int(rng.integers(2))
        align = str(rng.choice(["top-left", "bottom-right"]))
        centre = np.arange(Nq)[:, None] + (0 if align == "top-left" else Nk - Nq)
        j = np.arange(Nk)[None, :]
        band = (j >= centre - left) & (j <= centre + right)
        mask = np.broadcast_to(band, dims).copy()
        tags["window"] = (left, right, align)
    elif kind == "fully-masked-rows":
        additive = bool(rng.integers(2))
        mask = _additive(rng, dims, fmt) if additive else rng.random(dims) < rng.uniform(0.5, 0.95)
        rows = mask.reshape(-1, Nk)  # every mask shape of this kind ends in (Nq, Nk)
        count = int(rng.integers(1, max(1, rows.shape[0] // 2) + 1))
        picked = rng.choice(rows.shape[0], count, replace=False)
        rows[picked] = from_float64(np.full(Nk, -np.inf), fmt) if additive else False
    else:
        raise ValueError(f"mask kind {kind!r} has no explicit mask")
    tags["fully_masked_rows"] = int((~_full_view(mask, shape).any(axis=-1)).sum())
    return mask, tags


def _additive(rng, dims, fmt):
    """Finite offsets with -inf entries, stored in the input dtype."""
    values = rng.standard_normal(dims) * float(rng.choice([1.0, 4.0, 16.0]))
    values[rng.random(dims) < rng.uniform(0.0, 0.5)] = -np.inf
    return from_float64(values, fmt)


class Mask(NamedTuple):
    """What `masks` draws: the ``attn_mask`` array (or None), ``is_causal``,
    the kind's name, and tags (always ``fully_masked_rows``, a count of
    (b, h, i) rows with no visible key)."""

    attn_mask: np.ndarray | None
    is_causal: bool
    kind: str
    tags: dict


@st.composite
def _masks(draw, shape, fmt, kinds):
    kind = draw(st.sampled_from(kinds))
    event(f"mask: {kind}")
    if kind == "none":
        return Mask(None, False, kind, {"fully_masked_rows": 0})
    if kind == "causal":
        # torch aligns is_causal top-left: row i sees keys 0..i, never none.
        return Mask(None, True, kind, {"fully_masked_rows": 0})
    allowed = [m for m in MASK_SHAPES if m.endswith("Nq,Nk")] if kind in (
        "sliding-window", "fully-masked-rows") else list(MASK_SHAPES)
    mask_shape = draw(st.sampled_from(allowed))
    event(f"mask shape: ({mask_shape})")
    mask, tags = _build_mask(shape, fmt, kind, mask_shape, draw(_seeds))
    if tags["fully_masked_rows"]:
        event("mask: has fully masked rows")
    tags["mask_shape"] = mask.shape
    return Mask(mask, False, kind, tags)


def masks(shape: dict, dtype, *, kinds=MASK_KINDS) -> SearchStrategy[Mask]:
    """Attention masks for ``shape`` (a dict from `shapes`) and input
    ``dtype``, as `Mask` tuples.

    Kinds: "none"; "causal" (``is_causal=True``, no array); "bool-random"
    (True attends, random density); "additive" (finite offsets and -inf in
    the input dtype); "sliding-window" (bool band with left/right widths,
    aligned top-left or bottom-right); "fully-masked-rows" (bool or additive,
    at least one row with no visible key). Explicit masks come in broadcast
    shapes (Nq, Nk), (1, 1, Nq, Nk), (1, H, Nq, Nk), (B, 1, Nq, Nk),
    (B, H, Nq, Nk) and, for random kinds, key padding (B, 1, 1, Nk).

    >>> masks(dict(B=1, H=2, Hkv=2, Nq=5, Nk=7, D=8, Dv=8), "fp16")  # doctest: +SKIP
    """
    try:
        shape = _check_shape(shape, error=InvalidArgument)
    except TypeError as exc:
        raise InvalidArgument(str(exc)) from None
    fmt = _input_format(dtype, error=InvalidArgument)
    return _masks(shape, fmt, _check_choices("mask kind", kinds, MASK_KINDS))


_masks_strategy = masks


# -- whole cases --------------------------------------------------------------

@st.composite
def _cases(draw, dtype_st, shape_st, magnitude_names, mask_kinds, layout_st, block_kind, with_grad,
           allow_nonfinite):
    # Class choices first: they then vary as freely as the shape does.
    fmt = draw(dtype_st)
    magnitude = draw(_magnitudes_strategy(fmt, allowed=magnitude_names, allow_nonfinite=allow_nonfinite))
    mask_kind = draw(st.sampled_from(mask_kinds))
    layout = draw(layout_st)
    shape = draw(shape_st)
    scale = draw(scales(head_dim=shape["D"]))
    seed = draw(_seeds)
    q, k, v, tags = qkv(shape, fmt, magnitude, seed, scale=scale)
    mask = draw(_masks_strategy(shape, fmt, kinds=(mask_kind,)))
    block_m = block_n = None
    if block_kind is not None:
        if block_kind == "triton":
            block_m, block_n = draw(block_sizes(kind="triton")), draw(block_sizes(kind="triton"))
        else:  # up to twice the sequence: tiles that split it, and tiles that cover it
            block_m = draw(block_sizes(kind="numpy", max_value=2 * shape["Nq"]))
            block_n = draw(block_sizes(kind="numpy", max_value=2 * shape["Nk"]))
        event(f"block_m: {_block_class(block_m, shape['Nq'])}")
        event(f"block_n: {_block_class(block_n, shape['Nk'])}")
    do = None
    if with_grad:
        do_shape = (shape["B"], shape["H"], shape["Nq"], shape["Dv"])
        do = from_float64(np.random.default_rng([seed, 1]).standard_normal(do_shape), fmt)
    return Case(
        q=q, k=k, v=v,
        attn_mask=mask.attn_mask, is_causal=mask.is_causal, scale=scale,
        enable_gqa=shape["Hkv"] != shape["H"], layout=layout,
        magnitude=magnitude, mask_kind=mask.kind,
        block_m=block_m, block_n=block_n, do=do, seed=seed,
        tags={**tags, **mask.tags, "heads": _head_kind(shape["H"], shape["Hkv"])},
    )


def cases(
    *,
    dtypes=("fp16", "bf16", "fp32"),
    magnitudes=None,
    masks=None,
    layouts=None,
    max_batch: int = 2,
    max_heads: int = 4,
    max_seq: int = 256,
    max_scores: int = 2**14,
    head_dims: SearchStrategy[int] | None = None,
    gqa: bool = True,
    distinct_dv: bool = True,
    block_kind: str | None = None,
    with_grad: bool = False,
    allow_nonfinite: bool = False,
) -> SearchStrategy[Case]:
    """Whole `flashcheck.verify.case.Case` objects: dtype, shape, magnitude class,
    scale, mask, layout, and optionally block sizes and an output gradient.

    ``dtypes``, ``magnitudes``, ``masks``, ``layouts`` are sequences of
    names (None: all; "nan-inf" only with ``allow_nonfinite``). Shape
    options are those of `shapes`; ``max_scores`` caps B * H * Nq * Nk.
    ``block_kind`` ("numpy" or "triton") sets ``block_m``/``block_n``;
    ``with_grad`` adds ``case.do``, exact in the input dtype.

    >>> from hypothesis import find
    >>> case = find(cases(masks=("fully-masked-rows",)), lambda c: True)
    >>> case.mask_kind, case.tags["fully_masked_rows"] >= 1
    ('fully-masked-rows', True)
    """
    if not isinstance(allow_nonfinite, bool):
        raise InvalidArgument(f"allow_nonfinite={allow_nonfinite!r} must be a bool")
    if not isinstance(with_grad, bool):
        raise InvalidArgument(f"with_grad={with_grad!r} must be a bool")
    if block_kind not in (None, "numpy", "triton"):
        raise InvalidArgument(f"block_kind={block_kind!r}; expected None, 'numpy' or 'triton'")
    dtype_st = _dtypes_strategy(allowed=dtypes)
    known = MAGNITUDES if allow_nonfinite else tuple(m for m in MAGNITUDES if m != "nan-inf")
    if magnitudes is not None and "nan-inf" in tuple(magnitudes) and not allow_nonfinite:
        raise InvalidArgument("magnitude 'nan-inf' needs allow_nonfinite=True")
    magnitude_names = _check_choices("magnitude", magnitudes, known)
    mask_kinds = _check_choices("mask kind", masks, MASK_KINDS)
    layout_st = _layouts_strategy(allowed=LAYOUTS if layouts is None else layouts)
    shape_st = shapes(
        max_batch=max_batch, max_heads=max_heads, max_seq=max_seq, head_dims=head_dims, gqa=gqa,
        max_scores=max_scores, distinct_dv=distinct_dv,
    )
    return _cases(dtype_st, shape_st, magnitude_names, mask_kinds, layout_st, block_kind, with_grad,
                  allow_nonfinite)


_dtypes_strategy = dtypes
_layouts_strategy = layouts


# -- logits for softmax-only properties ------------------------------------

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


@st.composite
def _logit_rows(draw, fmt, kinds, max_rows, max_cols):
    kind = draw(st.sampled_from(kinds))
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    if kind == "one-hot" and cols == 1:
        cols = 2  # one key cannot dominate others that do not exist
    event(f"logits: {kind}")
    x = _logit_values(np.random.default_rng(draw(_seeds)), kind, rows, cols)
    # Rounding can move a value by half an ulp: harmless for every class's promise.
    return round_to(x, fmt)


def logit_rows(fmt="fp32", *, classes=None, max_rows: int = 8, max_cols: int = 64):
    """2-D float64 arrays of logits (rows = queries), every value exactly
    representable in ``fmt`` (any format of `flashcheck.kernels.precision.FORMATS`,
    tf32 included), for softmax-only properties.

    Classes (`LOGIT_CLASSES`): "normal"; "large-offset" (|offset| in
    100..1e4 per row); "near-overflow" (row max 90..4096); "all-negative"
    (every value <= -110); "uniform" (constant rows); "one-hot" (one entry
    beats the rest by >= 24); "neg-inf-entries" (some -inf, one finite value
    per row at least); "full-neg-inf-rows" (at least one row all -inf).

    >>> from hypothesis import find
    >>> x = find(logit_rows("bf16", classes=("all-negative",)), lambda x: x.shape[1] > 3)
    >>> x.shape, bool(x.max() <= -110)
    ((1, 4), True)
    """
    try:
        fmt = format_of(fmt).name
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad logits format {fmt!r}: {exc}") from None
    _check_int("max_rows", max_rows, min_value=1)
    _check_int("max_cols", max_cols, min_value=1)
    kinds = _check_choices("logit class", classes, LOGIT_CLASSES)
    return _logit_rows(fmt, kinds, int(max_rows), int(max_cols))
