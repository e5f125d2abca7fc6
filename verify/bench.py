"""Benchmarks run by ``python -m flashcheck bench NAME``, and their registry.

A benchmark is a function ``fn(argv: list[str]) -> int`` (its own options
parsed from ``argv``; return an exit status) registered under a name:

    @register_bench("kernel", "throughput of the Triton kernel")
    def bench_kernel(argv):
        ...

The CLI lists every registered name under ``bench``.

>>> sorted(BENCHES)
['kernel', 'oracle']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flashcheck.kernels import bench_kernel
from flashcheck.verify._xp import namespace

__all__ = ["BENCHES", "bench_oracle", "oracle_device_timings", "oracle_grad_timings", "oracle_timings",
           "plain_attention", "plain_attention_grad", "plain_attention_torch", "register_bench"]


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    run: Callable[[list[str]], int]


BENCHES: dict[str, Bench] = {}


def register_bench(name: str, help: str):
    """Decorator: register ``fn(argv) -> int`` as ``python -m flashcheck bench name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"bench name must be an identifier-like string, got {name!r}")
    if name in BENCHES:
        raise ValueError(f"a bench named {name!r} is already registered")

    def decorate(fn):
        if not callable(fn):
            raise TypeError(f"bench {name!r} must be callable")
        BENCHES[name] = Bench(name, help, fn)
        return fn

    return decorate


# ---------------------------------------------------------------------------
# oracle benchmark

DEFAULT_SIZES = ((256, 64), (1024, 128), (2048, 128))
GRAD_DEFAULT_SIZE = (2048, 128)


def plain_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Textbook float64 attention (no bound), on NumPy arrays or torch
    tensors: the baseline the oracle's cost is measured against."""
    xp = namespace(q)
    s = q @ k.swapaxes(-1, -2)
    s *= scale
    s -= xp.amax(s, axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= xp.sum(s, axis=-1, keepdims=True)
    return s @ v


def plain_attention_grad(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray,
                         scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Textbook float64 forward and backward (no bound): O, dQ, dK, dV, the
    baseline of the certified gradients (whose call includes its forward).

    P = softmax(scale Q K^T), O = P V, dV = P^T dO, dP = dO V^T,
    dS = P o (dP - rowsum(dO o O)), dQ = scale dS K, dK = scale dS^T Q.
    """
    p = q @ k.swapaxes(-1, -2)
    p *= scale
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v
    dv = p.swapaxes(-1, -2) @ do
    ds = do @ v.swapaxes(-1, -2)  # dP, then dS in place
    ds -= np.einsum("...ic,...ic->...i", do, out)[..., None]
    ds *= p
    dq = ds @ k
    dq *= scale
    dk = ds.swapaxes(-1, -2) @ q
    dk *= scale
    return out, dq, dk, dv


def _best_time(fn, repeat: int, min_total_s: float = 0.5) -> float:
    """Best of at least ``repeat`` calls, and of as many more as fit in
    ``min_total_s`` (at most 100): the machine may be shared, and short
    calls need many samples to find an undisturbed one."""
    best, spent, n = math.inf, 0.0, 0
    while n < repeat or (spent < min_total_s and n < 100):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def _best_times_interleaved(fns, repeat: int, min_total_s: float = 0.5) -> list[float]:
    """Best time of each of ``fns``, called in turn (a, b, a, b, ...) at
    least ``repeat`` times each and until ``min_total_s`` has passed (at most
    100 rounds): interleaving exposes both to the same load on a shared
    machine, which matters for their ratio."""
    best = [math.inf] * len(fns)
    spent, n = 0.0, 0
    while n < repeat or (spent < min_total_s and n < 100):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[i], spent = min(best[i], dt), spent + dt
        n += 1
    return best


def oracle_timings(N: int, D: int, *, repeat: int = 3, mp_budget_s: float = 60.0, seed: int = 0,
                   log=None) -> dict:
    """Times of plain float64, certified ``auto`` and all-rows ``mpmath`` on
    one head of standard-normal fp16 inputs of shape (1, 1, N, D).

    mpmath is timed on every row if that is expected to take less than
    ``mp_budget_s``; otherwise on the first row (which also pays the one-off
    conversion of K and V to integers) plus as many random rows as fit in a
    tenth of the budget, extrapolated linearly in the number of rows (every
    row costs the same: N exps and N x D exact products). ``mp_budget_s``
    0 skips mpmath (``mpmath_s`` None).
    """
    from flashcheck.verify import oracle

    for name, value in (("N", N), ("D", D), ("repeat", repeat)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, N, D)).astype(np.float16) for _ in range(3))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    scale = 1.0 / math.sqrt(D)
    plain_attention(q64, k64, v64, scale)  # warm up BLAS threads and caches
    t_plain = _best_time(lambda: plain_attention(q64, k64, v64, scale), repeat)
    result = {}

    def run_auto():
        result["r"] = oracle.attention(q, k, v)

    t_auto = _best_time(run_auto, repeat)
    r = result["r"]
    t_mp, rows_timed, extrapolated = _mpmath_time(q, k, v, mp_budget_s, seed)
    skip = t_mp is None
    out = {
        "N": N, "D": D, "dtype": "fp16", "plain_s": t_plain, "auto_s": t_auto, "mpmath_s": t_mp,
        "auto_over_plain": t_auto / t_plain, "mpmath_over_plain": None if skip else t_mp / t_plain,
        "mpmath_over_auto": None if skip else t_mp / t_auto, "mp_rows": r.mp_rows, "certified": r.certified,
        "max_rel_bound": _max_rel_bound(r),
        "mpmath_rows_timed": rows_timed, "mpmath_extrapolated": extrapolated,
    }
    if log:
        log(_format_row(out))
    return out


def _max_rel_bound(r) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(r.err_bound / np.maximum(np.abs(r.out), r.row_scale)))


def _mpmath_time(q, k, v, mp_budget_s: float, seed: int):
    """(seconds, rows timed, extrapolated) of the all-rows mpmath oracle on
    one head (see `oracle_timings`); (None, 0, False) when ``mp_budget_s``
    is 0: the mpmath column is skipped (hours at N = 65536)."""
    from flashcheck.verify import oracle

    if mp_budget_s == 0:
        return None, 0, False
    N = q.shape[2]
    # mpmath: time the first row (it also converts K and V to integers once)
    # to decide between timing all rows and extrapolating
    pr = oracle._prepare(q, k, v, None, False, None, False, None)
    t0 = time.perf_counter()
    pr.mp_row(0, 0, 0, 128)
    first = time.perf_counter() - t0
    if first * N <= mp_budget_s:
        t_mp = _best_time(lambda: oracle.attention(q, k, v, mode="mpmath"), 1, min_total_s=0.0)
        return t_mp, N, False
    n = max(2, min(N - 1, int(0.1 * mp_budget_s / first)))
    idx = np.random.default_rng(seed).choice(np.arange(1, N), size=n, replace=False)
    t0 = time.perf_counter()
    for i in idx:
        pr.mp_row(0, 0, int(i), 128)
    return first + (time.perf_counter() - t0) / n * (N - 1), n + 1, True


def plain_attention_torch(q, k, v, scale: float, tile_rows: int):
    """`plain_attention` in torch float64 on q's device, over the same
    tiles of query rows as the oracle's torch path (no bound)."""
    import torch

    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    for a in range(0, q.shape[2], tile_rows):
        out[:, :, a:a + tile_rows] = plain_attention(q[:, :, a:a + tile_rows], k, v, scale)
    return out


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def oracle_device_timings(N: int, D: int, *, device: str = "cuda", repeat: int = 3, tile_rows: int | None = None,
                          mp_budget_s: float = 0.0, seed: int = 0, log=None) -> dict:
    """Times of plain torch float64 attention (`plain_attention_torch`, on
    float64 copies of the inputs already on ``device``) and of the certified
    oracle in mode auto with ``device=`` (host fp16 inputs in, host NumPy
    results out: conversion, transfer, the float pass and its bound, any
    escalation on the host) on one head of standard-normal fp16 inputs of
    shape (1, 1, N, D), tiled alike; ``torch.cuda.synchronize`` before every
    clock read. mpmath as in `oracle_timings` unless ``mp_budget_s`` is 0.
    """
    import torch

    from flashcheck.verify import oracle

    for name, value in (("N", N), ("D", D), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dev = oracle._resolve_device(device)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, N, D)).astype(np.float16) for _ in range(3))
    qd, kd, vd = (torch.from_numpy(x.astype(np.float64)).to(dev) for x in (q, k, v))
    scale = 1.0 / math.sqrt(D)
    tile = min(N, tile_rows or max(1, oracle.TILE_ELEMENTS // N))
    result = {}

    def run_plain():
        plain_attention_torch(qd, kd, vd, scale, tile)
        _sync(dev)

    def run_auto():
        result["r"] = oracle.attention(q, k, v, device=dev, tile_rows=tile)
        _sync(dev)

    run_plain()  # warm up kernels, cuBLAS handles and the allocator
    run_auto()
    _sync(dev)
    t_plain, t_auto = _best_times_interleaved([run_plain, run_auto], repeat)
    r = result["r"]
    t_mp, rows_timed, extrapolated = _mpmath_time(q, k, v, mp_budget_s, seed)
    out = {
        "N": N, "D": D, "dtype": "fp16", "device": str(dev), "tile_rows": tile,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "plain_s": t_plain, "auto_s": t_auto, "auto_over_plain": t_auto / t_plain, "mpmath_s": t_mp,
        "mpmath_over_auto": None if t_mp is None else t_mp / t_auto, "mpmath_rows_timed": rows_timed,
        "mpmath_extrapolated": extrapolated, "mp_rows": r.mp_rows, "certified": r.certified,
        "max_rel_bound": _max_rel_bound(r),
    }
    if log:
        log(_format_device_row(out))
    return out


_DEVICE_HEADER = (f"{'N':>6} {'D':>4} {'device':>7} {'tile':>6} {'plain f64':>10} {'auto':>10} {'auto/plain':>10} "
                  f"{'mpmath':>12} {'mp_rows':>7} {'certified':>9}  max bound/scale")


def _format_device_row(t: dict) -> str:
    mp = "-" if t["mpmath_s"] is None else f"{t['mpmath_s']:.3g}s" + ("*" if t["mpmath_extrapolated"] else "")
    return (f"{t['N']:>6} {t['D']:>4} {t['device']:>7} {t['tile_rows']:>6} {t['plain_s'] * 1e3:>8.1f}ms "
            f"{t['auto_s'] * 1e3:>8.1f}ms {t['auto_over_plain']:>10.2f} {mp:>12} {t['mp_rows']:>7} "
            f"{str(t['certified']):>9}  {t['max_rel_bound']:.2e}")


def oracle_grad_timings(N: int, D: int, *, repeat: int = 3, seed: int = 0, log=None) -> dict:
    """Times of the plain float64 forward and backward (`plain_attention_grad`
    on float64 copies of the inputs) and of the certified gradients
    (``oracle.attention(q, k, v, dout=do)`` on the fp16 inputs: input
    checks and conversion, forward, escalation of uncertified rows, the
    gradients and their bounds) on one head of standard-normal fp16 inputs
    of shape (1, 1, N, D), dO included. Both are timed in turn in one loop.
    """
    from flashcheck.verify import oracle

    for name, value in (("N", N), ("D", D), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, 1, N, D)).astype(np.float16) for _ in range(4))
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    scale = 1.0 / math.sqrt(D)
    result = {}

    def run_plain():
        plain_attention_grad(q64, k64, v64, do64, scale)

    def run_oracle():
        result["r"] = oracle.attention(q, k, v, dout=do)

    run_plain()  # warm up BLAS threads and the allocator
    run_oracle()
    t_plain, t_grad = _best_times_interleaved([run_plain, run_oracle], repeat)
    r = result["r"]
    rel = max(float(e.max() / max(np.abs(g).max(), 1e-300))
              for g, e in ((r.dq, r.dq_err_bound), (r.dk, r.dk_err_bound), (r.dv, r.dv_err_bound)))
    out = {
        "N": N, "D": D, "dtype": "fp16", "plain_grad_s": t_plain, "oracle_grad_s": t_grad,
        "grad_over_plain": t_grad / t_plain, "mp_rows": r.mp_rows, "certified": r.certified,
        "max_rel_grad_bound": rel,
    }
    if log:
        log(_format_grad_row(out))
    return out


_GRAD_HEADER = (f"{'N':>5} {'D':>4} {'plain f64 fwd+bwd':>17} {'oracle grad':>11} {'grad/plain':>10} "
                f"{'mp_rows':>7} {'certified':>9}  max grad bound / max |grad|")


def _format_grad_row(t: dict) -> str:
    return (f"{t['N']:>5} {t['D']:>4} {t['plain_grad_s'] * 1e3:>15.1f}ms {t['oracle_grad_s'] * 1e3:>9.1f}ms "
            f"{t['grad_over_plain']:>10.2f} {t['mp_rows']:>7} {str(t['certified']):>9}  "
            f"{t['max_rel_grad_bound']:.2e}")


_HEADER = (f"{'N':>5} {'D':>4} {'plain f64':>10} {'auto':>10} {'mpmath':>12} {'auto/plain':>10} "
           f"{'mp/plain':>10} {'mp_rows':>7} {'certified':>9}  max bound/scale")


def _format_row(t: dict) -> str:
    if t["mpmath_s"] is None:
        mp, mp_ratio = "-", "-"
    else:
        mp = f"{t['mpmath_s']:.3g}s" + ("*" if t["mpmath_extrapolated"] else "")
        mp_ratio = f"{t['mpmath_over_plain']:.3g}"
    return (f"{t['N']:>5} {t['D']:>4} {t['plain_s'] * 1e3:>8.1f}ms {t['auto_s'] * 1e3:>8.1f}ms {mp:>12} "
            f"{t['auto_over_plain']:>10.2f} {mp_ratio:>10} {t['mp_rows']:>7} "
            f"{str(t['certified']):>9}  {t['max_rel_bound']:.2e}")


def _size(text: str) -> tuple[int, int]:
    try:
        n, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like NxD (e.g. 2048x128), got {text!r}") from None
    if n < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return n, d


@register_bench("oracle", "cost of the certified oracle next to plain float64 and mpmath (--grad: gradients)")
def bench_oracle(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashcheck bench oracle",
        description="Time the certified oracle (mode auto), plain float64 NumPy attention and the "
                    "all-mpmath oracle on one head of standard-normal fp16 inputs; with --grad, the "
                    "certified gradients (oracle with dout=) against a plain float64 NumPy forward "
                    "and backward.")
    parser.add_argument("--grad", action="store_true",
                        help="time the certified gradients instead (default size 2048x128)")
    parser.add_argument("--size", type=_size, action="append", metavar="NxD",
                        help="problem size (repeatable); default 256x64, 1024x128, 2048x128 "
                             "(with --grad: 2048x128)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats, best kept (default 3)")
    parser.add_argument("--mp-budget", type=float, metavar="SECONDS",
                        help="time all mpmath rows only below this estimate, else extrapolate; 0 skips the "
                             "mpmath column (default 60 with --device numpy, 0 on torch devices; not with --grad)")
    parser.add_argument("--device", choices=("numpy", "cpu", "cuda"), default="numpy",
                        help="numpy (default): the NumPy oracle and plain NumPy attention; cpu or cuda: the "
                             "oracle's torch float64 path (device=) and plain torch float64 attention, tiled alike")
    parser.add_argument("--tile-rows", type=int, metavar="ROWS",
                        help="query rows per tile on a torch device (default: about 2**27 elements per tile)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.grad and args.mp_budget is not None:
        parser.error("--mp-budget applies to the forward bench only (--grad times no all-mpmath run)")
    on_torch = args.device != "numpy"
    if args.grad and on_torch:
        parser.error("--device applies to the forward bench only (--grad times the NumPy gradients)")
    if on_torch:
        from flashcheck.verify.oracle import _resolve_device

        try:
            _resolve_device(args.device)
        except ValueError as e:
            parser.error(str(e))
    if args.tile_rows is not None and (not on_torch or args.tile_rows < 1):
        parser.error("--tile-rows must be a positive int and needs --device cpu or cuda")
    mp_budget = (0.0 if on_torch else 60.0) if args.mp_budget is None else args.mp_budget
    if not mp_budget >= 0:
        parser.error("--mp-budget must be positive, or 0 to skip the mpmath column")
    sizes = args.size or ([GRAD_DEFAULT_SIZE] if args.grad else list(DEFAULT_SIZES))
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    timed = ("plain and oracle grad: best of >= --repeat runs each, interleaved (and >= 0.5 s of runs)"
             if args.grad else
             "plain and auto: best of >= --repeat runs each, interleaved, synchronized (and >= 0.5 s of runs)"
             if on_torch else "plain and auto: best of >= --repeat runs (and >= 0.5 s of runs)")
    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, BLAS threads: {threads}; {timed}; all measured in this run")
    if on_torch:
        import torch

        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" and torch.cuda.is_available() else ""))
        print(_DEVICE_HEADER)
        rows = [oracle_device_timings(n, d, device=args.device, repeat=args.repeat, tile_rows=args.tile_rows,
                                      mp_budget_s=mp_budget, log=print) for n, d in sizes]
    elif args.grad:
        print(_GRAD_HEADER)
        rows = [oracle_grad_timings(n, d, repeat=args.repeat, log=print) for n, d in sizes]
    else:
        print(_HEADER)
        rows = [oracle_timings(n, d, repeat=args.repeat, mp_budget_s=mp_budget, log=print) for n, d in sizes]
    if not args.grad:
        if any(r["mpmath_extrapolated"] for r in rows):
            print("* mpmath timed on a random subset of rows (shown below) and extrapolated linearly to all rows:")
            for r in rows:
                if r["mpmath_extrapolated"]:
                    print(f"  {r['N']}x{r['D']}: {r['mpmath_rows_timed']} of {r['N']} rows timed")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if all(r["certified"] for r in rows) else 1


# The kernel benchmark lives with the kernel (kernels/bench_kernel.py) and knows
# nothing of this harness; registering it here keeps the layering: verify
# imports kernels, never the reverse.
register_bench("kernel", "TFLOP/s of the Triton kernel next to SDPA flash and cuDNN (CUDA; --smoke on CPU)")(
    bench_kernel.main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bench_oracle(sys.argv[1:]))
