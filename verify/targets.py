"""Targets: the attention implementations the harness judges.

A target takes a `Case` and returns the output (and, when it can, the
log-sum-exp) as torch tensors. Built-in names:

``triton``          the project's Triton kernel (`flashcheck.kernels.triton_flash`)
``numpy-tiled``     the NumPy algebra under a chosen precision model
``sdpa-math``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``
                    torch's ``scaled_dot_product_attention`` with that backend forced
``flash-attn``      the flash-attn package, when it is importable
``flex``            ``torch.compile(flex_attention)`` (torch.nn.attention.flex_attention)
``compiled-math``   ``torch.compile`` of plain attention in torch ops, fp32 inside
``MODULE:FUNCTION`` any callable with SDPA's signature

A target raises `NotImplementedError` for a feature combination it does not
support (the case is then recorded as unsupported, not failed).

Gradients: when the case carries an output gradient (``case.do``), every
target also returns dq, dk, dv. The torch targets get them from autograd,
``torch.autograd.grad(out, (q, k, v), do)``, with q, k, v (and dO) in the
case's memory layout; ``numpy-tiled`` from the NumPy backward emulation
(`flashcheck.kernels.numpy_backward`). A target that cannot differentiate a
case (no autograd formula, a backend without a backward for it) returns its
forward output with ``grad_error = ("unsupported", why)``: the gradient is
unsupported, the forward is still judged. A backward that raises anything
else gives ``("raised", message)``; a device fault is re-raised, so that the
isolated worker sees it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.models import GPU_SUFFIX, check_model_name, default_model_name, get_model
from flashcheck.kernels.precision import PrecisionModel, format_of, from_float64
from flashcheck.properties.case import Case, numpy_to_torch

__all__ = ["BUILTIN_TARGETS", "SDPA_BACKENDS", "Target", "TargetError", "TargetOutput", "resolve_target"]

BUILTIN_TARGETS = ("triton", "numpy-tiled", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn",
                   "flex", "compiled-math")


class TargetError(ValueError):
    """A target name that cannot be resolved (unknown, unimportable)."""


@dataclass
class TargetOutput:
    out: object  # torch tensor as the target returned it
    lse: object | None = None
    grads: tuple | None = None  # (dq, dk, dv) when the case has ``do`` and the backward ran
    grad_error: tuple | None = None  # ("unsupported" | "raised", message) when it did not


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

    def call(q, k, v, mask):
        return triton_flash.attention(
            q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
            enable_gqa=case.enable_gqa, return_lse=True, block_m=case.block_m, block_n=case.block_n,
        )

    return _run_torch(case, device, call)


# -- gradients through autograd ----------------------------------------------------
#: Messages of autograd errors that mean "no backward for this", not a bug.
_NO_BACKWARD = ("does not require grad", "does not have a grad_fn", "derivative for", "not implemented",
                "is not differentiable", "no backward", "not supported")


def _backward(case: Case, device: str, out, inputs) -> tuple[tuple | None, tuple | None]:
    """(grads, None) or (None, (status, message)) for ``out`` against
    ``inputs`` under the case's output gradient."""
    import torch

    from flashcheck.verify.isolation import fault_kind

    if not getattr(out, "requires_grad", False):
        return None, ("unsupported", "the output does not require grad: the target is not differentiable "
                                     "(no autograd graph from q, k, v)")
    try:
        grads = torch.autograd.grad(out, inputs, grad_outputs=case.do_torch(device).to(out.device),
                                    allow_unused=True)
    except NotImplementedError as exc:
        return None, ("unsupported", f"backward: {exc}" if str(exc) else "backward not implemented")
    except Exception as exc:  # noqa: BLE001 - classified below
        message = f"{type(exc).__name__}: {exc}"
        if fault_kind(message):
            raise  # a dead device: the isolated worker must see it
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _NO_BACKWARD):
            return None, ("unsupported", f"backward: {message}")
        return None, ("raised", f"backward raised {message}")
    if any(g is None for g in grads):
        unused = [n for n, g in zip("qkv", grads) if g is None]
        return None, ("raised", f"backward gave no gradient for {', '.join(unused)} (the output does not depend "
                                f"on it through autograd)")
    return tuple(g.detach() for g in grads), None


def _run_torch(case: Case, device: str, call) -> TargetOutput:
    """``call(q, k, v, mask) -> out or (out, lse)`` on the case's tensors;
    with ``case.do``, q, k, v require grad and the gradients come back too.
    A target that declines the differentiable call (NotImplementedError)
    still gets its forward judged, without gradients."""
    def forward(grad: bool):
        q, k, v, mask = case.to_torch(device, requires_grad=grad)
        res = call(q, k, v, mask)
        out, lse = res if isinstance(res, tuple) else (res, None)
        return (q, k, v), out, lse

    if case.do is None:
        _, out, lse = forward(False)
        return TargetOutput(out, lse)
    try:
        inputs, out, lse = forward(True)
    except NotImplementedError as exc:
        _, out, lse = forward(False)
        return TargetOutput(out, lse, grad_error=("unsupported", f"declined with requires_grad: {exc}"))
    grads, error = _backward(case, device, out, inputs)
    return TargetOutput(_detached(out), _detached(lse), grads, error)


def _detached(t):
    return t.detach() if hasattr(t, "detach") else t


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
        block_m, block_n = case.block_m or 64, case.block_n or 64
        out, lse = tiled_attention(
            case.q, case.k, case.v, case.attn_mask, case.is_causal, case.scale, case.enable_gqa,
            block_m=block_m, block_n=block_n, model=model, return_lse=True,
        )
        stored = from_float64(out, fmt)
        grads = None
        if case.do is not None:
            from flashcheck.kernels.numpy_backward import attention_backward

            # The backward reads what the forward saved: the stored output and the fp32 LSE.
            grads = tuple(numpy_to_torch(from_float64(g, fmt)) for g in attention_backward(
                case.q, case.k, case.v, stored, lse.astype(np.float32), case.do, case.attn_mask, case.is_causal,
                case.scale, case.enable_gqa, block_m=block_m, block_n=block_n, model=model))
        return TargetOutput(numpy_to_torch(stored), torch.from_numpy(lse), grads)

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

        def call(q, k, v, mask):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
                        enable_gqa=case.enable_gqa,
                    )
            except RuntimeError as exc:
                if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                    grad = " with requires_grad" if q.requires_grad else ""
                    raise NotImplementedError(f"SDPA backend {backend} does not support this case{grad}") from exc
                raise

        return _run_torch(case, device, call)

    return run


def _sdpa_model(dtype: str, device: str) -> PrecisionModel:
    # On GPUs these backends compute exp with ex2.approx and accumulate on
    # tensor cores; on the CPU they are IEEE code.
    name = default_model_name(dtype)
    return get_model(name + GPU_SUFFIX if device == "cuda" else name, dtype)


def _math_model(dtype: str, device: str) -> PrecisionModel:
    # The math backend is an autograd graph of fp32 tensor ops (kernels/models.py, "math").
    return get_model("math" + GPU_SUFFIX if device == "cuda" else "math", dtype)


def _flash_attn(case: Case, device: str) -> TargetOutput:
    import flash_attn

    if case.attn_mask is not None:
        raise NotImplementedError("flash-attn takes no attn_mask")
    if case.is_causal and case.q.shape[2] != case.k.shape[2]:
        # flash-attn aligns causal masks bottom-right; SDPA aligns them top-left.
        raise NotImplementedError("flash-attn's causal mask is bottom-right aligned when Nq != Nk")
    def call(q, k, v, mask):
        out, lse, _ = flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            softmax_scale=case.scale, causal=case.is_causal, return_attn_probs=True,
        )
        return out.transpose(1, 2), lse

    return _run_torch(case, device, call)


# -- compiled targets (torch.compile) --------------------------------------------
#: name -> the torch.compile'd function, built once per process (a campaign's
#: worker keeps it, so each new shape costs one compile, not a fresh start).
_COMPILED: dict = {}


def _compiled(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        import torch

        if name == "flex":
            from torch.nn.attention.flex_attention import flex_attention as eager
        else:
            eager = _math_attention
        # dynamic=False: on the CPU, dynamic shapes saved no compiles over a
        # campaign's varied shapes (head counts, head dims, dtypes, scales and
        # mask kinds recompile anyway) and made each compile slower; with flex
        # they also hit an inductor C++ codegen error for bool masks (torch 2.13).
        fn = _COMPILED[name] = torch.compile(eager, dynamic=False)
    return fn


def _recompile_settings():
    """Dynamo config for a call of a compiled target: each new shape is a
    recompile of the same function, and past ``recompile_limit`` (8) dynamo
    would silently run it uncompiled (flex then takes its unfused path).
    Lift the limit, and fail loudly rather than fall back should it be hit."""
    import torch._dynamo.config as config

    wanted = (
        (("recompile_limit", "cache_size_limit"), 1 << 20),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 1 << 20),
        (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True),
    )
    changes = {}
    for names, value in wanted:
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            changes[name] = value
    return config.patch(**changes)


def _compile_decline(exc: BaseException) -> str | None:
    """The reason when a compile failed because the backend does not support
    the input (a NotImplementedError inside inductor, or no C++ compiler);
    None for any other failure, which must stay a failure."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
        from torch._inductor.exc import InvalidCxxCompiler, LoweringException
    except ImportError:  # a torch whose internals moved: keep the failure as it is
        return None

    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, NotImplementedError):
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, InvalidCxxCompiler):
            return (f"{exc} (inductor compiles C++ for the CPU: install g++ or clang, "
                    "or point torch._inductor.config.cpp.cxx at one)")
        if isinstance(exc, BackendCompilerFailed):
            exc = exc.inner_exception
        elif isinstance(exc, LoweringException):
            exc = exc.__context__  # the lowering's own exception (raised "from None")
        else:
            return None
    return None


def _call_compiled(name: str, q, *args, **kwargs):
    import torch

    fn = _compiled(name)
    try:
        # Grad mode only when gradients are asked for: compiling the backward costs time.
        with torch.set_grad_enabled(q.requires_grad), _recompile_settings():
            return fn(q, *args, **kwargs)
    except Exception as exc:
        reason = _compile_decline(exc)
        if reason is None:
            raise
        raise NotImplementedError(f"target {name!r}: torch.compile refused q of shape {tuple(q.shape)}, {q.dtype}, "
                                  f"on {q.device.type}: {reason}") from exc


def _as_4d(mask):
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx  # top-left aligned, as SDPA's is_causal


def _bool_mod(full):
    def mask_mod(b, h, q_idx, kv_idx):
        return full[b, h, q_idx, kv_idx]

    return mask_mod


def _bias_mod(full):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + full[b, h, q_idx, kv_idx]

    return score_mod


def _run_flex(case: Case, device: str) -> TargetOutput:
    return _run_torch(case, device, lambda q, k, v, mask: _flex_call(case, device, q, k, v, mask))


def _flex_call(case: Case, device: str, q, k, v, mask):
    import torch
    from torch.nn.attention import flex_attention as fa

    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    score_mod = block_mask = None
    if case.is_causal:
        block_mask = fa.create_block_mask(_causal_mod, None, None, Nq, Nk, device=device)
    elif mask is not None:
        m = _as_4d(mask)
        full = m.expand(B, H, Nq, Nk)  # a view: size-1 dims broadcast with stride 0
        if mask.dtype == torch.bool:
            mb = B if m.shape[0] > 1 else None
            mh = H if m.shape[1] > 1 else None
            block_mask = fa.create_block_mask(_bool_mod(full), mb, mh, Nq, Nk, device=device)
        else:
            score_mod = _bias_mod(full)
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=case.scale, enable_gqa=case.enable_gqa)
    # The CPU lowering of torch 2.13 rejects an LSE request ("return_lse is not
    # supported yet"), so the LSE is asked for on GPUs only.
    want_lse = device != "cpu"
    if want_lse and hasattr(fa, "AuxRequest"):
        out, aux = _call_compiled("flex", q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    if want_lse:
        return _call_compiled("flex", q, k, v, return_lse=True, **kwargs)
    return _call_compiled("flex", q, k, v, **kwargs)


def _math_attention(q, k, v, mask, is_causal: bool, scale: float, groups: int):
    """Attention as a user writes it in torch ops; fp16/bf16 inputs are
    computed in fp32 (as SDPA's math backend does), the output cast back.
    A row with no visible key is softmax over all -inf: NaN, left as is."""
    import torch

    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        visible = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(work)
    return (torch.softmax(s, dim=-1) @ v).to(dtype)


def _run_compiled_math(case: Case, device: str) -> TargetOutput:
    import math

    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.q.shape[-1])
    groups = case.q.shape[1] // case.k.shape[1]
    return _run_torch(case, device, lambda q, k, v, mask: _call_compiled("compiled-math", q, k, v, mask,
                                                                          case.is_causal, scale, groups))


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
        return _run_torch(case, device, lambda q, k, v, mask: fn(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=case.is_causal, scale=case.scale,
            enable_gqa=case.enable_gqa))

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
        return Target(spec, _sdpa(SDPA_BACKENDS[spec]), _math_model if spec == "sdpa-math" else _sdpa_model,
                      model_name)
    if spec == "flash-attn":
        try:
            importlib.import_module("flash_attn")
        except ImportError as exc:
            raise TargetError("target 'flash-attn': the flash_attn package is not importable") from exc
        return Target(spec, _flash_attn, _sdpa_model, model_name)
    if spec == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as exc:
            raise TargetError(f"target 'flex': this torch has no torch.nn.attention.flex_attention ({exc}); "
                              "it needs torch >= 2.5") from exc
        return Target(spec, _run_flex, _sdpa_model, model_name)
    if spec == "compiled-math":
        return Target(spec, _run_compiled_math, _sdpa_model, model_name)
    if ":" in spec:
        return Target(spec, _callable_target(spec), None, model_name)
    raise TargetError(f"unknown target {spec!r}; expected one of {BUILTIN_TARGETS} or MODULE:FUNCTION")
