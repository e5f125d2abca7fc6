"""Flash attention in plain NumPy, with every intermediate rounded as a
`PrecisionModel` says.

The algebra is written out so that it can be read next to the papers:

* safe softmax in three passes (max, sum, normalise);
* the online normaliser of Milakov & Gimelshein (2018, "Online normalizer
  calculation for softmax"): one pass keeps a running max ``m`` and a running
  sum ``d``, rescaling ``d`` by ``exp(m_old - m_new)`` when the max grows;
* the FlashAttention-2 forward pass (Dao 2023): the same recurrence on key
  tiles, with an unnormalised output accumulator ``o`` rescaled alongside
  ``l``, and the split-KV combine of partial states (`merge`).

``model=None`` means exact float64 arithmetic: no rounding beyond float64's
own, the "float64 direct" reference.

Emulation contract
------------------
All values are float64 arrays holding numbers representable in the format
the model names for that intermediate; ``fl_X`` below is
``round_to(., model.X)``, round-to-nearest-even unless said otherwise.

1. Dot products. Products of two inputs are exact (fp32 x fp32 needs 48
   bits, float64 has 53; with ``model.tf32`` both operands are first rounded
   to tf32). They are added one at a time, in order of the reduction index,
   to the running accumulator, rounding each sum to ``model.qk_acc`` (for
   S = Q K^T, starting from 0) or ``model.pv_acc`` (for P V, starting from
   the rescaled ``o``), in ``model.acc_rounding`` ("zero" truncates, as
   tensor-core adders do). Real tensor cores add a few products at a time;
   sequential accumulation is the model the error bounds assume.
2. Logits. ``exp_impl == "exact"``: s = fl_logits(S * fl32(scale)), then an
   additive mask gives fl_logits(s + mask); p = fl_exp(exp(fl_logits(s - m))).
   ``exp_impl == "exp2"`` (what GPU kernels do): c = fl32(fl32(scale) *
   log2 e); t = fl_logits(S * c), plus fl_logits(mask * fl32(log2 e)) for an
   additive mask, rounded to logits again; p = fl_exp(2^fl_logits(t - m)).
   In that mode the running max ``m`` (and `State.m`) is in base-2 units.
   A boolean mask or causality sets masked logits to -inf.
   exp / exp2 is emulated as correctly rounded to the exp format (NumPy's
   float64 exp rounded once more; its 1-ulp float64 error is ~2**-29 of an
   fp32 ulp). ``model.exp_rel_err``, the error of the hardware's
   approximate exp, is NOT emulated: the error bounds account for it.
3. Per key tile: m_new = max(m_old, rowmax(tile));
   alpha = fl_rescale(exp(fl_logits(m_old - m_new))), with alpha = 1 and
   p = 0 while m_new is -inf (never NaN); l = fl_l_acc(l * alpha), then the
   tile's p (in the exp format, before rounding to ``model.p``, as
   FlashAttention-2 sums them) are added one by one in ``model.l_acc``;
   P = fl_p(p); o = fl_pv_acc(o * alpha), then P V is accumulated as in 1.
   Only the tensor-core accumulations (S and P V) use ``acc_rounding``; the
   row sum, the rescalings and the final division round to nearest.
4. End: out = fl_out(fl_pv_acc(o / l)), exactly 0 for a fully masked row;
   lse = fl32(m + fl32(log l)) (exp2 mode: fl32(fl32(m + fl32(log2 l)) *
   fl32(ln 2)), natural log), -inf for a fully masked row.
5. ``model.softmax == "stored"`` (torch's math backend; ``scaling ==
   "sqrt-qk"``): q and k are first multiplied by c = fl32(sqrt(scale)),
   each product rounded to fp32, and S = q_c k_c^T accumulated as in 1 is
   the logit (rounded to ``model.logits``), plus an additive mask rounded
   once more. Then the whole row at once: m = max_j s_j,
   e_j = fl_exp(exp(fl_logits(s_j - m))), l = sum_j e_j added in key order
   in ``l_acc``, P_j = fl_p(e_j * fl_l_acc(1 / l)) (ATen's CPU softmax
   multiplies by the reciprocal), 0 on rows with no visible key; out =
   fl_out(P V accumulated as in 1 in ``pv_acc``), lse = fl32(m +
   fl32(log l)). Tiles play no part (``block_m``, ``block_n`` are only
   validated), and no partial state exists: `partial_state`,
   `split_kv_attention` refuse such a model.
6. Rows are independent, so ``block_m`` does not change any number; the
   queries are still padded to whole blocks of ``block_m`` rows and
   processed block by block (vectorised across blocks, heads and batch).
   Keys are processed tile by tile and, inside a tile, key by key wherever
   an accumulation is sequential. Overflow in an emulated format propagates
   as it would on hardware (inf, then possibly NaN).

>>> q = np.zeros((1, 1, 2, 4)); k = np.zeros((1, 1, 3, 4))
>>> v = np.arange(12.0).reshape(1, 1, 3, 4)
>>> tiled_attention(q, k, v)[0, 0, 0].tolist()  # equal logits: mean of v's rows
[4.0, 5.0, 6.0, 7.0]
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.precision import PrecisionModel, format_of, round_to, to_float64
from flashcheck.kernels.sdpa_args import (
    check_array,
    check_finite,
    check_float_dtype,
    check_mask_values,
    check_sdpa_args,
    is_array,
)

__all__ = [
    "State",
    "attention_1pass",
    "empty_state",
    "finalize",
    "merge",
    "partial_state",
    "softmax_3pass",
    "softmax_online",
    "split_kv_attention",
    "tiled_attention",
]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# -- rounding helpers ----------------------------------------------------------


def _fl(x, model, field):
    """Round ``x`` to the format of ``model.<field>`` (nearest); identity
    when ``model`` is None. ``field`` may also be a format name."""
    if model is None:
        return x
    fmt = getattr(model, field) if hasattr(model, field) else field
    return round_to(x, fmt)


def _fl_acc(x, model, field):
    """Round an accumulator sum as the tensor cores would."""
    if model is None:
        return x
    return round_to(x, getattr(model, field), model.acc_rounding)


def _const(value, model):
    """A constant as the kernel holds it: fp32 under a model, else exact."""
    return float(value) if model is None else float(round_to(np.float64(value), "fp32"))


def _base2(model) -> bool:
    return model is not None and model.exp_impl == "exp2"


def _exp(x, model):
    """exp(x) in the model's units, rounded to the exp format."""
    with np.errstate(over="ignore"):
        return _fl(np.exp2(x) if _base2(model) else np.exp(x), model, "exp")


# -- argument checking ---------------------------------------------------------


def _check_model(model):
    if model is not None and not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel or None, got {type(model).__name__}")


def _check_block(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _is_tensor(x) -> bool:
    return is_array(x) and not isinstance(x, np.ndarray)


def _as_exact(x, name, model, field="input"):
    """(float64 values, format name) of a NumPy array or torch tensor of a
    floating dtype; checks values are finite and representable in the
    model's ``field`` format."""
    check_array(x, name)
    fmt = format_of(check_float_dtype(x, name))
    values = to_float64(x)
    check_finite(values, name)  # the emulation is defined for finite inputs
    if model is not None:
        target = getattr(model, field)
        if not np.array_equal(round_to(values, target), values):
            raise ValueError(
                f"{name} ({fmt.name}) has values not representable in model.{field} = {target!r}; "
                f"round them with flashcheck.kernels.precision.round_to first"
            )
    return values, fmt.name


def _check_logits(x, axis, model):
    """float64 copy of ``x`` with ``axis`` moved last."""
    check_array(x, "x")
    check_float_dtype(x, "x")
    values = to_float64(x)
    if values.ndim == 0:
        raise ValueError("x must have at least one dimension")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__} {axis!r}")
    if not -values.ndim <= axis < values.ndim:
        raise ValueError(f"axis {axis} out of range for x of rank {values.ndim}")
    if np.any(np.isnan(values)) or np.any(values == np.inf):
        raise ValueError("x contains NaN or +inf; only finite logits and -inf are allowed")
    if model is not None and not np.array_equal(round_to(values, model.logits), values):
        raise ValueError(f"x has values not representable in model.logits = {model.logits!r}")
    return np.moveaxis(values, axis, -1)


@dataclass
class _Problem:
    """Validated attention inputs, all float64, kv heads already expanded."""

    q: np.ndarray  # (B, H, Nq, D)
    k: np.ndarray  # (B, H, Nk, D)
    v: np.ndarray  # (B, H, Nk, Dv)
    mask: np.ndarray | None  # broadcast view (B, H, Nq, Nk), bool or additive
    is_causal: bool
    scale: float
    qk_const: float | None = None  # c = fl32(sqrt(scale)) already folded into q and k ("sqrt-qk")

    @property
    def nk(self) -> int:
        return self.k.shape[2]


def _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, model) -> _Problem:
    _check_model(model)
    # Shapes, dtypes, flags, GQA, scale, mask shape and dtype: the shared SDPA
    # rules; sizes of 0 are allowed here (empty results, no kernel launch).
    args = check_sdpa_args(q, k, v, attn_mask, is_causal, scale, enable_gqa, allow_empty=True)
    qf, _ = _as_exact(q, "q", model)
    kf, _ = _as_exact(k, "k", model)
    vf, _ = _as_exact(v, "v", model)
    if args.groups > 1:
        kf = np.repeat(kf, args.groups, axis=1)  # query head h reads kv head h // groups
        vf = np.repeat(vf, args.groups, axis=1)
    if model is not None and model.tf32:
        qf, kf, vf = (round_to(a, "tf32") for a in (qf, kf, vf))
    c = None
    if model is not None and model.scaling == "sqrt-qk":
        # torch's math backend: sqrt of the float64 scale, rounded to fp32 once
        # it meets an fp32 tensor, multiplies both q and k.
        c = float(round_to(np.sqrt(np.float64(args.scale)), "fp32"))
        qf, kf = round_to(qf * c, "fp32"), round_to(kf * c, "fp32")
    mask = None
    if attn_mask is not None:
        mask = _mask_values(attn_mask, args.mask, args.target_shape)
    return _Problem(qf, kf, vf, mask, args.is_causal, args.scale, c)


def _refuse_stored(model, what):
    if model is not None and model.softmax == "stored":
        raise ValueError(f"{what} builds partial states of the online softmax; model {model.name!r} has "
                         f"softmax='stored' (the math backend normalises each row at once): "
                         f"use tiled_attention, or an online model")


def _mask_values(attn_mask, kind, target):
    """A checked mask's values broadcast to ``target``: bool, or float64 additive."""
    if kind == "bool":
        values = attn_mask.detach().cpu().numpy() if _is_tensor(attn_mask) else attn_mask
        return np.broadcast_to(values.astype(bool), target)
    values = to_float64(attn_mask)
    check_mask_values(values)
    return np.broadcast_to(values, target)


def _key_positions(keys, nk):
    """The key indices selected by ``keys`` (a slice or 1-D integer array)."""
    if isinstance(keys, slice):
        return np.arange(nk)[keys]
    if _is_tensor(keys):
        keys = keys.detach().cpu().numpy()
    idx = np.asarray(keys)
    if idx.ndim != 1:
        raise ValueError(f"keys must be a slice or a 1-D index array, got shape {idx.shape}")
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"keys must hold integers, got dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= nk:
        raise ValueError(f"keys must lie in [0, {nk}), got values from {idx.min()} to {idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError("keys contains repeated indices; each key may be counted once")
    return idx.astype(np.int64)


# -- softmax -------------------------------------------------------------------


def _to_model_units(x, model):
    """Natural-log logits to the units the exp works in (base 2 for exp2)."""
    if _base2(model):
        return _fl(x * _const(_LOG2E, model), model, "logits")
    return x


def _normalise(x, m, d, model):
    """softmax value fl_p(exp(x - m) / d); zero rows where m is -inf."""
    dead = m == -np.inf
    m_safe = np.where(dead, 0.0, m)
    e = _exp(_fl(x - m_safe[..., None], model, "logits"), model)
    y = e / np.where(dead, 1.0, d)[..., None]
    return np.where(dead[..., None], 0.0, _fl(y, model, "p"))


def softmax_3pass(x, axis=-1, model=None):
    """Safe softmax in three passes: max, sum of exp(x - max), normalise.

    The sum is accumulated element by element in ``model.l_acc``; the result
    is rounded to ``model.p``. ``-inf`` entries are allowed and a row that is
    entirely ``-inf`` gives zeros.

    >>> softmax_3pass(np.array([0.0, np.log(3.0), -np.inf])).round(12).tolist()
    [0.25, 0.75, 0.0]
    """
    _check_model(model)
    x = _to_model_units(_check_logits(x, axis, model), model)
    if x.shape[-1] == 0:
        return np.moveaxis(x.copy(), -1, axis)
    m = x.max(axis=-1)  # pass 1
    dead = m == -np.inf
    e = _exp(_fl(x - np.where(dead, 0.0, m)[..., None], model, "logits"), model)
    if model is None:  # pass 2
        d = e.sum(axis=-1)
    else:
        d = np.zeros(m.shape)
        for j in range(x.shape[-1]):
            d = _fl(d + e[..., j], model, "l_acc")
    return np.moveaxis(_normalise(x, m, d, model), -1, axis)  # pass 3


def softmax_online(x, axis=-1, model=None):
    """Softmax with the online normaliser (Milakov & Gimelshein 2018).

    Pass 1 reads each element once, keeping a running max ``m`` and a running
    sum ``d``: when the max grows, ``d`` is rescaled by
    alpha = fl_rescale(exp(m_old - m_new)). Pass 2 normalises.

    >>> softmax_online(np.array([[1.0, 1.0], [-np.inf, -np.inf]])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    """
    _check_model(model)
    x = _to_model_units(_check_logits(x, axis, model), model)
    m = np.full(x.shape[:-1], -np.inf)
    d = np.zeros(x.shape[:-1])
    for j in range(x.shape[-1]):
        m_new = np.maximum(m, x[..., j])
        dead = m_new == -np.inf
        m_safe = np.where(dead, 0.0, m_new)
        alpha = np.where(dead, 1.0, _fl(_exp(_fl(m - m_safe, model, "logits"), model), model, "rescale"))
        p = _exp(_fl(x[..., j] - m_safe, model, "logits"), model)
        d = _fl(_fl(d * alpha, model, "l_acc") + p, model, "l_acc")
        m = m_new
    return np.moveaxis(_normalise(x, m, d, model), -1, axis)


# -- the partial state and its algebra -----------------------------------------


@dataclass
class State:
    """Partial attention state of a set of keys, per query row.

    m: running max of the logits (..., Nq), -inf while no key counted; in
       base-2 units when the model has ``exp_impl == "exp2"``.
    l: running sum of exp(logit - m) (..., Nq).
    o: UNnormalised output, sum of exp(logit - m) * v (..., Nq, Dv).

    A state means: softmax-weighted output = o / l, log-sum-exp = m + log l.
    States must be built and merged under one and the same model.
    """

    m: np.ndarray
    l: np.ndarray
    o: np.ndarray

    def __post_init__(self):
        self.m, self.l, self.o = (np.asarray(a, dtype=np.float64) for a in (self.m, self.l, self.o))
        if self.m.shape != self.l.shape:
            raise ValueError(f"State.m and State.l shapes differ: {self.m.shape} vs {self.l.shape}")
        if self.o.shape[:-1] != self.m.shape:
            raise ValueError(f"State.o must have shape m.shape + (Dv,) = {self.m.shape} + (Dv,), "
                             f"got {self.o.shape}")
        if np.any(np.isnan(self.m)) or np.any(self.m == np.inf):
            raise ValueError("State.m contains NaN or +inf")


def empty_state(batch_shape, nq, dv) -> State:
    """The state of no keys (m = -inf, l = 0, o = 0): `merge`'s identity.

    >>> s = empty_state((2, 3), nq=4, dv=5)
    >>> s.m.shape, s.o.shape
    ((2, 3, 4), (2, 3, 4, 5))
    """
    if isinstance(batch_shape, numbers.Integral):
        batch_shape = (batch_shape,)
    batch_shape = tuple(batch_shape)
    sizes = [("nq", nq), ("dv", dv)] + [(f"batch_shape[{i}]", s) for i, s in enumerate(batch_shape)]
    for name, value in sizes:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")
    shape = batch_shape + (int(nq),)
    return State(np.full(shape, -np.inf), np.zeros(shape), np.zeros(shape + (int(dv),)))


def _rescale_factor(m_old, m_new, model):
    """alpha = fl_rescale(exp(fl_logits(m_old - m_new))), 1 where m_new = -inf."""
    dead = m_new == -np.inf
    diff = _fl(m_old - np.where(dead, 0.0, m_new), model, "logits")
    return np.where(dead, 1.0, _fl(_exp(diff, model), model, "rescale"))


def merge(a: State, b: State, model=None) -> State:
    """Combine the states of two disjoint key sets (the split-KV combine).

    m = max(a.m, b.m); l = fl_l_acc(fl(a.l alpha_a) + fl(b.l alpha_b)) and the
    same for o in ``model.pv_acc``, with alpha_x = exp(x.m - m). The empty
    state is an exact identity, and merging two empty states gives the empty
    state (no NaN).

    >>> e = empty_state((), 1, 2)
    >>> s = State(np.array([0.5]), np.array([2.0]), np.array([[1.0, 3.0]]))
    >>> t = merge(e, s)
    >>> (t.m.tolist(), t.l.tolist(), t.o.tolist())
    ([0.5], [2.0], [[1.0, 3.0]])
    """
    _check_model(model)
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, State):
            raise TypeError(f"{name} must be a State, got {type(s).__name__}")
    if a.o.shape != b.o.shape:
        raise ValueError(f"states have different shapes: o {a.o.shape} vs {b.o.shape}")
    m = np.maximum(a.m, b.m)
    alpha_a = _rescale_factor(a.m, m, model)
    alpha_b = _rescale_factor(b.m, m, model)
    l = _fl(_fl(a.l * alpha_a, model, "l_acc") + _fl(b.l * alpha_b, model, "l_acc"), model, "l_acc")
    o_a = _fl(a.o * alpha_a[..., None], model, "pv_acc")
    o_b = _fl(b.o * alpha_b[..., None], model, "pv_acc")
    return State(m, l, _fl(o_a + o_b, model, "pv_acc"))


def finalize(state: State, model=None):
    """(out, lse) of a state: out = fl_out(fl_pv_acc(o / l)), lse = m + log l
    (natural log, fp32 under a model). Rows with no visible key give out 0
    and lse -inf.

    >>> out, lse = finalize(State(np.array([0.0]), np.array([2.0]), np.array([[4.0]])))
    >>> out.tolist(), lse.tolist() == [math.log(2.0)]
    ([[2.0]], True)
    """
    _check_model(model)
    if not isinstance(state, State):
        raise TypeError(f"state must be a State, got {type(state).__name__}")
    dead = state.m == -np.inf
    if np.any(state.l[~dead] <= 0) or np.any(np.isnan(state.l)):
        raise ValueError("State.l must be positive wherever State.m is finite")
    l_safe = np.where(dead, 1.0, state.l)
    out = _fl(_fl(state.o / l_safe[..., None], model, "pv_acc"), model, "out")
    out = np.where(dead[..., None], 0.0, out)
    return out, _lse(state.m, l_safe, dead, model)


def _lse(m, l_safe, dead, model):
    """Natural-log LSE fl32(m + fl32(log l)) (exp2 models: from base 2), -inf on dead rows."""
    with np.errstate(divide="ignore"):
        if _base2(model):
            lse = _fl(_fl(m + _fl(np.log2(l_safe), model, "fp32"), model, "fp32") * _const(_LN2, model),
                      model, "fp32")
        else:
            lse = _fl(m + _fl(np.log(l_safe), model, "fp32"), model, "fp32")
    return np.where(dead, -np.inf, lse)


# -- the tiled forward pass ----------------------------------------------------


def _qk(qb, kt, model):
    """S = Q K^T for one key tile: qb (..., bm, D), kt (..., t, D) -> (..., bm, t),
    accumulated over D one product at a time in ``model.qk_acc``."""
    if model is None:
        return qb @ np.swapaxes(kt, -1, -2)
    acc = np.zeros(np.broadcast_shapes(qb.shape[:-1] + (1,), kt.shape[:-2] + (1, kt.shape[-2])))
    for d in range(qb.shape[-1]):
        acc = _fl_acc(acc + qb[..., d, None] * kt[..., None, :, d], model, "qk_acc")
    return acc


def _tile_logits(prob, qb, rows, keys, model):
    """Logits of query blocks ``qb`` (B, H, nblk, bm, D) against the keys at
    positions ``keys``, in the model's units, masked entries -inf."""
    kt = prob.k[:, :, None, keys]  # (B, H, 1, t, D)
    S = _qk(qb, kt, model)
    bias = None
    if prob.mask is not None:
        tile = prob.mask[..., keys]  # (B, H, Nq, t)
        pad = rows.size - tile.shape[2]
        fill = True if tile.dtype == bool else 0.0
        tile = np.pad(tile, [(0, 0), (0, 0), (0, pad), (0, 0)], constant_values=fill)
        bias = tile.reshape(S.shape)
    if prob.qk_const is not None:
        s = _fl(S, model, "logits")  # q and k carry the scale already
        if bias is not None and bias.dtype != bool:
            s = _fl(s + bias, model, "logits")
    elif _base2(model):
        s = _fl(S * _const(prob.scale * _LOG2E, model), model, "logits")  # c = fl32(scale log2 e), once
        if bias is not None and bias.dtype != bool:
            s = _fl(s + _fl(bias * _const(_LOG2E, model), model, "logits"), model, "logits")
    else:
        s = _fl(S * _const(prob.scale, model), model, "logits")
        if bias is not None and bias.dtype != bool:
            s = _fl(s + bias, model, "logits")
    if bias is not None and bias.dtype == bool:
        s = np.where(bias, s, -np.inf)
    if prob.is_causal:
        hidden = keys[None, :] > rows.reshape(-1, 1)  # top-left aligned: key j sees rows i >= j
        s = np.where(hidden.reshape(S.shape[-3:]), -np.inf, s)
    return s


def _update(state: State, s, vt, model) -> State:
    """One FlashAttention-2 step: fold a tile of logits ``s`` (..., bm, t)
    and values ``vt`` (..., t, Dv) into ``state``."""
    m_new = np.maximum(state.m, s.max(axis=-1)) if s.shape[-1] else state.m
    alpha = _rescale_factor(state.m, m_new, model)
    m_safe = np.where(m_new == -np.inf, 0.0, m_new)
    p = _exp(_fl(s - m_safe[..., None], model, "logits"), model)  # exp format, unrounded to model.p
    P = _fl(p, model, "p")
    if model is not None and model.tf32:
        P = round_to(P, "tf32")
    if model is None:
        l = state.l * alpha + p.sum(axis=-1)
        o = state.o * alpha[..., None] + P @ vt
        return State(m_new, l, o)
    l = _fl(state.l * alpha, model, "l_acc")
    for j in range(p.shape[-1]):
        l = _fl(l + p[..., j], model, "l_acc")
    o = _fl(state.o * alpha[..., None], model, "pv_acc")
    for j in range(P.shape[-1]):
        o = _fl_acc(o + P[..., j, None] * vt[..., j, None, :], model, "pv_acc")
    return State(m_new, l, o)


def _attend(prob: _Problem, keys, block_m, block_n, model) -> State:
    """State of all queries over the key positions ``keys``, tile by tile."""
    B, H, Nq, D = prob.q.shape
    Dv = prob.v.shape[-1]
    bm = max(1, min(block_m, Nq))  # a block taller than Nq is one block plus discarded padding
    nblk = -(-Nq // bm)
    rows = np.arange(nblk * bm)
    qb = np.pad(prob.q, [(0, 0), (0, 0), (0, nblk * bm - Nq), (0, 0)]).reshape(B, H, nblk, bm, D)
    state = empty_state((B, H, nblk), bm, Dv)
    for start in range(0, keys.size, block_n):
        tile = keys[start:start + block_n]
        s = _tile_logits(prob, qb, rows, tile, model)
        state = _update(state, s, prob.v[:, :, None, tile], model)
    flat = (B, H, nblk * bm)
    return State(state.m.reshape(flat)[..., :Nq], state.l.reshape(flat)[..., :Nq],
                 state.o.reshape(flat + (Dv,))[..., :Nq, :])


def _stored_probs(prob: _Problem, model):
    """The math backend's softmax (contract step 5): (P, m, l, dead) with P
    (B, H, Nq, Nk) the stored, per-element normalised probabilities."""
    rows = np.arange(prob.q.shape[2])
    s = _tile_logits(prob, prob.q[:, :, None], rows, np.arange(prob.nk), model)[:, :, 0]
    m = s.max(axis=-1) if s.shape[-1] else np.full(s.shape[:-1], -np.inf)
    dead = m == -np.inf
    m_safe = np.where(dead, 0.0, m)
    e = _exp(_fl(s - m_safe[..., None], model, "logits"), model)
    l = np.zeros(m.shape)
    for j in range(e.shape[-1]):
        l = _fl(l + e[..., j], model, "l_acc")
    l_safe = np.where(dead, 1.0, l)
    p = _fl(e * _fl(1.0 / l_safe, model, "l_acc")[..., None], model, "p")
    return np.where(dead[..., None], 0.0, p), m, l_safe, dead


def _stored_attention(prob: _Problem, model):
    """(out, lse) of the math backend: stored P, then P V (contract step 5)."""
    p, m, l_safe, dead = _stored_probs(prob, model)
    o = np.zeros(p.shape[:-1] + (prob.v.shape[-1],))
    for j in range(p.shape[-1]):
        o = _fl_acc(o + p[..., j, None] * prob.v[..., j, None, :], model, "pv_acc")
    out = np.where(dead[..., None], 0.0, _fl(o, model, "out"))
    return out, _lse(m, l_safe, dead, model)


def partial_state(q, k, v, keys, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                  block_n=64, model=None) -> State:
    """The `State` of attention restricted to the keys ``keys`` (a slice or an
    index array into the key axis, processed in the given order). Masks and
    causality use the keys' original positions.

    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    >>> s = merge(partial_state(q, k, v, [0, 2]), partial_state(q, k, v, [1]))
    >>> bool(np.allclose(finalize(s)[0], tiled_attention(q, k, v), rtol=1e-13, atol=0))
    True
    """
    _refuse_stored(model, "partial_state")
    prob = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, model)
    block_n = _check_block(block_n, "block_n")
    return _attend(prob, _key_positions(keys, prob.nk), prob.q.shape[2], block_n, model)


def tiled_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    block_m=64, block_n=64, model=None, return_lse=False):
    """``scaled_dot_product_attention`` by the FlashAttention-2 forward pass.

    q (B, H, Nq, D); k (B, Hkv, Nk, D); v (B, Hkv, Nk, Dv); NumPy arrays
    (float16, bfloat16, float32, float64) or torch tensors of one dtype.
    ``is_causal`` is top-left aligned (key j visible to query i iff j <= i);
    ``attn_mask`` is bool (True attends) or additive in the query dtype,
    broadcastable to (B, H, Nq, Nk). Returns out (B, H, Nq, Dv) as float64,
    and the natural-log LSE (B, H, Nq) too if ``return_lse``. Fully masked
    rows give out 0 and LSE -inf. A ``softmax="stored"`` model (torch's math
    backend) is computed as the contract's step 5 says, without tiles.

    >>> q = np.ones((1, 1, 2, 2)); v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    >>> tiled_attention(q, q, v, is_causal=True).tolist()
    [[[[1.0, 0.0], [0.5, 0.5]]]]
    """
    prob = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, model)
    block_m = _check_block(block_m, "block_m")
    block_n = _check_block(block_n, "block_n")
    if model is not None and model.softmax == "stored":
        with np.errstate(over="ignore", invalid="ignore"):  # overflow propagates, as on hardware
            out, lse = _stored_attention(prob, model)
    else:
        out, lse = finalize(_attend(prob, np.arange(prob.nk), block_m, block_n, model), model)
    return (out, lse) if return_lse else out


def attention_1pass(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    model=None, return_lse=False):
    """The key-by-key recurrence (running m, l, o): `tiled_attention` with
    one key per tile.

    >>> q = np.zeros((1, 1, 1, 2)); v = np.array([[[[2.0, 0.0], [0.0, 2.0]]]])
    >>> attention_1pass(q, q[:, :, [0, 0]], v).tolist()
    [[[[1.0, 1.0]]]]
    """
    return tiled_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                           block_m=64, block_n=1, model=model, return_lse=return_lse)


def _partition_indices(partition, nk):
    """Index arrays of a partition given as index arrays or as split sizes."""
    if isinstance(partition, (np.ndarray, str)) or not hasattr(partition, "__iter__"):
        raise TypeError(
            f"partition must be a list of index arrays or of split sizes, got {type(partition).__name__}"
        )
    parts = list(partition)
    if parts and all(isinstance(p, numbers.Integral) and not isinstance(p, (bool, np.bool_)) for p in parts):
        if any(p < 0 for p in parts) or sum(parts) != nk:
            raise ValueError(f"split sizes must be non-negative and sum to the {nk} keys, got {parts}")
        bounds = np.cumsum([0] + parts)
        return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(parts))]
    idx = [_key_positions(p, nk) for p in parts]
    covered = np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)
    if not np.array_equal(covered, np.arange(nk)):
        raise ValueError(f"partition must cover each of the {nk} keys exactly once")
    return idx


def split_kv_attention(q, k, v, partition, *, order=None, attn_mask=None, is_causal=False, scale=None,
                       enable_gqa=False, block_n=64, model=None, return_lse=False):
    """Split-KV (flash-decoding) attention: one `partial_state` per part of
    ``partition`` (index arrays, or split sizes of consecutive keys), merged
    left to right in ``order`` (a permutation of the parts; default 0, 1, ...).

    >>> rng = np.random.default_rng(1)
    >>> q, k, v = (rng.standard_normal((1, 1, 2, 3)) for _ in range(3))
    >>> out = split_kv_attention(q, k, v, [1, 1], order=[1, 0])
    >>> bool(np.allclose(out, tiled_attention(q, k, v), rtol=1e-13, atol=0))
    True
    """
    _refuse_stored(model, "split_kv_attention")
    prob = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, model)
    block_n = _check_block(block_n, "block_n")
    parts = _partition_indices(partition, prob.nk)
    if order is None:
        order = list(range(len(parts)))
    order = list(order)
    if sorted(order) != list(range(len(parts))):
        raise ValueError(f"order must be a permutation of range({len(parts)}), got {order}")
    B, H, Nq, _ = prob.q.shape
    state = empty_state((B, H), Nq, prob.v.shape[-1])
    for i in order:
        state = merge(state, _attend(prob, parts[i], Nq, block_n, model), model)
    out, lse = finalize(state, model)
    return (out, lse) if return_lse else out
