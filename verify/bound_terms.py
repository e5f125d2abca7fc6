"""The error terms the forward and the gradient bound share.

`flashcheck.verify.bounds.attention_bound` (forward, docs/error-bounds.md)
and `flashcheck.verify.grad_bounds.gradient_bound` (backward,
docs/error-bounds-backward.md) bound the same kernel steps in places: the
units of the model's formats, the recomputed logits (the dot product, the
scale constant, the additive mask), exp and its underflow, tf32 operands.
Each such step is derived once, here, and both bounds call it, so that a
change to the kernel's contract (e.g. how the scale constant is rounded) is
made in one place. Section numbers refer to docs/error-bounds.md.

The hardware figures these terms use (tf32 conversion, ex2.approx) come
from the one catalogue, `flashcheck.kernels.models`.
"""

from __future__ import annotations

import numpy as np

from flashcheck.kernels.models import TF32_CONVERSION_REL_ERR
from flashcheck.kernels.precision import FORMATS, PrecisionModel

__all__ = [
    "EVAL_MARGIN",
    "SCALE_CONST_U",
    "additive_mask_abs",
    "dot_error",
    "exp_underflow",
    "exp_unit",
    "gamma",
    "half_subnormal",
    "largest_terms",
    "mask_logit_error",
    "mask_unit",
    "p_times_expm1",
    "scale_constant_error",
    "scaled_dot_error",
    "tf32_operand_terms",
    "unit",
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


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u), elementwise; inf where n u >= 1."""
    n = np.asarray(n, dtype=np.float64)
    nu = n * u
    with np.errstate(divide="ignore"):
        return np.where(nu < 1.0, nu / np.maximum(1.0 - nu, 0.0), np.inf)


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
    (ex2.approx.ftz) flushes results below fp32's smallest normal to 0;
    a correctly rounded exp loses at most half a subnormal of ``model.exp``."""
    return FORMATS["fp32"].tiny if model.exp_impl == "exp2" else half_subnormal(model.exp)


def p_times_expm1(p: np.ndarray, e: np.ndarray) -> np.ndarray:
    """p * (e^e - 1) for p in [0, 1], e >= 0, with no overflow for tiny p:
    the change of a weight P whose logit moved by at most e."""
    with np.errstate(divide="ignore", over="ignore"):
        big = np.exp(np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) + e, -np.inf))
        return np.where(e < 30, p * np.expm1(np.minimum(e, 30)), big)


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


def dot_error(abs_a, abs_b, n, u, tf):
    """Bound on |fl(A B) - A B| for exact A (..., m, n), B (..., n, p) given by
    their absolute values: products exact, n rounded additions with unit
    ``u`` in any order (Higham §3.1), operands first rounded to tf32 when
    ``tf`` (the ``tau`` of `tf32_operand_terms`; relative 2^-10 each, or a
    tf32 subnormal spacing absolutely: rounding a subnormal is an absolute
    error)."""
    g = gamma(n, u)
    err = ((1 + tf) * (1 + g) - 1) * (abs_a @ abs_b) * _DOT_EVAL_MARGIN
    if tf:
        eta = FORMATS["tf32"].smallest_subnormal
        err = err + (1 + g) * (eta * (1 + tf) * (abs_a.sum(-1)[..., :, None] + abs_b.sum(-2)[..., None, :])
                               + n * eta**2)
    return err


def scaled_dot_error(q, k, scale, model: PrecisionModel):
    """The logits' dot product S = Q K^T (§3, first bullet), times |scale|.

    ``q`` (..., Nq, D) and ``k`` (..., Nk, D) are the exact inputs (kv heads
    expanded). Returns ``(qk, e_dot, mag)``: the exact Q K^T, the bound
    |scale| |S~ - S| (accumulation in ``model.qk_acc``, tf32 operands when the
    model says so) and mag = |scale S| + e_dot, a bound on |scale S~|.
    """
    scale = abs(float(scale))
    tau = tf32_operand_terms(model)[0]
    qk = q @ np.swapaxes(k, -1, -2)
    e_dot = scale * dot_error(np.abs(q), np.swapaxes(np.abs(k), -1, -2), q.shape[-1],
                              unit(model.qk_acc, model.acc_rounding), tau)
    return qk, e_dot, np.abs(scale * qk) + e_dot


def scale_constant_error(factor, magnitude):
    """Error of multiplying by the rounded constant c~ = c (1 + delta),
    |delta| <= `SCALE_CONST_U`, rather than by c (§3, third bullet):
    SCALE_CONST_U * factor * magnitude, where ``factor * magnitude`` bounds
    the size of the product (e.g. factor = scale, magnitude = |S|).

    The forward charges it centred on the row's max key (|S_j - S_max|: a
    common factor cancels in the softmax) and uncentred (|S_j|) for the LSE;
    the gradient bound charges it uncentred (the saved LSE does not move with
    the recomputed logits), on the perturbed product's magnitude.
    """
    return SCALE_CONST_U * factor * magnitude


def additive_mask_abs(attn_mask, shape) -> np.ndarray:
    """|a| of an additive (float) mask broadcast to the logits' ``shape``;
    zeros for no mask or a boolean one, and where a is -inf (a masked key,
    which drops out rather than carrying an error)."""
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
    return mask_unit(model) * a + np.where(a > 0, unit(model.logits) * logit_mag, 0.0)


def largest_terms(**terms) -> dict:
    """The largest value of each named term array, as floats (0 for an empty
    array): the ``terms`` summary a bound reports for debugging."""
    return {name: float(np.max(value, initial=0.0)) for name, value in terms.items()}
