"""Case plans: the features of a case, chosen before its details.

A `Plan` fixes one value per feature: input dtype, size stratum, whether
Nq == Nk, whether the lengths sit on tile boundaries, the head layout
(MHA, MQA, GQA), the head-dim class, whether Dv differs from D, the mask
kind, the memory layout and the magnitude class. The details (exact lengths,
head counts, seeds, scale, block sizes) are drawn afterwards, inside the
plan, by `flashcheck.properties.strategies.cases_from_plan`.

Choosing every feature independently for each case is swarm testing
(Groce, Zhang, Eide, Chen, Regehr, ISSTA 2012): a case that enables few
features at once reaches bugs that the always-everything case hides, and no
feature's share depends on another's. `PlanDealer` deals each feature's
values in shuffled rounds, so over n cases every allowed value of a feature
appears n/k times, give or take one, whatever the other features are and
whatever a targeted search prefers.

Size strata are relative to a 64-wide tile, the usual key tile of flash
kernels (FlashAttention-2 uses 64 or 128): "key-tiles" has at least three
key tiles, "query-tiles" at least two query tiles, "both-tiles" both, and
"long" keeps decode-like rows of hundreds to thousands of keys. On CUDA
three more reach the sizes where real kernels broke (long-context index
overflow, split-KV decode): "decode" (1 to 8 queries over up to 2**17 + 1
keys), "past-64k" (up to 256 queries over key lengths on both sides of
2**16) and "huge" (Nq and Nk both around 2**16, one head; not dealt unless
asked for with ``sizes``: one case costs seconds).

>>> dealer = PlanDealer(feature_values(dtypes=("fp16",)), seed=0)
>>> plan = dealer.deal()
>>> plan.dtype, plan.size in SIZE_STRATA
('fp16', True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.precision import from_float64
from flashcheck.properties.case import LAYOUTS, Case
from flashcheck.properties.inputs import MAGNITUDES, qkv
from flashcheck.properties.masks import MASK_KINDS, mask_array, mask_shapes
from flashcheck.properties.validation import INPUT_DTYPES

__all__ = [
    "CHOICE_MAX",
    "DEFAULT_MAX_SCORES",
    "MASK_PLANE_CAP",
    "NONFINITE_MAX_SCORES",
    "FEATURES",
    "N_CHOICES",
    "HEAD_DIM_CLASSES",
    "HEAD_KINDS",
    "PLAIN",
    "SIZE_STRATA",
    "TILE",
    "TRITON_BLOCK_SIZES",
    "Plan",
    "PlanDealer",
    "SizeStratum",
    "case_from_plan",
    "feature_values",
    "head_kind",
    "size_strata",
    "strata_names",
]

#: The tile the size strata count in (keys per key tile, queries per query tile).
TILE = 64

#: Block sizes the Triton kernel accepts (powers of two; tl.arange needs them).
TRITON_BLOCK_SIZES = (16, 32, 64, 128)

#: Default cap on B * H * Nq * Nk per case. On the CPU the oracle and the
#: bound run in float64 NumPy and a 2-core CI runs a 40-case, 19-target
#: self-test in minutes; on CUDA they run on the device, tiled over query
#: rows, and the strata's own caps decide (`SizeStratum.max_scores`).
DEFAULT_MAX_SCORES = {"cpu": 2**16, "cuda": 2**35}

#: Cap on B * H * Nq * Nk of cases with NaN/Inf inputs: their finite rows
#: are judged against the host oracle of the case with those values zeroed.
NONFINITE_MAX_SCORES = 2**20

#: Cap on Nq * Nk when a case has an explicit mask: the mask's (Nq, Nk)
#: plane is built on the host (2**26 entries: 128 MB as float16).
MASK_PLANE_CAP = 2**26

#: Features of a plan, in the order a declined case is simplified (`verify.capabilities`).
FEATURES = ("magnitude", "mask", "layout", "heads", "dv", "lengths", "align", "head_dim", "size", "dtype")

HEAD_KINDS = ("MHA", "MQA", "GQA")

#: Head-dim classes: the values each one draws from.
HEAD_DIM_CLASSES = {
    "tiny": (1, 2, 3, 4, 5, 7, 8, 9, 12, 15),
    "16-32": (16, 32),
    "64": (64,),
    "128": (128,),
    "odd": (40, 48, 59, 72, 80, 96, 111, 112, 160),
    "192-256": (192, 256),
}

#: The value of each feature that narrow kernels most often support; a
#: declined case is simplified toward it to find what was declined.
PLAIN = {
    "dtype": "fp16", "size": "one-tile", "lengths": "equal", "align": "aligned", "heads": "MHA",
    "head_dim": "64", "dv": "same", "mask": "none", "layout": "contiguous", "magnitude": "normal",
}


@dataclass(frozen=True)
class SizeStratum:
    """Length ranges (inclusive) of one size stratum and its head/batch caps."""

    name: str
    nq: tuple[int, int]
    nk: tuple[int, int]
    max_batch: int
    max_heads: int
    #: False: no Nq == Nk cases (decode shapes); a plan asking for equal
    #: lengths gets different ones, as its Nq and Nk show.
    square: bool = True
    #: dealt by default (False: only when asked for by name)
    default: bool = True
    #: cap on B * H * Nq * Nk of this stratum's cases (None: the device's)
    max_scores: int | None = None

    def equal_range(self) -> tuple[int, int]:
        """Range of N when Nq == Nk: the key range, or the query range if that is the longer one."""
        lo = max(self.nq[0], self.nk[0])
        hi = max(self.nq[1], self.nk[1]) if lo <= min(self.nq[1], self.nk[1]) else max(self.nq[1], self.nk[1])
        return lo, hi


def size_strata(device: str = "cpu") -> dict[str, SizeStratum]:
    """The size strata for ``device``; on CUDA every length range is longer.

    >>> sorted(size_strata("cpu"))
    ['both-tiles', 'key-tiles', 'long', 'one-tile', 'query-tiles', 'tiny']
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}; expected 'cpu' or 'cuda'")
    T = TILE
    if device == "cpu":
        # Kept small enough that a 2-core CI runs 40 cases over 20 targets in minutes.
        rows = [
            ("tiny", (1, 17), (1, 17), 2, 4),
            ("one-tile", (18, T), (18, T), 2, 4),
            ("key-tiles", (1, 48), (2 * T + 1, 5 * T), 1, 4),
            ("query-tiles", (T + 1, 200), (1, 96), 1, 4),
            ("both-tiles", (T + 1, 160), (2 * T + 1, 4 * T), 1, 4),
            ("long", (1, 8), (8 * T + 1, 24 * T), 1, 4),
        ]
        return {name: SizeStratum(name, nq, nk, b, h) for name, nq, nk, b, h in rows}
    k16 = 2**16
    strata = [
        SizeStratum("tiny", (1, 17), (1, 17), 4, 8),
        SizeStratum("one-tile", (18, 2 * T), (18, 2 * T), 4, 8),
        SizeStratum("key-tiles", (1, 2 * T), (2 * T + 1, 32 * T), 2, 8),
        SizeStratum("query-tiles", (2 * T + 1, 32 * T), (1, 2 * T), 2, 8),
        SizeStratum("both-tiles", (2 * T + 1, 16 * T), (2 * T + 1, 32 * T), 2, 8),
        SizeStratum("long", (1, 64), (32 * T + 1, 256 * T), 1, 8, max_scores=2**26),
        SizeStratum("decode", (1, 8), (T + 1, 2 * k16 + 1), 2, 8, square=False, max_scores=2**22),
        # key lengths on both sides of 2**16: 16-bit index and offset arithmetic
        SizeStratum("past-64k", (1, 4 * T), (k16 - 3 * T, k16 + 3 * T), 1, 4, square=False, max_scores=2**25),
        # GQA needs 4 heads: 4 heads of 65,600 squared
        SizeStratum("huge", (k16 // 2, k16 + 3 * T), (k16 - 3 * T, k16 + 3 * T), 1, 4, default=False,
                    max_scores=2**34 + 2**30),
    ]
    return {s.name: s for s in strata}


def strata_names(device: str = "cpu", *, every: bool = False) -> tuple[str, ...]:
    """The size strata of ``device`` dealt by default (``every``: with the
    ones dealt only on request).

    >>> strata_names("cuda")[-2:], strata_names("cuda", every=True)[-1]
    (('decode', 'past-64k'), 'huge')
    """
    return tuple(name for name, s in size_strata(device).items() if every or s.default)


#: Names of the CPU size strata (CUDA has these and more: `strata_names`).
SIZE_STRATA = tuple(size_strata("cpu"))


@dataclass(frozen=True)
class Plan:
    """One value per feature of `FEATURES`."""

    dtype: str
    size: str
    lengths: str  # "equal" or "different"
    align: str  # "aligned" (multiples of 16/64) or "ragged"
    heads: str  # "MHA", "MQA" or "GQA"
    head_dim: str | int  # a class of HEAD_DIM_CLASSES, or an exact head dim
    dv: str  # "same" or "different"
    mask: str
    layout: str
    magnitude: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    def matches(self, rule: dict) -> bool:
        """True if every feature named in ``rule`` has the rule's value."""
        return all(getattr(self, f) == v for f, v in rule.items())


def _choices(name, values, known):
    if values is None:
        return tuple(known)
    values = tuple(dict.fromkeys(values))
    if not values:
        raise ValueError(f"{name} must not be empty; leave it None for all of {tuple(known)}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {name} {unknown}; expected some of {tuple(known)}")
    return values


def feature_values(*, dtypes=None, sizes=None, lengths=None, aligns=None, heads=None, head_dims=None, dvs=None,
                   masks=None, layouts=None, magnitudes=None, device: str = "cpu") -> dict[str, tuple]:
    """The allowed values of every feature; None means all of them (for
    ``sizes``: the strata `strata_names` deals by default on ``device``).

    ``head_dims`` takes class names of `HEAD_DIM_CLASSES` or exact integers
    (a kernel that supports only 64 and 128: ``head_dims=(64, 128)``).

    >>> feature_values(heads=("MHA",), lengths=("equal",))["heads"]
    ('MHA',)
    """
    if head_dims is not None:
        head_dims = tuple(head_dims)
        for d in head_dims:
            if isinstance(d, str) and d not in HEAD_DIM_CLASSES:
                raise ValueError(f"unknown head-dim class {d!r}; expected one of {tuple(HEAD_DIM_CLASSES)} "
                                 "or an integer head dim")
            if not isinstance(d, str) and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
                raise ValueError(f"head dim {d!r} must be a positive integer or a class name")
        head_dims = tuple(d if isinstance(d, str) else int(d) for d in head_dims)
        if not head_dims:
            raise ValueError("head_dims must not be empty")
    values = {
        "dtype": _choices("dtypes", dtypes, INPUT_DTYPES),
        "size": _sizes(sizes, device),
        "lengths": _choices("lengths", lengths, ("equal", "different")),
        "align": _choices("aligns", aligns, ("aligned", "ragged")),
        "heads": _choices("heads", heads, HEAD_KINDS),
        "head_dim": head_dims or tuple(HEAD_DIM_CLASSES),
        "dv": _choices("dvs", dvs, ("same", "different")),
        "mask": _choices("masks", masks, MASK_KINDS),
        "layout": _choices("layouts", layouts, LAYOUTS),
        "magnitude": _choices("magnitudes", magnitudes, MAGNITUDES),
    }
    assert tuple(sorted(values)) == tuple(sorted(FEATURES))
    return values


def _sizes(sizes, device: str) -> tuple:
    if sizes is None:
        return strata_names(device)
    known = strata_names(device, every=True)
    elsewhere = [v for v in sizes if v not in known and any(v in strata_names(d, every=True) for d in ("cpu", "cuda"))]
    if elsewhere:
        raise ValueError(f"size strata {elsewhere} exist only on another device; {device} has {known}")
    return _choices("sizes", sizes, known)


class PlanDealer:
    """Deals plans whose feature values come in shuffled rounds.

    Each feature has its own deck holding every allowed value once; a plan
    takes the next card of every deck, and an empty deck is reshuffled. So
    each value of a feature appears once per round of that feature, and
    features vary independently (their decks are shuffled separately).

    ``deal(avoid=rules)`` skips plans matching any rule (a dict of feature
    values, as `verify.capabilities` learns them); `drop` removes a value
    for good. Same seed, same sequence of calls: same plans.
    """

    def __init__(self, values: dict[str, tuple], seed: int = 0):
        missing = [f for f in FEATURES if not values.get(f)]
        if missing:
            raise ValueError(f"PlanDealer needs values for every feature; missing or empty: {missing}")
        self.values = {f: list(values[f]) for f in FEATURES}
        self._rng = np.random.default_rng([int(seed), 0x5EED])
        self._decks: dict[str, list] = {f: [] for f in FEATURES}

    def _card(self, feature):
        deck = self._decks[feature]
        if not deck:
            deck.extend(self._rng.permutation(len(self.values[feature])).tolist())
        return self.values[feature][deck.pop()]

    def drop(self, feature: str, value) -> bool:
        """Never deal ``value`` of ``feature`` again; False (and nothing
        dropped) if it is the feature's last value."""
        vals = self.values[feature]
        if value not in vals or len(vals) == 1:
            return False
        vals.remove(value)
        self._decks[feature] = []  # a fresh round over the values left
        return True

    def deal(self, avoid=(), tries: int = 200) -> Plan | None:
        """The next plan matching no rule of ``avoid``; None if ``tries``
        plans in a row all matched one (the rules leave nothing to deal)."""
        for _ in range(tries):
            plan = Plan(**{f: self._card(f) for f in FEATURES})
            if not any(plan.matches(rule) for rule in avoid):
                return plan
        return None


def head_dim_values(head_dim) -> tuple[int, ...]:
    """The head dims a plan's ``head_dim`` value stands for."""
    if isinstance(head_dim, str):
        return HEAD_DIM_CLASSES[head_dim]
    return (int(head_dim),)


def aligned_lengths(lo: int, hi: int) -> list[int]:
    """Lengths in [lo, hi] on tile boundaries: the multiples of 16 (those of
    64 and 128 among them)."""
    return list(range(math.ceil(lo / 16) * 16, hi + 1, 16))


@functools.lru_cache(maxsize=8)
def primes_upto(n: int) -> tuple:
    """The primes <= n."""
    if n < 2:
        return ()
    sieve = np.ones(n + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return tuple(int(p) for p in np.flatnonzero(sieve))


def head_kind(H: int, Hkv: int) -> str:
    """"MHA", "MQA" or "GQA" for H query heads on Hkv key/value heads."""
    if Hkv == H:
        return "MHA"
    return "MQA" if Hkv == 1 else "GQA"


# -- realising a plan -----------------------------------------------------------

#: How many raw choices `case_from_plan` reads, and their bound.
N_CHOICES = 24
CHOICE_MAX = 2**16 - 1


class _Choices:
    """Reads raw integers in [0, CHOICE_MAX] in order, as small decisions.
    0 always means the first or smallest option, so shrinking the raw
    integers shrinks the case."""

    def __init__(self, raw):
        raw = [int(r) for r in raw]
        if len(raw) != N_CHOICES or any(not 0 <= r <= CHOICE_MAX for r in raw):
            raise ValueError(f"need {N_CHOICES} raw choices in [0, {CHOICE_MAX}], got {raw!r}")
        self._raw, self._i = raw, 0

    def _next(self) -> int:
        if self._i == len(self._raw):
            raise RuntimeError(f"internal error: case_from_plan read more than {N_CHOICES} choices")
        self._i += 1
        return self._raw[self._i - 1]

    def integer(self, lo: int, hi: int) -> int:
        return lo + self._next() * (hi - lo + 1) // (CHOICE_MAX + 1) if hi > lo else (self._next(), lo)[1]

    def pick(self, values):
        return values[self.integer(0, len(values) - 1)]

    def index(self, n: int) -> int:
        """An index in [0, n) from two raw choices: Hypothesis favours the
        ends of a range, and a sum of two spreads them over the middle."""
        return (self._next() + self._next()) % n if n > 1 else (self._next(), self._next(), 0)[2]

    def unit(self) -> float:
        return self._next() / CHOICE_MAX


def _ragged_options(lo: int, hi: int) -> list[list[int]]:
    """Length pools off the tile boundaries in [lo, hi]: k*64 +- 1, 1, 2^k +- 1;
    primes; and every length that is not a multiple of 16."""
    edges = sorted({n for k in range(1, hi // TILE + 2) for n in (TILE * k - 1, TILE * k + 1)}
                   | {n for k in range(1, hi.bit_length() + 1) for n in ((1 << k) - 1, (1 << k) + 1)} | {1})
    pools = [[n for n in edges if lo <= n <= hi], [p for p in primes_upto(hi) if p >= lo],
             [n for n in range(lo, hi + 1) if n % 16]]
    # A range with no ragged length (a cap squeezed it onto one multiple of 16): just below it.
    return [p for p in pools if p] or [[max(1, lo - 1)]]


def _length(c: _Choices, align: str, lo: int, hi: int) -> int:
    hi = max(1, hi)
    lo = max(1, min(lo, hi))
    # A cap can squeeze [lo, hi] past every multiple of 16: then the one just below hi.
    aligned = aligned_lengths(lo, hi) or ([hi // 16 * 16] if hi >= 16 else [])
    pools = [aligned] if align == "aligned" and aligned else _ragged_options(lo, hi)
    pool = c.pick(pools)
    return pool[c.index(len(pool))]


def case_from_plan(plan: Plan, raw, *, device: str = "cpu", max_scores: int | None = None,
                   max_seq: int | None = None, block_kind: str | None = None, with_grad: bool = False) -> Case:
    """The case that ``plan`` and the raw choices ``raw`` (`N_CHOICES`
    integers in [0, `CHOICE_MAX`]) stand for; the same arguments give the same case.

    The plan fixes the features; ``raw`` decides the details: heads and
    batch, the lengths inside the size stratum of ``device`` (on tile
    boundaries or off them, as ``plan.align`` says), the head dim inside
    its class, Dv, the softmax scale, the mask's broadcast shape, the input
    seed and, for ``block_kind`` "triton" or "numpy", the block sizes.
    ``max_scores`` caps B * H * Nq * Nk (default `DEFAULT_MAX_SCORES`):
    batch and heads shrink first, so a case falls short of its stratum only
    when even one head does not fit. ``max_seq`` caps Nq and Nk.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    stratum = size_strata(device)[plan.size]
    if max_seq is not None:
        clamp = lambda r: (min(r[0], max_seq), min(r[1], max_seq))  # noqa: E731
        stratum = dataclasses.replace(stratum, nq=clamp(stratum.nq), nk=clamp(stratum.nk))
    if max_scores is None:
        max_scores = DEFAULT_MAX_SCORES[device]
    if stratum.max_scores is not None:
        max_scores = min(max_scores, stratum.max_scores)
    if plan.magnitude == "nan-inf":  # judged against the host oracle of the zeroed case
        max_scores = min(max_scores, NONFINITE_MAX_SCORES)
    c = _Choices(raw)
    fmt = plan.dtype
    nq_lo, nk_lo = stratum.nq[0], stratum.nk[0]
    equal = plan.lengths == "equal" and stratum.square
    plane = MASK_PLANE_CAP if plan.mask not in ("none", "causal") else None
    if plane is not None and equal:
        stratum = dataclasses.replace(stratum, nq=(min(stratum.nq[0], math.isqrt(plane)), stratum.nq[1]),
                                      nk=(min(stratum.nk[0], math.isqrt(plane)), stratum.nk[1]))
    elif plane is not None:  # fewer queries, so that the keys keep their stratum
        stratum = dataclasses.replace(stratum, nq=(min(stratum.nq[0], max(1, plane // stratum.nk[0])),
                                                   stratum.nq[1]))
    nq_lo, nk_lo = stratum.nq[0], stratum.nk[0]
    least = nq_lo * nk_lo if not equal else stratum.equal_range()[0] ** 2
    hmax = max(1, min(stratum.max_heads, max_scores // least))
    if plan.heads == "MQA":
        H, Hkv = c.integer(2, max(2, hmax)), 1
    elif plan.heads == "GQA":
        Hkv = c.integer(2, max(2, hmax // 2))
        H = Hkv * c.integer(2, max(2, hmax // Hkv))
    else:
        H = Hkv = c.integer(1, hmax)
    B = c.integer(1, max(1, min(stratum.max_batch, max_scores // (H * least))))
    budget = max(1, max_scores // (B * H))  # for Nq * Nk
    if plane is not None:
        budget = min(budget, plane)
    if equal:
        lo, hi = stratum.equal_range()
        Nq = Nk = _length(c, plan.align, lo, min(hi, math.isqrt(budget)))
    else:
        # leave room for the shortest query length of the plan's alignment
        nq_min = math.ceil(nq_lo / 16) * 16 if plan.align == "aligned" else nq_lo
        nq_min = nq_min if nq_min <= stratum.nq[1] else nq_lo
        Nk = _length(c, plan.align, nk_lo, min(stratum.nk[1], budget // nq_min))
        nq_hi = min(stratum.nq[1], budget // Nk)
        Nq = _length(c, plan.align, nq_lo, nq_hi)
        if Nq == Nk:  # "different" must differ: the nearest other length of the same alignment
            others = [n for n in range(nq_lo, nq_hi + 1) if n != Nk and (n % 16 == 0) == (plan.align == "aligned")]
            Nq = min(others, key=lambda n: abs(n - Nk)) if others else max(1, Nk - 1)
    dims = head_dim_values(plan.head_dim)
    D = int(dims[c.index(len(dims))])
    Dv = D if plan.dv == "same" else c.pick([d for d in (16, 32, 48, 64, 80, 128) if d != D])
    shape = {"B": B, "H": H, "Hkv": Hkv, "Nq": Nq, "Nk": Nk, "D": D, "Dv": Dv}
    scale = c.pick([None, 1.0, 1.0 / math.sqrt(D), 0.01 * 1000.0 ** c.unit()])
    seed = (c.integer(0, CHOICE_MAX) << 16) | c.integer(0, CHOICE_MAX)
    try:
        q, k, v, tags = qkv(shape, fmt, plan.magnitude, seed, scale=scale)
    except ValueError:
        # A logit-shaping class can need a larger scale than drawn (inputs would overflow).
        scale = None
        q, k, v, tags = qkv(shape, fmt, plan.magnitude, seed, scale=scale)
    attn_mask, is_causal, mask_tags = None, plan.mask == "causal", {"fully_masked_rows": 0}
    if plan.mask not in ("none", "causal"):
        mask_shape = c.pick(mask_shapes(plan.mask))
        attn_mask, mask_tags = mask_array(shape, fmt, plan.mask, mask_shape, seed + 1)
        mask_tags["mask_shape"] = attn_mask.shape
    block_m = block_n = None
    if block_kind == "triton":
        block_m, block_n = c.pick(TRITON_BLOCK_SIZES), c.pick(TRITON_BLOCK_SIZES)
    elif block_kind == "numpy":
        block_m, block_n = c.integer(1, 2 * Nq), c.integer(1, 2 * Nk)
    elif block_kind is not None:
        raise ValueError(f"block_kind={block_kind!r}; expected None, 'numpy' or 'triton'")
    do = None
    if with_grad:
        do = from_float64(np.random.default_rng([seed, 1]).standard_normal((B, H, Nq, Dv)), fmt)
    return Case(
        q=q, k=k, v=v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=Hkv != H,
        layout=plan.layout, magnitude=plan.magnitude, mask_kind=plan.mask, block_m=block_m, block_n=block_n,
        do=do, seed=seed, tags={**tags, **mask_tags, "heads": head_kind(H, Hkv), "plan": plan.as_dict()},
    )
