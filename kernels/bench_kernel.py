"""Throughput of the Triton flash-attention kernel next to torch SDPA.

Times forward and backward with ``triton.testing.do_bench`` (median) for
the kernel and SDPA's flash and cuDNN backends, in one process on one GPU.
FLOPs: 4·B·H·N²·D for the forward (two matrix products), halved when
causal; the backward counts 2.5 times the forward (five products, the
FlashAttention-2 convention).

Run ``python -m flashcheck.kernels.bench_kernel`` or ``python -m flashcheck bench kernel``
(CUDA); ``--quick`` for a smaller grid, ``--json PATH`` to keep every
number. ``--smoke`` runs one tiny case instead, on the CPU under Triton's
interpreter when there is no GPU (``TRITON_INTERPRET=1``): it checks the
plumbing, its timings mean nothing.

This module imports nothing from `flashcheck.verify`: the harness registers
`main` as the ``kernel`` benchmark (`flashcheck.verify.bench`), not the
other way round.

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


def _median_ms(fn, warmup, rep, device):
    """Median milliseconds of ``fn()``: triton's do_bench (CUDA events) on a
    GPU; on the CPU (the interpreter) ``rep`` wall-clock calls."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    import statistics
    import time

    times = []
    for _ in range(max(1, rep)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_case(impl, B, H, N, D, causal, dtype, mode, warmup=25, rep=100, device="cuda", **kernel_kwargs):
    """Median milliseconds and TFLOP/s of one configuration, or an error
    string when the implementation refuses it (e.g. no cuDNN support).
    ``device="cpu"`` times ``rep`` plain calls (the Triton kernel under the
    interpreter): a smoke test, not a measurement."""
    import torch

    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    fn = _impl_fn(impl, **kernel_kwargs)
    gen = torch.Generator(device=device).manual_seed(0)
    need_grad = mode == "bwd"
    q, k, v = (torch.randn((B, H, N, D), device=device, dtype=dtype, generator=gen).requires_grad_(need_grad)
               for _ in range(3))
    try:
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, causal)
                ms = _median_ms(lambda: fn(q, k, v, causal), warmup, rep, device)
        else:
            o = fn(q, k, v, causal)
            do = torch.randn_like(o)

            def step():
                q.grad = k.grad = v.grad = None
                o.backward(do, retain_graph=True)

            step()
            ms = _median_ms(step, warmup, rep, device)
    except (RuntimeError, ValueError) as exc:  # an SDPA backend that refuses the case
        return {"error": str(exc).splitlines()[0][:120]}
    return {"ms": ms, "tflops": flops(B, H, N, D, causal, mode) / ms * 1e-9}


def run_grid(B=4, H=32, Ds=(64, 128), Ns=(1024, 4096, 8192), dtypes=("fp16", "bf16"),
             modes=("fwd", "bwd"), causals=(False, True), impls=IMPLS, log=print, **case_kwargs):
    """Every combination; returns a list of result rows (dicts).
    ``case_kwargs`` (warmup, rep, device) go to `bench_case`."""
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
                            row[impl] = bench_case(impl, B, H, N, D, causal, tdt[dtype], mode, **case_kwargs)
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
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny case (B=1, H=2, N=32, D=16, fp16), run once; on the CPU under "
                             "TRITON_INTERPRET=1 when there is no GPU (checks the plumbing only)")
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args(argv)
    import os

    import torch

    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_kernel --smoke without a GPU needs TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                  file=sys.stderr)
            return 2
        kw = {"B": 1, "H": 2, "Ds": (16,), "Ns": (32,), "dtypes": ("fp16",), "warmup": 0, "rep": 1,
              "device": device}
    elif not torch.cuda.is_available():
        print("bench_kernel needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    else:
        kw = {"Ns": (4096,), "dtypes": ("bf16",)} if args.quick else {}
    rows = run_grid(**kw)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(format_table(rows))
    failed = [r["triton"] for r in rows if "tflops" not in r.get("triton", {})]
    if args.smoke and failed:  # a smoke run exists to show the kernel runs
        print(f"the Triton kernel failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
