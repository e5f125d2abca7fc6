"""One attention test case: exact low-precision inputs plus the options.

A case is what flows from a strategy to a target and the oracle. Its
tensors are NumPy arrays in the storage dtype the kernel sees (float16,
ml_dtypes.bfloat16 or float32); the oracle reads their exact values, and
`to_torch` hands the very same bits to a target in the requested layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashcheck.kernels.precision import format_of

__all__ = ["LAYOUTS", "Case", "numpy_to_torch"]

#: "contiguous": (B, H, N, D) row-major.
#: "bnhd": allocated as (B, N, H, D) and transposed, the layout of most models.
#: "strided": batch and head strides padded with unused memory.
LAYOUTS = ("contiguous", "bnhd", "strided")


#: Cases larger than this are saved uncompressed (`Case.save`).
_COMPRESS_MAX_BYTES = 4 << 20


@dataclass
class Case:
    """Inputs and options of one ``scaled_dot_product_attention`` call.

    Shapes: q (B, H, Nq, D); k, v (B, Hkv, Nk, D); attn_mask broadcastable
    to (B, H, Nq, Nk), bool (True attends) or additive in the input dtype.
    ``do`` is the output gradient for backward checks (same shape as q).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    attn_mask: np.ndarray | None = None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    layout: str = "contiguous"
    magnitude: str = "normal"
    mask_kind: str = "none"
    block_m: int | None = None
    block_n: int | None = None
    do: np.ndarray | None = None
    seed: int | None = None
    tags: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("q", "k", "v"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"Case.{name} must be a NumPy array, got {type(arr).__name__}")
            if arr.ndim != 4:
                raise ValueError(f"Case.{name} must have rank 4 (B, H, N, D), got shape {arr.shape}")
        if not (self.q.dtype == self.k.dtype == self.v.dtype):
            raise TypeError(f"q, k, v dtypes differ: {self.q.dtype}, {self.k.dtype}, {self.v.dtype}")
        format_of(self.q.dtype)
        if self.do is not None:
            want = self.q.shape[:3] + self.v.shape[-1:]
            if not isinstance(self.do, np.ndarray) or self.do.shape != want or self.do.dtype != self.q.dtype:
                raise ValueError(f"Case.do must be a NumPy array of the output's shape {want} and dtype "
                                 f"{self.q.dtype}, got {getattr(self.do, 'shape', type(self.do).__name__)} "
                                 f"{getattr(self.do, 'dtype', '')}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")

    # -- description -------------------------------------------------------
    @property
    def dtype(self) -> str:
        return format_of(self.q.dtype).name

    @property
    def shape(self) -> dict:
        B, H, Nq, D = self.q.shape
        return {"B": B, "H": H, "Hkv": self.k.shape[1], "Nq": Nq, "Nk": self.k.shape[2], "D": D}

    @property
    def case_id(self) -> str:
        """Content hash: equal inputs and options give equal ids."""
        h = hashlib.sha256()
        for arr in (self.q, self.k, self.v, self.attn_mask, self.do):
            if arr is not None:
                h.update(str(arr.dtype).encode() + str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps(self.options(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def options(self) -> dict:
        return {
            "is_causal": self.is_causal,
            "scale": self.scale,
            "enable_gqa": self.enable_gqa,
            "layout": self.layout,
            "block_m": self.block_m,
            "block_n": self.block_n,
        }

    def describe(self) -> dict:
        """Plain-JSON summary for a report row."""
        return {
            "case_id": self.case_id,
            "seed": self.seed,
            "dtype": self.dtype,
            **self.shape,
            **self.options(),
            "magnitude": self.magnitude,
            "mask_kind": self.mask_kind,
            "mask_dtype": None if self.attn_mask is None else str(self.attn_mask.dtype),
            **self.tags,
        }

    # -- conversion --------------------------------------------------------
    def to_torch(self, device="cpu", requires_grad: bool = False):
        """(q, k, v, attn_mask) as torch tensors on ``device`` with the same
        bits, laid out as ``self.layout`` says."""
        def convert(arr, grad):
            t = _apply_layout(numpy_to_torch(arr).to(device), self.layout)
            return t.requires_grad_(True) if grad else t

        q, k, v = (convert(a, requires_grad) for a in (self.q, self.k, self.v))
        mask = None
        if self.attn_mask is not None:
            mask = numpy_to_torch(self.attn_mask).to(device)
        return q, k, v, mask

    def do_torch(self, device="cpu"):
        """The output gradient ``do`` as a torch tensor on ``device`` with the
        same bits, in ``self.layout`` (None when the case has none)."""
        if self.do is None:
            return None
        return _apply_layout(numpy_to_torch(self.do).to(device), self.layout)

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    # -- persistence -------------------------------------------------------
    def save(self, path) -> Path:
        """Write the exact inputs and options to an ``.npz`` file."""
        path = Path(path)
        arrays = {"q": self.q, "k": self.k, "v": self.v}
        if self.attn_mask is not None:
            arrays["attn_mask"] = self.attn_mask
        if self.do is not None:
            arrays["do"] = self.do
        stored = {}
        for name, arr in arrays.items():
            if arr.dtype.name == "bfloat16":  # npz cannot store ml_dtypes: keep the bits
                stored[name + "__bf16bits"] = arr.view(np.uint16)
            else:
                stored[name] = arr
        meta = {k: v for k, v in self.describe().items()}
        meta.update(self.options(), magnitude=self.magnitude, mask_kind=self.mask_kind, tags=self.tags)
        stored["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        # Compressing a long-context case takes seconds (a 2**16-key case is
        # tens of MB of noise-like mantissas): store large cases as they are.
        big = sum(a.nbytes for a in stored.values()) > _COMPRESS_MAX_BYTES
        (np.savez if big else np.savez_compressed)(path, **stored)
        return path

    @classmethod
    def load(cls, path) -> Case:
        import ml_dtypes

        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            arrays = {}
            for name in data.files:
                if name.endswith("__bf16bits"):
                    arrays[name[: -len("__bf16bits")]] = data[name].view(ml_dtypes.bfloat16)
                elif name != "meta":
                    arrays[name] = data[name]
        return cls(
            q=arrays["q"], k=arrays["k"], v=arrays["v"],
            attn_mask=arrays.get("attn_mask"), do=arrays.get("do"),
            is_causal=meta["is_causal"], scale=meta["scale"], enable_gqa=meta["enable_gqa"],
            layout=meta["layout"], magnitude=meta["magnitude"], mask_kind=meta["mask_kind"],
            block_m=meta["block_m"], block_n=meta["block_n"], seed=meta.get("seed"),
            tags=meta.get("tags", {}),
        )


def numpy_to_torch(arr: np.ndarray):
    """A NumPy array of a storage dtype (ml_dtypes.bfloat16 included) as a
    torch tensor with the same bits (a copy)."""
    import torch

    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16).astype(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(np.ascontiguousarray(arr)).clone()


def _apply_layout(t, layout: str):
    """Same values, different memory layout."""
    import torch

    if layout == "contiguous":
        return t.contiguous()
    if layout == "bnhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        B, H, N, D = t.shape
        big = torch.empty((B + 1, H + 1, N, D + 3), dtype=t.dtype, device=t.device).fill_(float("nan"))
        view = big[1:, 1:, :, 3:]
        view.copy_(t)
        return view
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
