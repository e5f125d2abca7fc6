"""Elementwise error bounds for attention, derived from a precision model.

`attention_bound` returns, for every output element, a bound on
|O_target - O_exact| that holds for any kernel that computes the way its
`PrecisionModel` says (round-to-nearest or truncating steps, a fixed exp
error, any summation order, key tiles processed in increasing or decreasing
key order). The derivation, its assumptions and references are in
docs/error-bounds.md; the section numbers below refer to it.

Everything is computed from the case's exact data, as the oracle gives it
(``keep=True``): logits s, probabilities P, values V, output O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashcheck.kernels.models import LG2_APPROX_ABS_ERR
from flashcheck.kernels.precision import FORMATS, PrecisionModel
from flashcheck.verify.bound_terms import (
    acc_underflow,
    exp_underflow,
    exp_unit,
    gamma,
    half_subnormal,
    key_errors,
    largest_terms,
    normalise_unit,
    p_times_expm1,
    tf32_operand_terms,
    unit,
    weight_perturbation,
)

__all__ = ["Bound", "attention_bound", "rescale_counts", "softmax_bound"]


@dataclass
class Bound:
    """Bounds on |target - exact| for one case.

    out:          (B, H, Nq, Dv) elementwise bound on the output.
    lse:          (B, H, Nq) bound on the log-sum-exp.
    fallback:     (B, H, Nq) rows where first-order terms were not small and
                  the coarse rigorous bound (section 6) was used.
    terms:        largest value of each term, for reports and debugging.
    """

    out: np.ndarray
    lse: np.ndarray
    fallback: np.ndarray
    terms: dict = field(default_factory=dict)


def _records_after(s: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """For each key j of each row, how many later keys may raise the running
    max (in increasing key order): each such raise is one rescale of the
    partial sums that already hold key j. A key within ``tol`` of the running
    max counts, since rounding may or may not make it a new max."""
    prev = np.maximum.accumulate(s, axis=-1)
    prev = np.concatenate([np.full(s.shape[:-1] + (1,), -np.inf), prev[..., :-1]], axis=-1)
    with np.errstate(invalid="ignore"):
        maybe = np.isfinite(s) & (s >= prev - tol[..., None])
    counts = np.cumsum(maybe[..., ::-1], axis=-1)[..., ::-1]  # keys >= j
    return counts - maybe  # strictly after j


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1)
    m0 = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m0 + np.log(np.sum(np.exp(x - m0[..., None]), axis=-1))


def rescale_counts(s: np.ndarray, tol: np.ndarray, partition=None) -> np.ndarray:
    """Per key, an upper bound on the rescales that reach it after it entered
    the running sums, for increasing or decreasing key order (§3). With a
    ``partition`` (split-KV: a list of key index arrays, each part processed
    on its own and the parts merged), counts are taken within each part and
    every merge adds one more rescale."""
    if partition is None:
        fwd = _records_after(s, tol)
        bwd = _records_after(s[..., ::-1], tol)[..., ::-1]
        return np.maximum(fwd, bwd)
    counts = np.zeros(s.shape, dtype=np.int64)
    for part in partition:
        idx = np.asarray(part, dtype=np.int64)
        if idx.size:
            counts[..., idx] = rescale_counts(s[..., idx], tol) + len(partition)
    return counts


def _centred_sum(w: np.ndarray, v: np.ndarray, o: np.ndarray, max_work: float = 2e8) -> np.ndarray:
    """sum_j w_ij |V_jc - O_ic| over (B, H, Nq, Nk) weights, exactly when
    affordable, else via |V - O| <= |V| + |O| (still an upper bound)."""
    B, H, Nq, Nk = w.shape
    Dv = v.shape[-1]
    if B * H * Nq * Nk * Dv <= max_work:
        out = np.empty(o.shape)
        for c in range(Dv):
            out[..., c] = np.einsum("bhij,bhij->bhi", w, np.abs(v[..., None, :, c] - o[..., :, c, None]))
        return out
    return w @ np.abs(v) + w.sum(-1, keepdims=True) * np.abs(o)


def attention_bound(ref, model: PrecisionModel, *, attn_mask=None, block_n=None, partition=None) -> Bound:
    """Bound on |O_target - O_exact| for a target following ``model``.

    ``ref`` is the oracle's result with intermediates (``keep=True``): it
    supplies q, k, v (float64, kv heads expanded), the scale, the exact
    logits s (masked keys -inf), P, O and the LSE. ``attn_mask`` is the
    case's mask (only an additive float mask matters here). ``block_n`` is
    unused for soundness (the rescale count is taken per key, which covers
    every tile size) and accepted for symmetry with the targets.
    ``partition`` (a list of key index arrays) bounds split-KV attention:
    each part accumulated on its own, then merged (online models only).

    A ``softmax="stored"`` model (torch's math backend) is bounded by the
    same §3-§4 with no rescales, then §5s-§6s: P normalised per element
    before an fp32 P V product, and no final division.
    """
    for name in ("q", "k", "v", "s", "p", "out", "lse", "scale"):
        if getattr(ref, name, None) is None:
            raise ValueError(f"attention_bound needs the oracle's {name!r}: call the oracle with keep=True")
    if not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel, got {type(model).__name__}")
    stored = model.softmax == "stored"
    if stored and partition is not None:
        raise ValueError(f"model {model.name!r} has softmax='stored' (no partial states to merge): "
                         f"split-KV partitions apply to online models only; pass partition=None")
    del block_n
    q, k, v, s, p, o = ref.q, ref.k, ref.v, ref.s, ref.p, ref.out
    scale = abs(float(ref.scale))

    # --- units (section 2) ----------------------------------------------
    u_pv = unit(model.pv_acc, model.acc_rounding)
    u_l = unit(model.l_acc, model.acc_rounding)
    tf, _, eta_tf = tf32_operand_terms(model)
    u_p = 0.0 if model.p == model.exp else unit(model.p)
    u_div = unit(model.pv_acc) + model.div_rel_err
    u_out = 0.0 if model.out == model.pv_acc else unit(model.out)
    exp2 = model.exp_impl == "exp2"

    finite = np.isfinite(s)
    masked_row = ~finite.any(-1)

    # --- per-key logit errors (section 3) ---------------------------------
    ke = key_errors(q, k, s, scale, model, attn_mask,
                    None if stored else (lambda tol: rescale_counts(s, tol, partition)))
    mag_sS, a, rescales, e_c, e_abs = ke.mag, ke.a, ke.rescales, ke.e_c, ke.e_abs
    n_resc_row = np.max(np.where(finite, rescales, 0), axis=-1) + 1
    if partition is not None:
        n_resc_row = n_resc_row + len(partition)  # each merge also adds its two halves
    with np.errstate(over="ignore"):
        E = np.expm1(e_c)  # may be inf for keys far below the max: only P E is used then
    # Absolute errors of exp results that underflow (ftz on GPUs).
    eta_exp = exp_underflow(model)

    # --- (4) weight perturbations: centred, rigorous ----------------------
    PE, w_exact, ell, sPE_eta = weight_perturbation(s, p, e_c, model)
    fallback = (sPE_eta >= 0.5) | ~np.isfinite(sPE_eta)
    denom1 = np.where(fallback, 1.0, 1.0 - sPE_eta)
    w = PE + finite * (eta_exp / ell)[..., None]
    err1 = _centred_sum(w, v, o) / denom1[..., None]
    p_up = (p + PE) / denom1[..., None]  # perturbed probabilities, upper bound

    # --- (5) non-centred: P rounding, accumulation, l --------------------
    n_keys = finite.sum(-1)
    n_acc = n_keys + n_resc_row
    g_pv = gamma(n_acc, u_pv)[..., None]
    g_l = gamma(n_acc, u_l)
    absv = np.abs(v)
    if stored:
        fallback |= g_l >= 0.5
        err2, err3, err4, coarse = _stored_output_terms(model, p, w, denom1, err1, o, absv, finite, n_keys, n_acc,
                                                        fallback)
    else:
        sum_pv = p_up @ absv
        eta_p = 0.0 if u_p == 0.0 else half_subnormal(model.p)
        tiny_p = FORMATS[model.p].tiny
        with np.errstate(invalid="ignore"):
            maybe_sub = finite & ~(w_exact * (1 - E) >= tiny_p)  # NaN (0 * inf) counts as "may be subnormal"
        # tf32 models round both P and V to tf32 for the product as well.
        u_pp = (1 + u_p) * (1 + tf) - 1
        num_err = (u_pp + g_pv * (1 + u_pp)) * sum_pv + eta_p * ((maybe_sub / ell[..., None]) @ absv)
        if tf:
            # Subnormal P or V entries rounded to tf32: absolute errors.
            num_err = num_err + eta_tf * (1 + g_pv) * (
                p_up.sum(-1)[..., None] * (1 + u_pp) + (finite / ell[..., None]) @ absv + eta_tf
            )
        # In the subnormal range rounding is absolute, not relative: each of the
        # n_acc operations of the P V accumulation may lose up to one subnormal
        # spacing (half of one when rounding to nearest). Found on the H100 with
        # subnormal fp32 inputs; divided by l >= 1 at most once.
        num_err = num_err + acc_underflow(n_acc, model.pv_acc, model.acc_rounding)[..., None]
        theta = g_l
        fallback |= theta >= 0.5
        theta = np.where(theta >= 0.5, 0.0, theta)
        o_tilde = np.abs(o) + err1
        err2 = (num_err + o_tilde * theta[..., None]) / (1 - theta[..., None])
        o_c = o_tilde + err2

        # --- (6) division and output rounding -------------------------------
        err3 = u_div * o_c + half_subnormal(model.pv_acc)
        o_d = o_c + err3
        err4 = u_out * o_d + (half_subnormal(model.out) if u_out else 0.0)
        # Coarse rigorous fallback: the output is a weighted mean of V's rows
        # inflated by the accumulation and rounding factors.
        vmax = np.max(np.where(finite[..., None], absv[..., None, :, :], 0.0), axis=-2) if fallback.any() else 0.0
        coarse = np.abs(o) + vmax * (1 + u_p) * (1 + gamma(n_acc, u_pv))[..., None] / np.maximum(
            1 - gamma(n_acc, u_l), 1e-300
        )[..., None] * (1 + u_div) * (1 + u_out) + half_subnormal(model.out)
    bound = err1 + err2 + err3 + err4
    bound = np.where(fallback[..., None], coarse, bound)
    bound = np.where(masked_row[..., None], 0.0, bound)

    # Logits that overflow their format break the model: no bound. So do
    # inputs that overflow when rounded to tf32 (its largest value is below fp32's).
    big = np.max(np.where(finite, mag_sS + a, 0.0), axis=-1) > FORMATS[model.logits].max / 4
    if tf:
        tf_max = FORMATS["tf32"].max
        over = (np.abs(q) > tf_max).any(-1) | (np.abs(k) > tf_max).any(-1).any(-1)[..., None]
        over |= (np.abs(v) > tf_max).any(-1).any(-1)[..., None]
        big = big | over
    bound = np.where(big[..., None], np.inf, bound)

    # --- (7) log-sum-exp ----------------------------------------------------
    # log sum_j P_j e^{e_j} bounds the weights' effect both ways (Jensen), and
    # stays finite however large the logit errors: LSE is 1-Lipschitz.
    with np.errstate(divide="ignore"):
        lse_w = _logsumexp(np.where(finite & (p > 0), np.log(p) + e_abs, -np.inf))
    tail = eta_exp * n_keys / ell + g_l
    lse_fallback = tail >= 0.5
    lse_core = np.where(masked_row, 0.0, lse_w) - np.log1p(-np.minimum(tail, 0.5))
    lse = np.where(masked_row, -np.inf, ref.lse)
    lse_abs = np.abs(np.where(masked_row, 0.0, lse))
    if exp2:
        # lse = (m2 + log2 l) * ln 2, each step in fp32 plus lg2.approx's error.
        lse_final = np.log(2) * LG2_APPROX_ABS_ERR + 3 * unit("fp32") * (lse_abs + lse_core)
    else:
        lse_final = unit("fp32") * np.abs(np.log(ell)) + 2 * unit("fp32") * (lse_abs + lse_core)
    lse_bound = np.where(lse_fallback, np.inf, lse_core + lse_final)
    lse_bound = np.where(masked_row | big, np.where(masked_row, 0.0, np.inf), lse_bound)

    terms = largest_terms(logit_weights=err1, p_rounding_and_accumulation=err2, division=err3,
                          output_rounding=err4, max_weight_perturbation=E)
    terms["fallback_rows"] = int(fallback.sum())
    return Bound(out=bound, lse=lse_bound, fallback=fallback & ~masked_row, terms=terms)


def _stored_output_terms(model, p, w, denom1, err1, o, absv, finite, n_keys, n_acc, fallback):
    """§5s-§6s for a stored softmax: P~_j = fl_p(w~_j fl(1 / l~)) (relative
    u_norm, or half a subnormal of ``p``), then O~ = fl(sum_j P~_j V_j) in
    ``pv_acc`` with rounded products (2 n_keys operations that may each lose
    a subnormal spacing), no final division. Returns (err2, err3, err4,
    coarse) as the online path forms them."""
    u_norm = normalise_unit(model)
    u_out = 0.0 if model.out == model.pv_acc else unit(model.out)
    g_pv = gamma(n_acc, unit(model.pv_acc, model.acc_rounding))[..., None]
    theta = gamma(n_acc, unit(model.l_acc, model.acc_rounding))
    th = np.where(theta >= 0.5, 0.0, theta)[..., None]
    eta_p = half_subnormal(model.p)
    # Perturbed probabilities w~_j / sum w~, underflowed weights included.
    rho_up = (p + w) / denom1[..., None]
    sum_pv = rho_up @ absv
    n_vis = finite.astype(np.float64) @ absv  # sum over the row's visible keys of |V_j|
    underflow = acc_underflow(2 * n_keys, model.pv_acc, model.acc_rounding)[..., None]
    o_tilde = np.abs(o) + err1
    # sum_j (w~_j / l~) V_j = O^ (sum w~ / l~): |.. - O^| <= |O^| theta / (1 - theta).
    err2 = ((o_tilde * th + u_norm * sum_pv + g_pv * (1 + u_norm) * sum_pv) / (1 - th)
            + (1 + g_pv) * eta_p * n_vis + underflow)
    err3 = np.zeros_like(err2)
    o_d = o_tilde + err2
    err4 = u_out * o_d + (half_subnormal(model.out) if u_out else 0.0)
    # Fallback: |O~| <= (1 + gamma) sum_j |P~_j| |V_j| + underflow, sum_j P~_j <= (1 + u_norm) / (1 - theta) + n eta_p.
    vmax = np.max(np.where(finite[..., None], absv[..., None, :, :], 0.0), axis=-2) if fallback.any() else 0.0
    p_sum = (1 + u_norm) / np.maximum(1 - gamma(n_acc, unit(model.l_acc, model.acc_rounding)), 1e-300) \
        + n_keys * eta_p
    coarse = np.abs(o) + (vmax * (1 + g_pv) * p_sum[..., None] + underflow) * (1 + u_out) + half_subnormal(model.out)
    return err2, err3, err4, coarse


def softmax_bound(x, model: PrecisionModel, *, online: bool = True) -> np.ndarray:
    """Elementwise bound on |softmax_computed(x) - softmax_exact(x)| along the
    last axis, for logits ``x`` exactly representable in ``model.logits``
    (the softmax part of §3-§6: subtraction of the max, exp, rescales when
    ``online``, the sum in ``l_acc``, the division and the rounding to
    ``model.p``)."""
    if not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel, got {type(model).__name__}")
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("softmax_bound needs logits without NaN or +inf")
    finite = np.isfinite(x)
    empty = ~finite.any(-1)
    m = np.where(empty, 0.0, np.max(np.where(finite, x, -np.inf), axis=-1))
    x0 = np.where(finite, x, 0.0)
    w = np.exp(np.where(finite, x0 - m[..., None], -np.inf))
    ell = np.where(empty, 1.0, w.sum(-1))
    p = w / ell[..., None]
    u_log = unit(model.logits)
    u_exp = exp_unit(model)
    u_resc = unit(model.rescale) + model.exp_rel_err
    tol = np.full(x.shape[:-1], 2 * u_log) * (np.abs(m) + 1)
    r = rescale_counts(x, tol) if online else np.zeros(x.shape, dtype=np.int64)
    e = u_log * (np.abs(x0 - m[..., None]) + 2 * u_log * (np.abs(m[..., None]) + 1))
    if model.exp_impl == "exp2":
        # converting to base 2, fl(x * fl32(log2 e)): the constant's rounding is
        # common to the row (centred on the max), the product's is not.
        e = e + u_log * np.abs(x0) + unit("fp32") * np.abs(x0 - m[..., None])
    e = e - np.log1p(-u_exp) - r * np.log1p(-u_resc)
    E = np.where(finite, np.expm1(e), 0.0)
    sPE = np.sum(p_times_expm1(p, np.where(finite, e, 0.0)), -1)
    theta = gamma(finite.sum(-1) + np.max(r, axis=-1, initial=0) + 1, unit(model.l_acc))
    bad = (sPE >= 0.5) | (theta >= 0.5)
    sPE = np.where(bad, 0.0, sPE)
    theta = np.where(bad, 0.0, theta)
    rel = (E + sPE[..., None] + theta[..., None]) / ((1 - sPE[..., None]) * (1 - theta[..., None]))
    u_div = unit(model.pv_acc) + model.div_rel_err
    u_p = unit(model.p)
    eta = exp_underflow(model)
    bound = p * ((1 + rel) * (1 + u_div) * (1 + u_p) - 1) + eta / ell[..., None] + half_subnormal(model.p)
    bound = np.where(bad[..., None], 1.0, bound)  # a probability is always within 1 of another
    return np.where(empty[..., None] | ~finite, 0.0, bound)
