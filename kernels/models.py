"""The catalogue of named precision models, and the hardware error figures
they are built from: the one place both are defined.

Why in ``kernels/``: the layering is kernels <- properties <- verify. The
Triton kernel's own model (`flashcheck.kernels.triton_flash.precision_model`)
needs the ex2.approx figure, the property strategies need the model names
per dtype, and the bounds, targets and command line (verify) need both; the
lowest layer that needs them is the only one all three may import. Keeping
the catalogue beside `PrecisionModel` (kernels/precision.py holds the
formats and the dataclass, this file what is named and measured) leaves one
concept a file. There is no ``verify.models`` re-export: one import path,
so no second name that can drift.

=============  ===============================================================
name           what it says
=============  ===============================================================
``fa2``        fp16/bf16 inputs; S = QK^T accumulated in fp32; scale and exp in
               fp32 (exp correctly rounded: relative error u_fp32); P rounded to
               the input dtype before P V; P V, l and the rescale factors in
               fp32; output rounded to the input dtype.
``upcast``     as ``fa2`` but P stays fp32 for the P V product.
``fp32-ieee``  fp32 inputs and IEEE fp32 arithmetic throughout.
``fp32-tf32``  as ``fp32-ieee``, but both dot products take inputs rounded to
               tf32 (10 explicit mantissa bits), the default of Triton's
               ``tl.dot`` and of cuBLAS on NVIDIA GPUs for fp32.
``math``       torch's math backend of ``scaled_dot_product_attention``
               (fp16, bf16 or fp32 inputs): inputs upcast to fp32, q and k
               each multiplied by fl32(sqrt(scale)), S, softmax and P V in
               fp32 with P normalised per element and stored for the
               backward (plain autograd: Delta = rowsum(dP * P)), results
               cast to the input dtype (``softmax="stored"``,
               ``scaling="sqrt-qk"``; exp is ATen's vectorised CPU exp,
               `ATEN_CPU_EXP_REL_ERR`).
=============  ===============================================================

Suffix ``+gpu`` (e.g. ``fa2+gpu``) gives the GPU variant of any model: exp is
computed as exp2(x * log2 e) with the hardware's approximate ``ex2.approx.f32``
(`EX2_APPROX_REL_ERR`), the final division is approximate
(`DIV_APPROX_REL_ERR`) and the dot products accumulate on tensor cores,
which align and truncate rather than round to nearest (Fasi, Higham,
Mikaitis & Pranesh 2021, "Numerical behavior of NVIDIA tensor cores",
PeerJ Comput. Sci. 7:e330). ``math+gpu`` keeps the natural exp (ATen's CUDA
softmax calls ``expf`` on the logits: `CUDA_EXPF_REL_ERR`) and takes the
approximate division and truncating accumulation as the others do.

`MODELS_FOR_DTYPE` says which names apply to which input dtype: the models
the property tests and the sharpness script sweep. (``fa2`` and ``upcast``
are also accepted for fp32 inputs, where they coincide with ``fp32-ieee``
up to the name; they are listed for the dtypes they describe.)

>>> get_model("fa2", "bf16").p
'bf16'
>>> get_model("fp32-tf32+gpu", "fp32").exp_impl
'exp2'
"""

from __future__ import annotations

from flashcheck.kernels.precision import PrecisionModel, format_of

__all__ = [
    "ATEN_CPU_EXP_REL_ERR",
    "CUDA_EXPF_REL_ERR",
    "DIV_APPROX_REL_ERR",
    "EX2_APPROX_REL_ERR",
    "GPU_SUFFIX",
    "INTERP_EXP2_REL_ERR",
    "LG2_APPROX_ABS_ERR",
    "MODELS_FOR_DTYPE",
    "MODEL_NAMES",
    "TF32_CONVERSION_REL_ERR",
    "check_model_name",
    "default_model_name",
    "get_model",
]

# -- hardware (and interpreter) error figures ---------------------------------

#: ex2.approx.f32: "maximum ulp error is 2 ulp from correctly rounded result
#: across the full range of inputs" (PTX ISA 9.1, section 9.7.3.21), i.e. a
#: relative error of at most 2 * 2**-23 beyond the rounding of the result (as
#: `PrecisionModel.exp_rel_err` counts it: the bounds add the rounding).
#: The growing part of CUDA's ``__expf(x)`` error (2 + floor(|1.173 x|) ulp)
#: is the rounding of the argument x * log2 e, which the bounds add from the
#: data, not from this figure.
EX2_APPROX_REL_ERR = 2.0**-22

#: fp32 division on GPUs (Triton's default ``div.full.f32``, or rcp.approx
#: then a multiply): 2 ulp, a relative error of 2**-22.
DIV_APPROX_REL_ERR = 2.0**-22

#: lg2.approx.f32 (the LSE's log2 l on GPUs): absolute error in log2 units.
#: The PTX ISA gives 2**-22.6; 2**-21 keeps a margin.
LG2_APPROX_ABS_ERR = 2.0**-21

#: fp32 -> tf32 conversion of dot-product operands, bounded as truncation to
#: 10 fraction bits (2**-10 relative), so that both cuBLAS's round-to-nearest
#: conversion and the tensor cores' bit-dropping input path are covered.
TF32_CONVERSION_REL_ERR = 2.0**-10

#: exp2 under the Triton CPU interpreter is NumPy's float32 exp2, whose accuracy
#: depends on the host: 4 ulp is the documented worst case over NumPy's SIMD
#: paths (AVX-512/SVML float32 functions, numpy/numpy#19478; the AVX2 exp is
#: within 2.52 ulp, numpy/numpy#13134), and glibc's exp2f is within 1 ulp. One
#: host was seen 2 ulp off (at a subnormal result), so 1 ulp was not a bound.
#: Subnormal results are covered by the bounds' absolute exp term. See
#: docs/error-bounds.md, "exp on the CPU path"; tests/test_triton_interpreter.py.
INTERP_EXP2_REL_ERR = 4 * 2.0**-23

#: exp in ATen's CPU softmax (the math backend's): the vectorised
#: ``Vectorized<float>::exp``, SLEEF's ``expf8_u10`` / ``expf16_u10`` on AVX2 /
#: AVX-512 hosts, documented within 1.0 ulp (other builds call the C
#: library's expf, also within 1 ulp). As for the interpreter's exp2, the
#: figure is taken beyond the rounding the bounds already charge, so 1 ulp
#: <= 2**-23 |y| leaves the rounding's 2**-24 as margin. Measured on this
#: project's AVX2 CPU (torch 2.13): 0.66 * 2**-23 at most over 10**6
#: arguments with normal results. Subnormal results are absolute errors
#: (0.59 of a subnormal spacing seen there), covered by the 2**-126 exp term
#: the bounds charge whenever exp is approximate.
ATEN_CPU_EXP_REL_ERR = 2.0**-23

#: ``expf`` in CUDA device code, as ATen's CUDA softmax calls it (no fast
#: math): 2 ulp maximum error over the full range (CUDA C++ Programming
#: Guide, mathematical functions appendix), taken beyond the rounding.
CUDA_EXPF_REL_ERR = 2.0**-22

# -- the named models ---------------------------------------------------------

#: The base model names (each may take `GPU_SUFFIX`).
MODEL_NAMES = ("fa2", "upcast", "fp32-ieee", "fp32-tf32", "math")
GPU_SUFFIX = "+gpu"

#: Input dtype -> every named model (with its GPU variant) that describes it.
MODELS_FOR_DTYPE: dict[str, tuple[str, ...]] = {
    fmt: tuple(bases) + tuple(b + GPU_SUFFIX for b in bases)
    for fmt, bases in (
        ("fp16", ("fa2", "upcast", "math")),
        ("bf16", ("fa2", "upcast", "math")),
        ("fp32", ("fp32-ieee", "fp32-tf32", "math")),
    )
}


def default_model_name(dtype) -> str:
    """``fa2`` for fp16/bf16 targets, ``fp32-ieee`` for fp32."""
    return "fp32-ieee" if format_of(dtype).name == "fp32" else "fa2"


def check_model_name(name: str) -> PrecisionModel:
    """Validate a model name on its own, before any dtype is known (command
    line, target resolution): the model for the dtype its base name implies
    (fp32 for ``fp32-*``, fp16 otherwise). Raises as `get_model` does."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    base = name.partition("+")[0]
    return get_model(name, "fp32" if base.startswith("fp32") else "fp16")


def get_model(name: str, dtype) -> PrecisionModel:
    """The named model for inputs of ``dtype`` (fp16, bf16 or fp32).

    Raises ValueError for an unknown name or suffix, for a dtype no model
    covers, and for an ``fp32-*`` model asked for fp16/bf16 inputs.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    fmt = format_of(dtype).name
    if fmt not in MODELS_FOR_DTYPE:
        raise ValueError(f"precision models cover fp16, bf16 and fp32 inputs, got {fmt}")
    base, _, suffix = name.partition("+")
    if suffix not in ("", GPU_SUFFIX[1:]):
        raise ValueError(f"unknown model suffix {'+' + suffix!r} in {name!r}; the only suffix is {GPU_SUFFIX!r}")
    if base in ("fa2", "upcast"):
        model = PrecisionModel(
            input=fmt, qk_acc="fp32", logits="fp32", exp="fp32",
            p=fmt if base == "fa2" else "fp32",
            pv_acc="fp32", l_acc="fp32", rescale="fp32", out=fmt, name=base,
        )
    elif base in ("fp32-ieee", "fp32-tf32"):
        if fmt != "fp32":
            raise ValueError(f"model {base!r} is for fp32 inputs, not {fmt}")
        model = PrecisionModel(input="fp32", tf32=(base == "fp32-tf32"), name=base)
    elif base == "math":
        # Everything but the input and the output is an fp32 tensor after the upcast.
        model = PrecisionModel(input=fmt, out=fmt, softmax="stored", scaling="sqrt-qk",
                               exp_rel_err=ATEN_CPU_EXP_REL_ERR, name=base)
    else:
        raise ValueError(
            f"unknown precision model {name!r}; expected one of {MODEL_NAMES}, optionally with {GPU_SUFFIX!r}"
        )
    if suffix and base == "math":
        return model.replace(exp_rel_err=CUDA_EXPF_REL_ERR, acc_rounding="zero", div_rel_err=DIV_APPROX_REL_ERR,
                             name=name)
    if suffix:
        model = model.replace(
            exp_impl="exp2", exp_rel_err=EX2_APPROX_REL_ERR, acc_rounding="zero",
            div_rel_err=DIV_APPROX_REL_ERR, name=name
        )
    return model
