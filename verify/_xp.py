"""One array vocabulary for NumPy arrays and torch tensors.

The oracle's float64 pass and the error bounds are written once, against
the namespace `namespace(x)` returns: ``numpy`` semantics on host arrays, the
same calls on torch float64 tensors (on the CPU or a GPU). Only what the
two disagree on is wrapped here: reductions (torch's ``max`` returns
indices too), scalar operands of ``maximum``/``minimum``, reversed views
(torch has no negative strides), cumulative max, array creation (device
and dtype follow a reference tensor: ``zeros``, ``full``, ``asarray``,
``arange``), ``copy``/``ascontiguousarray`` (torch's ``clone``/``contiguous``)
and ``errstate`` (torch never warns).

Everything else (``exp``, ``expm1``, ``log``, ``sqrt``, ``abs``,
``where``, ``isfinite``, ``einsum``, ``matmul``, ``concatenate``,
``broadcast_to``, ``swapaxes``, ...) is the library's own function under
its NumPy name.

>>> import numpy as np
>>> xp = namespace(np.zeros(3))
>>> xp.amax(np.array([[1.0, 3.0]]), axis=-1, keepdims=True).tolist()
[[3.0]]
>>> xp.cummax(np.array([1.0, 0.0, 2.0]), axis=-1).tolist()
[1.0, 1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

__all__ = ["NUMPY", "is_torch", "namespace", "to_numpy"]


def is_torch(x) -> bool:
    """True for a torch tensor (without importing torch when it is not loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x):
    """A host NumPy array of ``x`` (a NumPy array is returned as it is)."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return x


class _NumpyNamespace:
    """NumPy, plus the few helpers the torch namespace needs under one name."""

    inf = np.inf
    float64 = np.float64
    bool_ = np.bool_
    errstate = staticmethod(np.errstate)

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def amax(x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def amin(x, axis=None, keepdims=False):
        return np.min(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cummax(x, axis=-1):
        return np.maximum.accumulate(x, axis=axis)

    @staticmethod
    def flip(x, axis=-1):
        return np.flip(x, axis=axis)

    @staticmethod
    def asarray(x, like=None, dtype=np.float64):
        return np.asarray(to_numpy(x), dtype=dtype)

    @staticmethod
    def zeros(shape, like=None, dtype=np.float64):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def full(shape, value, like=None, dtype=np.float64):
        return np.full(shape, value, dtype=dtype)

    @staticmethod
    def astype(x, dtype):
        return x.astype(dtype)

    @staticmethod
    def to_numpy(x):
        return x

    @staticmethod
    def device_of(x):
        return None

    @staticmethod
    def arange(start, stop, like=None):
        return np.arange(start, stop)


class _TorchNamespace:
    """torch under NumPy's names, for float64 tensors on one device."""

    inf = float("inf")
    errstate = staticmethod(lambda **_: contextlib.nullcontext())

    def __init__(self):
        import torch

        self._t = torch
        self.float64 = torch.float64
        self.bool_ = torch.bool

    def __getattr__(self, name):
        return getattr(self._t, name)

    def _tensor(self, x, like):
        if is_torch(x):
            return x
        return self._t.as_tensor(x, dtype=like.dtype if like.is_floating_point() else self._t.float64,
                                 device=like.device)

    def maximum(self, a, b, out=None):
        if not is_torch(a):
            a, b = b, a
        b = self._tensor(b, a)
        return self._t.maximum(a, b) if out is None else self._t.maximum(a, b, out=out)

    def minimum(self, a, b, out=None):
        if not is_torch(a):
            a, b = b, a
        b = self._tensor(b, a)
        return self._t.minimum(a, b) if out is None else self._t.minimum(a, b, out=out)

    def amax(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.amax(x)
        return self._t.amax(x, dim=axis, keepdim=keepdims)

    max = amax

    def amin(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.amin(x)
        return self._t.amin(x, dim=axis, keepdim=keepdims)

    min = amin

    def sum(self, x, axis=None, keepdims=False, dtype=None):
        if dtype is not None:
            x = x.to(dtype)
        if axis is None:
            return self._t.sum(x)
        return self._t.sum(x, dim=axis, keepdim=keepdims)

    def any(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.any(x)
        return self._t.any(x, dim=axis, keepdim=keepdims)

    def all(self, x, axis=None, keepdims=False):
        if axis is None:
            return self._t.all(x)
        return self._t.all(x, dim=axis, keepdim=keepdims)

    def cumsum(self, x, axis=-1):
        return self._t.cumsum(x, dim=axis)

    def cummax(self, x, axis=-1):
        return self._t.cummax(x, dim=axis).values

    def flip(self, x, axis=-1):
        return self._t.flip(x, dims=(axis,))

    def argmax(self, x, axis=None, keepdims=False):
        return self._t.argmax(x, dim=axis, keepdim=keepdims)

    def take_along_axis(self, x, idx, axis):
        return self._t.take_along_dim(x, idx, dim=axis)

    def asarray(self, x, like=None, dtype=None):
        dtype = self._t.float64 if dtype is None or dtype is np.float64 else dtype
        device = None if like is None else like.device
        if is_torch(x):
            return x.to(device=device or x.device, dtype=dtype)
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = np.array(x)
        return self._t.as_tensor(x, dtype=dtype, device=device)

    def zeros(self, shape, like=None, dtype=None):
        return self._t.zeros(shape, dtype=self._dtype(dtype), device=None if like is None else like.device)

    def zeros_like(self, x, dtype=None):
        return self._t.zeros_like(x, dtype=self._dtype(dtype) if dtype is not None else None)

    def full(self, shape, value, like=None, dtype=None):
        return self._t.full(shape, value, dtype=self._dtype(dtype), device=None if like is None else like.device)

    def _dtype(self, dtype):
        if dtype is None or dtype is np.float64 or dtype is float:
            return self._t.float64
        if dtype is bool or dtype is np.bool_:
            return self._t.bool
        return dtype

    def astype(self, x, dtype):
        return x.to(self._dtype(dtype))

    @staticmethod
    def to_numpy(x):
        return to_numpy(x)

    @staticmethod
    def device_of(x):
        return x.device

    def arange(self, start, stop, like=None):
        """Integers start..stop-1 (int64) on ``like``'s device."""
        return self._t.arange(start, stop, device=None if like is None else like.device)

    @staticmethod
    def copy(x):
        return x.clone()

    @staticmethod
    def ascontiguousarray(x):
        return x.contiguous()


NUMPY = _NumpyNamespace()
_TORCH = None


def namespace(*arrays):
    """The namespace of ``arrays``: torch's when any of them is a tensor
    (all tensors must then share one device), else NumPy's."""
    global _TORCH
    tensors = [a for a in arrays if is_torch(a)]
    if not tensors:
        return NUMPY
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"arrays on several devices {sorted(map(str, devices))}: move them to one device first")
    if _TORCH is None:
        _TORCH = _TorchNamespace()
    return _TORCH
