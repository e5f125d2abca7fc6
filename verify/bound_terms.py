"""The error terms the forward and the gradient bound share.

`flashcheck.verify.bounds.attention_bound` (forward, docs/error-bounds.md)
and `flashcheck.verify.grad_bounds.gradient_bound` (backward,
docs/error-bounds-backward.md) bound the same kernel steps in places: the
units of the model's formats, the recomputed logits (the dot product, the
scale constant, the additive mask), exp and its underflow, tf32 operands.
Each such step is derived once, here, and both bounds call it, so that a
change to the kernel's contract (e.g. how the scale constant is rounded) is
made in one place. Section numbers refer to docs/error-bounds.md. The
per-key weight errors (`key_errors`, §3) and the stored softmax's
normalisation (`normalise_unit`, `stored_p_error`, §4s-§5s) are shared the
same way: the forward bound and the math backend's gradient bound
(docs/error-bounds-backward.md, M1) read the same arrays.

The hardware figures these terms use (tf32 conversion, ex2.approx) come
from the one catalogue, `flashcheck.kernels.models`.

Every function takes NumPy arrays or torch float64 tensors (one device)
and computes with the same library (`flashcheck.verify._xp`): one formula
for both. On NumPy inputs the results are bit for bit those of the plain
NumPy code; on torch they agree to float64 rounding (reductions may sum in
another order), which the bounds' evaluation margins absorb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.models import TF32_CONVERSION_REL_ERR
from flashcheck.kernels.precision import FORMATS, PrecisionModel, to_float64
from flashcheck.verify._xp import is_torch, namespace

__all__ = [
    "EVAL_MARGIN",
    "SCALE_CONST_U",
    "KeyErrors",
    "acc_underflow",
    "additive_mask_abs",
    "count",
    "dot_error",
    "exp_underflow",
    "exp_unit",
    "gamma",
    "half_subnormal",
    "key_errors",
    "largest_terms",
    "largest_value",
    "logit_product_error",
    "mask_logit_error",
    "mask_unit",
    "normalise_unit",
    "on_device",
    "p_times_expm1",
    "scale_constant_error",
    "scale_constant_unit",
    "scaled_dot_error",
    "stored_p_error",
    "tf32_operand_terms",
    "unit",
    "weight_perturbation",
]

#: The gradient bound's float-evaluation margin: the bound is evaluated in
#: float64 from the oracle's float64 values (P, O, the logits: relative
#: errors below 1e-13); multiplying the result by this absorbs that and the
#: rounding of the bound's own few dozen operations. (Not the oracle's
#: certification factor `flashcheck.verify._mp.CERT_SAFETY`.)
EVAL_MARGIN = 1.0 + 2.0**-30

# dot_error's own float-evaluation margin: one float64 matrix product of
# magnitudes and a few scalar factors, far below 2**-40 relative.
_DOT_EVAL_MARGIN = 1.0 + 2.0**-40

#: Relative error of the kernel's logit constant c, rounded to fp32 once on
#: the host: c = fl32(scale) (natural-exp kernels) or c = fl32(scale * log2 e)
#: (exp2 kernels; scale * log2 e is formed in float64 first, two float64
#: roundings of 2**-53 each, hence the 2**-28 margin on u_fp32 = 2**-24).
SCALE_CONST_U = FORMATS["fp32"].u * (1 + 2.0**-28)


def on_device(x, like, name="value"):
    """``x`` (a NumPy array of any float dtype, ml_dtypes bf16 included, or
    a torch tensor) as exact float64 values in ``like``'s library and on its
    device; None stays None. With a NumPy ``like`` a NumPy ``x`` is returned
    as it is (the NumPy bounds use the oracle's arrays unchanged)."""
    if x is None:
        return None
    if not is_torch(like):
        return to_float64(x) if is_torch(x) else x
    if is_torch(x):
        if x.dtype == like.dtype and x.device == like.device:
            return x
        return x.detach().to(device=like.device, dtype=like.dtype)  # every float format embeds in float64
    if not isinstance(x, (np.ndarray, np.generic, float, int)):
        raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")
    return namespace(like).asarray(to_float64(x), like=like)


def count(x):
    """An integer count array (e.g. ``finite.sum(-1)``) as float64: torch
    would turn ``int_tensor * python_float`` into float32. Exact for counts
    below 2**53, so NumPy results do not change."""
    return namespace(x).astype(x, np.float64) if is_torch(x) else np.asarray(x).astype(np.float64)


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u), elementwise; inf where n u >= 1.
    A scalar ``n`` gives a NumPy float64 scalar (which torch tensors accept)."""
    xp = namespace(n)
    nu = (count(n) if is_torch(n) else np.asarray(n, dtype=np.float64)) * u
    with xp.errstate(divide="ignore"):
        g = xp.where(nu < 1.0, nu / xp.maximum(1.0 - nu, 0.0), xp.inf)
    return g if is_torch(g) or g.ndim else g[()]


def unit(fmt: str, rounding: str = "nearest") -> float:
    """Unit roundoff of ``fmt`` (§2); truncation (``rounding="zero"``, tensor
    cores) has twice the error of rounding to nearest."""
    return FORMATS[fmt].u * (2.0 if rounding == "zero" else 1.0)


def half_subnormal(fmt: str) -> float:
    """Largest absolute error of rounding to nearest into ``fmt``'s subnormal
    range: half its smallest subnormal."""
    return FORMATS[fmt].smallest_subnormal / 2.0


def exp_unit(model: PrecisionModel) -> float:
    """Relative error of one exp (or exp2) result (§2): the rounding to
    ``model.exp`` plus the primitive's own error (``exp_rel_err``)."""
    return unit(model.exp) + model.exp_rel_err


def exp_underflow(model: PrecisionModel) -> float:
    """Absolute error of an exp result that underflows: GPU exp2
    (ex2.approx.ftz) flushes results below fp32's smallest normal to 0, and
    any approximate exp (``exp_rel_err > 0``) may be off by a few subnormal
    spacings there, where its relative figure means nothing: both are
    charged fp32's smallest normal. A correctly rounded exp loses at most
    half a subnormal of ``model.exp``."""
    if model.exp_impl == "exp2" or model.exp_rel_err > 0:
        return FORMATS["fp32"].tiny
    return half_subnormal(model.exp)


def acc_underflow(n_ops, fmt: str, rounding: str = "nearest"):
    """Absolute error that ``n_ops`` rounded operations into ``fmt`` may add
    in its subnormal range, where rounding is absolute: half a subnormal
    spacing each when rounding to nearest, a whole one when truncating."""
    n_ops = count(n_ops) if is_torch(n_ops) else n_ops
    return n_ops * FORMATS[fmt].smallest_subnormal * (1.0 if rounding == "zero" else 0.5)


def p_times_expm1(p: np.ndarray, e: np.ndarray) -> np.ndarray:
    """p * (e^e - 1) for p in [0, 1], e >= 0, with no overflow for tiny p:
    the change of a weight P whose logit moved by at most e."""
    xp = namespace(p, e)
    with xp.errstate(divide="ignore", over="ignore"):
        big = xp.exp(xp.where(p > 0, xp.log(xp.where(p > 0, p, 1.0)) + e, -xp.inf))
        return xp.where(e < 30, p * xp.expm1(xp.minimum(e, 30)), big)


def tf32_operand_terms(model: PrecisionModel) -> tuple[float, float, float]:
    """``(tau, u_tf, eta_tf)`` for dot-product operands rounded to tf32, all 0
    unless the model has fp32 inputs and ``tf32``: u_tf the relative error
    of one operand (`TF32_CONVERSION_REL_ERR`, bounded as truncation), tau =
    (1 + u_tf)^2 - 1 that of a product of two rounded operands, eta_tf the
    absolute error of rounding a subnormal (one tf32 subnormal spacing)."""
    if not (model.tf32 and model.input == "fp32"):
        return 0.0, 0.0, 0.0
    u_tf = TF32_CONVERSION_REL_ERR
    return 2 * u_tf + u_tf**2, u_tf, FORMATS["tf32"].smallest_subnormal


def dot_error(abs_a, abs_b, n, u, tf, eta=None):
    """Bound on |fl(A B) - A B| for exact A (..., m, n), B (..., n, p) given by
    their absolute values: n terms accumulated with unit ``u`` in any order
    (Higham §3.1: gamma_n covers the additions and rounded products alike),
    operands first rounded with relative error ``tf`` for a product of two
    (the ``tau`` of `tf32_operand_terms`: tf32 rounding, 2^-10 each) or an
    absolute ``eta`` each (rounding a subnormal; default one tf32 subnormal
    spacing)."""
    g = gamma(n, u)
    err = ((1 + tf) * (1 + g) - 1) * (abs_a @ abs_b) * _DOT_EVAL_MARGIN
    if tf:
        eta = FORMATS["tf32"].smallest_subnormal if eta is None else eta
        err = err + (1 + g) * (eta * (1 + tf) * (abs_a.sum(-1)[..., :, None] + abs_b.sum(-2)[..., None, :])
                               + n * eta**2)
    return err


def scaled_dot_error(q, k, scale, model: PrecisionModel):
    """The logits' dot product S = Q K^T (§3, first bullet), times |scale|.

    ``q`` (..., Nq, D) and ``k`` (..., Nk, D) are the exact inputs (kv heads
    expanded). Returns ``(qk, e_dot, mag)``: the exact Q K^T, the bound
    |scale| |S~ - S| (accumulation in ``model.qk_acc``, tf32 operands when the
    model says so) and mag = |scale S| + e_dot, a bound on |scale S~|.

    ``scaling="sqrt-qk"`` (§3s): the operands are q c~ and k c~, each rounded
    to fp32 (relative u32, or half an fp32 subnormal), c~ = fl32(sqrt(scale))
    = sqrt(scale)(1 + delta_c); e_dot then bounds |S~ - c~^2 S|, the part
    that differs from key to key, evaluated with |q c~| <= sqrt(scale)(1 +
    u_c)|q|; the common factor c~^2 / scale - 1 is `scale_constant_unit`'s,
    charged by `scale_constant_error`, and mag includes it.
    """
    scale = abs(float(scale))
    xp = namespace(q, k)
    qk = q @ xp.swapaxes(k, -1, -2)
    u_dot = unit(model.qk_acc, model.acc_rounding)
    if model.scaling == "sqrt-qk":
        c_up = np.sqrt(scale) * (1 + SCALE_CONST_U)
        u32 = unit("fp32")
        e_dot = dot_error(c_up * xp.abs(q), xp.swapaxes(c_up * xp.abs(k), -1, -2), q.shape[-1], u_dot,
                          2 * u32 + u32**2, eta=half_subnormal("fp32"))
        return qk, e_dot, xp.abs(scale * qk) * (1 + scale_constant_unit(model)) + e_dot
    tau = tf32_operand_terms(model)[0]
    e_dot = scale * dot_error(xp.abs(q), xp.swapaxes(xp.abs(k), -1, -2), q.shape[-1], u_dot, tau)
    return qk, e_dot, xp.abs(scale * qk) + e_dot


def scale_constant_unit(model: PrecisionModel) -> float:
    """Relative error of the factor every logit of a row shares through the
    rounded scale constant: `SCALE_CONST_U` for a constant c~ multiplying
    the logits; for ``scaling="sqrt-qk"`` the logits carry c~^2, so
    (1 + SCALE_CONST_U)^2 - 1 (fl32 of a float64 sqrt is within
    SCALE_CONST_U of sqrt(scale) too)."""
    if model.scaling == "sqrt-qk":
        return 2 * SCALE_CONST_U + SCALE_CONST_U**2
    return SCALE_CONST_U


def logit_product_error(model: PrecisionModel, mag):
    """Rounding of the logit as the kernel forms it (§3, second bullet):
    u_logits * mag for fl_logits(S~ c) (``scaling="logits"``); none for
    ``"sqrt-qk"``, whose dot product already is the logit, unless it is
    held in another format than its accumulator."""
    if model.scaling == "sqrt-qk" and model.logits == model.qk_acc:
        return namespace(mag).zeros_like(mag)
    return unit(model.logits) * mag


def scale_constant_error(factor, magnitude, unit_c=SCALE_CONST_U):
    """Error of multiplying by the rounded constant c~ = c (1 + delta),
    |delta| <= ``unit_c`` (`SCALE_CONST_U`, or `scale_constant_unit` of the
    model), rather than by c (§3, third bullet): unit_c * factor *
    magnitude, where ``factor * magnitude`` bounds the size of the product
    (e.g. factor = scale, magnitude = |S|).

    The forward charges it centred on the row's max key (|S_j - S_max|: a
    common factor cancels in the softmax) and uncentred (|S_j|) for the LSE;
    the gradient bound charges it uncentred (the saved LSE does not move with
    the recomputed logits), on the perturbed product's magnitude.
    """
    return unit_c * factor * magnitude


def additive_mask_abs(attn_mask, shape, like=None) -> np.ndarray:
    """|a| of an additive (float) mask broadcast to the logits' ``shape``;
    zeros for no mask or a boolean one, and where a is -inf (a masked key,
    which drops out rather than carrying an error). With a torch ``like``
    (the logits) the result is a float64 tensor on its device, the mask
    (NumPy, any float dtype, or a tensor) converted exactly first."""
    if is_torch(like):
        xp = namespace(like)
        is_bool = attn_mask is not None and (attn_mask.dtype == xp.bool_ if is_torch(attn_mask)
                                             else np.asarray(attn_mask).dtype == bool)
        if attn_mask is None or is_bool:
            return xp.zeros(shape, like=like)
        a = xp.broadcast_to(xp.abs(on_device(attn_mask, like, "attn_mask")), shape)
        return xp.where(xp.isfinite(a), a, 0.0)
    if attn_mask is not None and hasattr(attn_mask, "detach"):  # a torch tensor (bf16 has no NumPy view)
        attn_mask = attn_mask.detach().cpu().numpy() if str(attn_mask.dtype) == "torch.bool" else to_float64(attn_mask)
    if attn_mask is None or np.asarray(attn_mask).dtype == bool:
        return np.zeros(shape)
    a = np.broadcast_to(np.abs(np.asarray(attn_mask).astype(np.float64)), shape)
    return np.where(np.isfinite(a), a, 0.0)


def mask_unit(model: PrecisionModel) -> float:
    """Relative error of the mask term as added: exp2 kernels add
    fl_logits(a * fl32(log2 e)) (two roundings, u_logits + u_fp32); natural-exp
    kernels add a itself (exact)."""
    return unit(model.logits) + unit("fp32") if model.exp_impl == "exp2" else 0.0


def mask_logit_error(a, logit_mag, model: PrecisionModel):
    """Error the additive mask adds to a logit (§3, fourth bullet):
    `mask_unit` * |a|, plus, where there is a mask term, the rounding of the
    sum to ``model.logits``: u_logits * ``logit_mag``, a bound on the
    magnitude of the sum as computed."""
    return mask_unit(model) * a + namespace(a).where(a > 0, unit(model.logits) * logit_mag, 0.0)


@dataclass
class KeyErrors:
    """Per-key errors of one case's logits and weights (docs/error-bounds.md
    §3), arrays shaped like the logits (B, H, Nq, Nk) unless said otherwise.

    qk:           the exact Q K^T.
    mag:          bound on |scale S~|, the logit as computed before the mask.
    a:            |additive mask| (0 for none, a boolean mask, or -inf).
    e_logit:      the error each key has on its own: dot product, the
                  product with the constant, the mask.
    e_common_c:   the common factor of the scale constant, centred on the
                  row's max key; e_common_abs: the same, uncentred.
    row_err:      (B, H, Nq) the row's largest logit error, centred.
    e_sub:        rounding of the exp argument s - m (and of the rescale
                  exponents, which telescope into it).
    rescales:     per key, how many later rescales may reach it (0 for a
                  stored softmax, which has none).
    e_c, e_abs:   the whole log-error of a key's weight, centred and
                  uncentred, with exp's own (0 on masked keys).
    """

    qk: np.ndarray
    mag: np.ndarray
    a: np.ndarray
    e_logit: np.ndarray
    e_common_c: np.ndarray
    e_common_abs: np.ndarray
    row_err: np.ndarray
    e_sub: np.ndarray
    rescales: np.ndarray
    e_c: np.ndarray
    e_abs: np.ndarray


def key_errors(q, k, s, scale, model: PrecisionModel, attn_mask=None, count_rescales=None) -> KeyErrors:
    """The per-key weight errors of §3 for exact inputs ``q``, ``k`` (kv
    heads expanded) and exact logits ``s`` (masked keys -inf).

    ``count_rescales(tol)`` gives, per key, the rescales that may reach it
    when keys within ``tol`` (B, H, Nq) of the running max count as
    records (`flashcheck.verify.bounds.rescale_counts`); None means no
    rescales (``softmax="stored"``).
    """
    u_log = unit(model.logits)
    u_exp = exp_unit(model)
    u_resc = unit(model.rescale) + model.exp_rel_err
    u_c = scale_constant_unit(model)
    xp = namespace(s)
    finite = xp.isfinite(s)
    masked_row = ~finite.any(-1)
    s_vis = xp.where(finite, s, -xp.inf)
    m = xp.where(masked_row, 0.0, xp.amax(s_vis, axis=-1))
    s0 = xp.where(finite, s, 0.0)
    qk, e_dot, mag = scaled_dot_error(q, k, scale, model)
    e_mul = logit_product_error(model, mag)
    a = additive_mask_abs(attn_mask, s.shape, like=s)
    # The common rounding of the scale moves every logit of a row by the same
    # factor: centred on the row's max key it costs u_c |scale (S_j - S_max)|.
    jmax = xp.argmax(s_vis, axis=-1)
    del s_vis
    qk_max = xp.take_along_axis(qk, jmax[..., None], axis=-1)
    e_common_c = scale_constant_error(scale, xp.abs(qk - qk_max), u_c)
    e_common_abs = scale_constant_error(scale, xp.abs(qk), u_c)
    if model.scaling == "sqrt-qk":
        e_mask = mask_logit_error(a, xp.abs(s0) + e_dot + e_common_abs, model)
    else:
        e_mask = mask_logit_error(a, xp.abs(s0) + e_dot, model)
    e_logit = e_dot + e_mul + e_mask
    row_err = xp.amax(xp.where(finite, e_logit + e_common_c, 0.0), axis=-1)
    # exp argument s - m_tile and the rescale exponents telescope to |s - m|.
    e_sub = u_log * (xp.abs(s0 - m[..., None]) + 2 * row_err[..., None])
    # Each key's weight passes through its own exp and one exp per later rescale.
    tol = 2 * row_err + 1e-300
    if count_rescales is None:
        rescales = xp.zeros(s.shape, like=s, dtype=xp.int64)
    else:
        rescales = count_rescales(tol)
    e_expo = -np.log1p(-u_exp) + count(rescales) * (-np.log1p(-u_resc))
    e_c = xp.where(finite, e_logit + e_common_c + e_sub + e_expo, 0.0)
    e_abs = xp.where(finite, e_logit + e_common_abs + e_sub + e_expo, 0.0)
    return KeyErrors(qk, mag, a, e_logit, e_common_c, e_common_abs, row_err, e_sub, rescales, e_c, e_abs)


def weight_perturbation(s, p, e_c, model: PrecisionModel):
    """§4's sums for exact logits ``s`` (masked keys -inf), probabilities
    ``p`` and centred key errors ``e_c``: returns ``(pe, w_exact, ell,
    s_pe)`` with pe = P (e^{e_c} - 1) (no inf * 0 for keys far below the
    max), the exact weights w = e^{s - m} and their sum l (1 on rows with
    no visible key), and s_pe = sum_j pe_j + n eta_exp / l, which bounds how
    far the computed weights' sum, relative to l, may move."""
    xp = namespace(s, p, e_c)
    finite = xp.isfinite(s)
    masked_row = ~finite.any(-1)
    m = xp.where(masked_row, 0.0, xp.amax(xp.where(finite, s, -xp.inf), axis=-1))
    s0 = xp.where(finite, s, 0.0)
    pe = p_times_expm1(p, e_c)
    w_exact = xp.exp(xp.where(finite, s0 - m[..., None], -xp.inf))
    ell = xp.where(masked_row, 1.0, xp.sum(w_exact, axis=-1))
    s_pe = xp.sum(pe, axis=-1) + exp_underflow(model) * count(finite.sum(-1)) / ell
    return pe, w_exact, ell, s_pe


def normalise_unit(model: PrecisionModel) -> float:
    """Relative error of one stored-softmax normalisation (§5s):
    fl_p(e * fl_l(1 / l)) has (1 + u_l)(1 + u_p) - 1 (a true division
    fl_p(e / l), u_p, is within it), plus ``div_rel_err`` for an approximate
    reciprocal or divide."""
    return (1 + unit(model.l_acc)) * (1 + unit(model.p)) - 1 + model.div_rel_err


def stored_p_error(p, pe, s_pe, theta, n_keys, ell, finite, model: PrecisionModel):
    """Elementwise bound on |P~ - P| for a stored softmax (backward M1),
    and a bound on |sum_j P~_j - 1| per row.

    ``p`` exact probabilities; ``pe`` = P (e^{e_c} - 1) with e_c the
    centred key errors (`key_errors`); ``s_pe`` (B, H, Nq) = sum_j pe_j plus
    the underflow n eta_exp / l, as the forward's §4 forms it; ``theta`` =
    gamma(n, u_l) of the row sum l~; ``ell`` the exact sum of e^{s - m}.
    The normalised perturbed weight rho_j = w~_j / sum w~ is within
    (pe_j + P_j s_pe + eta_exp / l) / (1 - s_pe) of P_j; then
    P~_j = rho_j (sum w~ / l~)(1 + delta) + xi adds rho (theta + u_norm) /
    (1 - theta) and half a subnormal of ``model.p``. Where that is not
    small, max(P, P~_max) bounds it as well (both are non-negative), with
    P~_max = (1 + u_norm) / (1 - theta) + eta_p; rows with theta >= 1/2 get
    inf. Returns ``(e_p, e_sum)``, e_p 0 on masked keys.
    """
    xp = namespace(p, pe)
    u_norm = normalise_unit(model)
    eta_exp = exp_underflow(model)
    eta_p = half_subnormal(model.p)
    ok = (s_pe < 0.5) & (theta < 0.5)
    den = xp.where(ok, 1.0 - s_pe, 1.0)[..., None]
    th = xp.where(theta < 0.5, theta, 0.0)[..., None]
    s_pe = xp.where(ok, s_pe, 0.0)  # those rows take the fallback below
    rho_err = (pe + p * s_pe[..., None] + eta_exp / ell[..., None]) / den
    fine = rho_err + (p + rho_err) * (th + u_norm) / (1 - th) + eta_p
    fine = xp.where(ok[..., None], fine, xp.inf)
    p_max = (1 + u_norm) / (1 - th) + eta_p
    e_p = xp.minimum(fine, xp.maximum(p, p_max))
    e_p = xp.where((theta < 0.5)[..., None], e_p, xp.inf)
    e_sum = xp.where(theta < 0.5, (u_norm + th[..., 0]) / (1 - th[..., 0]) + count(n_keys) * eta_p, xp.inf)
    return xp.where(finite, e_p, 0.0), e_sum


def largest_terms(**terms) -> dict:
    """The largest value of each named term array, as floats (0 for an empty
    array): the ``terms`` summary a bound reports for debugging. Torch
    tensors are reduced on their device (one scalar copied back each)."""
    return {name: largest_value(value) for name, value in terms.items()}


def largest_value(value) -> float:
    """max(0, max(value)) as a float, NaN propagating (NumPy's
    ``np.max(value, initial=0.0)``), for NumPy arrays and torch tensors."""
    if not is_torch(value):
        return float(np.max(value, initial=0.0))
    if value.numel() == 0:
        return 0.0
    top = float(value.amax())
    return top if not top < 0.0 else 0.0  # max(initial=0): NaN propagates
