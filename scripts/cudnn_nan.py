"""Narrow down the cuDNN NaN the H100 campaign found: replay the saved case
with the harness's ``sdpa-cudnn`` target and change one thing at a time.

    python scripts/cudnn_nan.py CASE.npz
"""

import sys

import numpy as np

from flashcheck.kernels.precision import format_of, from_float64, to_float64
from flashcheck.properties.case import Case
from flashcheck.verify.targets import resolve_target

CUDNN = resolve_target("sdpa-cudnn")


def nans(case: Case) -> str:
    """NaN count of the cuDNN output for ``case`` on the GPU."""
    import torch

    try:
        out = CUDNN.run(case, "cuda").out
    except NotImplementedError as exc:
        return f"unsupported ({exc})"
    torch.cuda.synchronize()
    bad = out.isnan()
    rows = bad.any(-1)
    return f"NaN elements {int(bad.sum())}, NaN rows {int(rows.sum())} of {rows.numel()}"


def scaled(arr: np.ndarray, factor: float) -> np.ndarray:
    """``arr`` times ``factor``, rounded back to its format."""
    return from_float64(to_float64(arr) * factor, format_of(arr.dtype).name)


def main(path) -> None:
    case = Case.load(path)
    print(case.describe())
    print(f"as found (layout {case.layout}):", nans(case))
    flat = case.replace(layout="contiguous")
    print("contiguous copies:", nans(flat))
    if case.enable_gqa:
        rep = case.q.shape[1] // case.k.shape[1]
        expanded = flat.replace(k=np.repeat(case.k, rep, axis=1), v=np.repeat(case.v, rep, axis=1), enable_gqa=False)
        print("kv heads expanded (no GQA):", nans(expanded))
    print("not causal:", nans(flat.replace(is_causal=False)))
    tiny = format_of(case.q.dtype).tiny
    for name in ("q", "k", "v"):
        x = np.abs(to_float64(getattr(case, name)))
        print(f"{name}: subnormal fraction {float((x < tiny).mean()):.3f}, max |x| {float(x.max()):.3g}")
    big = {name: scaled(getattr(case, name), 2.0**14) for name in ("q", "k", "v")}
    print("inputs times 2**14 (no subnormals):", nans(flat.replace(**big)))
    print("q only scaled up:", nans(flat.replace(q=big["q"])))
    print("v only scaled up:", nans(flat.replace(v=big["v"])))


if __name__ == "__main__":
    main(sys.argv[1])
