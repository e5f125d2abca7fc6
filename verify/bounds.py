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
from flashcheck.verify._xp import is_torch, namespace, to_numpy
from flashcheck.verify.bound_terms import (
    acc_underflow,
    count,
    exp_underflow,
    exp_unit,
    gamma,
    half_subnormal,
    key_errors,
    largest_terms,
    normalise_unit,
    on_device,
    p_times_expm1,
    tf32_operand_terms,
    unit,
    weight_perturbation,
)

__all__ = ["CENTRED_ROW_WORK", "Bound", "attention_bound", "rescale_counts", "softmax_bound"]


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


def _records_after(s, tol):
    """For each key j of each row, how many later keys may raise the running
    max (in increasing key order): each such raise is one rescale of the
    partial sums that already hold key j. A key within ``tol`` of the running
    max counts, since rounding may or may not make it a new max."""
    xp = namespace(s, tol)
    run = xp.cummax(s, axis=-1)
    maybe = xp.isfinite(s)  # the first key always sets the max
    with xp.errstate(invalid="ignore"):
        maybe[..., 1:] &= s[..., 1:] >= run[..., :-1] - tol[..., None]
    del run
    counts = xp.flip(xp.cumsum(xp.flip(maybe, axis=-1), axis=-1), axis=-1)  # keys >= j
    counts -= xp.astype(maybe, xp.int64)  # strictly after j
    return counts


def _logsumexp(x):
    xp = namespace(x)
    m = xp.amax(x, axis=-1)
    m0 = xp.where(xp.isfinite(m), m, 0.0)
    with xp.errstate(divide="ignore"):
        return m0 + xp.log(xp.sum(xp.exp(x - m0[..., None]), axis=-1))


def rescale_counts(s, tol, partition=None):
    """Per key, an upper bound on the rescales that reach it after it entered
    the running sums, for increasing or decreasing key order (§3). With a
    ``partition`` (split-KV: a list of key index arrays, each part processed
    on its own and the parts merged), counts are taken within each part and
    every merge adds one more rescale. Integer counts (int64), in ``s``'s
    library and on its device; row-local (row i reads only row i of s, tol)."""
    xp = namespace(s, tol)
    if partition is None:
        fwd = _records_after(s, tol)
        bwd = xp.flip(_records_after(xp.flip(s, axis=-1), tol), axis=-1)
        return xp.maximum(fwd, bwd, out=fwd)
    counts = xp.zeros(s.shape, like=s, dtype=xp.int64)
    for part in partition:
        idx = np.asarray(to_numpy(part), dtype=np.int64)
        if idx.size:
            idx = xp.asarray(idx, like=s, dtype=xp.int64)
            counts[..., idx] = rescale_counts(s[..., idx], tol) + len(partition)
    return counts


#: Largest work per query row (Nk * Dv) for which §4's centred sum is
#: evaluated exactly; above it, via |V - O| <= |V| + |O|. A per-row figure,
#: so that a row's bound does not depend on how many rows are evaluated with it.
CENTRED_ROW_WORK = 2**20
# Elements of one (rows, Nk) temporary in the blocked evaluations below.
_BLOCK_ELEMENTS = 2**24


def _row_blocks(shape, n_keys):
    """Slices over the query rows of a (B, H, Nq, ...) array, each of at most
    about `_BLOCK_ELEMENTS` rows times keys (whole rows: at least one)."""
    B, H, Nq = shape[:3]
    rows = max(1, _BLOCK_ELEMENTS // max(1, B * H * n_keys))
    return [slice(i, i + rows) for i in range(0, Nq, rows)]


def _centred_sum(w, v, o):
    """sum_j w_ij |V_jc - O_ic| over (B, H, Nq, Nk) weights, exactly when a
    row's work Nk * Dv is at most `CENTRED_ROW_WORK`, else via |V - O| <=
    |V| + |O| (still an upper bound). Row i's result reads only row i of w
    and o, whatever the number of rows (blocks bound the temporaries)."""
    xp = namespace(w, v, o)
    Nk, Dv = v.shape[-2], v.shape[-1]
    if Nk * Dv > CENTRED_ROW_WORK:
        return w @ xp.abs(v) + w.sum(-1, keepdims=True) * xp.abs(o)
    out = xp.zeros(o.shape, like=o)
    for rows in _row_blocks(w.shape, Nk):
        w_r, o_r = w[..., rows, :], o[..., rows, :]
        for c in range(Dv):
            out[..., rows, c] = xp.einsum("bhij,bhij->bhi", w_r, xp.abs(v[..., None, :, c] - o_r[..., :, c, None]))
    return out


def _visible_vmax(finite, absv):
    """max_j |V_jc| over each row's visible keys (0 for none), (B, H, Nq, Dv),
    without a (B, H, Nq, Nk, Dv) temporary for the whole case."""
    xp = namespace(finite, absv)
    out = xp.zeros(finite.shape[:-1] + absv.shape[-1:], like=absv)
    for rows in _row_blocks(finite.shape, finite.shape[-1] * absv.shape[-1]):
        out[..., rows, :] = xp.amax(xp.where(finite[..., rows, :, None], absv[..., None, :, :], 0.0), axis=-2)
    return out


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

    Devices: when ``ref.s`` is a torch float64 tensor (with q, k, v, p on
    its device) every large intermediate is computed with torch there;
    ``ref.out``, ``ref.lse`` and ``attn_mask`` may be NumPy arrays of any
    float dtype or tensors, and are moved there exactly. The returned arrays
    are always host NumPy arrays. Row-local: the bound of query rows i0:i1
    (s, p, q, out, lse and the mask's query rows sliced) equals rows i0:i1
    of the whole case's bound (docs/error-bounds.md, "Row locality").
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
    b = device_attention_bound(ref, model, attn_mask=attn_mask, partition=partition)
    return Bound(out=to_numpy(b.out), lse=to_numpy(b.lse), fallback=to_numpy(b.fallback), terms=b.terms)


def device_attention_bound(ref, model: PrecisionModel, *, attn_mask=None, partition=None) -> Bound:
    """`attention_bound` (arguments checked there) with its arrays left in
    ``ref.s``'s library and on its device, for callers that go on computing
    there (the gradient bound)."""
    stored = model.softmax == "stored"
    s = ref.s
    xp = namespace(s)
    q, k, v, p = (_ref_array(ref, name, s) for name in ("q", "k", "v", "p"))
    o = on_device(ref.out, s, "ref.out")
    ref_lse = on_device(ref.lse, s, "ref.lse")
    scale = abs(float(ref.scale))

    # --- units (section 2) ----------------------------------------------
    u_pv = unit(model.pv_acc, model.acc_rounding)
    u_l = unit(model.l_acc, model.acc_rounding)
    tf, _, eta_tf = tf32_operand_terms(model)
    u_p = 0.0 if model.p == model.exp else unit(model.p)
    u_div = unit(model.pv_acc) + model.div_rel_err
    u_out = 0.0 if model.out == model.pv_acc else unit(model.out)
    exp2 = model.exp_impl == "exp2"

    finite = xp.isfinite(s)
    masked_row = ~finite.any(-1)

    # --- per-key logit errors (section 3) ---------------------------------
    ke = key_errors(q, k, s, scale, model, attn_mask,
                    None if stored else (lambda tol: rescale_counts(s, tol, partition)))
    mag_sS, a, rescales, e_c, e_abs = ke.mag, ke.a, ke.rescales, ke.e_c, ke.e_abs
    n_resc_row = xp.amax(xp.where(finite, rescales, 0), axis=-1) + 1
    if partition is not None:
        n_resc_row = n_resc_row + len(partition)  # each merge also adds its two halves
    with xp.errstate(over="ignore"):
        E = xp.expm1(e_c)  # may be inf for keys far below the max: only P E is used then
    # Absolute errors of exp results that underflow (ftz on GPUs).
    eta_exp = exp_underflow(model)

    # --- (4) weight perturbations: centred, rigorous ----------------------
    PE, w_exact, ell, sPE_eta = weight_perturbation(s, p, e_c, model)
    fallback = (sPE_eta >= 0.5) | ~xp.isfinite(sPE_eta)
    denom1 = xp.where(fallback, 1.0, 1.0 - sPE_eta)
    w = PE + finite * (eta_exp / ell)[..., None]
    err1 = _centred_sum(w, v, o) / denom1[..., None]
    p_up = (p + PE) / denom1[..., None]  # perturbed probabilities, upper bound

    # --- (5) non-centred: P rounding, accumulation, l --------------------
    n_keys = finite.sum(-1)
    n_acc = n_keys + n_resc_row
    g_pv = gamma(n_acc, u_pv)[..., None]
    g_l = gamma(n_acc, u_l)
    absv = xp.abs(v)
    if stored:
        fallback |= g_l >= 0.5
        err2, err3, err4, coarse = _stored_output_terms(model, p, w, denom1, err1, o, absv, finite, n_keys, n_acc,
                                                        fallback)
    else:
        sum_pv = p_up @ absv
        eta_p = 0.0 if u_p == 0.0 else half_subnormal(model.p)
        tiny_p = FORMATS[model.p].tiny
        with xp.errstate(invalid="ignore"):
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
        theta = xp.where(theta >= 0.5, 0.0, theta)
        o_tilde = xp.abs(o) + err1
        err2 = (num_err + o_tilde * theta[..., None]) / (1 - theta[..., None])
        o_c = o_tilde + err2

        # --- (6) division and output rounding -------------------------------
        err3 = u_div * o_c + half_subnormal(model.pv_acc)
        o_d = o_c + err3
        err4 = u_out * o_d + (half_subnormal(model.out) if u_out else 0.0)
        # Coarse rigorous fallback: the output is a weighted mean of V's rows
        # inflated by the accumulation and rounding factors.
        vmax = _visible_vmax(finite, absv) if fallback.any() else 0.0
        coarse = xp.abs(o) + vmax * (1 + u_p) * (1 + gamma(n_acc, u_pv))[..., None] / xp.maximum(
            1 - gamma(n_acc, u_l), 1e-300
        )[..., None] * (1 + u_div) * (1 + u_out) + half_subnormal(model.out)
    bound = err1 + err2 + err3 + err4
    bound = xp.where(fallback[..., None], coarse, bound)
    bound = xp.where(masked_row[..., None], 0.0, bound)

    # Logits that overflow their format break the model: no bound. So do
    # inputs that overflow when rounded to tf32 (its largest value is below fp32's).
    big = xp.amax(xp.where(finite, mag_sS + a, 0.0), axis=-1) > FORMATS[model.logits].max / 4
    if tf:
        tf_max = FORMATS["tf32"].max
        over = (xp.abs(q) > tf_max).any(-1) | (xp.abs(k) > tf_max).any(-1).any(-1)[..., None]
        over |= (xp.abs(v) > tf_max).any(-1).any(-1)[..., None]
        big = big | over
    bound = xp.where(big[..., None], xp.inf, bound)

    # --- (7) log-sum-exp ----------------------------------------------------
    # log sum_j P_j e^{e_j} bounds the weights' effect both ways (Jensen), and
    # stays finite however large the logit errors: LSE is 1-Lipschitz.
    with xp.errstate(divide="ignore"):
        lse_w = _logsumexp(xp.where(finite & (p > 0), xp.log(p) + e_abs, -xp.inf))
    tail = eta_exp * count(n_keys) / ell + g_l
    lse_fallback = tail >= 0.5
    lse_core = xp.where(masked_row, 0.0, lse_w) - xp.log1p(-xp.minimum(tail, 0.5))
    lse = xp.where(masked_row, -xp.inf, ref_lse)
    lse_abs = xp.abs(xp.where(masked_row, 0.0, lse))
    if exp2:
        # lse = (m2 + log2 l) * ln 2, each step in fp32 plus lg2.approx's error.
        lse_final = np.log(2) * LG2_APPROX_ABS_ERR + 3 * unit("fp32") * (lse_abs + lse_core)
    else:
        lse_final = unit("fp32") * xp.abs(xp.log(ell)) + 2 * unit("fp32") * (lse_abs + lse_core)
    lse_bound = xp.where(lse_fallback, xp.inf, lse_core + lse_final)
    lse_bound = xp.where(masked_row | big, xp.where(masked_row, 0.0, xp.inf), lse_bound)

    terms = largest_terms(logit_weights=err1, p_rounding_and_accumulation=err2, division=err3,
                          output_rounding=err4, max_weight_perturbation=E)
    terms["fallback_rows"] = int(fallback.sum())
    return Bound(out=bound, lse=lse_bound, fallback=fallback & ~masked_row, terms=terms)


def _ref_array(ref, name, s):
    """One of the oracle's large float64 arrays, in s's library and on its device."""
    x = getattr(ref, name)
    if is_torch(s) and not (is_torch(x) and x.device == s.device and x.dtype == s.dtype):
        x = on_device(x, s, f"ref.{name}")
    return x


def _stored_output_terms(model, p, w, denom1, err1, o, absv, finite, n_keys, n_acc, fallback):
    """§5s-§6s for a stored softmax: P~_j = fl_p(w~_j fl(1 / l~)) (relative
    u_norm, or half a subnormal of ``p``), then O~ = fl(sum_j P~_j V_j) in
    ``pv_acc`` with rounded products (2 n_keys operations that may each lose
    a subnormal spacing), no final division. Returns (err2, err3, err4,
    coarse) as the online path forms them."""
    xp = namespace(p, absv)
    u_norm = normalise_unit(model)
    u_out = 0.0 if model.out == model.pv_acc else unit(model.out)
    g_pv = gamma(n_acc, unit(model.pv_acc, model.acc_rounding))[..., None]
    theta = gamma(n_acc, unit(model.l_acc, model.acc_rounding))
    th = xp.where(theta >= 0.5, 0.0, theta)[..., None]
    eta_p = half_subnormal(model.p)
    # Perturbed probabilities w~_j / sum w~, underflowed weights included.
    rho_up = (p + w) / denom1[..., None]
    sum_pv = rho_up @ absv
    n_vis = xp.astype(finite, xp.float64) @ absv  # sum over the row's visible keys of |V_j|
    underflow = acc_underflow(2 * n_keys, model.pv_acc, model.acc_rounding)[..., None]
    o_tilde = xp.abs(o) + err1
    # sum_j (w~_j / l~) V_j = O^ (sum w~ / l~): |.. - O^| <= |O^| theta / (1 - theta).
    err2 = ((o_tilde * th + u_norm * sum_pv + g_pv * (1 + u_norm) * sum_pv) / (1 - th)
            + (1 + g_pv) * eta_p * n_vis + underflow)
    err3 = xp.zeros_like(err2)
    o_d = o_tilde + err2
    err4 = u_out * o_d + (half_subnormal(model.out) if u_out else 0.0)
    # Fallback: |O~| <= (1 + gamma) sum_j |P~_j| |V_j| + underflow, sum_j P~_j <= (1 + u_norm) / (1 - theta) + n eta_p.
    vmax = _visible_vmax(finite, absv) if fallback.any() else 0.0
    p_sum = (1 + u_norm) / xp.maximum(1 - gamma(n_acc, unit(model.l_acc, model.acc_rounding)), 1e-300) \
        + count(n_keys) * eta_p
    coarse = xp.abs(o) + (vmax * (1 + g_pv) * p_sum[..., None] + underflow) * (1 + u_out) + half_subnormal(model.out)
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
