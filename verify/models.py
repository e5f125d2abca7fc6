"""Named precision models: how a kernel claims to compute.

A target is judged against the bound derived from its model (`flashcheck.verify.bounds`).

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
=============  ===============================================================

Suffix ``+gpu`` (e.g. ``fa2+gpu``) gives the GPU variant of any model: exp is
computed as exp2(x * log2 e) with the hardware's approximate ``ex2.approx.f32``
and the dot products accumulate on tensor cores, which align and truncate
rather than round to nearest (Fasi, Higham, Mikaitis & Pranesh 2021, "Numerical
behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 7:e330). The ex2 error
figure used is 2 ulp of fp32, i.e. a relative error of 2**-22: the CUDA C++
Programming Guide lists the fast-math ``exp2f``/``ex2.approx`` as accurate to
2 ulp (and ``__expf(x)`` as 2 + floor(|1.173 x|) ulp: the part growing with |x|
is the rounding of the argument product x * log2 e, which the bound adds from
the data, not from this figure).
"""

from __future__ import annotations

from flashcheck.kernels.precision import PrecisionModel, format_of

__all__ = ["DIV_APPROX_REL_ERR", "EX2_APPROX_REL_ERR", "MODEL_NAMES", "default_model_name", "get_model"]

#: relative error of ex2.approx.f32 (2 ulp of fp32), beyond nothing: it
#: includes the rounding of the result.
EX2_APPROX_REL_ERR = 2.0**-22

#: fp32 division on GPUs (Triton's default ``div.full.f32``, or rcp.approx
#: then a multiply): 2 ulp, a relative error of 2**-22.
DIV_APPROX_REL_ERR = 2.0**-22

MODEL_NAMES = ("fa2", "upcast", "fp32-ieee", "fp32-tf32")


def default_model_name(dtype) -> str:
    """``fa2`` for fp16/bf16 targets, ``fp32-ieee`` for fp32."""
    return "fp32-ieee" if format_of(dtype).name == "fp32" else "fa2"


def get_model(name: str, dtype) -> PrecisionModel:
    """The named model for inputs of ``dtype``.

    >>> get_model("fa2", "bf16").p
    'bf16'
    >>> get_model("fp32-tf32+gpu", "fp32").exp_impl
    'exp2'
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    fmt = format_of(dtype).name
    if fmt not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision models cover fp16, bf16 and fp32 inputs, got {fmt}")
    base, _, suffix = name.partition("+")
    if suffix not in ("", "gpu"):
        raise ValueError(f"unknown model suffix {'+' + suffix!r} in {name!r}; the only suffix is '+gpu'")
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
    else:
        raise ValueError(f"unknown precision model {name!r}; expected one of {MODEL_NAMES}, optionally with '+gpu'")
    if suffix == "gpu":
        model = model.replace(
            exp_impl="exp2", exp_rel_err=EX2_APPROX_REL_ERR, acc_rounding="zero",
            div_rel_err=DIV_APPROX_REL_ERR, name=name
        )
    return model
