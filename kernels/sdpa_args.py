"""One validator for ``scaled_dot_product_attention``'s arguments.

The NumPy emulation (`flashcheck.kernels.numpy_attention`), the Triton
kernel (`flashcheck.kernels.triton_flash`) and the certified oracle
(`flashcheck.verify.oracle`) all take torch's SDPA arguments. They check
them here, so that one bad input gets one error message wherever it is
passed. `check_sdpa_args` reads only shapes and dtypes (never values), of
NumPy arrays and torch tensors alike, and returns the parsed sizes as an
`SdpaArgs`. The small ``check_*`` helpers are the checks that two of the
entry points share but not all three (finite values, mask values, flags).

Rules an entry point has alone stay in its module: the Triton kernel's
devices, maximum head dim and block sizes; the emulation's representability
in its precision model; the oracle's output gradient.

This module imports no torch: the NumPy emulation must work without it.

>>> import numpy as np
>>> a = check_sdpa_args(np.zeros((2, 4, 3, 8)), np.zeros((2, 2, 5, 8)), np.zeros((2, 2, 5, 6)),
...                     enable_gqa=True)
>>> (a.B, a.Hq, a.Hkv, a.Nq, a.Nk, a.D, a.Dv, a.groups, a.dtype)
(2, 4, 2, 3, 5, 8, 6, 2, 'fp64')
>>> check_sdpa_args(np.zeros((1, 3, 2, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)),
...                 enable_gqa=True)
Traceback (most recent call last):
...
ValueError: enable_gqa needs q's 3 heads to be a multiple of k and v's 2 heads; use a kv head count that divides it
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels.precision import format_of

__all__ = [
    "DtypeError",
    "SdpaArgs",
    "check_array",
    "check_bool",
    "check_finite",
    "check_float_dtype",
    "check_mask_values",
    "check_sdpa_args",
    "dtype_name",
    "is_array",
]

#: Format names and the dtype names users write for them.
_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


class DtypeError(TypeError, ValueError):
    """An argument of an unsupported dtype.

    A TypeError; also a ValueError because the NumPy emulation used to let
    `flashcheck.kernels.precision.format_of`'s ValueError through, and
    callers that catch that must keep working.
    """


@dataclass(frozen=True)
class SdpaArgs:
    """Validated SDPA arguments, sizes parsed.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); query head h
    reads kv head h // groups. ``dtype`` is q's format name ("fp16", "bf16",
    "fp32", "fp64"). ``scale`` is the softmax scale to use: the caller's, or
    the default 1/sqrt(D) (1.0 when D is 0). ``mask`` is None, "bool" or
    "additive"; ``mask_shape`` its shape (broadcastable to (B, Hq, Nq, Nk)).
    """

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    groups: int
    dtype: str
    is_causal: bool
    enable_gqa: bool
    scale: float
    mask: str | None
    mask_shape: tuple | None

    @property
    def target_shape(self) -> tuple:
        """(B, Hq, Nq, Nk): the shape the mask broadcasts to."""
        return (self.B, self.Hq, self.Nq, self.Nk)


# -- small shared checks -------------------------------------------------------


def is_array(x) -> bool:
    """True for a NumPy array or a torch tensor (duck-typed: no torch import)."""
    return isinstance(x, np.ndarray) or (hasattr(x, "detach") and hasattr(x, "dtype") and hasattr(x, "shape"))


def dtype_name(dtype) -> str:
    """"float16", "bfloat16", "bool" ... for NumPy and torch dtypes alike."""
    return str(dtype).removeprefix("torch.")


def check_array(x, name: str) -> None:
    """TypeError unless ``x`` is a NumPy array or torch tensor."""
    if not is_array(x):
        raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")


def check_float_dtype(x, name: str, formats=None) -> str:
    """The format name of ``x``'s dtype; `DtypeError` unless it is a floating
    format `format_of` knows (and, if given, one of ``formats``)."""
    try:
        fmt = format_of(x.dtype).name
    except (TypeError, ValueError):
        fmt = None
    if fmt is None or (formats is not None and fmt not in formats):
        allowed = formats if formats is not None else tuple(_DTYPE_NAMES)
        expected = ", ".join(_DTYPE_NAMES.get(f, f) for f in allowed)
        raise DtypeError(f"{name} has unsupported dtype {dtype_name(x.dtype)}; expected one of {expected}")
    return fmt


def check_bool(value, name: str) -> bool:
    """``value`` as a Python bool; TypeError unless it is a bool (or NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _first(bad: np.ndarray) -> tuple:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _what(x) -> str:
    return "NaN" if np.isnan(x) else ("+inf" if x > 0 else "-inf")


def check_finite(values: np.ndarray, name: str) -> None:
    """ValueError naming the first NaN or inf of the float64 ``values``."""
    bad = ~np.isfinite(values)
    if bad.any():
        idx = _first(bad)
        raise ValueError(f"{name} contains {_what(values[idx])} at index {idx}; {name} must be finite "
                         f"(remove or replace the non-finite values)")


def check_mask_values(values: np.ndarray, name: str = "attn_mask") -> None:
    """ValueError naming the first NaN or +inf of an additive mask's float64
    ``values``: finite values and -inf (which hides a key) are allowed."""
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        idx = _first(bad)
        raise ValueError(f"{name} contains {_what(values[idx])} at index {idx}; an additive mask may hold "
                         f"finite values and -inf (to hide a key) only")


def _check_scale(scale, D: int, positive: bool) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0  # torch's default, in float64
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or (positive and scale <= 0):
        want = "finite and positive" if positive else "finite"
        raise ValueError(f"scale must be {want}, got {scale}; pass None for the default 1/sqrt(D)")
    return scale


# -- the validator -------------------------------------------------------------


def check_sdpa_args(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    formats=None, one_dtype=True, allow_empty=False, positive_scale=True) -> SdpaArgs:
    """Check SDPA's arguments as torch does, on shapes and dtypes only.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): NumPy arrays or
    torch tensors of a floating dtype (one of ``formats``, format names, if
    given). ``attn_mask``: None, or bool or floating, of rank <= 4 and
    broadcastable to (B, Hq, Nq, Nk); not together with ``is_causal``.
    Hq != Hkv needs ``enable_gqa`` and Hkv dividing Hq.

    Options for what an entry point genuinely allows:
      one_dtype       q, k, v and a float mask share q's dtype (torch's rule;
                      the oracle, which reads exact values, passes False);
      allow_empty     sizes of 0 are allowed (the NumPy emulation);
      positive_scale  the scale must be > 0 (the kernels fold it into a
                      base-2 exponent; the oracle takes any finite scale).

    Raises TypeError (`DtypeError` for dtypes) or ValueError with a message
    naming the argument, what it is, and what is expected.
    """
    names = ("q", "k", "v")
    fmts = []
    for name, x in zip(names, (q, k, v)):
        check_array(x, name)
        fmts.append(check_float_dtype(x, name, formats))
    if one_dtype and not fmts[0] == fmts[1] == fmts[2]:
        got = ", ".join(dtype_name(x.dtype) for x in (q, k, v))
        raise TypeError(f"q, k, v must share one dtype, got {got}; cast them to one dtype")
    shapes = [tuple(int(s) for s in x.shape) for x in (q, k, v)]
    for name, shape in zip(names, shapes):
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {shape}")
    if not allow_empty:
        for name, shape in zip(names, shapes):
            if 0 in shape:
                raise ValueError(f"{name} is empty, shape {shape}: B, H, N and the head dim must all be >= 1")
    (B, Hq, Nq, D), (Bk, Hkv, Nk, Dk), (Bv, Hv, Nv, Dv) = shapes
    if not B == Bk == Bv:
        raise ValueError(f"batch sizes differ: q has {B}, k {Bk}, v {Bv}; q, k, v must share dim 0 (B)")
    if Dk != D:
        raise ValueError(f"head dims differ: q has D={D}, k has D={Dk}; q and k must share their last dim")
    if (Hv, Nv) != (Hkv, Nk):
        raise ValueError(f"k and v shapes differ: k {shapes[1]}, v {shapes[2]}; they must agree in heads "
                         f"and length (dims 1 and 2)")
    is_causal = check_bool(is_causal, "is_causal")
    enable_gqa = check_bool(enable_gqa, "enable_gqa")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"q has {Hq} heads but k and v have {Hkv}; pass enable_gqa=True for GQA/MQA")
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"enable_gqa needs q's {Hq} heads to be a multiple of k and v's {Hkv} heads; "
                             f"use a kv head count that divides it")
    groups = Hq // Hkv if Hkv else 1
    scale = _check_scale(scale, D, positive_scale)
    mask = mask_shape = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal=True are mutually exclusive (as in torch's SDPA); "
                             "pass one, or fold the causal mask into attn_mask")
        check_array(attn_mask, "attn_mask")
        mask, mask_shape = _check_mask(attn_mask, q, fmts[0], one_dtype, (B, Hq, Nq, Nk))
    return SdpaArgs(B, Hq, Hkv, Nq, Nk, D, Dv, groups, fmts[0], is_causal, enable_gqa, scale, mask, mask_shape)


def _check_mask(attn_mask, q, q_fmt, one_dtype, target):
    """("bool" or "additive", shape) of a mask; its dtype and shape checked."""
    text = dtype_name(attn_mask.dtype)
    if text == "bool":
        kind = "bool"
    else:
        try:
            fmt = format_of(attn_mask.dtype).name
        except (TypeError, ValueError):
            fmt = None
        if one_dtype and fmt != q_fmt:
            raise TypeError(f"attn_mask must be bool or the query dtype {dtype_name(q.dtype)} (an additive "
                            f"mask), got dtype {text}")
        if fmt is None:
            raise TypeError(f"attn_mask must be bool or floating point (an additive mask), got dtype {text}")
        kind = "additive"
    shape = tuple(int(s) for s in attn_mask.shape)
    fits = len(shape) <= 4
    if fits:
        try:
            fits = np.broadcast_shapes(shape, target) == target
        except ValueError:
            fits = False
    if not fits:
        rank = f"; it has rank {len(shape)}, at most 4 is allowed" if len(shape) > 4 else ""
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (B, H, Nq, Nk) = {target}{rank}")
    return kind, shape
