"""Attention masks built in NumPy: explicit boolean and additive masks of
every broadcast shape, for the `masks` strategy.

>>> m, tags = mask_array(dict(B=1, H=2, Hkv=2, Nq=3, Nk=4, D=8, Dv=8), "fp16", "fully-masked-rows", "Nq,Nk", 0)
>>> m.shape, tags["fully_masked_rows"] >= 1
((3, 4), True)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flashcheck.kernels.precision import from_float64, to_float64
from flashcheck.properties.validation import check_shape, input_format

__all__ = ["EXPLICIT_KINDS", "MASK_KINDS", "MASK_SHAPES", "Mask", "full_view", "mask_array", "mask_shapes"]

#: Mask kinds drawn by the `masks` strategy.
MASK_KINDS = ("none", "causal", "bool-random", "additive", "sliding-window", "fully-masked-rows")

#: Kinds that are an ``attn_mask`` array (the others are None or ``is_causal``).
EXPLICIT_KINDS = ("bool-random", "additive", "sliding-window", "fully-masked-rows")

#: Broadcast shapes of an explicit mask, by name.
MASK_SHAPES = ("Nq,Nk", "1,1,Nq,Nk", "1,H,Nq,Nk", "B,1,Nq,Nk", "B,H,Nq,Nk", "B,1,1,Nk")


def mask_shapes(kind: str) -> tuple:
    """The broadcast shapes (`MASK_SHAPES`) an explicit mask of ``kind`` comes
    in: the banded and row-killing kinds need their own (Nq, Nk) plane."""
    if kind in ("sliding-window", "fully-masked-rows"):
        return tuple(m for m in MASK_SHAPES if m.endswith("Nq,Nk"))
    return MASK_SHAPES


def mask_array(shape: dict, dtype, kind: str, mask_shape: str, seed: int):
    """The ``attn_mask`` array of an explicit ``kind`` (`EXPLICIT_KINDS`) in
    broadcast shape ``mask_shape`` (`MASK_SHAPES`), built from ``seed``, and
    its tags (always ``fully_masked_rows``: the count of (b, h, i) rows with
    no visible key). Additive masks are stored in the input ``dtype``."""
    shape = check_shape(shape)
    fmt = input_format(dtype)
    if kind not in EXPLICIT_KINDS:
        raise ValueError(f"mask kind {kind!r} has no explicit mask; expected one of {EXPLICIT_KINDS}")
    if mask_shape not in MASK_SHAPES:
        raise ValueError(f"unknown mask shape {mask_shape!r}; expected one of {MASK_SHAPES}")
    if mask_shape not in mask_shapes(kind):
        raise ValueError(f"a {kind!r} mask needs one of the shapes {mask_shapes(kind)}, got {mask_shape!r}")
    return _build_mask(shape, fmt, kind, mask_shape, seed)


def _mask_dims(name, shape):
    table = {"Nq": shape["Nq"], "Nk": shape["Nk"], "B": shape["B"], "H": shape["H"], "1": 1}
    return tuple(table[part] for part in name.split(","))


def full_view(mask, shape):
    """Mask broadcast to (B, H, Nq, Nk), True where a key is visible."""
    visible = mask if mask.dtype == np.bool_ else to_float64(mask) != -np.inf
    return np.broadcast_to(visible, (shape["B"], shape["H"], shape["Nq"], shape["Nk"]))


def _build_mask(shape, fmt, kind, mask_shape, seed):
    rng = np.random.default_rng(seed)
    dims = _mask_dims(mask_shape, shape)
    Nq, Nk = shape["Nq"], shape["Nk"]
    tags = {}
    if kind == "bool-random":
        mask = rng.random(dims) < rng.uniform(0.05, 0.95)
    elif kind == "additive":
        mask = _additive(rng, dims, fmt)
    elif kind == "sliding-window":
        left, right = int(rng.integers(0, Nk + 1)), int(rng.integers(0, Nk + 1)) * int(rng.integers(2))
        align = str(rng.choice(["top-left", "bottom-right"]))
        centre = np.arange(Nq)[:, None] + (0 if align == "top-left" else Nk - Nq)
        j = np.arange(Nk)[None, :]
        band = (j >= centre - left) & (j <= centre + right)
        mask = np.broadcast_to(band, dims).copy()
        tags["window"] = (left, right, align)
    elif kind == "fully-masked-rows":
        additive = bool(rng.integers(2))
        mask = _additive(rng, dims, fmt) if additive else rng.random(dims) < rng.uniform(0.5, 0.95)
        rows = mask.reshape(-1, Nk)  # every mask shape of this kind ends in (Nq, Nk)
        count = int(rng.integers(1, max(1, rows.shape[0] // 2) + 1))
        picked = rng.choice(rows.shape[0], count, replace=False)
        rows[picked] = from_float64(np.full(Nk, -np.inf), fmt) if additive else False
    else:
        raise ValueError(f"mask kind {kind!r} has no explicit mask")
    tags["fully_masked_rows"] = int((~full_view(mask, shape).any(axis=-1)).sum())
    return mask, tags


def _additive(rng, dims, fmt):
    """Finite offsets with -inf entries, stored in the input dtype."""
    values = rng.standard_normal(dims) * float(rng.choice([1.0, 4.0, 16.0]))
    values[rng.random(dims) < rng.uniform(0.0, 0.5)] = -np.inf
    return from_float64(values, fmt)


class Mask(NamedTuple):
    """What `masks` draws: the ``attn_mask`` array (or None), ``is_causal``,
    the kind's name, and tags (always ``fully_masked_rows``, a count of
    (b, h, i) rows with no visible key)."""

    attn_mask: np.ndarray | None
    is_causal: bool
    kind: str
    tags: dict
