"""Hypothesis strategies that build attention test cases.

Flash-attention bugs hide in tails: huge and tiny logits, fully masked rows,
odd sequence lengths, grouped heads, non-contiguous memory. These strategies
aim there on purpose.

Tensors are never drawn element by element. Hypothesis draws the *choices*
(dtype, shape, magnitude class, mask kind, layout, block sizes) and a seed;
the builders (`flashcheck.properties.inputs`, `flashcheck.properties.masks`)
then fill the arrays from that seed, exactly in the input format. Shrinking
therefore works on the choices and the seed, and large tensors cost nothing
to draw.

Each drawn class is reported with `hypothesis.event`, so
``pytest --hypothesis-show-statistics`` shows what a run covered.

>>> from hypothesis import given
>>> @given(cases(max_seq=64))
... def test_something(case):
...     q, k, v, mask = case.to_torch()
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

from flashcheck.kernels.precision import format_of, from_float64, round_to
from flashcheck.properties.case import LAYOUTS, Case
from flashcheck.properties.inputs import (
    FP32_EXP_OVERFLOW,
    LOGIT_CLASSES,
    MAGNITUDES,
    ONE_HOT_GAP,
    QKV,
    logit_values,
    qkv,
)
from flashcheck.properties.masks import MASK_KINDS, MASK_SHAPES, Mask, mask_array, mask_shapes
from flashcheck.properties.plans import (
    CHOICE_MAX,
    N_CHOICES,
    TRITON_BLOCK_SIZES,
    Plan,
    case_from_plan,
    head_kind,
    primes_upto,
)
from flashcheck.properties.validation import (
    check_bool,
    check_choices,
    check_int,
    check_range,
    check_scale,
    check_shape,
    input_format,
)

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
    "cases_from_plan",
    "plan_choices",
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


#: Head dimensions seen in real models that are not powers of two.
SPECIAL_HEAD_DIMS = (59, 80, 96, 111, 160)

_seeds = st.integers(0, 2**32 - 1)


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
        ("prime", _in_range(primes_upto(1 << hi.bit_length()), lo, hi)),
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
    check_range("min_value", min_value, "max_value", max_value)
    return _lengths(int(min_value), int(max_value), "N")


def head_dims(*, min_value: int = 1, max_value: int = 256) -> SearchStrategy[int]:
    """Head dimensions: powers of two, the odd sizes of real models
    (59, 80, 96, 111, 160, where in range) and uniform draws.

    >>> from hypothesis import find
    >>> d = find(head_dims(), lambda d: d > 128)
    >>> 128 < d <= 256
    True
    """
    check_range("min_value", min_value, "max_value", max_value)
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

    event(f"heads: {head_kind(H, Hkv)}")
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
    check_int("max_batch", max_batch, min_value=1)
    check_int("max_heads", max_heads, min_value=1)
    check_range("min_seq", min_seq, "max_seq", max_seq)
    check_int("max_scores", max_scores, min_value=1)
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
    check_int("max_value", max_value, min_value=1)
    hi = int(max_value)
    options = [st.just(1), st.integers(1, hi)]
    primes = primes_upto(hi)
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
        name = input_format(d, error=InvalidArgument)
        if name not in names:
            names.append(name)
    return _labelled(names, "dtype")


def layouts(*, allowed=LAYOUTS) -> SearchStrategy[str]:
    """Memory layouts of `flashcheck.properties.case.LAYOUTS`: "contiguous", "bnhd", "strided"."""
    return _labelled(check_choices("layout", allowed, LAYOUTS), "layout")


def magnitudes(dtype, *, allowed=None, allow_nonfinite: bool = False) -> SearchStrategy[str]:
    """Magnitude-class names for ``dtype`` (see `MAGNITUDES`). "nan-inf" is
    only drawn with ``allow_nonfinite=True``.

    >>> magnitudes("fp16", allowed=("normal", "subnormal"))  # doctest: +SKIP
    """
    input_format(dtype, error=InvalidArgument)
    known = MAGNITUDES if allow_nonfinite else tuple(m for m in MAGNITUDES if m != "nan-inf")
    if allowed is not None and "nan-inf" in allowed and not allow_nonfinite:
        raise InvalidArgument("magnitude 'nan-inf' needs allow_nonfinite=True")
    return _labelled(check_choices("magnitude", allowed, known), "magnitude")


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
        check_int("head_dim", head_dim, min_value=1)
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


def qkv_arrays(shape: dict, dtype, *, magnitudes=None, scale: float | None = None,
               allow_nonfinite: bool = False) -> SearchStrategy[QKV]:
    """Strategy wrapper of `qkv`: draws the magnitude class and the seed.

    >>> qkv_arrays(dict(B=1, H=1, Hkv=1, Nq=4, Nk=4, D=8, Dv=8), "bf16")  # doctest: +SKIP
    """
    try:
        shape = check_shape(shape, error=InvalidArgument)
        scale = check_scale(scale, error=InvalidArgument)
    except TypeError as exc:
        raise InvalidArgument(str(exc)) from None
    classes = _magnitudes_strategy(dtype, allowed=magnitudes, allow_nonfinite=allow_nonfinite)
    return st.tuples(classes, _seeds).map(lambda ms: qkv(shape, dtype, ms[0], ms[1], scale=scale))


_magnitudes_strategy = magnitudes


@st.composite
def _masks(draw, shape, fmt, kinds):
    kind = draw(st.sampled_from(kinds))
    event(f"mask: {kind}")
    if kind == "none":
        return Mask(None, False, kind, {"fully_masked_rows": 0})
    if kind == "causal":
        # torch aligns is_causal top-left: row i sees keys 0..i, never none.
        return Mask(None, True, kind, {"fully_masked_rows": 0})
    allowed = mask_shapes(kind)
    mask_shape = draw(st.sampled_from(allowed))
    event(f"mask shape: ({mask_shape})")
    mask, tags = mask_array(shape, fmt, kind, mask_shape, draw(_seeds))
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
        shape = check_shape(shape, error=InvalidArgument)
    except TypeError as exc:
        raise InvalidArgument(str(exc)) from None
    fmt = input_format(dtype, error=InvalidArgument)
    return _masks(shape, fmt, check_choices("mask kind", kinds, MASK_KINDS))


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
        tags={**tags, **mask.tags, "heads": head_kind(shape["H"], shape["Hkv"])},
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
    """Whole `flashcheck.properties.case.Case` objects: dtype, shape, magnitude class,
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
    magnitude_names = check_choices("magnitude", magnitudes, known)
    mask_kinds = check_choices("mask kind", masks, MASK_KINDS)
    layout_st = _layouts_strategy(allowed=LAYOUTS if layouts is None else layouts)
    shape_st = shapes(
        max_batch=max_batch, max_heads=max_heads, max_seq=max_seq, head_dims=head_dims, gqa=gqa,
        max_scores=max_scores, distinct_dv=distinct_dv,
    )
    return _cases(dtype_st, shape_st, magnitude_names, mask_kinds, layout_st, block_kind, with_grad,
                  allow_nonfinite)


_dtypes_strategy = dtypes
_layouts_strategy = layouts


@st.composite
def _logit_rows(draw, fmt, kinds, max_rows, max_cols):
    kind = draw(st.sampled_from(kinds))
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    if kind == "one-hot" and cols == 1:
        cols = 2  # one key cannot dominate others that do not exist
    event(f"logits: {kind}")
    x = logit_values(np.random.default_rng(draw(_seeds)), kind, rows, cols)
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
    check_int("max_rows", max_rows, min_value=1)
    check_int("max_cols", max_cols, min_value=1)
    kinds = check_choices("logit class", classes, LOGIT_CLASSES)
    return _logit_rows(fmt, kinds, int(max_rows), int(max_cols))


# -- whole cases from a plan (the campaign's generator) ------------------------

#: Raw choices behind one case of `cases_from_plan`: a fixed number of
#: integers with fixed bounds, whatever the plan, so that Hypothesis sees the
#: same kind of draws for every plan (its data tree requires that) and
#: shrinks them toward 0, the smallest lengths and counts of the plan.
plan_choices = st.lists(st.integers(0, CHOICE_MAX), min_size=N_CHOICES, max_size=N_CHOICES)


def cases_from_plan(plan: Plan, *, device: str = "cpu", max_scores: int | None = None,
                    block_kind: str | None = None, with_grad: bool = False) -> SearchStrategy[Case]:
    """Cases that realise ``plan`` (a `flashcheck.properties.plans.Plan`):
    its features are fixed, the details are drawn (see
    `flashcheck.properties.plans.case_from_plan`).

    >>> from hypothesis import find
    >>> from flashcheck.properties.plans import PLAIN, Plan
    >>> case = find(cases_from_plan(Plan(**{**PLAIN, "size": "key-tiles"})), lambda c: True)
    >>> case.k.shape[2] > 128
    True
    """
    if not isinstance(plan, Plan):
        raise InvalidArgument(f"plan must be a Plan, got {type(plan).__name__}")
    if block_kind not in (None, "numpy", "triton"):
        raise InvalidArgument(f"block_kind={block_kind!r}; expected None, 'numpy' or 'triton'")
    check_bool("with_grad", with_grad)
    if max_scores is not None:
        check_int("max_scores", max_scores, min_value=1)
    return plan_choices.map(lambda raw: case_from_plan(plan, raw, device=device, max_scores=max_scores,
                                                       block_kind=block_kind, with_grad=with_grad))
