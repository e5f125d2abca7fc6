"""Elementwise error bounds for the attention backward pass, derived from a
precision model.

`gradient_bound` bounds |dX_target - dX_exact| (X = Q, K, V) for a kernel
that computes the FlashAttention-2 backward the way its `PrecisionModel`
says (the contract of `flashcheck.kernels.numpy_backward`; the Triton kernel's
backward follows it), or, for a ``softmax="stored"`` model, torch's math
backend's autograd backward (contract M1-M6 of the same module). The
derivation, its assumptions and references are in
docs/error-bounds-backward.md; the step numbers (B1 ..., M1 ...) refer to it.

The bound is not first order only: every product of two perturbed
quantities is bounded with both perturbations (|a~ b~ - a b| <=
|da||b| + |a~||db|), the exp perturbation as P (e^eta - 1) and each
accumulation by Higham's gamma_n, so it holds whatever the size of the
errors (it becomes infinite when the model does not apply: overflow, or
n u >= 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from flashcheck.kernels.precision import FORMATS, PrecisionModel
from flashcheck.verify._xp import is_torch, namespace, to_numpy
from flashcheck.verify.bound_terms import (
    EVAL_MARGIN,
    SCALE_CONST_U,
    acc_underflow,
    additive_mask_abs,
    count,
    dot_error,
    exp_underflow,
    exp_unit,
    gamma,
    half_subnormal,
    key_errors,
    largest_terms,
    largest_value,
    mask_logit_error,
    mask_unit,
    on_device,
    p_times_expm1,
    scale_constant_error,
    scale_constant_unit,
    scaled_dot_error,
    stored_p_error,
    tf32_operand_terms,
    unit,
    weight_perturbation,
)
from flashcheck.verify.bounds import device_attention_bound

__all__ = ["GradBound", "gradient_bound"]

_U64 = 2.0**-53


@dataclass
class GradBound:
    """Bounds on |d*_target - d*_exact|, elementwise, shaped like the
    gradients: dq (B, H, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv).
    ``terms`` holds the largest value of each contribution (for reports)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    terms: dict = field(default_factory=dict)


def _group_sum(x, hkv):
    """(B, H, N, C) summed over each GQA group -> (B, Hkv, N, C)."""
    B, H, N, C = x.shape
    return x.reshape(B, hkv, H // hkv, N, C).sum(axis=2)


def _rounds_per_head(group: int, model: PrecisionModel, u_in: float) -> bool:
    """Whether B4a applies: a GQA group, ``gqa_sum="rounded"``, and an input
    format coarser than the accumulator."""
    return group > 1 and model.gqa_sum == "rounded" and bool(u_in)


def _per_head_rounding(mag, err, group: int, model: PrecisionModel, u_in: float, eta_in: float):
    """B4a: the extra error of reducing a GQA group after rounding each query
    head's result to the input dtype (``model.gqa_sum == "rounded"``); 0 for
    MHA, for ``"acc"``, and when the input format is the accumulator's.
    ``mag`` bounds the sum over the group of the heads' computed magnitudes,
    ``err`` the error so far. Each head's rounding costs u_in of its value
    plus half a subnormal; the fp32 sum of the ``group`` rounded values adds
    gamma_{group-1}(u32) of their magnitudes and, in fp32's subnormal range,
    the absolute losses of `acc_underflow`."""
    if not _rounds_per_head(group, model, u_in):
        return 0.0
    rounded = u_in * mag + group * eta_in
    return rounded + gamma(group - 1, unit("fp32")) * (mag + rounded) \
        + acc_underflow(2 * group, "fp32", model.acc_rounding)


def _check_ref(ref):
    for name in ("q", "k", "v", "s", "p", "out", "lse", "scale", "err_bound", "lse_err_bound", "dk"):
        if getattr(ref, name, None) is None:
            raise ValueError(
                f"gradient_bound needs the oracle's {name!r}: call verify.oracle.attention with keep=True and dout="
            )


_REF_ARRAYS = ("q", "k", "v", "s", "p", "out", "lse", "err_bound", "lse_err_bound", "dq", "dk", "dv")


def _ref_on_device(ref):
    """The oracle's arrays the bound reads, in ``ref.s``'s library and on its
    device (NumPy refs: the arrays themselves)."""
    return SimpleNamespace(scale=ref.scale, **{n: on_device(getattr(ref, n), ref.s, f"ref.{n}") for n in _REF_ARRAYS})


def _as_float64(x, name, shape, like=None):
    if x is None:
        return None
    if is_torch(like):
        if not (is_torch(x) or isinstance(x, np.ndarray)):
            raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")
        x = on_device(x, like, name)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.isnan().any():
            raise ValueError(f"{name} contains NaN")
        return x
    if hasattr(x, "detach"):
        from flashcheck.kernels.precision import to_float64

        x = to_float64(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")
    x = np.asarray(x, dtype=np.float64)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def gradient_bound(ref, model: PrecisionModel, *, dout, out_target=None, lse_target=None,
                   attn_mask=None) -> GradBound:
    """Bound on |dX_target - dX_exact| for a backward following ``model``.

    ``ref`` is the oracle's result for the case with ``keep=True`` and
    ``dout=dout`` (q, k, v, logits s, P, O, LSE and dk's shape). ``dout`` is
    the output gradient the target received. ``out_target`` and
    ``lse_target`` (natural log) are what the target's forward saved: when
    given, their errors are measured a posteriori (|saved - oracle| + the
    oracle's certified error); otherwise the forward bound of
    `flashcheck.verify.bounds.attention_bound` is used. ``attn_mask`` is the case's
    mask (only an additive one matters). A ``softmax="stored"`` model (the
    math backend) keeps P from its forward and reads neither the output nor
    an LSE: ``out_target`` and ``lse_target`` are ignored then.

    >>> import numpy as np
    >>> from flashcheck.verify.oracle import attention
    >>> from flashcheck.kernels.models import get_model
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 1, 4, 8)).astype(np.float16) for _ in range(4))
    >>> ref = attention(q, k, v, keep=True, dout=do)
    >>> b = gradient_bound(ref, get_model("fa2", "fp16"), dout=do)
    >>> b.dq.shape, bool(np.isfinite(b.dv).all())
    ((1, 1, 4, 8), True)
    """
    if not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel, got {type(model).__name__}")
    _check_ref(ref)
    xp = namespace(ref.s)
    ref = _ref_on_device(ref)
    q, k, v, s, P, O = ref.q, ref.k, ref.v, ref.s, ref.p, ref.out
    B, H, Nq, _ = q.shape
    Dv = v.shape[-1]
    Hkv = ref.dk.shape[1]
    scale = abs(float(ref.scale))
    dO = _as_float64(dout, "dout", (B, H, Nq, Dv), like=s)
    if dO is None:
        raise ValueError("dout is required: the output gradient the target received")
    if not xp.isfinite(dO).all():
        raise ValueError("dout contains inf")
    if model.softmax == "stored":
        return _stored_gradient_bound(ref, model, dO, Hkv, attn_mask)
    out_t = _as_float64(out_target, "out_target", tuple(O.shape), like=s)
    lse_t = _as_float64(lse_target, "lse_target", tuple(ref.lse.shape), like=s)

    finite = xp.isfinite(s)
    masked_row = ~finite.any(-1)
    s0 = xp.where(finite, s, 0.0)
    lse = xp.where(masked_row, 0.0, ref.lse)
    exp2 = model.exp_impl == "exp2"

    # --- units -------------------------------------------------------------
    u32 = unit("fp32")
    u_dot = unit(model.qk_acc, model.acc_rounding)
    u_acc = unit(model.pv_acc, model.acc_rounding)
    u_log = unit(model.logits)
    u_exp = exp_unit(model)
    tf, u_tf, eta_tf = tf32_operand_terms(model)
    u_pr = 0.0 if model.p == model.exp else unit(model.p)  # P rounded for dV
    u_ds = 0.0 if model.p == "fp32" else unit(model.p)  # dS rounded after its fp32 product
    eta_p = half_subnormal(model.p)
    eta32 = half_subnormal("fp32")
    u_in = 0.0 if model.input == model.pv_acc else unit(model.input)
    eta_in = half_subnormal(model.input)

    # --- B1: errors of what the forward saved -------------------------------
    fwd = None
    if out_t is None or lse_t is None:
        fwd = device_attention_bound(ref, model, attn_mask=attn_mask)
    if out_t is None:
        e_o = fwd.out
        o_up = xp.abs(O) + e_o
    else:
        e_o = xp.abs(out_t - O) + ref.err_bound
        o_up = xp.abs(out_t)
    if lse_t is None:
        e_lse = xp.where(masked_row, 0.0, fwd.lse)
        lse_up = xp.abs(lse) + e_lse
    else:
        both_dead = masked_row & xp.isneginf(lse_t)
        with xp.errstate(invalid="ignore"):
            e_lse = xp.where(both_dead, 0.0, xp.abs(lse_t - lse) + ref.lse_err_bound)
        e_lse = xp.where(xp.isnan(e_lse), xp.inf, e_lse)
        lse_up = xp.where(both_dead, 0.0, xp.abs(lse_t))

    # --- B2: logit errors, the forward's terms (§3 of error-bounds.md) -----
    _, e_dot, mag = scaled_dot_error(q, k, scale, model)
    # fl(S~ c~) with c~ = c (1 + delta_c): the constant's rounding is charged
    # uncentred (the saved LSE does not move with it), on the perturbed
    # product |S~| c (1 + u_log), to stay rigorous to all orders.
    e_logit = e_dot + u_log * mag + scale_constant_error(1 + u_log, mag)
    a = additive_mask_abs(attn_mask, s.shape, like=s)
    e_logit = e_logit + mask_logit_error(a, xp.abs(s0) + e_logit + mask_unit(model) * a, model)
    # --- B3: P recomputed from the saved LSE --------------------------------
    # exp2 kernels convert the natural LSE: fl32(LSE fl32(log2 e)).
    e_conv = (2 * u32 + u32**2) * lse_up if exp2 else 0.0
    e_arg = e_logit + (e_lse + e_conv)[..., None]
    e_sub = u_log * (xp.abs(s0 - lse[..., None]) + e_arg)
    eta = xp.where(finite, e_arg + e_sub - np.log1p(-u_exp), 0.0)
    eta_exp = exp_underflow(model)
    dP_rel = p_times_expm1(P, eta)  # |p~ - P| <= P (e^eta - 1) + underflow
    e_p = xp.where(finite, dP_rel + eta_exp, 0.0)
    p_up = P + e_p
    # P rounded to model.p (and to tf32) for the dV product.
    e_ph = e_p + ((1 + u_pr) * (1 + u_tf) - 1) * p_up + xp.where(finite, (eta_p if u_pr else 0.0) + eta_tf, 0.0)
    ph_up = P + e_ph

    absdo = xp.abs(dO)
    e_do = u_tf * absdo + eta_tf  # dO rounded to tf32 for the dot products
    do_up = absdo + e_do

    # --- B4: dV = P^T dO, summed over the group and the queries -------------
    n_v = _group_sum(count(xp.swapaxes(finite, -1, -2).sum(-1, keepdims=True)), Hkv)  # (B,Hkv,Nk,1)
    pt = xp.swapaxes(e_ph, -1, -2)
    e_dv = _group_sum(pt @ absdo + xp.swapaxes(ph_up, -1, -2) @ e_do, Hkv)
    e_dv = e_dv + gamma(n_v, u_acc) * _group_sum(xp.swapaxes(ph_up, -1, -2) @ do_up, Hkv)
    # Products that fall in fp32's subnormal range are rounded absolutely (fp32
    # models: nothing rounds dV afterwards to hide it; found with one-hot fp32 cases).
    e_dv = e_dv + (1 + gamma(n_v, u_acc)) * acc_underflow(2 * n_v, model.pv_acc, model.acc_rounding)
    mag_v = (1 + gamma(n_v, u_acc)) * _group_sum(xp.swapaxes(ph_up, -1, -2) @ do_up, Hkv) + e_dv
    e_dv = e_dv + _per_head_rounding(mag_v, e_dv, H // Hkv, model, u_in, eta_in)
    dv_up = xp.abs(ref.dv) + e_dv
    e_dv = e_dv + u_in * dv_up + (eta_in if u_in else 0.0)

    # --- B5: dP = dO V^T, D = rowsum(dO O), X = dP - D ----------------------
    absv = xp.abs(v)
    e_dp = dot_error(absdo, xp.swapaxes(absv, -1, -2), Dv, u_dot, tf) \
        + (1 + gamma(Dv, u_dot)) * acc_underflow(2 * Dv, model.qk_acc, model.acc_rounding)
    e_d = (absdo * e_o).sum(-1) + gamma(Dv, u32) * (absdo * o_up).sum(-1) + Dv * eta32 * (1 + gamma(Dv, u32))
    dp = dO @ xp.swapaxes(v, -1, -2)
    Dvec = (dO * O).sum(-1)
    X = dp - Dvec[..., None]
    # X in float64 from the oracle's O: its own evaluation error, made explicit.
    mag_x64 = absdo @ xp.swapaxes(absv, -1, -2) + (absdo * xp.abs(O)).sum(-1)[..., None]
    absX = xp.abs(X) + gamma(Dv + 2, _U64) * mag_x64
    e_x0 = e_dp + e_d[..., None]
    e_x = e_x0 + u32 * (absX + e_x0)

    # --- B6: dS = fl_p(fl32(p~ X~)) -----------------------------------------
    dS_abs = P * absX
    e_prod = e_p * absX + p_up * e_x
    r = (1 + u32) * (1 + u_ds) * (1 + u_tf) - 1
    e_ds = e_prod + r * (dS_abs + e_prod) + (1 + u_ds) * eta32 + (eta_p if u_ds else 0.0) + eta_tf
    e_ds = xp.where(finite, e_ds, 0.0)
    ds_up = dS_abs + e_ds

    # --- B7: dK = scale dS^T Q, dQ = scale dS K -----------------------------
    absq, absk = xp.abs(q), xp.abs(k)
    e_q, e_k = u_tf * absq + eta_tf, u_tf * absk + eta_tf
    post = (1 + u32) ** 2  # fl32(scale), then the product, in fp32
    dst = xp.swapaxes(ds_up, -1, -2)
    n_k = n_v
    acc_k = _group_sum(xp.swapaxes(e_ds, -1, -2) @ absq + dst @ e_q, Hkv)
    acc_k = acc_k + gamma(n_k, u_acc) * _group_sum(dst @ (absq + e_q), Hkv) \
        + (1 + gamma(n_k, u_acc)) * acc_underflow(2 * n_k, model.pv_acc, model.acc_rounding)
    e_dk = scale * post * acc_k + (post - 1) * xp.abs(ref.dk) + eta32
    mag_k = scale * post * (1 + gamma(n_k, u_acc)) * _group_sum(dst @ (absq + e_q), Hkv) + eta32 + e_dk
    e_dk = e_dk + _per_head_rounding(mag_k, e_dk, H // Hkv, model, u_in, eta_in)
    n_q = count(finite.sum(-1, keepdims=True))
    acc_q = e_ds @ absk + ds_up @ e_k + gamma(n_q, u_acc) * (ds_up @ (absk + e_k)) \
        + (1 + gamma(n_q, u_acc)) * acc_underflow(2 * n_q, model.pv_acc, model.acc_rounding)
    e_dq = scale * post * acc_q + (post - 1) * xp.abs(ref.dq) + eta32
    e_dk = e_dk + u_in * (xp.abs(ref.dk) + e_dk) + (eta_in if u_in else 0.0)
    e_dq = e_dq + u_in * (xp.abs(ref.dq) + e_dq) + (eta_in if u_in else 0.0)

    # --- where the model does not apply: overflow --------------------------
    # A partial sum of n terms is at most (1 + gamma_n) times the sum of
    # their magnitudes; an fp32 intermediate above half fp32's range may
    # overflow (inf, then NaN), and the bound is infinite there.
    half32 = FORMATS["fp32"].max / 2
    big = bool(largest_value(xp.where(finite, mag, 0.0)) > FORMATS[model.logits].max / 4) or not xp.all(
        xp.isfinite(xp.where(finite, eta, 0.0)))
    if tf:
        tf_max = FORMATS["tf32"].max
        big = big or any(bool((xp.abs(x) > tf_max).any()) for x in (q, k, v, dO))
    mag_dp = (1 + tf) * (1 + gamma(Dv, u_dot)) * (absdo @ xp.swapaxes(absv, -1, -2)) + e_dp
    mag_d = (1 + gamma(Dv, u32)) * (absdo * o_up).sum(-1)
    pair_over = (mag_dp > half32) | (mag_d[..., None] > half32) | (absX + e_x > half32)
    pair_over |= (p_up * (absX + e_x) > half32) | (ds_up > FORMATS[model.p].max / 2)
    over_q = pair_over.any(-1, keepdims=True)
    over_q = over_q | ((1 + gamma(n_q, u_acc)) * (ds_up @ (absk + e_k)) > half32)
    over_k = _group_sum(count(xp.swapaxes(pair_over, -1, -2).any(-1, keepdims=True)), Hkv) > 0
    over_k = over_k | ((1 + gamma(n_k, u_acc)) * _group_sum(dst @ (absq + e_q), Hkv) > half32)
    over_v = (1 + gamma(n_v, u_acc)) * _group_sum(xp.swapaxes(ph_up, -1, -2) @ do_up, Hkv) > half32
    out_max = FORMATS[model.input].max
    if _rounds_per_head(H // Hkv, model, u_in):
        # B4a: one head's result, rounded to the input dtype, may overflow even where the group's sum would not.
        over_k, over_v = over_k | (mag_k > out_max), over_v | (mag_v > out_max)
    bounds = []
    for e, exact, over in ((e_dq, ref.dq, over_q), (e_dk, ref.dk, over_k), (e_dv, ref.dv, over_v)):
        e = e * EVAL_MARGIN
        with xp.errstate(invalid="ignore"):
            bad = big | over | ~(xp.abs(exact) + e <= out_max)
        bounds.append(xp.where(bad, xp.inf, e))
    terms = largest_terms(p_recompute=e_p, delta=e_d, dp=e_dp, ds=e_ds, saved_out=e_o, saved_lse=e_lse)
    return GradBound(dq=to_numpy(bounds[0]), dk=to_numpy(bounds[1]), dv=to_numpy(bounds[2]), terms=terms)


def _stored_gradient_bound(ref, model, dO, Hkv, attn_mask) -> GradBound:
    """Steps M1-M6 of docs/error-bounds-backward.md: the math backend's
    autograd backward with the stored P, Delta = rowsum(dP P) and the scale
    folded into q and k as c~ = fl32(sqrt(scale)) each."""
    xp = namespace(ref.s)
    q, k, v, s, P, O = ref.q, ref.k, ref.v, ref.s, ref.p, ref.out
    H = q.shape[1]
    G = H // Hkv
    Dv = v.shape[-1]
    scale = abs(float(ref.scale))
    finite = xp.isfinite(s)
    masked_row = ~finite.any(-1)
    u32, eta32 = unit("fp32"), half_subnormal("fp32")
    u_dot = unit(model.qk_acc, model.acc_rounding)
    u_acc = unit(model.pv_acc, model.acc_rounding)
    u_in = 0.0 if model.input == model.pv_acc else unit(model.input)
    eta_in = half_subnormal(model.input) if u_in else 0.0
    c_up = np.sqrt(scale) * (1 + SCALE_CONST_U)  # bounds c~ = fl32(sqrt(scale))
    cc_up = c_up**2
    u_cc = scale_constant_unit(model)  # |c~^2 / scale - 1|
    n_keys = finite.sum(-1)

    # --- M1: the stored P, the forward's §3-§5s terms ---------------------
    ke = key_errors(q, k, s, scale, model, attn_mask)
    pe, _, ell, s_pe = weight_perturbation(s, P, ke.e_c, model)
    theta = gamma(n_keys + 1, unit(model.l_acc, model.acc_rounding))  # the forward's n_acc for the sum l
    e_p, e_sum = stored_p_error(P, pe, s_pe, theta, n_keys, ell, finite, model)
    e_sum = xp.where(masked_row, 0.0, e_sum)
    p_up = P + e_p

    # --- M2, M6: dV_h = P^T dO per head, summed over the group in fp32 -----
    absdo, absv = xp.abs(dO), xp.abs(v)
    n_v = _group_sum(count(xp.swapaxes(finite, -1, -2).sum(-1, keepdims=True)), Hkv)
    g_v = gamma(n_v + G, u_acc)  # n_h products and sums in a head, G - 1 sums across heads
    e_dv = _group_sum(xp.swapaxes(e_p, -1, -2) @ absdo, Hkv) \
        + g_v * _group_sum(xp.swapaxes(p_up, -1, -2) @ absdo, Hkv) \
        + (1 + g_v) * acc_underflow(2 * n_v + G, "fp32", model.acc_rounding)
    dv_sum = (1 + g_v) * _group_sum(xp.swapaxes(p_up, -1, -2) @ absdo, Hkv)
    e_dv = e_dv + u_in * (xp.abs(ref.dv) + e_dv) + eta_in

    # --- M2: dP = dO V^T; exact D and X = dP - D in float64 ----------------
    mag_dp = absdo @ xp.swapaxes(absv, -1, -2)
    e_dp = dot_error(absdo, xp.swapaxes(absv, -1, -2), Dv, u_dot, 0.0) \
        + (1 + gamma(Dv, u_dot)) * acc_underflow(2 * Dv, "fp32", model.acc_rounding)
    dp = dO @ xp.swapaxes(v, -1, -2)
    e_o = (absdo * ref.err_bound).sum(-1)  # the oracle's O is certified, not exact
    Dvec = (dO * O).sum(-1)
    d_up = xp.abs(Dvec) + e_o + gamma(Dv + 1, _U64) * (absdo * xp.abs(O)).sum(-1)
    mag_x64 = mag_dp + (absdo * xp.abs(O)).sum(-1)[..., None]
    absX = xp.abs(dp - Dvec[..., None]) + gamma(Dv + 2, _U64) * mag_x64 + e_o[..., None]
    dp_up = xp.abs(dp) + gamma(Dv, _U64) * mag_dp + e_dp

    # --- M3: Delta~ = fl(sum_j fl(dP~ P~)), centred on X --------------------
    # sum_j dP~ P~ - D = sum_j (dP~ - dP) P~ + sum_j X_j (P~_j - P_j) + D (sum_j P~_j - 1).
    e_delta = (e_dp * p_up).sum(-1) + (absX * e_p).sum(-1) + d_up * e_sum \
        + gamma(n_keys, u32) * (dp_up * p_up).sum(-1) + acc_underflow(2 * n_keys, "fp32")
    delta_up = d_up + e_delta

    # --- M4: dS~ = P~ (dP~ - Delta~), in either evaluation order ------------
    e_prod = e_p * absX + p_up * (e_dp + e_delta[..., None])
    ds_exact = P * absX
    # fl(fl(P dP) - P Delta) costs u P (|dP| + |Delta|) + u |dS|; it covers fl(P fl(dP - Delta)).
    e_round = u32 * (1 + u32) * p_up * (dp_up + delta_up[..., None]) + u32 * (ds_exact + e_prod) + 4 * eta32
    e_ds = xp.where(finite, e_prod + e_round, 0.0)
    ds_up = ds_exact + e_ds

    # --- M5, M6: dq = fl32(fl(dS k_c) c~), dk = group sum of fl32(fl(dS_h^T q_c) c~) ---
    absq, absk = xp.abs(q), xp.abs(k)

    def scaled_gemm(e_mat, up_mat, operand, n):
        """Error of fl32(fl(A B_c) c~) against c~^2 (A B) with |A~ - A| <= e_mat,
        B_c = fl32(B c~), and the magnitude sum |A|~ |B| it is charged on."""
        g = gamma(n, u_acc)
        z = up_mat @ operand
        inner = c_up * (e_mat @ operand + ((1 + u32) * (1 + g) - 1) * z) \
            + (1 + g) * eta32 * up_mat.sum(-1, keepdims=True) + acc_underflow(2 * n, "fp32", model.acc_rounding)
        return c_up * (1 + u32) * inner + u32 * cc_up * z + eta32, z

    n_q = count(finite.sum(-1, keepdims=True))
    e_dq, z_q = scaled_gemm(e_ds, ds_up, absk, n_q)
    e_dq = e_dq + u_cc * xp.abs(ref.dq)
    n_kh = count(xp.swapaxes(finite, -1, -2).sum(-1, keepdims=True))
    e_kh, z_k = scaled_gemm(xp.swapaxes(e_ds, -1, -2), xp.swapaxes(ds_up, -1, -2), absq, n_kh)
    g_g = gamma(G - 1, u32)
    e_dk = _group_sum(e_kh, Hkv) * (1 + g_g) + g_g * cc_up * _group_sum(z_k, Hkv) + G * eta32 \
        + u_cc * xp.abs(ref.dk)
    e_dq = e_dq + u_in * (xp.abs(ref.dq) + e_dq) + eta_in
    e_dk = e_dk + u_in * (xp.abs(ref.dk) + e_dk) + eta_in

    # --- where the model does not apply: overflow ---------------------------
    half32 = FORMATS["fp32"].max / 2
    big = bool(largest_value(xp.where(finite, ke.mag + ke.a, 0.0)) > FORMATS[model.logits].max / 4) \
        or not xp.all(xp.isfinite(e_p))
    # A partial sum of n terms is at most (1 + gamma_n) times the sum of their magnitudes.
    dp_partial = (1 + gamma(Dv, u_dot)) * mag_dp + e_dp
    delta_partial = (1 + gamma(n_keys, u32)) * (dp_partial * p_up).sum(-1)
    pair_over = (dp_partial > half32) | (delta_partial[..., None] > half32) | (delta_up[..., None] > half32)
    pair_over |= (p_up * (dp_up + delta_up[..., None]) > half32) | (ds_up > half32)
    over_q = pair_over.any(-1, keepdims=True) | (cc_up * (1 + u32) * (1 + gamma(n_q, u_acc)) * z_q > half32)
    over_k = _group_sum(count(xp.swapaxes(pair_over, -1, -2).any(-1, keepdims=True)), Hkv) > 0
    over_k = over_k | (cc_up * (1 + u32) * (1 + gamma(n_v, u_acc)) * (1 + g_g) * _group_sum(z_k, Hkv) > half32)
    over_v = dv_sum > half32
    out_max = FORMATS[model.input].max
    bounds = []
    for e, exact, over in ((e_dq, ref.dq, over_q), (e_dk, ref.dk, over_k), (e_dv, ref.dv, over_v)):
        e = e * EVAL_MARGIN
        with xp.errstate(invalid="ignore"):
            bad = big | over | ~(xp.abs(exact) + e <= out_max)
        bounds.append(xp.where(bad, xp.inf, e))
    terms = largest_terms(p_stored=e_p, delta=e_delta, dp=e_dp, ds=e_ds)
    return GradBound(dq=to_numpy(bounds[0]), dk=to_numpy(bounds[1]), dv=to_numpy(bounds[2]), terms=terms)
