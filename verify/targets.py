"""Targets: the attention implementations the harness judges.

A target takes a `Case` and returns the output (and, when it can, the
log-sum-exp) as torch tensors. Built-in names:

``triton``          the project's Triton kernel (`flashcheck.kernels.triton_flash`)
``numpy-tiled``     the NumPy algebra under a chosen precision model
``sdpa-math``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``
                    torch's ``scaled_dot_product_attention`` with that backend forced
``flash-attn``      the flash-attn package, when it is importable
``MODULE:FUNCTION`` any callable with SDPA's signature

A target raises `NotImplementedError` for a feature combination it does not
support (the case is then recorded as unsupported, not failed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.models import GPU_SUFFIX, check_model_name, default_model_name, get_model
from flashcheck.kernels.precision import PrecisionModel, format_of, from_float64
from flashcheck.properties.case import Case

__all__ = ["BUILTIN_TARGETS", "SDPA_BACKENDS", "Target", "TargetError", "TargetOutput", "resolve_target"]

BUILTIN_TARGETS = ("triton", "numpy-tiled", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn")


class TargetError(ValueError):
    """A target name that cannot be resolved (unknown, unimportable)."""


@dataclass
class TargetOutput:
    out: object  # torch tensor as the target returned it
    lse: object | None = None


@dataclass
class Target:
    """An attention implementation plus the precision model it is judged by.

    ``run(case, device)`` returns a `TargetOutput`. ``model_for(dtype)``
    gives the `PrecisionModel` for inputs of that dtype: the one named on the
    command line, else the target's own declaration, else the default
    (``fa2`` for fp16/bf16, ``fp32-ieee`` for fp32).
    """

    name: str
    run: Callable[[Case, str], TargetOutput]
    declared_model: Callable[[str, str], PrecisionModel] | None = None
    model_name: str | None = None

    def model_for(self, dtype, device: str = "cpu") -> PrecisionModel:
        fmt = format_of(dtype).name
        if self.model_name is not None:
            return get_model(self.model_name, fmt)
        if self.declared_model is not None:
            return self.declared_model(fmt, device)
        return get_model(default_model_name(fmt), fmt)


# -- built-ins ----------------------------------------------------------------
def _run_triton(case: Case, device: str) -> TargetOutput:
    from flashcheck.kernels import triton_flash

    if case.v.shape[-1] != case.q.shape[-1]:
        raise NotImplementedError("the Triton kernel needs V's head dim equal to Q's")

    q, k, v, mask = case.to_torch(device)
    out, lse = triton_flash.attention(
        q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
        enable_gqa=case.enable_gqa, return_lse=True, block_m=case.block_m, block_n=case.block_n,
    )
    return TargetOutput(out, lse)


def _triton_model(dtype: str, device: str) -> PrecisionModel:
    from flashcheck.kernels import triton_flash

    return triton_flash.precision_model(dtype, device=device)


def _numpy_tiled(model_name: str | None):
    def run(case: Case, device: str) -> TargetOutput:
        import torch

        from flashcheck.kernels.numpy_attention import tiled_attention

        fmt = case.dtype
        if not all(np.isfinite(t.astype(np.float64)).all() for t in (case.q, case.k, case.v)):
            raise NotImplementedError("the NumPy emulation is defined for finite inputs only")
        model = get_model(model_name or default_model_name(fmt), fmt)
        out, lse = tiled_attention(
            case.q, case.k, case.v, case.attn_mask, case.is_causal, case.scale, case.enable_gqa,
            block_m=case.block_m or 64, block_n=case.block_n or 64, model=model, return_lse=True,
        )
        stored = from_float64(out, fmt)
        t = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16) if fmt == "bf16" else torch.from_numpy(stored)
        return TargetOutput(t, torch.from_numpy(lse))

    return run


#: Target name -> the ``torch.nn.attention.SDPBackend`` member it forces
#: (by name, so that importing this module needs no torch).
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}


def _sdpa(backend: str):
    def run(case: Case, device: str) -> TargetOutput:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, mask = case.to_torch(device)
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
                    enable_gqa=case.enable_gqa,
                )
        except RuntimeError as exc:
            if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                raise NotImplementedError(f"SDPA backend {backend} does not support this case") from exc
            raise
        return TargetOutput(out)

    return run


def _sdpa_model(dtype: str, device: str) -> PrecisionModel:
    # On GPUs these backends compute exp with ex2.approx and accumulate on
    # tensor cores; on the CPU they are IEEE code.
    name = default_model_name(dtype)
    return get_model(name + GPU_SUFFIX if device == "cuda" else name, dtype)


def _flash_attn(case: Case, device: str) -> TargetOutput:
    import flash_attn

    if case.attn_mask is not None:
        raise NotImplementedError("flash-attn takes no attn_mask")
    if case.is_causal and case.q.shape[2] != case.k.shape[2]:
        # flash-attn aligns causal masks bottom-right; SDPA aligns them top-left.
        raise NotImplementedError("flash-attn's causal mask is bottom-right aligned when Nq != Nk")
    q, k, v, _ = case.to_torch(device)
    out, lse, _ = flash_attn.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=case.scale, causal=case.is_causal, return_attn_probs=True,
    )
    return TargetOutput(out.transpose(1, 2), lse)


def _callable_target(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TargetError(f"target {spec!r}: expected MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"target {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise TargetError(f"target {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TargetError(f"target {spec!r}: {attr!r} is not callable")

    def run(case: Case, device: str) -> TargetOutput:
        q, k, v, mask = case.to_torch(device)
        out = fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=case.is_causal, scale=case.scale,
                 enable_gqa=case.enable_gqa)
        return TargetOutput(out)

    return run


def resolve_target(spec: str, model_name: str | None = None) -> Target:
    """The `Target` for a built-in name or ``MODULE:FUNCTION``.

    >>> resolve_target("numpy-tiled").name
    'numpy-tiled'
    """
    if not isinstance(spec, str) or not spec:
        raise TargetError(f"target must be a non-empty string, got {spec!r}")
    if model_name is not None:
        check_model_name(model_name)
    if spec == "triton":
        return Target(spec, _run_triton, _triton_model, model_name)
    if spec == "numpy-tiled":
        return Target(spec, _numpy_tiled(model_name), None, model_name)
    if spec in SDPA_BACKENDS:
        return Target(spec, _sdpa(SDPA_BACKENDS[spec]), _sdpa_model, model_name)
    if spec == "flash-attn":
        try:
            importlib.import_module("flash_attn")
        except ImportError as exc:
            raise TargetError("target 'flash-attn': the flash_attn package is not importable") from exc
        return Target(spec, _flash_attn, _sdpa_model, model_name)
    if ":" in spec:
        return Target(spec, _callable_target(spec), None, model_name)
    raise TargetError(f"unknown target {spec!r}; expected one of {BUILTIN_TARGETS} or MODULE:FUNCTION")
