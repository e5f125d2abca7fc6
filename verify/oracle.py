"""The certified reference for scaled dot-product attention.

The oracle reads the exact values of the inputs a kernel saw (float16,
bfloat16 and float32 all embed exactly in float64) and returns the attention
output together with an elementwise bound on its own error. Semantics are
those of ``torch.nn.functional.scaled_dot_product_attention``.

Modes:
  "auto"     float64 with a rigorous a-posteriori bound; rows whose bound is
             not below the target (``rtol_target``) are recomputed with exact
             integer dot products and mpmath exp (see docs/oracle.md).
  "float64"  the float64 pass only: bounds are still rigorous, but no row is
             recomputed.
  "mpmath"   every row recomputed at ``prec`` bits (at least 113).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 2, 5, 4)).astype(np.float16) for _ in range(3))
>>> r = attention(q, k, v, is_causal=True)
>>> r.out.shape, bool((r.err_bound < 1e-12).all()), r.mp_rows
((1, 2, 5, 4), True, 0)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import mpmath
import numpy as np

from flashcheck.kernels.precision import format_of, to_float64
from flashcheck.kernels.sdpa_args import (
    check_array,
    check_finite,
    check_float_dtype,
    check_mask_values,
    check_sdpa_args,
)
from flashcheck.verify._mp import CERT_SAFETY, dyadic_ints, mp_exp_weights, mp_row, ratio_to_float
from flashcheck.verify._xp import NUMPY, is_torch, namespace

__all__ = [
    "DEFAULT_RTOL_TARGET",
    "AttentionResult",
    "CertificationError",
    "CrosscheckReport",
    "SoftmaxResult",
    "attention",
    "attention_case",
    "case_rtol_target",
    "crosscheck",
    "logsumexp",
    "softmax",
]

U = 2.0**-53  # unit roundoff of float64
#: NumPy's float64 exp and log are taken to be within 4 units in the last
#: place (glibc and NumPy's SIMD code claim < 1 ulp and < 2.52 ulp); 1 ulp is
#: at most 2u relative.
EXP_ULPS = 4
RHO = 2 * EXP_ULPS * U
#: Absolute error allowance for results in or near the subnormal range
#: (exp's output, the scale multiply and the adds can underflow).
ETA = 4 * 2.0**-1074
#: Entries with exp(d + sigma) < exp(-L_NEG) are treated as "negligible".
L_NEG = 700.0
#: A row is certified when its bound is at most this times
#: max(|O_ic|, sum_j P_ij |V_jc|): 1e-3 of fp32's unit roundoff.
DEFAULT_RTOL_TARGET = 1e-3 * 2.0**-24
MIN_PREC = 113
#: Results are float64: rounding alone costs up to u = 2**-53 relative.
MIN_RTOL_TARGET = 2.0**-50
_MODES = ("auto", "float64", "mpmath")


def gamma(n: int, u: float = U) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of a
    sum or dot product of n terms in any order (FMA or not)."""
    if n * u >= 0.01:
        raise ValueError(f"gamma({n}) is too large for these bounds (n u = {n * u:g})")
    return n * u / (1 - n * u)


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class AttentionResult:
    """Reference attention output with certified error bounds.

    ``err_bound[b, h, i, c]`` bounds |out - exact attention of the inputs|.
    ``row_scale`` is sum_j P_ij |V_jc|, the magnitude the tolerance of row i
    is measured against (approximate, not itself certified).
    Intermediates (``keep=True``) are float64 approximations (not certified
    elementwise beyond their use in the bound code): ``s`` logits with the
    additive mask, -inf where masked; ``p`` probabilities; ``q``, ``k``,
    ``v`` the exact inputs with kv heads expanded to query heads. They are
    NumPy arrays, or torch float64 tensors on the device of ``device=``;
    every other array is a host NumPy float64 array.
    """

    out: np.ndarray
    lse: np.ndarray
    err_bound: np.ndarray
    lse_err_bound: np.ndarray
    row_scale: np.ndarray
    mp_rows: int
    mode: str
    prec: int
    scale: float
    rtol_target: float
    certified: bool
    s: np.ndarray | None = None
    p: np.ndarray | None = None
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    v: np.ndarray | None = None
    dq: np.ndarray | None = None
    dk: np.ndarray | None = None
    dv: np.ndarray | None = None
    dq_err_bound: np.ndarray | None = None
    dk_err_bound: np.ndarray | None = None
    dv_err_bound: np.ndarray | None = None
    #: Rows certified by the compensated-logit tier (not counted in mp_rows).
    refined_rows: int = 0
    mp_row_index: tuple = field(default=(), repr=False)
    #: (i0, i1) when computed with ``rows=``: row r of the arrays is query
    #: row i0 + r (``mp_row_index`` holds global indices); None: all rows.
    row_range: tuple | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """Scalars for a JSON report."""
        return {
            "mode": self.mode, "mp_rows": self.mp_rows, "refined_rows": self.refined_rows,
            "certified": self.certified,
            "max_err_bound": float(self.err_bound.max(initial=0.0)),
            "max_lse_err_bound": float(self.lse_err_bound.max(initial=0.0)),
            "scale": self.scale, "rtol_target": self.rtol_target,
        }


@dataclass(frozen=True)
class SoftmaxResult:
    """``value`` with the elementwise bound ``err_bound`` on |value - exact|."""

    value: np.ndarray
    err_bound: np.ndarray
    mp_rows: int
    mode: str


@dataclass(frozen=True)
class CrosscheckReport:
    """Result of `crosscheck`: ``ok`` when every checked element of the
    oracle lies within its bound of a higher-precision recomputation.
    ``worst_ratio`` is max |oracle - high precision| / allowed (<= 1 if ok)."""

    ok: bool
    rows: tuple
    worst_ratio: float
    failures: tuple
    prec: int

    def as_dict(self) -> dict:
        return asdict(self)


class CertificationError(AssertionError):
    """The oracle's result lies outside its certified bound of a
    higher-precision recomputation (raised by ``crosscheck_rows``)."""


# ---------------------------------------------------------------------------
# input handling


def _exact(x, name: str) -> np.ndarray:
    """Exact float64 values of a NumPy array or torch tensor of a float dtype."""
    check_array(x, name)
    check_float_dtype(x, name)
    return to_float64(x)


@dataclass
class _Problem:
    q: np.ndarray  # (B, H, n, D), kv heads expanded; the n query rows row0 <= i < row0 + n
    k: np.ndarray
    v: np.ndarray
    allowed: np.ndarray | None  # bool, 4-D, broadcastable to (B, H, n, Nk); None: all (or causal)
    add: np.ndarray | None  # finite additive mask (0 where not allowed)
    scale: float
    groups: int
    hkv: int
    dout: np.ndarray | None
    causal: bool = False  # top-left causal, built per tile from global row indices
    row0: int = 0  # global index of local row 0 (``rows=``)
    _cache: dict = field(default_factory=dict)

    @property
    def shape(self):
        B, H, Nq, _ = self.q.shape
        return B, H, Nq, self.k.shape[2], self.v.shape[3]

    def allowed_row(self, b, h, i) -> np.ndarray:
        Nk = self.k.shape[2]
        if self.causal:
            return np.arange(Nk) <= self.row0 + i
        if self.allowed is None:
            return np.ones(Nk, dtype=bool)
        return np.broadcast_to(self.allowed, self.q.shape[:3] + (Nk,))[b, h, i]

    def masks(self, xp, like, a, b):
        """(allowed, add) of local rows a <= i < b in ``xp`` on ``like``'s
        device (None where there is none). The causal mask is built there
        from global row indices, so no Nq x Nk host array is needed."""
        Nk = self.k.shape[2]
        if self.causal:
            allowed = (xp.arange(self.row0 + a, self.row0 + b, like=like)[:, None]
                       >= xp.arange(0, Nk, like=like)[None, :])[None, None]
            return allowed, None
        allowed, add = (None if m is None else m if m.shape[2] == 1 else m[:, :, a:b]
                        for m in (self.allowed, self.add))
        if xp is not NUMPY:
            allowed = None if allowed is None else xp.asarray(allowed, like=like, dtype=xp.bool_)
            add = None if add is None else xp.asarray(add, like=like)
        return allowed, add

    def head_ints(self, b, h):
        key = (b, h // self.groups)
        if key not in self._cache:
            self._cache[key] = (dyadic_ints(self.k[b, h]), dyadic_ints(self.v[b, h]))
        return self._cache[key]

    def exact_logits(self, b, h, i):
        """Row i's logits as integers times a power of two, exactly."""
        (k_int, ek), _ = self.head_ints(b, h)
        q_int, eq = dyadic_ints(self.q[b, h, i])
        s_int, es = dyadic_ints(np.array([self.scale]))
        x = (k_int @ q_int) * s_int[0]
        ex = ek + eq + es
        if self.add is None:
            return x, ex
        a = np.broadcast_to(self.add, self.q.shape[:3] + (self.k.shape[2],))[b, h, i]
        a_int, ea = dyadic_ints(a)
        e = min(ex, ea)
        return (x << (ex - e)) + (a_int << (ea - e)), e

    def mp_row(self, b, h, i, prec):
        s_int, es = self.exact_logits(b, h, i)
        _, (v_int, ev) = self.head_ints(b, h)
        return mp_row(s_int, es, self.allowed_row(b, h, i), v_int, ev, self.v[b, h], prec)


def _check_rows(rows, Nq):
    """``rows`` as (i0, i1), or None for all rows."""
    if rows is None:
        return None
    ok = (isinstance(rows, (tuple, list)) and len(rows) == 2
          and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in rows))
    if not ok:
        raise ValueError(f"rows must be a pair of ints (i0, i1) selecting query rows i0 <= i < i1, got {rows!r}")
    i0, i1 = int(rows[0]), int(rows[1])
    if not 0 <= i0 < i1 <= Nq:
        raise ValueError(f"rows={rows!r} must satisfy 0 <= i0 < i1 <= Nq = {Nq}")
    return i0, i1


def _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, dout, rows=None) -> _Problem:
    # The shared SDPA rules, as the oracle applies them: it reads exact values,
    # so q, k, v and an additive mask may have different float dtypes, and any
    # finite scale is certified (torch takes 0 and negative scales too).
    args = check_sdpa_args(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                           one_dtype=False, positive_scale=False)
    B, H, Nq, Nk = args.target_shape
    rows = _check_rows(rows, Nq)
    if rows is not None and dout is not None:
        raise ValueError(f"rows={rows!r} cannot be combined with dout: dK and dV sum over every query "
                         f"row; pass rows=None to get the gradients")
    q64, k64, v64 = _exact(q, "q"), _exact(k, "k"), _exact(v, "v")
    for name, x in (("q", q64), ("k", k64), ("v", v64)):
        check_finite(x, name)  # the bounds are derived for finite inputs
    groups, Hkv, scale = args.groups, args.Hkv, args.scale
    i0, i1 = rows or (0, Nq)
    if rows is not None:
        q64 = q64[:, :, i0:i1]
    allowed = add = None
    if attn_mask is not None:
        if args.mask == "bool":
            m = np.asarray(attn_mask.detach().cpu().numpy() if hasattr(attn_mask, "detach") else attn_mask,
                           dtype=bool)
        else:
            m = to_float64(attn_mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if rows is not None and m.shape[2] != 1:
            m = m[:, :, i0:i1]  # masks use global row indices
        if m.dtype == bool:
            allowed = m
        else:
            check_mask_values(m)
            allowed = m != -np.inf
            add = np.where(allowed, m, 0.0)
            if allowed.all():
                allowed = None
    d64 = None
    if dout is not None:
        d64 = _exact(dout, "dout")
        if d64.shape != (B, H, Nq, args.Dv):
            raise ValueError(f"dout must have the output's shape {(B, H, Nq, args.Dv)}, got {d64.shape}")
        check_finite(d64, "dout")
    if groups > 1:
        k64, v64 = np.repeat(k64, groups, axis=1), np.repeat(v64, groups, axis=1)
    return _Problem(q64, k64, v64, allowed, add, scale, groups, Hkv, d64,
                    causal=bool(args.is_causal) and attn_mask is None, row0=i0)


# ---------------------------------------------------------------------------
# float64 pass (one implementation for NumPy and torch, see verify/_xp.py)


def _forward_tile(xp, q, k, v, allowed, add, scale, keep, need_p, logits=None) -> dict:
    """The float64 pass and its bound (docs/oracle.md) for the query rows
    in ``q`` (B, H, n, D) against all keys; every quantity is per row, so
    tiles of rows give the bound of the whole. ``xp`` is NumPy's or
    torch's namespace (`verify._xp`); results stay in it.

    ``logits=(s, sig)``: precomputed logits ``s`` (-inf where masked, the
    mask already added; ``add`` must be None) with elementwise bounds
    ``sig`` on their error (the compensated tier, `_refined_logits`) replace
    steps 1-2's product and its sigma; the rest is the same."""
    Nk, Dv = k.shape[2], v.shape[3]
    D = q.shape[3]
    gD, gK = gamma(D), gamma(Nk)
    with xp.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        if logits is None:
            s = xp.matmul(q, k.swapaxes(-1, -2))
            s *= scale
            if add is not None:
                s += add
        else:
            s = xp.copy(logits[0])
        if allowed is not None:
            s = xp.where(allowed, s, -xp.inf)
        s_keep = xp.copy(s) if keep else None
        m = xp.amax(s, axis=-1, keepdims=True)
        empty = m == -xp.inf  # fully masked rows
        m_shift = xp.where(empty, 0.0, m)
        if logits is not None:
            # the given bound plus the rounding of the shift below
            sig = logits[1] + 1.001 * U * (xp.abs(s) + xp.abs(m_shift)) + ETA
        s -= m_shift  # d = s - m (in place)
        if logits is not None:
            keep_sig = xp.isfinite(s) & ~(s + sig < -L_NEG)  # negligible entries are bounded separately
            sigma = xp.amax(xp.where(keep_sig, sig, 0.0), axis=-1, keepdims=True)
        else:
            # sigma_i bounds the error of d_ij (docs/oracle.md, step 2)
            qn = xp.sqrt(xp.einsum("bhnd,bhnd->bhn", q, q))[..., None] * (1 + gamma(D + 2))
            kn = xp.amax(xp.sqrt(xp.einsum("bhnd,bhnd->bhn", k, k)), axis=-1)[..., None, None] * (1 + gamma(D + 2))
            sigma = ((gD + 3 * U) * abs(scale) * qn * kn * 1.001 + 1.001 * U * xp.abs(m_shift) + ETA)
        if add is not None:
            sig = sigma + 2.01 * U * xp.abs(add)
            sig = xp.where(s + sig < -L_NEG, 0.0, sig)  # negligible entries are bounded separately
            sigma = xp.amax(sig, axis=-1, keepdims=True)
        e = xp.exp(s, out=s)
        ell = xp.sum(e, axis=-1, keepdims=True)
        ym = xp.matmul(e, xp.concatenate([v, xp.abs(v)], axis=-1))  # E V and E |V| in one product
        y, mabs = ym[..., :Dv], ym[..., Dv:]
        ell_safe = xp.where(empty, 1.0, ell)
        out = y / ell_safe
        row_scale = mabs / ell_safe
        kappa = (RHO + xp.expm1(sigma)) / (1 - RHO)
        tau_abs = math.exp(-L_NEG) * (1 + RHO) + 1.02 * ETA
        F = kappa * (1 + 3 * gK) + Nk * tau_abs / ell_safe * 1.01
        vmax = xp.amax(xp.abs(v), axis=-2, keepdims=True)
        aout = xp.abs(out)
        err = CERT_SAFETY * ((gK + kappa) * (row_scale + aout) + U * aout
                        + Nk * tau_abs * (vmax + aout) / ell_safe) / (1 - F)
        log_ell = xp.log(ell_safe)
        lse = m_shift + log_ell
        lse_err = CERT_SAFETY * (1.02 * (gK + F) + RHO * xp.abs(log_ell) + U * xp.abs(lse))
        bad = ~((sigma <= 0.01) & (F < 0.01) & xp.isfinite(m_shift))
        err = xp.where(empty, 0.0, err)
        out = xp.where(empty, 0.0, out)
        lse = xp.where(empty, -xp.inf, lse)
        lse_err = xp.where(empty, 0.0, lse_err)
        res = {
            "out": out, "err": err, "lse": lse[..., 0], "lse_err": lse_err[..., 0],
            "row_scale": xp.where(empty, 0.0, row_scale), "bad": (bad & ~empty)[..., 0],
        }
        if keep or need_p:
            e /= ell_safe  # p; e is a scratch buffer (not s_keep)
            res["p"] = e
            res["pi"] = xp.where(empty, 0.0, 1.01 * (kappa + F + gK + U))[..., 0]
            res["tau"] = xp.where(empty, 0.0, 1.02 * tau_abs / ell_safe)[..., 0]
        if keep:
            res["s"] = s_keep
    return res


def _float_forward(pr: _Problem, keep: bool, need_p: bool) -> dict:
    """The float64 pass on the host over all rows at once."""
    return _forward_tile(NUMPY, pr.q, pr.k, pr.v, *pr.masks(NUMPY, None, 0, pr.q.shape[2]), pr.scale,
                         keep, need_p)


#: Host results of a tile: (key, per-row) copied back after each tile.
_HOST_KEYS = ("out", "err", "lse", "lse_err", "row_scale", "bad", "pi", "tau")
#: Default tile: about this many float64 elements of B*H*rows*Nk (1 GiB).
TILE_ELEMENTS = 2**27


def _default_tile_rows(pr: _Problem) -> int:
    B, H, _, Nk, _ = pr.shape
    return max(1, TILE_ELEMENTS // (B * H * Nk))


def _tiled_forward(xp, dev, pr: _Problem, keep: bool, need_p: bool, tile: int) -> dict:
    """`_forward_tile` over tiles of at most ``tile`` query rows (of every
    batch and head at once). The per-row results come back to host NumPy
    arrays; with ``keep`` s and p are written into full arrays in ``xp``.
    Without ``keep`` no P is held: the gradients recompute it per tile.
    ``dev`` holds q, k, v in ``xp`` (the device copies)."""
    B, H, n, Nk, Dv = pr.shape
    like = dev["like"]
    res = {"out": np.empty((B, H, n, Dv)), "err": np.empty((B, H, n, Dv)), "lse": np.empty((B, H, n)),
           "lse_err": np.empty((B, H, n)), "row_scale": np.empty((B, H, n, Dv)),
           "bad": np.empty((B, H, n), dtype=bool)}
    if keep or need_p:
        res["pi"], res["tau"] = np.empty((B, H, n)), np.empty((B, H, n))
    if keep:
        res["s"] = xp.zeros((B, H, n, Nk), like=like)
        res["p"] = xp.zeros((B, H, n, Nk), like=like)
    elif need_p:
        res["p_rows"] = {}  # P of rows recomputed on the host, for the gradients
    for a in range(0, n, tile):
        b = min(n, a + tile)
        t = _forward_tile(xp, dev["q"][:, :, a:b], dev["k"], dev["v"], *pr.masks(xp, like, a, b),
                          pr.scale, keep, keep or need_p)
        for key in _HOST_KEYS:
            if key in res:
                res[key][:, :, a:b] = xp.to_numpy(t[key])
        if keep:
            res["s"][:, :, a:b] = t["s"]
            res["p"][:, :, a:b] = t["p"]
    return res


#: Elements of rows x Nk x D held at once by the compensated tier.
REFINE_ELEMENTS = 2**24
_SPLIT = 134217729.0  # 2**27 + 1, Veltkamp's splitting constant for float64


def _two_sum(a, b):
    """Knuth's TwoSum: s + e == a + b exactly, s = fl(a + b) (no overflow)."""
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _two_prod(a, b):
    """Dekker's TwoProduct with Veltkamp's split: p + e == a b exactly,
    p = fl(a b), barring overflow and underflow (docs/oracle.md)."""
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _refined_logits(xp, q, k, add, allowed, scale):
    """Compensated logits of query rows ``q`` (R, D) against their keys
    ``k`` (R, Nk, D) (docs/oracle.md, "The compensated-logit tier"):
    float64 values ``s`` (shifted by the per-row float64 ``m0`` (R, 1),
    so s + m0 is the logit) and elementwise bounds ``sig`` on |s - exact|.
    The products q_ik k_jk are exact (inputs of at most 26 significant
    bits); their sum is Ogita-Rump-Oishi's Sum2 (cascaded TwoSum) kept as
    an unevaluated pair hi + lo; the scale multiply (TwoProduct), the mask
    add and the shift by m0 (TwoSum) stay error-free until the last adds."""
    D = q.shape[-1]
    prods = k * q[:, None, :]  # exact
    hi, lo = prods[..., 0], xp.zeros(prods.shape[:-1], like=prods)
    for c in range(1, D):
        hi, e = _two_sum(hi, prods[..., c])
        lo += e
    A = xp.sum(xp.abs(prods), axis=-1) * (1 + gamma(D + 1))
    del prods
    p, e = _two_prod(hi, xp.full(hi.shape, scale, like=hi))
    ls = lo * scale
    lo1 = e + ls
    if add is not None:
        p, e1 = _two_sum(p, add)
        lo2 = lo1 + e1
    else:
        lo2 = lo1
    m0 = xp.amax(xp.where(allowed & xp.isfinite(p), p, -xp.inf), axis=-1, keepdims=True)
    m0 = xp.where(xp.isfinite(m0), m0, 0.0)
    d1, e2 = _two_sum(p, xp.broadcast_to(-m0, p.shape))
    t = e2 + lo2
    d = d1 + t
    g2 = gamma(D) ** 2
    sig = 1.01 * (abs(scale) * g2 * A + U * (xp.abs(ls) + xp.abs(lo1) + xp.abs(lo2) + xp.abs(t) + xp.abs(d))) \
        + 8 * ETA
    return d, sig, m0


def _refine_rows(xp, dev, pr: _Problem, res: dict, rows, rtol: float, keep: bool) -> list:
    """The compensated-logit tier: recompute ``rows`` [(b, h, i)] with
    `_refined_logits` and `_forward_tile`; rows that now meet ``rtol`` are
    written into ``res``. Returns the rows that still miss it."""
    if not rows:
        return []
    _, _, _, Nk, _ = pr.shape
    D = pr.q.shape[3]
    like = dev["like"]
    block = max(1, REFINE_ELEMENTS // max(1, Nk * D))
    left = []
    for a in range(0, len(rows), block):
        chunk = rows[a:a + block]
        bs, hs, is_ = ([r[n] for r in chunk] for n in range(3))
        qg, kg, vg = dev["q"][bs, hs, is_], dev["k"][bs, hs], dev["v"][bs, hs]
        allowed = np.stack([pr.allowed_row(b, h, i) for b, h, i in chunk])
        add = None
        if pr.add is not None:
            full = np.broadcast_to(pr.add, pr.q.shape[:3] + (Nk,))
            add = xp.asarray(np.stack([full[b, h, i] for b, h, i in chunk]), like=like)
        with xp.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            allowed_x = xp.asarray(allowed, like=like, dtype=xp.bool_)
            d, sig, m0 = _refined_logits(xp, qg, kg, add, allowed_x, pr.scale)
            allowed_x = allowed_x[:, None, None]
            t = _forward_tile(xp, qg[:, None, None], kg[:, None], vg[:, None], allowed_x, None, pr.scale,
                              keep, keep, logits=(d[:, None, None], sig[:, None, None]))
            m0h = xp.to_numpy(m0)[:, 0]
            part = {key: xp.to_numpy(t[key])[:, 0, 0] for key in ("out", "err", "lse", "lse_err", "row_scale",
                                                                   "bad")}
            lse = part["lse"] + m0h  # -inf stays -inf
            part["lse_err"] = np.where(lse == -np.inf, 0.0, part["lse_err"] + CERT_SAFETY * U * np.abs(lse))
            part["lse"] = lse
        ok = _certified_rows({key: val[:, None] for key, val in part.items()}, rtol)[:, 0]
        for r, (b, h, i) in enumerate(chunk):
            if not ok[r]:
                left.append((b, h, i))
                continue
            for key in ("out", "err", "lse", "lse_err", "row_scale"):
                res[key][b, h, i] = part[key][r]
            res["bad"][b, h, i] = False
            if keep:
                _put(res["p"], (b, h, i), xp.to_numpy(t["p"][r, 0, 0]))
                _put(res["s"], (b, h, i), xp.to_numpy(t["s"][r, 0, 0] + m0[r]))
    return left


def _put(arr, idx, value) -> None:
    """arr[idx] = value for a NumPy array or a torch tensor (value from the host)."""
    if is_torch(arr):
        value = namespace(arr).asarray(value, like=arr)
    arr[idx] = value


def _certified_rows(res: dict, rtol: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        tol = rtol * np.maximum(np.abs(res["out"]), res["row_scale"])
        ok_out = (res["err"] <= tol).all(axis=-1)
        ok_lse = res["lse_err"] <= rtol * np.maximum(np.abs(res["lse"]), 1.0)
        ok_lse |= res["lse"] == -np.inf
    return ok_out & ok_lse & ~res["bad"]


def _fill_mp_rows(pr: _Problem, res: dict, rows, prec: int, want_mp: bool = False) -> None:
    if want_mp:  # multiple-precision P and O for the gradients of mode "mpmath"
        B, H, Nq, Nk, Dv = pr.shape
        res["p_mp"] = np.empty((B, H, Nq, Nk), dtype=object)
        res["out_mp"] = np.empty((B, H, Nq, Dv), dtype=object)
        res["pi_mp"] = np.zeros((B, H, Nq))
        res["err_mp"] = np.zeros((B, H, Nq, Dv))
    for b, h, i in rows:
        r = pr.mp_row(b, h, i, prec)
        if want_mp:
            res["p_mp"][b, h, i] = r.p_mp
            res["out_mp"][b, h, i] = r.out_mp
            res["pi_mp"][b, h, i] = r.pi_mp
            res["err_mp"][b, h, i] = r.err_mp
        res["out"][b, h, i] = r.out
        res["err"][b, h, i] = r.err
        res["lse"][b, h, i] = r.lse
        res["lse_err"][b, h, i] = r.lse_err
        res["row_scale"][b, h, i] = r.row_scale
        res["bad"][b, h, i] = False  # the float pass's verdict no longer applies
        if "pi" in res:
            res["pi"][b, h, i] = r.pi
            res["tau"][b, h, i] = r.tau
        if "p" in res:
            _put(res["p"], (b, h, i), r.p)
        elif "p_rows" in res:
            res["p_rows"][(b, h, i)] = r.p
        if "s" in res:
            _put(res["s"], (b, h, i), r.s)


# ---------------------------------------------------------------------------
# gradients


def _group_sum(x, ex, groups, u, f):
    """Sum dK or dV (B, H, N, D) and its bound ``ex`` over the query heads
    of each kv group; the sum adds gamma_G sum |.| (``f`` gives |.| as float)."""
    if groups == 1:
        return x, ex
    B, H = x.shape[:2]
    xs = x.reshape(B, H // groups, groups, *x.shape[2:])
    bound = ex.reshape(xs.shape).sum(axis=2) + gamma(groups, u) * f(xs).sum(axis=2)
    return xs.sum(axis=2), bound


def _backward(P, O, dO, Q, K, V, scale, pi, tau, E, u, groups, to_float):
    """dQ, dK, dV and their bounds, written for object arrays of mpf (mode
    "mpmath": every operation rounds with unit roundoff ``u``); it also runs
    on float64, where `_float_grads` is the same bound, rearranged to be fast.
    |P_hat - P| <= pi p_hat + tau rowwise; |O_hat - O| <= E."""
    Nq, Nk = P.shape[2:]
    Dv = V.shape[3]

    def t(x):
        return x.swapaxes(-1, -2)

    dV = t(P) @ dO
    dP = dO @ t(V)
    Dvec = (dO * O).sum(axis=-1)
    X = dP - Dvec[..., None]
    dS = P * X
    dQ = (dS @ K) * scale
    dK = (t(dS) @ Q) * scale

    def f(x):
        return np.abs(to_float(x))

    pf, Xf, dSf, dOf = f(P), f(X), f(dS), f(dO)
    Qf, Kf, Vf = f(Q), f(K), f(V)
    pi_, tau_ = pi[..., None], tau[..., None]
    gq, gk, gd = gamma(Nq, u), gamma(Nk, u), gamma(Dv, u)
    with np.errstate(over="ignore", invalid="ignore"):
        edv = t((pi_ + gq) * pf + tau_) @ dOf + u * f(dV)
        don = np.sqrt((dOf * dOf).sum(-1)) * (1 + gamma(Dv + 2))
        vn = np.sqrt((Vf * Vf).sum(-1)) * (1 + gamma(Dv + 2))
        ed = (dOf * E).sum(-1) + gd * (dOf * f(O)).sum(-1) * 1.01
        ex = gd * don[..., :, None] * vn[..., None, :] + ed[..., None] + u * Xf
        eds = (pi_ * pf + tau_) * Xf + (pf * (1 + pi_) + tau_) * ex + u * dSf
        edq = abs(scale) * ((eds + gk * dSf) @ Kf) + 2 * u * f(dQ)
        edk = abs(scale) * (t(eds + gq * dSf) @ Qf) + 2 * u * f(dK)
    dK, edk = _group_sum(dK, edk, groups, u, f)
    dV, edv = _group_sum(dV, edv, groups, u, f)
    return dQ, dK, dV, CERT_SAFETY * edq, CERT_SAFETY * edk, CERT_SAFETY * edv


def _grad_tile(xp, P, O, E, dO, Q, K, V, scale, pi, tau, Nq) -> dict:
    """The float64 gradients and bounds of the query rows in ``P``, ``O``,
    ``E``, ``dO``, ``Q`` (a tile; ``K``, ``V`` whole, ``Nq`` the number of
    query rows of the whole problem). dQ and its bound are final; dK, dV
    and their bounds are this tile's part of sums over query rows, finished
    by `_grad_finish` (see `_float_grads`)."""
    Nk = P.shape[3]
    Dv = V.shape[3]
    gq, gk, gd = gamma(Nq), gamma(Nk), gamma(Dv)
    with xp.errstate(over="ignore", invalid="ignore"):
        adO = xp.abs(dO)
        # dV = P^T dO and sum_i (pi_i + gq) P_ij |dO_ic| in one product
        w = xp.matmul(P.swapaxes(-1, -2), xp.concatenate([dO, (pi + gq) * adO], axis=-1))
        dV = xp.ascontiguousarray(w[..., :Dv])
        edv = w[..., Dv:] + xp.sum(tau * adO, axis=-2, keepdims=True)
        delta = xp.einsum("bhic,bhic->bhi", dO, O)[..., None]
        # |fl(D) - D|: O's error and the rounding of the row dot product
        ed = (xp.einsum("bhic,bhic->bhi", adO, E) + 1.01 * gd * xp.einsum("bhic,bhic->bhi", adO, xp.abs(O)))[..., None]
        don = xp.sqrt(xp.einsum("bhic,bhic->bhi", dO, dO))[..., None] * (1 + gamma(Dv + 2))
        vn = xp.sqrt(xp.einsum("bhjc,bhjc->bhj", V, V))[..., None, :] * (1 + gamma(Dv + 2))
        ds = xp.matmul(dO, V.swapaxes(-1, -2))  # dP; |fl(dP) - dP| <= gd ||dO_i|| ||v_j||
        ds -= delta  # X = dP - D
        ds *= P  # dS
        dQ = xp.matmul(ds, K)
        dQ *= scale
        dK = xp.matmul(ds.swapaxes(-1, -2), Q)  # scaled in _grad_finish, after the sum over tiles
        # |dS^ - dS| <= (pi P + tau)|X^| + ((1 + pi) P + tau) ex with
        # ex = gd ||dO_i|| ||v_j|| + ed_i + u|X^|, and P |X^| <= |dS^| (1 + u);
        # with the u |dS^| of the product and gamma_N |dS^| of dS K (or
        # dS^T Q) this is T: the |dS| terms collect into a, the P terms into
        # alpha ||v_j|| + beta, the tau terms into t (with |X^_ij| <= xb_i).
        g_lo, g_hi = min(gq, gk), max(gq, gk)
        a = (1 + U) * pi + 2 * U + g_lo
        alpha = (1 + pi) * gd * don
        beta = (1 + pi) * ed
        vmax = xp.amax(vn, axis=-1, keepdims=True)
        xb = 1.01 * (don * vmax + xp.abs(delta))
        t = tau * ((1 + U) * xb + gd * don * vmax + ed)
        T = xp.multiply(alpha, vn)
        T += beta
        T *= P
        xp.abs(ds, out=ds)
        ds *= a
        T += ds
        aK, aQ = xp.abs(K), xp.abs(Q)

        def err_dq():
            return abs(scale) * (xp.matmul(T, aK) + t * xp.sum(aK, axis=-2, keepdims=True)) + 2 * U * xp.abs(dQ)

        def err_dk():  # without |scale| and 2u|dK|: added once in _grad_finish
            return xp.matmul(T.swapaxes(-1, -2), aQ) + xp.sum(t * aQ, axis=-2, keepdims=True)

        # T carries gamma of the shorter sum; the longer one (Nq != Nk) gets
        # the difference before its product
        first, second = (err_dq, err_dk) if gk <= gq else (err_dk, err_dq)
        e1 = first()
        if g_hi > g_lo:
            ds *= (g_hi - g_lo) / a  # (g_hi - g_lo) |dS|
            T += ds
        del ds
        e2 = second()
        edq, edk = (e1, e2) if gk <= gq else (e2, e1)
    return {"dq": dQ, "edq": edq, "dk": dK, "edk": edk, "dv": dV, "edv": edv}


def _grad_finish(xp, acc, scale):
    """dK, dV and their bounds from the sums over tiles of `_grad_tile`'s
    parts: the terms in the rounded results (the scale multiply, u |dK^|,
    u |dV^|) once, at the end."""
    with xp.errstate(over="ignore", invalid="ignore"):
        dK = acc["dk"]
        dK *= scale
        edk = abs(scale) * acc["edk"] + 2 * U * xp.abs(dK)
        dV = acc["dv"]
        edv = acc["edv"] + U * xp.abs(dV)
    return dK, dV, edk, edv


def _float_grads(pr, res):
    """dQ, dK, dV in float64 and their bounds (docs/oracle.md, "Gradients"),
    on the host over all rows at once.

    The bound of `_backward` rearranged so that no N x N matrix beyond P is
    formed except dP (then X = dP - D, then dS, then a |dS|, in place) and
    one bound matrix T, and every bound is a product with magnitudes: the
    error of dS, plus the rounding of dS K and dS^T Q, is at most T_ij =
    a_i |dS_ij| + P_ij (alpha_i ||v_j|| + beta_i) + t_i, so that
    err(dQ) = |scale| (T |K|) and err(dK) = |scale| (T^T |Q|).
    """
    g = _grad_tile(NUMPY, res["p"], res["out"], res["err"], pr.dout, pr.q, pr.k, pr.v, pr.scale,
                   res["pi"][..., None], res["tau"][..., None], pr.q.shape[2])
    dK, dV, edk, edv = _grad_finish(NUMPY, g, pr.scale)
    return _grads_out(pr, g["dq"], dK, dV, g["edq"], edk, edv)


def _grads_out(pr, dQ, dK, dV, edq, edk, edv):
    dK, edk = _group_sum(dK, edk, pr.groups, U, np.abs)
    dV, edv = _group_sum(dV, edv, pr.groups, U, np.abs)
    return dQ, dK, dV, CERT_SAFETY * edq, CERT_SAFETY * edk, CERT_SAFETY * edv


def _tiled_grads(xp, dev, pr, res, tile: int):
    """`_grad_tile` over the same tiles as `_tiled_forward`: P of a tile is
    the kept one or recomputed (the same computation as the forward's, so
    the forward's pi and tau bound it), with the rows recomputed on the host
    put in; dQ goes to the host per tile, the dK and dV parts are summed on
    the device (a sum over query rows in some order, which gamma_Nq covers)."""
    B, H, n, Nk, Dv = pr.shape
    like = dev["like"]
    dO = xp.asarray(pr.dout, like=like)
    dQ, edq = np.empty(pr.q.shape), np.empty(pr.q.shape)
    acc = None
    for a in range(0, n, tile):
        b = min(n, a + tile)
        if "p" in res:
            P = res["p"][:, :, a:b]
        else:
            P = _forward_tile(xp, dev["q"][:, :, a:b], dev["k"], dev["v"], *pr.masks(xp, like, a, b),
                              pr.scale, False, True)["p"]
            for (bb, hh, i), p_row in res["p_rows"].items():
                if a <= i < b:
                    _put(P, (bb, hh, i - a), p_row)
        host = {key: xp.asarray(res[key][:, :, a:b], like=like) for key in ("out", "err", "pi", "tau")}
        g = _grad_tile(xp, P, host["out"], host["err"], dO[:, :, a:b], dev["q"][:, :, a:b], dev["k"], dev["v"],
                       pr.scale, host["pi"][..., None], host["tau"][..., None], n)
        dQ[:, :, a:b], edq[:, :, a:b] = xp.to_numpy(g["dq"]), xp.to_numpy(g["edq"])
        if acc is None:
            acc = {key: g[key] for key in ("dk", "edk", "dv", "edv")}
        else:
            for key in acc:
                acc[key] += g[key]
    dK, dV, edk, edv = (xp.to_numpy(x) for x in _grad_finish(xp, acc, pr.scale))
    return _grads_out(pr, dQ, dK, dV, edq, edk, edv)


def _mp_grads(pr, res, prec):
    to_mp = np.vectorize(mpmath.mpf, otypes=[object])

    def to_float(x):
        return np.asarray(x, dtype=object).astype(np.float64) if np.asarray(x).dtype == object else x

    with mpmath.workprec(prec):
        args = [res["p_mp"], res["out_mp"]] + [to_mp(a) for a in (pr.dout, pr.q, pr.k, pr.v)]
        grads = _backward(*args, mpmath.mpf(pr.scale), res["pi_mp"], res["tau"], res["err_mp"],
                          2.0**-prec, pr.groups, to_float)
    out = []
    for g, e in zip(grads[:3], grads[3:]):
        gf = g.astype(np.float64)
        out.append((gf, e + U * np.abs(gf)))  # rounding to float64
    (dq, edq), (dk, edk), (dv, edv) = out
    return dq, dk, dv, edq, edk, edv


# ---------------------------------------------------------------------------
# public entry points


def _products_exact(q, k) -> bool:
    """q_ik k_jk is exact in float64: both formats have at most 26
    significant bits together 53 (fp16, bf16, fp32; not float64)."""
    try:
        return format_of(q.dtype).p + format_of(k.dtype).p <= 53
    except (ValueError, TypeError):
        return False


def _check_mode(mode, prec, rtol_target):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(prec, int) or prec < MIN_PREC:
        raise ValueError(f"prec must be an int >= {MIN_PREC} bits, got {prec!r}")
    if not isinstance(rtol_target, (int, float)) or not (MIN_RTOL_TARGET <= rtol_target < 1):
        raise ValueError(f"rtol_target must be a float in [2**-50, 1) (a float64 result cannot be "
                         f"certified more tightly), got {rtol_target!r}")


def _resolve_device(device):
    """None (the NumPy path) or a torch.device of type cpu or cuda that exists."""
    if device is None:
        return None
    import torch

    if isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device {device!r} is not a device name; use None (NumPy), 'cpu', 'cuda' "
                             f"or 'cuda:N'") from None
    elif isinstance(device, torch.device):
        dev = device
    else:
        raise ValueError(f"device must be None, a string such as 'cuda' or a torch.device, "
                         f"got {type(device).__name__} {device!r}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the oracle runs on 'cpu' or 'cuda' (float64 with documented "
                         f"exp/log accuracy), not {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available to this torch {torch.__version__} "
                             f"(CUDA build: {torch.version.cuda}); use device='cpu' or device=None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                             f"use an index below that")
        # cuBLAS floating-point emulation (Ozaki scheme, opt-in through
        # environment variables) is not IEEE FMA arithmetic, so gamma_n
        # would not cover its DGEMM; torch offers no switch for it
        emu = {name: val for name, val in os.environ.items()
               if name.startswith("CUBLAS_EMULAT") and val not in ("", "0")}
        if emu:
            raise ValueError(f"device {device!r}: cuBLAS floating-point emulation settings {emu} are set; the "
                             f"oracle's bound assumes native IEEE float64 GEMM: unset them for this process")
    return dev


def _check_tile_rows(tile_rows):
    if tile_rows is None:
        return None
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, (int, np.integer)) or tile_rows < 1:
        raise ValueError(f"tile_rows must be a positive int (query rows per tile) or None, got {tile_rows!r}")
    return int(tile_rows)


def _device_arrays(pr: _Problem, dev) -> tuple:
    """The namespace and q, k, v of the float pass: host NumPy for
    ``dev=None``, else float64 tensors on ``dev`` (the host copies stay in
    ``pr`` for the multiple-precision rows)."""
    if dev is None:
        return NUMPY, {"like": None, "q": pr.q, "k": pr.k, "v": pr.v}
    import torch

    like = torch.empty(0, dtype=torch.float64, device=dev)
    xp = namespace(like)
    return xp, {"like": like, **{name: xp.asarray(getattr(pr, name), like=like) for name in ("q", "k", "v")}}


def attention(q, k, v, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
              mode="auto", keep=False, dout=None, rtol_target=DEFAULT_RTOL_TARGET,
              prec=128, crosscheck_rows=0, device=None, rows=None, tile_rows=None,
              refine=True) -> AttentionResult:
    """Certified ``scaled_dot_product_attention(q, k, v, ...)``.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); NumPy arrays
    (float16, ml_dtypes.bfloat16, float32, float64) or torch tensors. The
    scale is the exact value of the float64 a target receives (default
    ``1.0 / math.sqrt(D)``); a kernel that rounds it to fp32 commits an error
    of its own. With ``dout`` (B, H, Nq, Dv) the gradients are returned too.
    ``crosscheck_rows > 0`` re-verifies that many random rows with
    `crosscheck` at 256 bits (a fuzzing option) and raises
    `CertificationError` if one is off.

    ``device`` None runs the float pass in NumPy on the host; "cpu", "cuda",
    "cuda:N" or a torch.device run the same pass in torch float64 there, in
    tiles of at most ``tile_rows`` query rows (default: about 2**27
    elements of B*H*rows*Nk per tile; on the NumPy path tiles only when
    given). Uncertified rows are recomputed on the host either way. Results
    are host NumPy arrays; with ``keep`` s, p, q, k, v are in the float
    pass's arrays (torch tensors on ``device``). ``rows=(i0, i1)`` computes
    query rows i0 <= i < i1 only (masks and causality by global index;
    ``mp_row_index`` holds global indices); not with ``dout``.

    In mode "auto", rows the float pass does not certify first go through
    the compensated-logit tier (``refine=True``, inputs q and k of at most
    26 significant bits, no ``dout``): ``refined_rows`` counts the rows it
    certifies; the others are recomputed by mpmath (``mp_rows``).

    >>> import numpy as np
    >>> q = np.ones((1, 1, 2, 2), np.float32)
    >>> v = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    >>> attention(q, q, v, is_causal=True).out[0, 0].tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    >>> attention(q, q, v, is_causal=True, rows=(1, 2)).out[0, 0].tolist()
    [[2.0, 3.0]]
    """
    _check_mode(mode, prec, rtol_target)
    if not isinstance(keep, bool):
        raise TypeError(f"keep must be a bool, got {type(keep).__name__}")
    if isinstance(crosscheck_rows, bool) or not isinstance(crosscheck_rows, int) or crosscheck_rows < 0:
        raise ValueError(f"crosscheck_rows must be a non-negative int, got {crosscheck_rows!r}")
    dev = _resolve_device(device)
    tile = _check_tile_rows(tile_rows)
    pr = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, dout, rows=rows)
    B, H, Nq, Nk, Dv = pr.shape
    need_p = dout is not None
    xp, arrays = _device_arrays(pr, dev)
    untiled = dev is None and tile is None  # today's NumPy path, bit for bit
    if untiled:
        res = _float_forward(pr, keep, need_p)
    else:
        tile = tile or _default_tile_rows(pr)
        res = _tiled_forward(xp, arrays, pr, keep, need_p, tile)
    if mode == "mpmath":
        mp = [(b, h, i) for b in range(B) for h in range(H) for i in range(Nq)]
    elif mode == "auto":
        mp = [tuple(int(x) for x in r) for r in np.argwhere(~_certified_rows(res, rtol_target))]
    else:
        mp = []
    refined = 0
    if mp and mode == "auto" and refine and dout is None and _products_exact(q, k):
        left = _refine_rows(xp, arrays, pr, res, mp, rtol_target, keep)
        refined, mp = len(mp) - len(left), left
    _fill_mp_rows(pr, res, mp, prec, want_mp=mode == "mpmath" and dout is not None)
    certified = bool(_certified_rows(res, rtol_target).all())
    extra = {}
    if keep:
        extra = {"s": res["s"], "p": res["p"], "q": arrays["q"], "k": arrays["k"], "v": arrays["v"]}
    if dout is not None:
        if mode == "mpmath":
            grads = _mp_grads(pr, res, prec)
        elif untiled:
            grads = _float_grads(pr, res)
        else:
            grads = _tiled_grads(xp, arrays, pr, res, tile)
        extra.update(zip(("dq", "dk", "dv", "dq_err_bound", "dk_err_bound", "dv_err_bound"), grads))
    i0 = pr.row0
    result = AttentionResult(
        out=res["out"], lse=res["lse"], err_bound=res["err"], lse_err_bound=res["lse_err"],
        row_scale=res["row_scale"], mp_rows=len(mp), refined_rows=refined, mode=mode, prec=prec, scale=pr.scale,
        rtol_target=float(rtol_target), certified=certified,
        mp_row_index=tuple((b, h, i + i0) for b, h, i in mp),
        row_range=None if rows is None else (i0, i0 + Nq), **extra,
    )
    if crosscheck_rows:
        rep = crosscheck(result, q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa, rows=crosscheck_rows)
        if not rep.ok:
            raise CertificationError(f"oracle outside its bound on rows {rep.failures[:3]} "
                                     f"(worst ratio {rep.worst_ratio:.3g})")
    return result


def case_rtol_target(case_or_dtype) -> float:
    """The oracle's ``rtol_target`` for judging a kernel on these inputs:
    1e-3 times the unit roundoff of the input format (fp16: 2**-11, bf16:
    2**-8, fp32: 2**-24; the finest of q, k, v for a `Case`), at least
    2**-50. The oracle's bound is then at most 0.1% of the smallest
    tolerance any model of that format allows (docs/oracle.md, "When a row
    is recomputed"). Accepts a `Case`, a dtype, an array or a format name.

    >>> case_rtol_target("float16") == 1e-3 * 2.0**-11
    True
    """
    xs = [getattr(case_or_dtype, name) for name in ("q", "k", "v") if hasattr(case_or_dtype, name)]
    u = min(format_of(x.dtype).u for x in xs) if xs else format_of(case_or_dtype).u
    return max(MIN_RTOL_TARGET, 1e-3 * u)


def attention_case(case, *, mode="auto", keep=False, with_grad=None, **options) -> AttentionResult:
    """`attention` of a `flashcheck.properties.case.Case`; gradients when the case has
    ``do`` (or when ``with_grad`` is True, which then requires it). ``rtol_target``
    defaults to `case_rtol_target` of the case (1e-3 of its input format's unit
    roundoff), not `attention`'s fp32 default."""
    from flashcheck.properties.case import Case

    if not isinstance(case, Case):
        raise TypeError(f"attention_case needs a flashcheck.properties.case.Case, got {type(case).__name__}")
    if with_grad and case.do is None:
        raise ValueError("with_grad=True but the case has no output gradient 'do'")
    dout = case.do if with_grad is not False else None
    options.setdefault("rtol_target", case_rtol_target(case))
    return attention(case.q, case.k, case.v, attn_mask=case.attn_mask, is_causal=case.is_causal,
                     scale=case.scale, enable_gqa=case.enable_gqa, mode=mode, keep=keep, dout=dout,
                     **options)


def crosscheck(result: AttentionResult, q, k, v, *, attn_mask=None, is_causal=False, scale=None,
               enable_gqa=False, rows=8, seed=0, prec=256) -> CrosscheckReport:
    """Recompute ``rows`` random rows at ``prec`` bits (at least 226) and check
    that ``result`` lies within its certified bound of them. The comparison
    is exact (rational arithmetic), with the high-precision row's own tiny
    bound added to ``result``'s.

    Use as ``assert crosscheck(r, q, k, v).ok``. A result of ``rows=``
    is checked on its rows (``result.row_range``); rows are reported by
    global index.
    """
    if not isinstance(result, AttentionResult):
        raise TypeError(f"result must be an AttentionResult, got {type(result).__name__}")
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    if not isinstance(prec, int) or prec < 2 * MIN_PREC:
        raise ValueError(f"crosscheck needs prec >= {2 * MIN_PREC} bits, got {prec!r}")
    pr = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, None, rows=result.row_range)
    B, H, Nq, Nk, Dv = pr.shape
    if result.out.shape != (B, H, Nq, Dv):
        raise ValueError(f"result has shape {result.out.shape}, inputs give {(B, H, Nq, Dv)}")
    if pr.scale != result.scale:
        raise ValueError(f"result was computed with scale {result.scale}, not {pr.scale}")
    rng = np.random.default_rng(seed)
    n = B * H * Nq
    picks = rng.choice(n, size=min(rows, n), replace=False)
    checked, failures, worst = [], [], 0.0
    for flat in sorted(int(x) for x in picks):
        b, h, i = np.unravel_index(flat, (B, H, Nq))
        b, h, i = int(b), int(h), int(i)
        r = pr.mp_row(b, h, i, prec)
        gi = i + pr.row0  # reported as global row indices
        checked.append((b, h, gi))
        for c in range(Dv):
            diff = abs(Fraction(float(result.out[b, h, i, c])) - r.exact[c])
            allowed = Fraction(float(result.err_bound[b, h, i, c])) + Fraction(float(r.exact_err[c]))
            worst = max(worst, _ratio(diff, allowed))
            if diff > allowed:
                failures.append(("out", b, h, gi, c, float(diff), float(allowed)))
        lse = float(result.lse[b, h, i])
        if r.lse == -np.inf or lse == -np.inf:
            if r.lse != lse:
                failures.append(("lse", b, h, gi, -1, math.inf, 0.0))
            continue
        diff = abs(lse - r.lse)
        allowed = float(result.lse_err_bound[b, h, i]) + r.lse_err
        worst = max(worst, diff / allowed if allowed > 0 else (0.0 if diff == 0 else math.inf))
        if diff > allowed:
            failures.append(("lse", b, h, gi, -1, diff, allowed))
    return CrosscheckReport(not failures, tuple(checked), worst, tuple(failures), prec)


def _ratio(diff: Fraction, allowed: Fraction) -> float:
    if allowed == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / allowed)


# ---------------------------------------------------------------------------
# softmax and log-sum-exp


def _softmax_core(x, axis, mode, rtol_target, prec, want):
    _check_mode(mode, prec, rtol_target)
    x64 = _exact(x, "x")
    if x64.ndim == 0:
        raise ValueError("x must have at least one dimension")
    if not isinstance(axis, (int, np.integer)) or not -x64.ndim <= axis < x64.ndim:
        raise ValueError(f"axis {axis!r} is out of range for an array of rank {x64.ndim}")
    if x64.shape[axis] == 0:
        raise ValueError("the softmax axis must not be empty")
    if np.isnan(x64).any():
        raise ValueError("x contains NaN")
    if (x64 == np.inf).any():
        raise ValueError("x contains +inf (the softmax would be undefined)")
    xs = np.moveaxis(x64, axis, -1)
    n = xs.shape[-1]
    gn = gamma(n)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        m = xs.max(axis=-1, keepdims=True)
        empty = m == -np.inf
        ms = np.where(empty, 0.0, m)
        d = xs - ms
        sig = U * np.abs(d) + ETA  # x is exact: only the subtraction rounds
        neg = d + sig < -L_NEG
        e = np.exp(d)
        kap = np.where(neg, 0.0, (RHO + np.expm1(sig)) / (1 - RHO))
        tau_abs = math.exp(-L_NEG) * (1 + RHO) + 1.02 * ETA
        w = kap * e + tau_abs * np.isfinite(d)
        ell = e.sum(-1, keepdims=True)
        ell_s = np.where(empty, 1.0, ell)
        F = w.sum(-1, keepdims=True) / ell_s * (1 + 3 * gn)
        if want == "softmax":
            val = e / ell_s
            err = CERT_SAFETY * (w / ell_s + val * (F + gn + U)) / (1 - F)
            tol = rtol_target * val + 2.0**-1000
        else:
            log_ell = np.log(ell_s)
            val = ms + log_ell
            err = CERT_SAFETY * (1.02 * (gn + F) + RHO * np.abs(log_ell) + U * np.abs(val))
            tol = rtol_target * np.maximum(np.abs(val), 1.0)
        bad = ~((F < 0.01) & (err <= tol)).all(-1) & ~empty[..., 0]
        val = np.where(empty, 0.0 if want == "softmax" else -np.inf, val)
        err = np.where(empty, 0.0, err)
    rows = []
    if mode != "float64":
        rows = [tuple(r) for r in np.argwhere(bad | (mode == "mpmath"))]
    for r in rows:
        xi = xs[r]
        allowed = xi != -np.inf
        if not allowed.any():
            continue
        xi_int, ex = dyadic_ints(np.where(allowed, xi, 0.0))
        m_int = max(xi_int[j] for j in np.flatnonzero(allowed))
        wts = mp_exp_weights(xi_int - m_int, ex, allowed, prec)
        ell_f = ratio_to_float(wts.total, 1, wts.e0)
        Fm = float(wts.w.sum()) / ell_f * 1.01
        if want == "softmax":
            val[r] = [ratio_to_float(int(t), wts.total, 0) for t in wts.ints]
            err[r] = CERT_SAFETY * (wts.w / ell_f * 1.01 + val[r] * (Fm + 2 * U)) / (1 - Fm)
        else:
            with mpmath.workprec(prec):
                m_mp = mpmath.ldexp(mpmath.mpf(int(m_int)), ex)
                lg = mpmath.log(mpmath.mpf(wts.total)) + wts.e0 * mpmath.ln2
                val[r] = lse = float(m_mp + lg)
            err[r] = CERT_SAFETY * (1.01 * Fm + 2.0 ** (4 - prec) * (abs(float(m_mp)) + abs(float(lg)) + abs(lse))
                               + U * abs(lse))
    if want == "softmax":
        return SoftmaxResult(np.moveaxis(val, -1, axis), np.moveaxis(err, -1, axis), len(rows), mode)
    return SoftmaxResult(val[..., 0], err[..., 0], len(rows), mode)


def softmax(x, axis=-1, mode="auto", *, rtol_target=DEFAULT_RTOL_TARGET, prec=128) -> SoftmaxResult:
    """Certified softmax of the exact values of ``x`` along ``axis``; -inf
    entries get probability 0, rows of -inf give zeros.

    >>> r = softmax(np.array([0.0, np.log(3.0)]))
    >>> bool(abs(r.value[1] - 0.75) <= r.err_bound[1] + 1e-16)
    True
    """
    return _softmax_core(x, axis, mode, rtol_target, prec, "softmax")


def logsumexp(x, axis=-1, mode="auto", *, rtol_target=DEFAULT_RTOL_TARGET, prec=128) -> SoftmaxResult:
    """Certified log(sum(exp(x))) along ``axis`` (-inf for rows of -inf).

    >>> float(logsumexp(np.array([0.0, 0.0])).value)
    0.6931471805599453
    """
    return _softmax_core(x, axis, mode, rtol_target, prec, "logsumexp")
