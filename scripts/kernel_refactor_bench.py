"""The Triton kernel before and after a refactor, timed side by side on one GPU.

Loads a saved copy of kernels/triton_flash.py (``--old FILE``, e.g. from
``git show REV:kernels/triton_flash.py``) next to the current one and times
forward and forward+backward of both with ``triton.testing.do_bench``
(median), interleaved A B A B so that the spread between two timings of the
same version shows the noise. Prints TFLOP/s and new/old time ratios.

    python scripts/kernel_refactor_bench.py --old /tmp/triton_flash_old.py
"""

import argparse
import importlib.util
import sys

import torch
import triton

from flashcheck.kernels import bench_kernel
from flashcheck.kernels import triton_flash as new


def load(path: str):
    spec = importlib.util.spec_from_file_location("flashcheck.kernels._triton_flash_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timer(module, B, H, N, D, dtype, causal, mode):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=mode == "fwd+bwd")
               for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        return module.attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        out = module.attention(q, k, v, is_causal=causal)
        out.backward(do)

    fn = fwd if mode == "fwd" else fwd_bwd
    return lambda: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a copy of kernels/triton_flash.py before the change")
    args = ap.parse_args()
    old = load(args.old)
    grid = [(dtype, N, D, causal, mode)
            for dtype in (torch.bfloat16, torch.float16) for N in (1024, 4096) for D in (64, 128)
            for causal in (False, True) for mode in ("fwd", "fwd+bwd")]
    print("| dtype | N | D | causal | pass | old TFLOP/s (a, b) | new TFLOP/s (a, b) | new/old time |")
    print("|---|--:|--:|---|---|--:|--:|--:|")
    ratios = []
    for dtype, N, D, causal, mode in grid:
        B, H = 16384 // N * 2, 16
        t_old, t_new = timer(old, B, H, N, D, dtype, causal, mode), timer(new, B, H, N, D, dtype, causal, mode)
        a_old, a_new, b_old, b_new = t_old(), t_new(), t_old(), t_new()
        f = bench_kernel.flops(B, H, N, D, causal, "fwd") / 1e9  # GFLOP, so GFLOP / ms = TFLOP/s
        if mode == "fwd+bwd":
            f += bench_kernel.flops(B, H, N, D, causal, "bwd") / 1e9
        ratio = (a_new + b_new) / (a_old + b_old)
        ratios.append(ratio)
        print(f"| {str(dtype)[6:]} | {N} | {D} | {causal} | {mode} | {f / a_old:.0f}, {f / b_old:.0f} | "
              f"{f / a_new:.0f}, {f / b_new:.0f} | {ratio:.3f} |", flush=True)
    ratios.sort()
    print(f"\nnew/old time over {len(ratios)} cells: min {ratios[0]:.3f}, median {ratios[len(ratios) // 2]:.3f}, "
          f"max {ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
