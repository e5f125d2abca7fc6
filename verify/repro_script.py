"""Standalone reproducers: a failing case as a script to paste into an upstream issue.

`write_repro(directory, case, target, failure, device=...)` writes

``case.npz``     the case, `Case.save` (replay with ``flashcheck replay``);
``repro.py``     a script that reproduces the failure with torch alone;
``inputs.npz``   the inputs' bit patterns, only when they are too large to
                 write into the script (more than `INLINE_LIMIT` elements).

The script needs no flashcheck (except for the project's own ``triton``
kernel, which it has to import). It rebuilds the inputs bit for bit, in the
case's memory layout, makes the one call that failed, computes the expected
values itself in float64, prints what it sees, and exits 1 when the bug
shows ("bug reproduced") and 0 when it does not ("not reproduced"); 2 when
a value was to be checked but the call raised instead. ``--device`` runs it
elsewhere; ``--dump PATH`` saves the inputs it built (bit patterns and
strides, .npz) and stops before the call.

A gradient failure (``grad-wrong``, ``grad-non-finite``, ``grad-raised``)
gets the same script with the case's output gradient dO among the inputs:
it runs the call with q, k, v requiring grad, then
``torch.autograd.grad(out, (q, k, v), dO)``, and compares the failing
gradient with float64 autograd through the script's own reference.

The script is assembled from one template (`_SCRIPT`) whose sections are
filled by small generators: inputs (`_inputs_section`), layout
(`_LAYOUTS`), the call (`_kernel_section`, one generator per target kind,
e.g. `_kernel_flex`), the float64 reference (`_REFERENCE`) and the check
for the failure class (`_CHECKS`, `_GRAD_CHECKS`).
"""

from __future__ import annotations

import math
import numbers
import re
import textwrap
from pathlib import Path
from string import Template

import numpy as np

from flashcheck.properties.case import Case
from flashcheck.verify.targets import SDPA_BACKENDS as _SDPA

__all__ = ["FAILURE_CLASSES", "INLINE_LIMIT", "TARGET_KINDS", "describe_case", "int_list_literal", "script_text",
           "write_repro"]

#: Failure class -> what the generated script checks.
FAILURE_CLASSES = {
    "wrong": "the error at the failing element exceeds the certified bound",
    "non-finite": "NaN/Inf in the output where the float64 reference is finite",
    "nan-dropped": "a row that reads a NaN input has a finite output",
    "nan-leak": "a row whose inputs are all finite has a non-finite output",
    "raised": "the call raises",
    "fault": "the call raises a (CUDA) fault",
    "crash": "the process dies",
    "hang": "the call never returns",
    "grad-wrong": "a gradient's error at the failing element exceeds the certified bound",
    "grad-non-finite": "NaN/Inf in a gradient where the float64 reference is finite",
    "grad-raised": "the backward raises",
}
_VALUE_CLASSES = ("wrong", "non-finite", "nan-dropped", "nan-leak")
_GRAD_CLASSES = ("grad-wrong", "grad-non-finite", "grad-raised")
#: Gradient -> the case array of its shape, and what its index (b, h, i, d) names.
_GRADIENTS = {"dq": ("q", "(b, h, i, d)"), "dk": ("k", "(b, kv_head, j, d)"), "dv": ("v", "(b, kv_head, j, d)")}
_ROW_CLASSES = ("nan-dropped", "nan-leak")  # `at` may name a row (b, h, i)

#: Targets the generator knows (besides ``MODULE:FUNCTION``).
TARGET_KINDS = (*_SDPA, "flex", "compiled-math", "triton", "flash-attn", "MODULE:FUNCTION")

#: Inputs with at most this many elements in all (q, k, v, mask, and dO for
#: a gradient failure) are written into the script; larger ones go to
#: inputs.npz beside it.
INLINE_LIMIT = 8192

#: Seconds a "hang" script waits for the call before it declares the bug.
HANG_TIMEOUT_S = 120

# storage dtype name -> (torch dtype, signed integer type of its bits)
_FORMATS = {
    "float16": ("torch.float16", np.int16),
    "bfloat16": ("torch.bfloat16", np.int16),
    "float32": ("torch.float32", np.int32),
    "float64": ("torch.float64", np.int64),
}
_WIDTH = 79  # PEP 8 line length of the generated script


# -- validation -----------------------------------------------------------------------------
def _check_target(target) -> None:
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    if target in _SDPA or target in ("flex", "compiled-math", "triton", "flash-attn"):
        return
    if ":" in target:
        module, _, attr = target.partition(":")
        parts = module.split(".") + attr.split(".")
        if module and attr and all(p.isidentifier() for p in parts):
            return
        raise ValueError(f"target {target!r}: expected MODULE:FUNCTION with Python identifiers")
    if target == "numpy-tiled":
        raise ValueError("target 'numpy-tiled' is flashcheck's own NumPy model, not a kernel: "
                         "replay case.npz with `flashcheck replay` instead")
    raise ValueError(f"unknown target {target!r}; expected one of {TARGET_KINDS}")


def _check_failure(case: Case, failure) -> dict:
    """The failure dict with defaults filled in; ValueError naming what is wrong."""
    if not isinstance(failure, dict):
        raise ValueError(f"failure must be a dict, got {type(failure).__name__}")
    cls = failure.get("class")
    if cls not in FAILURE_CLASSES:
        raise ValueError(f"unknown failure class {cls!r}; expected one of {tuple(FAILURE_CLASSES)}")
    out = {"reason": "", "signature": "", "at": None, "allowed": None, "allowed_max": None, "model": None,
           "features": [], "gradient": None}
    out.update(failure)
    for key in ("reason", "signature"):
        if not isinstance(out[key] or "", str):
            raise ValueError(f"failure[{key!r}] must be a string, got {out[key]!r}")
        out[key] = out[key] or ""
    features = out["features"] or []
    if isinstance(features, str) or not all(isinstance(f, str) for f in features):
        raise ValueError(f"failure['features'] must be a list of strings, got {features!r}")
    out["features"] = list(features)
    if cls in _GRAD_CLASSES:
        _check_gradient_failure(case, out)
    else:
        out["at"] = _check_at(case, cls, out["at"])
    if cls in ("wrong", "grad-wrong"):
        if out["at"] is None or len(out["at"]) != 4:
            raise ValueError(f"failure class {cls!r} needs 'at', the failing element (b, h, i, d)")
        allowed = out["allowed"]
        if (not isinstance(allowed, numbers.Real) or isinstance(allowed, bool)
                or not math.isfinite(allowed) or allowed < 0):
            raise ValueError(f"failure class {cls!r} needs 'allowed', a finite bound >= 0, got {allowed!r}")
        out["allowed"] = float(allowed)
        # Without allowed_max, the bound at the failing element stands for all of them.
        top = out["allowed_max"] if out["allowed_max"] is not None else allowed
        if not isinstance(top, numbers.Real) or isinstance(top, bool) or not top >= allowed or not math.isfinite(top):
            raise ValueError(f"failure['allowed_max'] must be a finite bound >= allowed ({allowed!r}), got {top!r}")
        out["allowed_max"] = float(top)
    if out["model"] is not None and not isinstance(out["model"], str):
        raise ValueError(f"failure['model'] must be a string or None, got {out['model']!r}")
    return out


def _check_gradient_failure(case: Case, out: dict) -> None:
    """Validate (in place) what a gradient failure needs: the case's output
    gradient, and for a value failure the gradient and an index into it."""
    cls = out["class"]
    if case.do is None:
        raise ValueError(f"failure class {cls!r} needs case.do, the output gradient the backward was given")
    if cls == "grad-raised":
        out["at"] = out["gradient"] = None  # the backward raised: no element to show
        return
    name = out["gradient"]
    if name not in _GRADIENTS:
        raise ValueError(f"failure class {cls!r} needs 'gradient', one of {tuple(_GRADIENTS)}, got {name!r}")
    at, index = out["at"], _GRADIENTS[name][1]
    if at is None:
        raise ValueError(f"failure class {cls!r} needs 'at', the failing element of {name}, {index}")
    if isinstance(at, (str, bytes)) or not hasattr(at, "__len__") or len(at) != 4:
        raise ValueError(f"failure['at'] must be the failing element of {name}, {index}, got {at!r}")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in at):
        raise ValueError(f"failure['at'] must hold integers, got {at!r}")
    shape = getattr(case, _GRADIENTS[name][0]).shape
    if not all(0 <= i < n for i, n in zip(at, shape)):
        raise ValueError(f"failure['at'] = {list(at)} is outside {name}'s shape {shape}")
    out["at"] = tuple(int(i) for i in at)


def _check_at(case: Case, cls: str, at):
    if at is None:
        return None
    if isinstance(at, (str, bytes)) or not hasattr(at, "__len__"):
        raise ValueError(f"failure['at'] must be a list (b, h, i, d) or None, got {at!r}")
    lengths = (3, 4) if cls in _ROW_CLASSES else (4,)
    if len(at) not in lengths:
        want = "(b, h, i, d) or a row (b, h, i)" if cls in _ROW_CLASSES else "(b, h, i, d)"
        raise ValueError(f"failure['at'] has length {len(at)}; expected {want}")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in at):
        raise ValueError(f"failure['at'] must hold integers, got {at!r}")
    B, H, Nq, _ = case.q.shape
    shape = (B, H, Nq, case.v.shape[-1])
    if not all(0 <= i < n for i, n in zip(at, shape)):
        raise ValueError(f"failure['at'] = {list(at)} is outside the output's shape {shape}")
    return tuple(int(i) for i in at)


# -- describing the case ----------------------------------------------------------------------
def _mask_description(case: Case) -> str:
    mask = case.attn_mask
    if mask is None:
        return "no attn_mask"
    if mask.dtype == bool:
        return f"bool attn_mask {tuple(mask.shape)} (True = attend)"
    return f"additive {_FORMATS[mask.dtype.name][0][6:]} attn_mask {tuple(mask.shape)}"


def describe_case(case: Case) -> str:
    """One line: dtype, shapes, options, layout, magnitude."""
    B, H, Nq, D = case.q.shape
    Hkv, Nk, Dv = case.k.shape[1], case.k.shape[2], case.v.shape[-1]
    dims = f"B={B} H={H} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D}" + (f" Dv={Dv}" if Dv != D else "")
    parts = [case.dtype, dims, "causal" if case.is_causal else "not causal", _mask_description(case),
             "default scale" if case.scale is None else f"scale={float(case.scale)!r}"]
    if case.enable_gqa:
        parts.append("enable_gqa")
    parts += [f"{case.layout} layout", f"{case.magnitude} magnitudes"]
    return ", ".join(parts)


def _describe_target(target: str) -> str:
    if target in _SDPA:
        return f"torch SDPA, {_SDPA[target]} backend"
    return {
        "flex": "torch.compile(flex_attention)",
        "compiled-math": "torch.compile of float32 attention",
        "triton": "flashcheck's Triton kernel",
        "flash-attn": "flash_attn_func",
    }.get(target, target)


# -- literals -------------------------------------------------------------------------------------
def _bits(arr: np.ndarray) -> np.ndarray:
    """Raw bit patterns of ``arr`` as signed integers (bool as 0/1), C order."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.name not in _FORMATS:
        raise ValueError(f"cannot write a {arr.dtype} array into a reproducer")
    return arr.view(_FORMATS[arr.dtype.name][1])


def int_list_literal(name: str, arr: np.ndarray) -> str:
    """``NAME = [...]``: the bit patterns of ``arr`` (see `_bits`), flattened,
    wrapped to the script's line length."""
    body = ", ".join(str(int(x)) for x in _bits(arr).ravel())
    if len(name) + len(body) + 5 <= _WIDTH:
        return f"{name} = [{body}]"
    lines = textwrap.wrap(body, _WIDTH - 4, break_long_words=False, break_on_hyphens=False)
    return f"{name} = [\n" + "".join(f"    {line}\n" for line in lines) + "]"


def _quote(text: str) -> str:
    """repr(text), in double quotes where that needs no escape."""
    r = repr(text)
    if r.startswith("'") and '"' not in text:
        return '"' + r[1:-1] + '"'
    return r


def _str_literal(text: str, indent: int) -> str:
    """A string literal, split into implicitly joined pieces to fit the line."""
    room = _WIDTH - indent - 4
    if len(_quote(text)) <= room:
        return _quote(text)
    pieces = textwrap.wrap(text, room - 4, drop_whitespace=False, break_on_hyphens=False)
    pad = " " * (indent + 4)
    return "(\n" + "".join(f"{pad}{_quote(p)}\n" for p in pieces) + " " * indent + ")"


def _docstring_text(text: str) -> str:
    """``text`` safe inside a triple-quoted docstring."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _wrap(label: str, text: str) -> str:
    return textwrap.fill(_docstring_text(text), _WIDTH - 4, initial_indent=label,
                         subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)


# -- sections ---------------------------------------------------------------------------------
def _docstring(case, target, failure, device, meta, inline) -> str:
    cls = failure["class"]
    lines = [f"Reproducer: {_docstring_text(_describe_target(target))}, {cls}.", "",
             _wrap("The bug: ", FAILURE_CLASSES[cls] + ".")]
    if failure["reason"]:
        lines.append(_wrap("What went wrong: ", failure["reason"]))
    if failure["signature"]:
        lines.append(_wrap("Signature: ", failure["signature"]))
    lines.append(_wrap("Case: ", describe_case(case)))
    if failure["features"]:
        lines.append(_wrap("What is special: ", "; ".join(failure["features"])))
    found = f"device {device}"
    if meta:
        found += ", " + ", ".join(f"{k} {v}" for k, v in meta.items())
    lines.append(_wrap("Found on: ", found))
    lines.append("")
    if target == "triton":
        lines.append(_wrap("", "This target is the flashcheck project's own Triton kernel: the script "
                               "imports it, so it needs the flashcheck package installed."))
    if cls in _GRAD_CLASSES:
        lines.append(_wrap("", "The backward: q, k, v require grad, and dq, dk, dv = "
                               "torch.autograd.grad(out, (q, k, v), do), with do (the output gradient) "
                               "among the exact inputs."))
    needs = "torch" + ("" if inline else " and numpy (inputs.npz holds the inputs)")
    status = "Exit status: 1 bug reproduced, 0 not reproduced"
    if cls in _GRAD_CLASSES:
        status = _wrap("", status + (", 2 the call itself raised (not its backward)." if cls == "grad-raised"
                                     else ", 2 the call or its backward raised instead."))
    else:
        status += (", 2 the call raised instead." if cls in _VALUE_CLASSES else
                   ", 2 the backend declines it." if cls in ("raised", "fault") and target in _SDPA else ".")
    lines += [
        f"Needs {needs}. Usage: python repro.py [--device DEV] [--dump PATH]",
        "(--dump saves the inputs' bit patterns and strides to PATH and stops).",
        status,
    ]
    return '"""' + "\n".join(lines) + '\n"""'


def _tensors(case: Case, grad: bool) -> list[tuple[str, np.ndarray]]:
    """The inputs laid out as the case: q, k, v, and dO for a gradient failure."""
    return [("q", case.q), ("k", case.k), ("v", case.v), *([("do", case.do)] if grad else [])]


def _input_names(grad: bool) -> str:
    return "q, k, v, attn_mask" + (", do" if grad else "")


def _inputs_section(case: Case, inline: bool, grad: bool) -> tuple[str, str, list[str]]:
    """(functions that build the inputs, the data block, extra imports).
    ``grad``: dO, the output gradient, is an input too."""
    tensors = _tensors(case, grad)
    fmt = _FORMATS[case.q.dtype.name]
    lines = []
    if inline:
        helper = textwrap.dedent('''\
            def from_bits(bits, dtype, shape):
                """The tensor of `dtype` whose raw bit patterns are the integers
                `bits` (so every value, NaN payloads and subnormals included, is
                exact)."""
                int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                             torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
                return torch.tensor(bits, dtype=int_dtype).view(dtype).reshape(shape)
            ''')
        for name, arr in tensors:
            lines.append(f"    {name} = lay_out(from_bits({name.upper()}_BITS, {fmt[0]}, {tuple(arr.shape)})"
                         f".to(device))")
        mask = case.attn_mask
        if mask is None:
            lines.append("    attn_mask = None")
        elif mask.dtype == bool:
            lines.append(f"    attn_mask = torch.tensor(MASK_BITS, dtype=torch.bool).reshape({tuple(mask.shape)})")
            lines.append("    attn_mask = attn_mask.to(device)  # True = attend")
        else:
            lines.append(f"    attn_mask = from_bits(MASK_BITS, {_FORMATS[mask.dtype.name][0]}, "
                         f"{tuple(mask.shape)}).to(device)")
        bits_of = {"float16": "float16 as int16", "bfloat16": "bfloat16 as int16",
                   "float32": "float32 as int32"}[case.q.dtype.name]
        data = [f"# Raw bit patterns ({bits_of}), flattened in (B, H, N, D) order."]
        data += [int_list_literal(f"{name.upper()}_BITS", arr) for name, arr in tensors]
        if mask is not None:
            kind = "0/1" if mask.dtype == bool else "bit patterns"
            data.append(f"# attn_mask {tuple(mask.shape)}, {kind}.")
            data.append(int_list_literal("MASK_BITS", mask))
        extra = []
    else:
        helper = textwrap.dedent('''\
            def from_bits(bits, dtype):
                """The tensor of `dtype` whose raw bit patterns are the integers
                `bits` (a NumPy array), so that every value is exact."""
                int_dtype = {torch.float16: np.int16, torch.bfloat16: np.int16,
                             torch.float32: np.int32, torch.float64: np.int64}[dtype]
                return torch.from_numpy(np.ascontiguousarray(bits).view(int_dtype)).view(dtype)
            ''')
        lines.append("    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), \"inputs.npz\")")
        lines.append("    data = np.load(path)  # raw bit patterns; bfloat16 as uint16")
        for name, _ in tensors:
            lines.append(f"    {name} = lay_out(from_bits(data[{name!r}], {fmt[0]}).to(device))")
        mask = case.attn_mask
        if mask is None:
            lines.append("    attn_mask = None")
        elif mask.dtype == bool:
            lines.append("    attn_mask = torch.from_numpy(data[\"attn_mask\"]).to(device)  # True = attend")
        else:
            lines.append(f"    attn_mask = from_bits(data[\"attn_mask\"], {_FORMATS[mask.dtype.name][0]}).to(device)")
        data = []
        extra = ["import os", "import numpy as np"]
    what = "q, k, v (in the case's memory layout) and attn_mask on `device`."
    if grad:
        what = ("q, k, v and do, the output gradient (in the case's memory\n"
                "    layout), and attn_mask on `device`.")
    make = (f'def make_inputs(device):\n    """{what}"""\n' + "\n".join(lines)
            + f"\n    return {_input_names(grad)}\n")
    return _join(helper, make), "\n".join(data), extra


def _npz_arrays(case: Case, grad: bool) -> dict:
    """inputs.npz: raw bit patterns (bf16 as uint16), bool masks as bool."""
    arrays = dict(_tensors(case, grad))
    if case.attn_mask is not None:
        arrays["attn_mask"] = case.attn_mask
    stored = {}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype == bool:
            stored[name] = arr
        elif arr.dtype.name == "bfloat16":
            stored[name] = arr.view(np.uint16)
        else:
            stored[name] = _bits(arr)
    return stored


#: Case.layout -> the function that lays a contiguous tensor out the same way
#: (copied from flashcheck.properties.case._apply_layout).
_LAYOUTS = {
    "contiguous": '''\
def lay_out(t):
    """The case's layout: contiguous (B, H, N, D), row-major."""
    return t.contiguous()
''',
    "bnhd": '''\
def lay_out(t):
    """The case's layout: allocated as (B, N, H, D), then transposed to
    (B, H, N, D), the layout most models hand to attention."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)
''',
    "strided": '''\
def lay_out(t):
    """The case's layout: a view into a larger NaN-filled buffer, so that the
    batch, head and row strides are padded (the last dim keeps stride 1).
    A kernel that ignores the strides reads the NaN padding."""
    B, H, N, D = t.shape
    big = torch.empty((B + 1, H + 1, N, D + 3), dtype=t.dtype, device=t.device)
    big.fill_(float("nan"))
    view = big[1:, 1:, :, 3:]
    view.copy_(t)
    return view
''',
}


def _call_args(case: Case) -> str:
    scale = "None" if case.scale is None else repr(float(case.scale))
    return f"is_causal={case.is_causal}, scale={scale}, enable_gqa={case.enable_gqa}"


def _kernel_sdpa(case: Case, backend: str) -> tuple[str, list[str]]:
    code = f'''\
def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the {backend} backend forced."""
    with sdpa_kernel(SDPBackend.{backend}):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=0.0,
            {_call_args(case)})
'''
    return code, ["import torch.nn.functional as F", "from torch.nn.attention import SDPBackend, sdpa_kernel"]


def _kernel_flex(case: Case) -> tuple[str, list[str]]:
    """flex_attention as its documentation writes it: is_causal and a bool
    mask become a mask_mod (through create_block_mask), an additive mask a
    score_mod. Kept in one function so it can follow the flex target."""
    mask = case.attn_mask
    bool_mask = mask is not None and mask.dtype == bool
    additive = mask is not None and not bool_mask
    body = ["    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]"]
    conditions = []
    if case.is_causal:
        conditions.append("(kv_idx <= q_idx)")
    if bool_mask:
        body.append("    allowed = attn_mask.expand(B, H, Nq, Nk)  # True = attend")
        conditions.append("allowed[b, h, q_idx, kv_idx]")
    if conditions:
        body += [
            "",
            "    def mask_mod(b, h, q_idx, kv_idx):",
        ]
        if case.is_causal:
            body.append("        # causal, top-left aligned: key j is visible to query i iff j <= i")
        body += [
            f"        return {' & '.join(conditions)}",
            "",
            "    block_mask = create_block_mask(mask_mod, B, H, Nq, Nk, device=q.device)",
        ]
    else:
        body.append("    block_mask = None")
    if additive:
        body += [
            "    bias = attn_mask.expand(B, H, Nq, Nk)",
            "",
            "    def score_mod(score, b, h, q_idx, kv_idx):",
            "        return score + bias[b, h, q_idx, kv_idx]  # additive attn_mask",
            "",
        ]
    else:
        body.append("    score_mod = None")
    scale = "None" if case.scale is None else repr(float(case.scale))
    body += [
        "    compiled = torch.compile(flex_attention)",
        "    return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,",
        f"                    scale={scale}, enable_gqa={case.enable_gqa})",
    ]
    code = ('def run_kernel(q, k, v, attn_mask):\n'
            '    """The failing call: torch.compile(flex_attention), the case\'s mask\n'
            '    written as mask_mod / score_mod."""\n' + "\n".join(body) + "\n")
    return code, ["from torch.nn.attention.flex_attention import create_block_mask, flex_attention"]


def _kernel_compiled_math(case: Case) -> tuple[str, list[str]]:
    mask = case.attn_mask
    scale = "1.0 / math.sqrt(q.shape[-1])" if case.scale is None else repr(float(case.scale))
    body = [
        "    dtype = q.dtype",
        "    q, k, v = q.float(), k.float(), v.float()",
        "    if k.shape[1] != q.shape[1]:  # GQA: kv head j serves query heads",
        "        group = q.shape[1] // k.shape[1]  # j * group .. (j + 1) * group - 1",
        "        k = k.repeat_interleave(group, dim=1)",
        "        v = v.repeat_interleave(group, dim=1)",
        f"    scores = (q @ k.transpose(-2, -1)) * {scale}",
    ]
    if case.is_causal:
        body += [
            "    Nq, Nk = scores.shape[-2:]",
            "    causal = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()",
            "    scores = scores.masked_fill(~causal, float(\"-inf\"))",
        ]
    if mask is not None and mask.dtype == bool:
        body.append("    scores = scores.masked_fill(~attn_mask, float(\"-inf\"))")
    elif mask is not None:
        body.append("    scores = scores + attn_mask.float()")
    body.append("    return (torch.softmax(scores, dim=-1) @ v).to(dtype)")
    code = ('def float32_attention(q, k, v, attn_mask):\n'
            '    """Plain attention computed in float32 (inputs upcast)."""\n'
            + "\n".join(body) + "\n\n\n"
            'def run_kernel(q, k, v, attn_mask):\n'
            '    """The failing call: torch.compile of plain float32 attention."""\n'
            '    return torch.compile(float32_attention)(q, k, v, attn_mask)\n')
    return code, []


def _kernel_triton(case: Case) -> tuple[str, list[str]]:
    code = f'''\
def run_kernel(q, k, v, attn_mask):
    """The failing call: flashcheck's Triton kernel (needs flashcheck)."""
    return triton_attention(
        q, k, v, attn_mask=attn_mask,
        {_call_args(case)},
        block_m={case.block_m}, block_n={case.block_n})
'''
    return code, ["from flashcheck.kernels.triton_flash import attention as triton_attention"]


def _kernel_flash_attn(case: Case) -> tuple[str, list[str]]:
    scale = "None" if case.scale is None else repr(float(case.scale))
    code = f'''\
def run_kernel(q, k, v, attn_mask):
    """The failing call: flash_attn_func, which takes (B, N, H, D)."""
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                          v.transpose(1, 2), softmax_scale={scale},
                          causal={case.is_causal})
    return out.transpose(1, 2)
'''
    return code, ["from flash_attn import flash_attn_func"]


def _kernel_callable(case: Case, target: str) -> tuple[str, list[str]]:
    module, _, attr = target.partition(":")
    first, _, rest = attr.partition(".")
    fn = first + ("." + rest if rest else "")
    doc = textwrap.fill(f"The failing call: {fn} from {module}, with SDPA's signature.", _WIDTH - 7,
                        initial_indent='    """', subsequent_indent="    ", break_on_hyphens=False)
    code = f'''\
def run_kernel(q, k, v, attn_mask):
{doc}"""
    return {fn}(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0,
        {_call_args(case)})
'''
    return code, [f"from {module} import {first}"]


def _kernel_section(case: Case, target: str) -> tuple[str, list[str]]:
    if target in _SDPA:
        return _kernel_sdpa(case, _SDPA[target])
    if target == "flex":
        return _kernel_flex(case)
    if target == "compiled-math":
        return _kernel_compiled_math(case)
    if target == "triton":
        return _kernel_triton(case)
    if target == "flash-attn":
        return _kernel_flash_attn(case)
    return _kernel_callable(case, target)


_REFERENCE = '''\
def repeat_kv(t, num_heads):
    """GQA/MQA: kv head j serves query heads j * g .. (j + 1) * g - 1, where
    g = num_heads // Hkv (heads are dim 1)."""
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def visible_keys(q, k, attn_mask, is_causal):
    """(B, H, Nq, Nk) bool, on the CPU: may query i attend to key j?"""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = torch.ones(Nq, Nk, dtype=torch.bool)
    if is_causal:
        visible = visible.tril()  # top-left aligned: j <= i
    visible = visible.expand(B, H, Nq, Nk)
    if attn_mask is not None:
        mask = attn_mask.cpu()
        if mask.dtype == torch.bool:
            visible = visible & mask  # True = attend
        else:
            visible = visible & (mask != float("-inf"))  # additive
    return visible.expand(B, H, Nq, Nk)


def reference_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """softmax(q k^T * scale + mask) v in float64 on the CPU, from the exact
    inputs, with scaled_dot_product_attention's semantics. (enable_gqa only
    permits Hkv < H; the mapping is repeat_kv's.) Differentiable in q, k, v
    when they are float64 CPU tensors that require grad."""
    visible = visible_keys(q, k, attn_mask, is_causal)
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.cpu().to(torch.float64)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key would be 0/0 = NaN; SDPA's math and efficient
    # backends return 0 for it, and so does this reference. Its scores are
    # set to 0 first, so that no NaN reaches the backward either: its
    # gradients come out exactly 0.
    empty = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    out = torch.softmax(scores, dim=-1) @ v
    return out.masked_fill(empty, 0.0)
'''

_REFERENCE_GRADIENTS = '''\
def reference_gradients(q, k, v, attn_mask, do, is_causal, scale, enable_gqa):
    """(dq, dk, dv) of reference_attention for the output gradient `do`,
    by float64 autograd on the CPU from the exact inputs. dk and dv are
    summed over the query heads that share a kv head."""
    q, k, v = (t.detach().to("cpu", torch.float64).requires_grad_()
               for t in (q, k, v))
    out = reference_attention(q, k, v, attn_mask, is_causal, scale,
                              enable_gqa)
    return torch.autograd.grad(out, (q, k, v), do.to("cpu", torch.float64))
'''

_NAN_ROWS = '''\
def rows_reading_nan(q, k, v, visible):
    """(B, H, Nq) bool: rows that read a NaN input: the query has a NaN and
    sees some key, or a key or value the row sees has a NaN. Such a row must
    come out NaN (NaN * 0 is NaN)."""
    q_nan = q.isnan().any(-1).cpu()
    kv_nan = (k.isnan().any(-1) | v.isnan().any(-1)).cpu()
    kv_nan = repeat_kv(kv_nan, q.shape[1])  # (B, H, Nk)
    sees_nan_kv = (visible & kv_nan[:, :, None, :]).any(-1)
    return (q_nan & visible.any(-1)) | sees_nan_kv
'''

_FINITE_ROWS = '''\
def rows_with_finite_inputs(q, k, v):
    """(B, H, Nq) bool: rows whose query and all keys and values (of its kv
    head, visible or not) are finite. Such a row must come out finite."""
    q_ok = torch.isfinite(q).all(-1).cpu()
    kv_ok = (torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)).cpu()
    kv_ok = repeat_kv(kv_ok, q.shape[1]).all(-1)  # (B, H)
    return q_ok & kv_ok[:, :, None]
'''

_REPORT = '''\
def show_row(observed, expected, at, width=2):
    """Observed and expected values at `at` and its neighbours in the row."""
    b, h, i = at[:3]
    d = at[3] if len(at) == 4 else width  # a row: its first dims
    lo, hi = max(0, d - width), min(observed.shape[-1], d + width + 1)
    print(f"output row (b={b}, h={h}, i={i}), dims {lo}..{hi - 1}:")
    print(f"{'d':>6} {'observed':>24} {'expected (float64)':>24}")
    for j in range(lo, hi):
        mark = "  <-" if len(at) == 4 and j == d else ""
        got, want = float(observed[b, h, i, j]), float(expected[b, h, i, j])
        print(f"{j:>6} {got!r:>24} {want!r:>24}{mark}")


def show_max_error(observed, expected):
    """The largest |observed - expected| over the output (NaN counts inf)."""
    error = (observed - expected).abs().nan_to_num(nan=math.inf)
    if error.numel():
        worst = tuple(int(i) for i in (error == error.max()).nonzero()[0])
        print(f"max |observed - expected| over the output: "
              f"{float(error.max())!r} at {worst}")
'''

#: The start of every value check: call, then compare.
_CALL_AND_COMPARE = '''\
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:
        print(f"the call raised {type(exc).__name__}: {exc}")
        print("not reproduced (an output was expected)")
        return 2
    observed = out.detach().to("cpu", torch.float64)
    expected = reference_attention(
        q, k, v, attn_mask, $call_args)
    if observed.shape != expected.shape:
        print(f"output shape {tuple(observed.shape)}, expected "
              f"{tuple(expected.shape)}")
        return 2
    if AT is not None:
        show_row(observed, expected, AT)
'''

_VERDICT = '''\
    print("bug reproduced" if bug else "not reproduced")
    return 1 if bug else 0
'''

_CHECKS = {
    "wrong": '''\
    show_max_error(observed, expected)
    error = abs(float(observed[AT]) - float(expected[AT]))
    print(f"at {AT}: |observed - expected| = {error!r}, allowed {ALLOWED!r}")
    print("(allowed: flashcheck's certified error bound at this element for "
          f"the precision model {MODEL!r})")
    worst = float((observed - expected).abs().nan_to_num(nan=math.inf).max())
    print(f"largest error anywhere {worst!r}; the largest bound anywhere "
          f"is {ALLOWED_MAX!r}")
    # A NaN error counts as the bug. Some kernels go wrong at different
    # elements from run to run, so an error above every element's bound
    # counts too.
    bug = not error <= ALLOWED or worst > ALLOWED_MAX
''',
    "non-finite": '''\
    show_max_error(observed, expected)
    bad = ~torch.isfinite(observed) & torch.isfinite(expected)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        print(f"{count} of {bad.numel()} output elements are NaN/Inf where "
              f"the float64 reference is finite; first at {first}")
    bug = count > 0
''',
    "nan-dropped": '''\
    visible = visible_keys(q, k, attn_mask, $is_causal)
    must_be_nan = rows_reading_nan(q, k, v, visible)
    dropped = must_be_nan & torch.isfinite(observed).all(-1)
    count = int(dropped.sum())
    print(f"{int(must_be_nan.sum())} rows read a NaN input; {count} of them "
          "have a finite output")
    if count:
        first = tuple(int(i) for i in dropped.nonzero()[0])
        print(f"first such row (b, h, i): {first}")
    bug = count > 0
''',
    "nan-leak": '''\
    clean = rows_with_finite_inputs(q, k, v)
    leaked = clean & ~torch.isfinite(observed).all(-1)
    count = int(leaked.sum())
    print(f"{int(clean.sum())} rows have only finite inputs; {count} of them "
          "have a NaN/Inf in the output")
    if count:
        first = tuple(int(i) for i in leaked.nonzero()[0])
        print(f"first such row (b, h, i): {first}")
    bug = count > 0
''',
}

_CHECK_RAISES = '''\
def check(q, k, v, attn_mask):
    """The failure was the call raising$what.
    Does it raise again?"""
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()  # CUDA errors surface asynchronously
    except Exception as exc:
        print(f"the call raised {type(exc).__name__}: {exc}")
$declined        print("bug reproduced")
        return 1
    print("the call returned normally")
    show_max_error(out.detach().to("cpu", torch.float64), reference_attention(
        q, k, v, attn_mask, $call_args))
    print("not reproduced")
    return 0
'''

#: An SDPA backend that does not support a case (on this device) says so.
_SDPA_DECLINED = '''\
        declined = ("No available kernel", "No viable backend")
        if any(text in str(exc) for text in declined):
            print("not reproduced: the backend declines this case here")
            return 2
'''

_CHECK_CRASH = '''\
def check(q, k, v, attn_mask):
    """The failure was the process dying (a segfault, an abort, a fatal CUDA
    error). If this process is killed by a signal (exit status 128 + N in a
    shell, -N from subprocess), the bug reproduced."""
    print("calling; if the process dies now, the bug reproduced", flush=True)
    out = run_kernel(q, k, v, attn_mask)
    if out.is_cuda:
        torch.cuda.synchronize()  # CUDA errors surface asynchronously
    print("the call returned normally")
    print("not reproduced")
    return 0
'''

_CHECK_HANG = '''\
def check(q, k, v, attn_mask):
    """The failure was a call that never returned. A watchdog prints the
    stack and ends the process with status 1 (bug reproduced) if the call
    has not returned after HANG_TIMEOUT_S seconds."""
    print(f"calling; no return within {HANG_TIMEOUT_S} s means bug reproduced "
          "(the watchdog then exits with status 1)", flush=True)
    faulthandler.dump_traceback_later(HANG_TIMEOUT_S, exit=True)
    out = run_kernel(q, k, v, attn_mask)
    if out.is_cuda:
        torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    print("the call returned normally")
    print("not reproduced")
    return 0
'''


_GRAD_REPORT = '''\
def run_backward(q, k, v, attn_mask, do):
    """The failing call with q, k, v requiring grad, then its backward:
    torch.autograd.grad(out, (q, k, v), do). Returns ((dq, dk, dv), None),
    or (None, what raised: "the call" or "the backward")."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    what = "the call"
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()  # CUDA errors surface asynchronously
        what = "the backward"
        grads = torch.autograd.grad(out, (q, k, v), do)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:
        print(f"{what} raised {type(exc).__name__}: {exc}")
        return None, what
    return grads, None


def far_from_overflow(expected, dtype):
    """Elements whose expected value is finite and at most half the largest
    value of `dtype`. flashcheck does not judge elements whose certified
    bound allows overflow; this stands in for its rule."""
    return expected.abs() <= torch.finfo(dtype).max / 2


def largest_error(name, observed, expected, judged):
    """The largest |observed - expected| of gradient `name` over the
    elements in `judged` (NaN counts inf), printed and returned."""
    error = (observed - expected).abs().nan_to_num(nan=math.inf)
    error = torch.where(judged, error, 0.0)
    if not error.numel():
        return 0.0
    worst = float(error.max())
    at = tuple(int(i) for i in (error == worst).nonzero()[0])
    print(f"max |observed - expected| over {name}: {worst!r} at {at}")
    return worst
'''

_GRAD_ROW = '''\
def show_gradient_row(observed, expected, at, width=2):
    """Observed and expected GRADIENT at `at` and its neighbours."""
    b, h, i, d = at
    lo, hi = max(0, d - width), min(observed.shape[-1], d + width + 1)
    print(f"{GRADIENT} $row_label,",
          f"dims {lo}..{hi - 1}:")
    print(f"{'d':>6} {'observed':>24} {'expected (float64)':>24}")
    for j in range(lo, hi):
        mark = "  <-" if j == d else ""
        got, want = float(observed[b, h, i, j]), float(expected[b, h, i, j])
        print(f"{j:>6} {got!r:>24} {want!r:>24}{mark}")
'''

#: The start of every gradient value check: call, backward, compare.
_BACKWARD_AND_COMPARE = '''\
    grads, raised = run_backward(q, k, v, attn_mask, do)
    if raised:
        print("not reproduced (gradients were expected)")
        return 2
    index = ("dq", "dk", "dv").index(GRADIENT)
    dtype = grads[index].dtype
    observed = grads[index].detach().to("cpu", torch.float64)
    expected = reference_gradients(
        q, k, v, attn_mask, do,
        $call_args)[index]
    if observed.shape != expected.shape:
        print(f"{GRADIENT} shape {tuple(observed.shape)}, expected "
              f"{tuple(expected.shape)}")
        return 2
    show_gradient_row(observed, expected, AT)
    judged = far_from_overflow(expected, dtype)
'''

_GRAD_CHECKS = {
    "grad-wrong": '''\
    worst = largest_error(GRADIENT, observed, expected, judged)
    error = abs(float(observed[AT]) - float(expected[AT]))
    print(f"at {AT}: |observed - expected| = {error!r}, allowed {ALLOWED!r}")
    print("(allowed: flashcheck's certified error bound at this element for "
          f"the precision model {MODEL!r})")
    print(f"largest error anywhere in {GRADIENT} {worst!r}; the largest "
          f"bound anywhere is {ALLOWED_MAX!r}")
    # A NaN error counts as the bug. Some kernels go wrong at different
    # elements from run to run, so an error above every element's bound
    # counts too (away from overflow, where no bound holds).
    bug = not error <= ALLOWED or worst > ALLOWED_MAX
''',
    "grad-non-finite": '''\
    largest_error(GRADIENT, observed, expected, judged)
    bad = ~torch.isfinite(observed) & judged
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        print(f"{count} of {bad.numel()} {GRADIENT} elements are NaN/Inf "
              "where the float64 reference is finite (and far from "
              f"overflow); first at {first}")
    bug = count > 0
''',
}

_CHECK_GRAD_RAISES = '''\
def check(q, k, v, attn_mask, do):
    """The failure was the backward raising. Does it raise again?"""
    grads, raised = run_backward(q, k, v, attn_mask, do)
    if raised == "the backward":
        print("bug reproduced")
        return 1
    if raised:
        print("not reproduced (the failure was in the backward, but the "
              "call itself raised)")
        return 2
    print("the backward returned normally")
    expected = reference_gradients(
        q, k, v, attn_mask, do,
        $call_args)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        if got.shape == want.shape:
            largest_error(name, got.detach().to("cpu", torch.float64), want,
                          far_from_overflow(want, got.dtype))
    print("not reproduced")
    return 0
'''


def _grad_check_section(case: Case, failure: dict) -> tuple[str, list[str]]:
    """(the check of a gradient failure and its helpers, constants)."""
    cls = failure["class"]
    subs = {"call_args": _call_args(case)}
    if cls == "grad-raised":
        return _join(_GRAD_REPORT, Template(_CHECK_GRAD_RAISES).substitute(subs)), []
    name = failure["gradient"]
    # dq's index names a query row; dk's and dv's a key row of a kv head.
    row = "of query (b={b}, h={h}, i={i})" if name == "dq" else "of key (b={b}, kv_head={h}, j={i})"
    report = _join(_GRAD_REPORT, Template(_GRAD_ROW).substitute(row_label=row))
    doc = textwrap.fill(f"Run the call and its backward; the bug shows if {FAILURE_CLASSES[cls]}.", _WIDTH - 7,
                        initial_indent='    """', subsequent_indent="    ")
    code = (f'def check(q, k, v, attn_mask, do):\n{doc}"""\n'
            + Template(_BACKWARD_AND_COMPARE).substitute(subs) + _GRAD_CHECKS[cls] + _VERDICT)
    constants = [f"GRADIENT = {_quote(name)}  # the failing gradient"]
    if cls == "grad-wrong":
        constants += [
            f"ALLOWED = {failure['allowed']!r}  # |observed - expected| allowed at AT",
            f"ALLOWED_MAX = {failure['allowed_max']!r}  # the largest error allowed in {name}",
            f"MODEL = {failure['model']!r}  # the precision model the bound is for",
        ]
    return _join(report, code), constants


def _check_section(case: Case, failure: dict, sdpa: bool) -> tuple[str, str, list[str]]:
    """(the check and its helpers, constants, extra imports). ``sdpa``: the
    target is an SDPA backend, which raises when it declines a case."""
    cls = failure["class"]
    subs = {"call_args": _call_args(case), "is_causal": str(case.is_causal)}
    if cls in _GRAD_CLASSES:
        code, constants = _grad_check_section(case, failure)
        return code, "\n".join(constants), []
    if cls in _VALUE_CLASSES:
        helpers = {"nan-dropped": _NAN_ROWS, "nan-leak": _FINITE_ROWS}.get(cls, "")
        doc = textwrap.fill(f"Run the call; the bug shows if {FAILURE_CLASSES[cls]}.", _WIDTH - 7,
                            initial_indent='    """', subsequent_indent="    ")
        code = (
            f'def check(q, k, v, attn_mask):\n{doc}"""\n'
            + Template(_CALL_AND_COMPARE).substitute(subs)
            + Template(_CHECKS[cls]).substitute(subs) + _VERDICT
        )
        code = _join(_REPORT, helpers, code)
    elif cls in ("raised", "fault"):
        what = "" if cls == "raised" else " (a fault, e.g. an illegal address)"
        code = _join(_REPORT, Template(_CHECK_RAISES).substitute(subs, what=what, declined=_SDPA_DECLINED * sdpa))
    elif cls == "crash":
        code = _CHECK_CRASH
    else:
        code = _CHECK_HANG
    constants = []
    if cls == "wrong":
        constants = [
            f"ALLOWED = {failure['allowed']!r}  # |observed - expected| allowed at AT",
            f"ALLOWED_MAX = {failure['allowed_max']!r}  # the largest error allowed anywhere",
            f"MODEL = {failure['model']!r}  # the precision model the bound is for",
        ]
    if cls == "hang":
        constants = [f"HANG_TIMEOUT_S = {HANG_TIMEOUT_S}  # raise it for very large cases"]
    return code, "\n".join(constants), ["import faulthandler"] if cls == "hang" else []


_MAIN = '''\
def print_versions(device):
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    if torch.device(device).type == "cuda":
        print(f"device {device}: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device {device}: {platform.processor() or platform.machine()}")


def dump(path, **tensors):
    """Save each tensor's raw bit patterns and strides to `path` (.npz)."""
    import numpy as np

    arrays = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype.is_floating_point:
            int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}
            t = t.view(int_dtype[t.element_size()])
        arrays[name] = t.cpu().contiguous().numpy()
        arrays[name + "_strides"] = np.array(t.stride())
    np.savez(path, **arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument("--dump", metavar="PATH",
                        help="save the inputs (bits, strides) to PATH; stop")
    args = parser.parse_args()
    print_versions(args.device)
    print("case:", CASE)
    $names = make_inputs(args.device)
    if args.dump:
        dump(args.dump, $dumped)
        return 0
    return check($names)
'''

#: The script: sections separated by two blank lines (`_join`).
_SCRIPT = Template('''\
$docstring

$imports

$constants


# -- inputs: the exact bits of the failing run --


$inputs


# -- the call under test --


$kernel


# -- expected values: float64 attention on the same inputs --


$reference


# -- does the bug show? --


$check


$main$data


if __name__ == "__main__":
    sys.exit(main())
''')


def _join(*blocks: str) -> str:
    """Top-level blocks of code, two blank lines apart."""
    return "\n\n\n".join(b.strip("\n") for b in blocks if b.strip())


def _rule(match) -> str:
    head = f"# -- {match.group(1)} "
    return head + "-" * max(3, _WIDTH - len(head))


_SECTION_RULE = re.compile(r"^# -- (.*?) -+$", re.MULTILINE)


def script_text(case: Case, target: str, failure: dict, *, device: str, meta: dict | None = None,
                inline: bool | None = None) -> str:
    """The text of repro.py (see `write_repro`). ``inline``: write the inputs
    into the script (default: when they have at most `INLINE_LIMIT`
    elements); otherwise it reads them from inputs.npz beside it."""
    if not isinstance(case, Case):
        raise ValueError(f"case must be a flashcheck Case, got {type(case).__name__}")
    _check_target(target)
    failure = _check_failure(case, failure)
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty string such as 'cuda', got {device!r}")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict or None, got {type(meta).__name__}")
    if case.attn_mask is not None and case.attn_mask.dtype != bool and case.attn_mask.dtype.name not in _FORMATS:
        raise ValueError(f"attn_mask dtype {case.attn_mask.dtype} is neither bool nor a float format")
    grad = failure["class"] in _GRAD_CLASSES
    if inline is None:
        inline = _num_elements(case, grad) <= INLINE_LIMIT
    inputs, data, input_imports = _inputs_section(case, inline, grad)
    kernel, kernel_imports = _kernel_section(case, target)
    check, constants, check_imports = _check_section(case, failure, target in _SDPA)
    std = {"import argparse", "import math", "import platform", "import sys", *check_imports,
           *(i for i in input_imports if not i.startswith("import numpy"))}
    # torch, numpy, and the package of the kernel under test.
    third = {"import torch", *(i for i in input_imports if i.startswith("import numpy")), *kernel_imports}
    imports = "\n".join(_sorted_imports(std)) + "\n\n" + "\n".join(_sorted_imports(third))
    data = _join("# -- data --", data) if data else ""
    names = _input_names(grad)
    at = failure["at"]
    if grad and at is not None:
        at_note = f"failing element of {failure['gradient']} {_GRADIENTS[failure['gradient']][1]}"
    else:
        at_note = ("no single failing element" if at is None else
                   "failing output element (b, h, i, d)" if len(at) == 4 else "failing output row (b, h, i)")
    constants = "\n".join([
        f"DEVICE = {_str_literal(device, 9)}  # where it was found; --device overrides it",
        f"CASE = {_str_literal(describe_case(case), 0)}",
        f"AT = {at!r}  # {at_note}",
        *([constants] if constants else []),
    ])
    text = _SCRIPT.substitute(
        docstring=_docstring(case, target, failure, device, meta, inline),
        imports=imports,
        constants=constants,
        inputs=_join(_LAYOUTS[case.layout], inputs),
        kernel=_join(kernel),
        reference=_join(_REFERENCE, _REFERENCE_GRADIENTS if grad else ""),
        check=_join(check),
        main=_join(Template(_MAIN).substitute(names=names, dumped=", ".join(f"{n}={n}" for n in names.split(", ")))),
        data=("\n\n\n" + data) if data else "",
    )
    text = _SECTION_RULE.sub(_rule, text)
    compile(text, "repro.py", "exec")  # a generator bug fails here, not in the user's hands
    return text


def _sorted_imports(lines) -> list[str]:
    """isort's order: ``import x`` lines first, then ``from x import y``, by module."""
    return sorted(lines, key=lambda line: (line.startswith("from "), line.split()[1].lower(), line))


def _num_elements(case: Case, grad: bool) -> int:
    n = sum(arr.size for _, arr in _tensors(case, grad))
    return n + (case.attn_mask.size if case.attn_mask is not None else 0)


def write_repro(directory, case: Case, target: str, failure: dict, *, device: str,
                meta: dict | None = None) -> Path:
    """Write a standalone reproducer of ``failure`` of ``target`` on ``case``.

    Creates ``directory`` with ``case.npz`` (`Case.save`), ``repro.py`` (torch
    only, no flashcheck, except for the ``triton`` target) and, when the
    inputs have more than `INLINE_LIMIT` elements, ``inputs.npz`` (their raw
    bit patterns). Returns the path of ``repro.py``.

    ``target``: ``sdpa-math|flash|efficient|cudnn``, ``flex``,
    ``compiled-math``, ``triton``, ``flash-attn`` or ``MODULE:FUNCTION``.
    ``failure``: ``class`` (one of `FAILURE_CLASSES`), ``reason``,
    ``signature``, ``at`` ((b, h, i, d) or None; nan-dropped and nan-leak
    also take a row (b, h, i)), ``allowed`` (the bound at ``at``, required for
    "wrong"), ``allowed_max`` (the largest bound anywhere; ``allowed`` when
    absent), ``model`` (its precision model), ``features`` (short strings).
    A gradient failure (grad-wrong, grad-non-finite, grad-raised) needs
    ``case.do``, the output gradient; grad-wrong and grad-non-finite also
    ``gradient`` ("dq", "dk" or "dv") and ``at``, the failing element of that
    gradient ((b, kv_head, j, d) for dk and dv); grad-wrong also ``allowed``
    (and ``allowed_max``, the largest finite bound over that gradient).
    ``device``: where the failure was found (the script's default device).
    ``meta``: where it was found (torch, GPU, ...), shown as "found on".
    Raises ValueError naming what is wrong with the arguments.
    """
    text = script_text(case, target, failure, device=device, meta=meta)  # validates the arguments
    grad = failure["class"] in _GRAD_CLASSES
    inline = _num_elements(case, grad) <= INLINE_LIMIT
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    case.save(directory / "case.npz")
    npz = directory / "inputs.npz"
    if inline:
        npz.unlink(missing_ok=True)  # a stale one from an earlier write
    else:
        np.savez_compressed(npz, **_npz_arrays(case, grad))
    script = directory / "repro.py"
    script.write_text(text, encoding="utf-8")
    return script
