"""Argument checks shared by the case builders and the strategies.

One place for them, as Hypothesis keeps its own in one validation module:
every builder and strategy reports a bad argument in the same words, naming
the value, what was expected and how to fix it. Strategies raise
`hypothesis.errors.InvalidArgument`; the plain builders pass ``error=ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis.errors import InvalidArgument

from flashcheck.kernels.precision import format_of

__all__ = [
    "INPUT_DTYPES", "SHAPE_KEYS", "check_bool", "check_choices", "check_int", "check_range", "check_scale",
    "check_shape", "input_format",
]

SHAPE_KEYS = ("B", "H", "Hkv", "Nq", "Nk", "D", "Dv")
INPUT_DTYPES = ("fp16", "bf16", "fp32")

def check_int(name, value, *, min_value=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{name}={value!r} must be an integer, not {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise InvalidArgument(f"{name}={value!r} must be at least {min_value}")


def check_range(lo_name, lo, hi_name, hi, *, floor=1):
    check_int(lo_name, lo, min_value=floor)
    check_int(hi_name, hi, min_value=floor)
    if lo > hi:
        raise InvalidArgument(f"{lo_name}={lo} is larger than {hi_name}={hi}")


def check_choices(name, values, known):
    """``values`` as a tuple of members of ``known``; None means all."""
    if values is None:
        return tuple(known)
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise InvalidArgument(f"{name} must not be empty")
    for v in values:
        if v not in known:
            raise InvalidArgument(f"unknown {name} entry {v!r}; expected some of {tuple(known)}")
    return values


def input_format(dtype, *, error=ValueError):
    """Name of an input format with a storage dtype ("fp16", "bf16", "fp32")."""
    try:
        fmt = format_of(dtype)
    except (TypeError, ValueError) as exc:
        raise error(f"bad dtype {dtype!r}: {exc}") from None
    if fmt.name not in INPUT_DTYPES:
        raise error(f"dtype {fmt.name!r} is not an input format; expected one of {INPUT_DTYPES}")
    return fmt.name


def check_shape(shape, *, error=ValueError):
    """Validate a shape dict as `shapes` draws it; return it with Dv filled in."""
    if not isinstance(shape, dict):
        raise TypeError(f"shape must be a dict with keys {SHAPE_KEYS}, got {type(shape).__name__}")
    shape = dict(shape)
    shape.setdefault("Dv", shape.get("D"))
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise error(f"shape is missing {missing}; expected keys {SHAPE_KEYS}")
    for key in SHAPE_KEYS:
        value = shape[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise error(f"shape[{key!r}]={value!r} must be a positive integer")
        shape[key] = int(value)
    if shape["H"] % shape["Hkv"]:
        raise error(f"Hkv={shape['Hkv']} does not divide H={shape['H']}")
    return shape


def check_scale(scale, *, error=ValueError):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise error(f"scale={scale!r} must be a positive finite number")
    return scale


def check_bool(name, value):
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be a bool")
