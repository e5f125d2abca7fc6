"""Throughput of the Triton flash-attention kernel next to torch SDPA.

Times forward and backward with ``triton.testing.do_bench`` (median) for
the kernel and SDPA's flash and cuDNN backends, in one process on one GPU.
FLOPs: 4·B·H·N²·D for the forward (two matrix products), halved when
causal; the backward counts 2.5 times the forward (five products, the
FlashAttention-2 convention).

Run ``python -m flashcheck.kernels.bench_kernel`` or ``python -m flashcheck bench kernel``
(CUDA only); ``--quick`` for a smaller grid, ``--json PATH`` to keep every
number.

>>> forward_flops(1, 1, 2, 3, causal=False)
48.0
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["forward_flops", "flops", "bench_case", "run_grid", "format_table", "main"]

IMPLS = ("triton", "sdpa-flash", "sdpa-cudnn")


def forward_flops(B: int, H: int, N: int, D: int, causal: bool) -> float:
    """4·B·H·N²·D, halved for causal masking."""
    for name, value in (("B", B), ("H", H), ("N", N), ("D", D)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    f = 4.0 * B * H * N * N * D
    return f / 2 if causal else f


def flops(B, H, N, D, causal, mode):
    """FLOPs of one call: ``mode`` is "fwd" or "bwd" (2.5x the forward)."""
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    f = forward_flops(B, H, N, D, causal)
    return f * 2.5 if mode == "bwd" else f


def _sdpa_fn(backend):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def call(q, k, v, causal):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _impl_fn(impl, **kernel_kwargs):
    if impl == "triton":
        from flashcheck.kernels.triton_flash import attention

        return lambda q, k, v, causal: attention(q, k, v, is_causal=causal, **kernel_kwargs)
    if impl in ("sdpa-flash", "sdpa-cudnn"):
        return _sdpa_fn(impl)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def bench_case(impl, B, H, N, D, causal, dtype, mode, warmup=25, rep=100, **kernel_kwargs):
    """Median milliseconds and TFLOP/s of one configuration, or an error
    string when the implementation refuses it (e.g. no cuDNN support)."""
    import torch
    import triton

    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    fn = _impl_fn(impl, **kernel_kwargs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    need_grad = mode == "bwd"
    q, k, v = (torch.randn((B, H, N, D), device="cuda", dtype=dtype, generator=gen).requires_grad_(need_grad)
               for _ in range(3))
    try:
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, causal)
                ms = triton.testing.do_bench(lambda: fn(q, k, v, causal), warmup=warmup, rep=rep,
                                             return_mode="median")
        else:
            o = fn(q, k, v, causal)
            do = torch.randn_like(o)

            def step():
                q.grad = k.grad = v.grad = None
                o.backward(do, retain_graph=True)

            step()
            ms = triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    except (RuntimeError, ValueError) as exc:  # an SDPA backend that refuses the case
        return {"error": str(exc).splitlines()[0][:120]}
    return {"ms": ms, "tflops": flops(B, H, N, D, causal, mode) / ms * 1e-9}


def run_grid(B=4, H=32, Ds=(64, 128), Ns=(1024, 4096, 8192), dtypes=("fp16", "bf16"),
             modes=("fwd", "bwd"), causals=(False, True), impls=IMPLS, log=print):
    """Every combination; returns a list of result rows (dicts)."""
    import torch

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for mode in modes:
        for dtype in dtypes:
            for D in Ds:
                for causal in causals:
                    for N in Ns:
                        row = {"mode": mode, "dtype": dtype, "B": B, "H": H, "N": N, "D": D, "causal": causal}
                        for impl in impls:
                            row[impl] = bench_case(impl, B, H, N, D, causal, tdt[dtype], mode)
                        rows.append(row)
                        if log:
                            log(format_table([row], header=False))
    return rows


def format_table(rows, header=True):
    """Fixed-width text table, TFLOP/s per implementation and the ratio of
    the kernel to SDPA flash."""
    lines = []
    if header:
        lines.append(f"{'mode':4} {'dtype':5} {'D':>4} {'N':>5} {'causal':6} "
                     + " ".join(f"{i:>10}" for i in IMPLS) + f" {'tri/flash':>9}")
    for r in rows:
        cells = []
        for impl in IMPLS:
            res = r.get(impl, {})
            cells.append(f"{res['tflops']:10.1f}" if "tflops" in res else f"{'n/a':>10}")
        t, f = r.get("triton", {}), r.get("sdpa-flash", {})
        ratio = f"{t['tflops'] / f['tflops']:9.2f}" if "tflops" in t and "tflops" in f else f"{'n/a':>9}"
        lines.append(f"{r['mode']:4} {r['dtype']:5} {r['D']:4d} {r['N']:5d} {str(r['causal']):6} "
                     + " ".join(cells) + " " + ratio)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flashcheck.kernels.bench_kernel",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4096 only, bf16 only")
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    kw = {"Ns": (4096,), "dtypes": ("bf16",)} if args.quick else {}
    rows = run_grid(**kw)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(format_table(rows))
    return 0


try:  # ``python -m flashcheck bench kernel`` once flashcheck.verify.cli.BENCH_MODULES lists this module
    from flashcheck.verify.bench import register_bench
except ImportError:  # the harness is optional for the benchmark itself
    pass
else:
    register_bench("kernel", "TFLOP/s of the Triton kernel next to SDPA flash and cuDNN (CUDA)")(main)


if __name__ == "__main__":
    sys.exit(main())
