"""Floating-point formats and the precision model of an attention kernel.

Every emulated intermediate is held in a float64 array whose values are
exactly representable in the format the model names for it. ``round_to``
performs that rounding, correctly rounded (round-to-nearest-even, or toward
zero for truncating accumulators), straight from float64: never through an
intermediate format, which would round twice.

>>> round_to(np.array([1 + 2**-8 + 2**-40]), "bf16")[0] == 1 + 2**-7
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "FORMATS",
    "Format",
    "PrecisionModel",
    "format_of",
    "from_float64",
    "round_to",
    "to_float64",
    "unit_roundoff",
]


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: ``p`` significand bits (with the
    hidden one), smallest normal exponent ``emin``, largest ``emax``."""

    name: str
    p: int
    emin: int
    emax: int
    storage: type | None  # NumPy dtype that stores it, None if none does

    @property
    def u(self) -> float:
        """Unit roundoff of round-to-nearest, 2**-p."""
        return 2.0 ** -self.p

    @property
    def max(self) -> float:
        return (2.0 - 2.0 ** (1 - self.p)) * 2.0**self.emax

    @property
    def tiny(self) -> float:
        """Smallest positive normal number."""
        return 2.0**self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.p + 1)


FORMATS: dict[str, Format] = {
    "fp16": Format("fp16", 11, -14, 15, np.float16),
    "bf16": Format("bf16", 8, -126, 127, ml_dtypes.bfloat16),
    "tf32": Format("tf32", 11, -126, 127, None),
    "fp32": Format("fp32", 24, -126, 127, np.float32),
    "fp64": Format("fp64", 53, -1022, 1023, np.float64),
}

_ALIASES = {
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32", "float": "fp32", "f32": "fp32", "single": "fp32",
    "float64": "fp64", "double": "fp64", "f64": "fp64",
}


def format_of(x) -> Format:
    """The `Format` named by ``x``: a name ("fp16", "bfloat16", ...), a NumPy
    dtype or array, a torch dtype or tensor, or a `Format`.

    >>> format_of("bfloat16").name
    'bf16'
    """
    if isinstance(x, Format):
        return x
    if isinstance(x, str):
        name = _ALIASES.get(x.lower(), x.lower())
        if name not in FORMATS:
            raise ValueError(
                f"unknown floating-point format {x!r}; expected one of "
                f"{sorted(FORMATS)} (or an alias such as 'float16', 'bfloat16')"
            )
        return FORMATS[name]
    if isinstance(x, type) and issubclass(x, np.generic):
        dtype = np.dtype(x)  # a scalar type such as np.float32 (its .dtype is a descriptor)
    else:
        dtype = getattr(x, "dtype", x)
    text = str(dtype)
    if text.startswith("torch."):
        return format_of(text[len("torch."):])
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"cannot tell a floating-point format from {type(x).__name__} {x!r}") from None
    if np_dtype.kind not in "fV":
        raise ValueError(f"unsupported dtype {np_dtype}; expected float16, bfloat16, float32 or float64")
    for fmt in FORMATS.values():
        if fmt.storage is not None and np_dtype == np.dtype(fmt.storage):
            return fmt
    raise ValueError(
        f"unsupported dtype {np_dtype}; expected float16, bfloat16, float32 or float64"
    )


def unit_roundoff(fmt) -> float:
    return format_of(fmt).u


def _round_generic(x: np.ndarray, fmt: Format, mode: str) -> np.ndarray:
    """Round float64 values to ``fmt`` in one step (subnormals and overflow
    handled as IEEE 754 does)."""
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(x)  # x = m * 2**e with 0.5 <= |m| < 1
        exp = np.maximum(e.astype(np.int64) - 1, fmt.emin)
        quantum = np.ldexp(1.0, exp - (fmt.p - 1))
        scaled = x / quantum  # exact: division by a power of two
        if mode == "nearest":
            r = np.rint(scaled) * quantum  # rint rounds half to even
            r = np.where(np.abs(r) > fmt.max, np.copysign(np.inf, x), r)
        else:  # toward zero: overflow saturates at the largest finite value
            r = np.trunc(scaled) * quantum
            r = np.where(np.abs(r) > fmt.max, np.copysign(fmt.max, x), r)
        return np.where(np.isfinite(x), r, x)


def round_to(x, fmt, mode: str = "nearest") -> np.ndarray:
    """``x`` (float64 values) rounded to ``fmt``, returned as float64.

    ``mode`` is "nearest" (ties to even) or "zero" (truncation, as the
    alignment-and-truncate adders of NVIDIA tensor cores do).

    >>> round_to(np.array([65520.0]), "fp16")[0]
    inf
    """
    fmt = format_of(fmt)
    x = np.asarray(x, dtype=np.float64)
    if mode not in ("nearest", "zero"):
        raise ValueError(f"unknown rounding mode {mode!r}; expected 'nearest' or 'zero'")
    if fmt.name == "fp64":
        return x.copy()
    if fmt.name in ("fp16", "fp32"):
        # NumPy's float64 -> float16/float32 casts are correctly rounded.
        with np.errstate(over="ignore", invalid="ignore"):
            r = x.astype(fmt.storage).astype(np.float64)
            if mode == "zero":
                # Where nearest rounded away from zero, step back one value.
                grew = np.abs(r) > np.abs(x)
                if grew.any():
                    stepped = np.nextafter(r.astype(fmt.storage), np.zeros((), fmt.storage)).astype(np.float64)
                    r = np.where(grew, stepped, r)
        return r
    return _round_generic(x, fmt, mode)


def to_float64(x) -> np.ndarray:
    """Exact float64 values of a NumPy array or torch tensor (any device).

    bf16, fp16 and fp32 all embed exactly in float64.
    """
    if hasattr(x, "detach"):  # torch tensor
        import torch

        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(np.float64)  # bf16 -> fp32 is exact
        return t.to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


def from_float64(x, fmt) -> np.ndarray:
    """Store float64 values in ``fmt``'s NumPy dtype, rounding correctly."""
    fmt = format_of(fmt)
    if fmt.storage is None:
        raise ValueError(f"format {fmt.name} has no storage dtype")
    return round_to(x, fmt).astype(fmt.storage)


_EXP_IMPLS = ("exact", "exp2")
_SOFTMAX_KINDS = ("online", "stored")
_GQA_SUMS = ("rounded", "acc")
_SCALINGS = ("logits", "sqrt-qk")


@dataclass(frozen=True)
class PrecisionModel:
    """How an attention kernel rounds each of its intermediates.

    Each field names the format an intermediate is rounded to. The NumPy
    emulation (`flashcheck.kernels.numpy_attention`) follows it step by step, and the
    error bounds (`flashcheck.verify.bounds`) are derived from it.

    Fields:
        input: format of Q, K, V (and of the output's storage).
        qk_acc: accumulator of the dot products S = Q K^T.
        logits: format the scaled logits are held in before exp.
        exp: format of exp's result (P before any down-conversion).
        p: format P is rounded to before the P V product.
        pv_acc: accumulator of P V (rescaled tile by tile).
        l_acc: accumulator of the row sum l.
        rescale: format of the rescale factor alpha = exp(m_old - m_new).
        out: format of the returned output.
        tf32: round fp32 dot-product inputs to tf32 first.
        exp_impl: "exact" (correctly rounded exp) or "exp2"
            (exp2(x * log2 e) in fp32, the way GPU kernels call ex2.approx).
        exp_rel_err: relative error of the exp primitive beyond rounding of
            its result (0 for "exact"; the ex2.approx figure for "exp2").
        acc_rounding: "nearest" for IEEE accumulation; "zero" for tensor
            cores, which align and truncate when they add.
        div_rel_err: relative error of the final division O = acc / l beyond
            rounding to ``pv_acc`` (0 for IEEE division; GPU compilers often
            use an approximate divide or reciprocal); for ``softmax="stored"``,
            of the per-element normalisation P = e / l beyond its two
            roundings (see below).
        softmax: how P is formed and what the backward pass reads.
            "online" (FlashAttention-2): running max and rescaled partial
            sums per key tile, the output divided by l once at the end; the
            forward saves O and the LSE, and the backward recomputes P from
            the logits and the saved LSE, with D = rowsum(dO * O) from the
            stored output (`flashcheck.kernels.numpy_backward`).
            "stored" (torch's math backend, an ordinary autograd graph): one
            pass over the whole row, m = max_j s_j, e_j = fl_exp(exp(fl_logits(
            s_j - m))), l = sum_j e_j in ``l_acc``, and every element
            normalised on its own, P_j = fl_p(e_j * fl_l_acc(1 / l)) (a true
            division fl_p(e_j / l) is covered too); P is kept for the
            backward, and O = P V in ``pv_acc``. The backward uses that P,
            Delta = rowsum(dP * P) in fp32 and dS = P * (dP - Delta) in fp32.
            It requires ``scaling="sqrt-qk"``, ``exp_impl="exact"``, no tf32
            and fp32 ``qk_acc``, ``pv_acc`` and ``l_acc`` (the math backend's
            fp32 tensors): other combinations are not derived.
        scaling: where the softmax scale enters. "logits": S = Q K^T is
            accumulated from the inputs and multiplied by the constant
            fl32(scale) (or fl32(scale * log2 e) for exp2); "sqrt-qk" (the
            math backend): c = fl32(sqrt(|scale|)) and both q and k are
            multiplied by it (q by -c for a negative scale), each product
            rounded to fp32, before the dot products, whose result is the
            logit. Requires ``softmax="stored"``.
        gqa_sum: how the backward reduces dK and dV over the query heads of
            a GQA group (``softmax="online"`` models; the stored-P backward
            is plain autograd, which sums in fp32). "rounded" (the default,
            and what torch's fused SDPA backends were seen to do: the CPU
            flash backend's GQA dK equals per-head results summed): each
            query head's dK, dV may be rounded to the input dtype first, then
            summed in fp32 and rounded again, as flash-attn's
            ``dk_expanded.sum`` and autograd through ``repeat_interleave`` do;
            it also covers "acc". "acc": the heads' contributions are
            accumulated in ``pv_acc`` and rounded once (the project's Triton
            kernel and the NumPy emulation).
        name: a label.
    """

    input: str = "fp32"
    qk_acc: str = "fp32"
    logits: str = "fp32"
    exp: str = "fp32"
    p: str = "fp32"
    pv_acc: str = "fp32"
    l_acc: str = "fp32"
    rescale: str = "fp32"
    out: str = "fp32"
    tf32: bool = False
    exp_impl: str = "exact"
    exp_rel_err: float = 0.0
    acc_rounding: str = "nearest"
    div_rel_err: float = 0.0
    softmax: str = "online"
    scaling: str = "logits"
    gqa_sum: str = "rounded"
    name: str = "custom"

    def __post_init__(self):
        for field in ("input", "qk_acc", "logits", "exp", "p", "pv_acc", "l_acc", "rescale", "out"):
            value = getattr(self, field)
            fmt = format_of(value)  # raises on unknown names
            object.__setattr__(self, field, fmt.name)
        if self.exp_impl not in _EXP_IMPLS:
            raise ValueError(f"exp_impl must be one of {_EXP_IMPLS}, got {self.exp_impl!r}")
        if self.acc_rounding not in ("nearest", "zero"):
            raise ValueError(f"acc_rounding must be 'nearest' or 'zero', got {self.acc_rounding!r}")
        for field in ("exp_rel_err", "div_rel_err"):
            value = getattr(self, field)
            if not (0.0 <= value < 1e-2):
                raise ValueError(f"{field} must be in [0, 1e-2), got {value!r}")
        if self.gqa_sum not in _GQA_SUMS:
            raise ValueError(f"gqa_sum must be one of {_GQA_SUMS}, got {self.gqa_sum!r}")
        if self.softmax not in _SOFTMAX_KINDS:
            raise ValueError(f"softmax must be one of {_SOFTMAX_KINDS}, got {self.softmax!r}")
        if self.scaling not in _SCALINGS:
            raise ValueError(f"scaling must be one of {_SCALINGS}, got {self.scaling!r}")
        if (self.softmax == "stored") != (self.scaling == "sqrt-qk"):
            raise ValueError(
                f"softmax={self.softmax!r} with scaling={self.scaling!r} is not a derived combination; "
                f"use softmax='stored' with scaling='sqrt-qk' (torch's math backend) or the defaults "
                f"softmax='online', scaling='logits' (FlashAttention-2)"
            )
        if self.softmax == "stored":
            wrong = [f"{f}={getattr(self, f)!r}" for f in ("qk_acc", "pv_acc", "l_acc") if getattr(self, f) != "fp32"]
            if self.exp_impl != "exact":
                wrong.append(f"exp_impl={self.exp_impl!r}")
            if self.tf32:
                wrong.append("tf32=True")
            if wrong:
                raise ValueError(
                    f"softmax='stored' (the math backend) is derived for natural exp, no tf32 and fp32 "
                    f"qk_acc, pv_acc and l_acc; got {', '.join(wrong)}: set those fields to 'exact', "
                    f"False and 'fp32'"
                )

    def replace(self, **changes) -> PrecisionModel:
        return dataclasses.replace(self, **changes)

    def fmt(self, field: str) -> Format:
        return FORMATS[getattr(self, field)]
