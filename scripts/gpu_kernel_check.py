"""Everything the Triton kernel needs a GPU for, in one run.

1. correctness on the GPU, forward and backward, judged the way the property
   tests judge it: against the certified oracle (`flashcheck.verify.oracle`)
   within the bound derived from the kernel's declared precision model
   (`flashcheck.verify.check.judge` for the output and LSE,
   `flashcheck.verify.check.judge_gradients` for dq, dk, dv); per
   configuration the max abs error and its ratio to the bound;
2. a forward sweep of launch configurations (block sizes, warps, stages) at
   B=4, H=32, N=4096, bf16, and the cost of the no-FMA rounding contract;
3. the benchmark grid of kernels/bench_kernel.py next to SDPA flash/cuDNN.

Usage (from the repository root): python scripts/gpu_kernel_check.py OUTDIR
[--skip-bench] [--skip-sweep] [--skip-bwd-sweep]. Writes check.json,
sweep.json, bwd_sweep.json, bench.json and prints a compact table last.
"""

import json
import os
import sys
import time
import traceback

import numpy as np
import torch
import triton

from flashcheck.kernels import bench_kernel, triton_flash
from flashcheck.kernels.precision import from_float64, to_float64
from flashcheck.properties.case import Case
from flashcheck.properties.strategies import qkv
from flashcheck.verify import oracle
from flashcheck.verify.check import judge, judge_gradients

CHECKS = [
    # (dtype, tf32, B, H, Hkv, Nq, Nk, D, causal, mask, layout)
    ("fp16", False, 2, 4, 4, 1000, 1000, 64, False, None, "contiguous"),
    ("bf16", False, 2, 4, 4, 1000, 1000, 128, False, None, "contiguous"),
    ("fp16", False, 2, 4, 4, 777, 1029, 128, True, None, "bnhd"),
    ("bf16", False, 2, 4, 4, 1029, 777, 64, True, None, "strided"),
    ("fp32", False, 2, 4, 4, 513, 600, 64, False, None, "contiguous"),
    ("fp32", True, 2, 4, 4, 513, 600, 64, False, None, "contiguous"),
    ("fp32", True, 1, 4, 2, 300, 333, 128, True, None, "contiguous"),
    ("fp16", False, 2, 8, 2, 300, 333, 59, False, None, "contiguous"),
    ("bf16", False, 2, 8, 1, 300, 333, 80, True, None, "contiguous"),
    ("fp16", False, 2, 4, 4, 300, 333, 96, False, "bool", "contiguous"),
    ("bf16", False, 2, 4, 4, 300, 333, 111, False, "add", "contiguous"),
    ("fp16", False, 1, 2, 2, 200, 257, 160, True, None, "contiguous"),
    ("bf16", False, 1, 2, 2, 200, 257, 256, False, None, "contiguous"),
    ("fp16", False, 1, 2, 2, 1, 1, 16, False, None, "contiguous"),
]


def make_case(dtype, B, H, Hkv, Nq, Nk, D, causal, mask_kind, layout, seed) -> Case:
    """The check's inputs as a `Case`: N(0, 1) q, k, v and output gradient,
    exact in ``dtype``; "bool" masks keep 70 % of the keys and mask row 3
    fully, "add" masks are N(0, 4) offsets in ``dtype``."""
    t = qkv(dict(B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=D), dtype, "normal", seed)
    rng = np.random.default_rng(seed + 1)
    do = from_float64(rng.standard_normal((B, H, Nq, D)), dtype)
    mask = None
    if mask_kind == "bool":
        mask = rng.random((B, 1, Nq, Nk)) > 0.3
        mask[:, :, 3] = False  # one fully masked row
    elif mask_kind == "add":
        mask = from_float64(rng.standard_normal((1, H, Nq, Nk)) * 2, dtype)
    return Case(q=t.q, k=t.k, v=t.v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv, layout=layout,
                mask_kind=mask_kind or "none", do=do, seed=seed)


def run_check(dtype, tf32, B, H, Hkv, Nq, Nk, D, causal, mask_kind, layout, seed, device="cuda"):
    """One row of the correctness table. ``device="cpu"`` runs the same
    check under Triton's interpreter (TRITON_INTERPRET=1), for tests."""
    case = make_case(dtype, B, H, Hkv, Nq, Nk, D, causal, mask_kind, layout, seed)
    q, k, v, mask = case.to_torch(device, requires_grad=True)
    out, lse = triton_flash.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=case.enable_gqa,
                                      return_lse=True, allow_tf32=tf32)
    out.backward(torch.from_numpy(to_float64(case.do)).to(device=device, dtype=out.dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    model = triton_flash.precision_model(dtype, allow_tf32=tf32, device=device)
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    fwd = judge(case, out, lse, model=model, ref=ref)
    bwd = judge_gradients(case, q.grad, k.grad, v.grad, model=model, out=out, lse=lse, ref=ref)
    res = {"dtype": dtype + ("-tf32" if tf32 else ""), "B": B, "H": H, "Hkv": Hkv, "Nq": Nq, "Nk": Nk, "D": D,
           "causal": causal, "mask": mask_kind or "-", "layout": layout, "model": model.name,
           "oracle_mp_rows": ref.mp_rows}
    res["out_err"] = fwd.metrics.max_abs_err if fwd.metrics is not None else float("inf")
    res["out_ratio"], res["lse_ratio"] = fwd.ratio, fwd.lse_ratio
    for name in ("dq", "dk", "dv"):
        res[name + "_err"], res[name + "_ratio"] = bwd.max_errs[name], bwd.ratios[name]
    res["reason"] = fwd.reason or bwd.reason
    res["ok"] = fwd.verdict == "pass" and bwd.verdict == "pass"
    return res


def check_table(rows):
    lines = [f"{'dtype':9} {'H/Hkv':5} {'Nq':>5} {'Nk':>5} {'D':>4} {'caus':5} {'mask':4} {'layout':10} "
             f"{'out err':>9} {'/bnd':>5} {'dq err':>9} {'/bnd':>5} {'dk err':>9} {'/bnd':>5} "
             f"{'dv err':>9} {'/bnd':>5} ok"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']}: ERROR {r['error']}")
            continue
        cells = " ".join(f"{r[n + '_err']:9.2e} {r[n + '_ratio']:5.2f}" for n in ("out", "dq", "dk", "dv"))
        lines.append(f"{r['dtype']:9} {r['H']}/{r['Hkv']:<3} {r['Nq']:5d} {r['Nk']:5d} {r['D']:4d} "
                     f"{str(r['causal']):5} {r['mask']:4} {r['layout']:10} {cells} {r['ok']}"
                     + (f"  ({r['reason']})" if r.get("reason") else ""))
    return "\n".join(lines)


SWEEP = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3),
         (64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3)]


def sweep(B=4, H=32, N=4096):
    rows = []
    for D in (64, 128):
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn((B, H, N, D), device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(3))
            c = triton_flash._fold_scale(D ** -0.5)
            f = bench_kernel.flops(B, H, N, D, causal, "fwd")
            for bm, bn, w, s in SWEEP:
                for fusion in (False, True):
                    cfg = (bm, bn, w, s)
                    if fusion and cfg != SWEEP[0] and not rows_best(rows, D, causal, cfg):
                        continue
                    try:
                        def fn(q=q, k=k, v=v, causal=causal, c=c, bm=bm, bn=bn, w=w, s=s, fusion=fusion):
                            return triton_flash._forward(q, k, v, None, causal, c, bm, bn, False,
                                                         launch=(w, s), fp_fusion=fusion)
                        fn()
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                        row = {"D": D, "causal": causal, "cfg": [bm, bn, w, s], "fusion": fusion,
                               "ms": ms, "tflops": f / ms * 1e-9}
                    except Exception as exc:  # out of shared memory etc.
                        row = {"D": D, "causal": causal, "cfg": [bm, bn, w, s], "fusion": fusion,
                               "error": str(exc).splitlines()[0][:100]}
                    rows.append(row)
                    print("sweep", row, flush=True)
    return rows


DKDV_SWEEP = [(64, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3)]
DQ_SWEEP = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3)]


def bwd_sweep(B=4, H=32, N=4096):
    """Backward launch configs, one kernel varied at a time, bf16."""
    rows = []
    for D in (64, 128):
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn((B, H, N, D), device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(4))
            sc = D ** -0.5
            c = triton_flash._fold_scale(sc)
            out, lse2 = triton_flash._forward(q, k, v, None, causal, c, None, None, False)
            f = bench_kernel.flops(B, H, N, D, causal, "bwd")
            base_kv, base_q = triton_flash._GPU_BWD[D]
            trials = [("dkdv", (cfg, base_q)) for cfg in DKDV_SWEEP] + [("dq", (base_kv, cfg)) for cfg in DQ_SWEEP]
            for varied, cfgs in trials:
                row = {"D": D, "causal": causal, "varied": varied, "dkdv": list(cfgs[0]), "dq": list(cfgs[1])}
                try:
                    def fn(q=q, k=k, v=v, do=do, out=out, lse2=lse2, causal=causal, c=c, sc=sc, cfgs=cfgs):
                        return triton_flash._backward(do, q, k, v, out, lse2, None, causal, c, sc,
                                                      None, None, False, configs=cfgs)
                    fn()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row.update(ms=ms, tflops=f / ms * 1e-9)
                except Exception as exc:
                    row["error"] = str(exc).splitlines()[0][:100]
                rows.append(row)
                print("bwd-sweep", row, flush=True)
    return rows


def adopt_bwd_winners(rows):
    """Per head dim, the dk/dv and dq configs with the best summed throughput."""
    for D in (64, 128):
        best = []
        for varied in ("dkdv", "dq"):
            score = {}
            for r in rows:
                if r["D"] == D and r["varied"] == varied and "tflops" in r:
                    score[tuple(r[varied])] = score.get(tuple(r[varied]), 0.0) + r["tflops"]
            best.append(max(score, key=score.get) if score else triton_flash._GPU_BWD[D][len(best)])
        triton_flash._GPU_BWD[D] = tuple(best)
        print(f"backward configs for D={D}: dkdv {best[0]}, dq {best[1]}", flush=True)


def rows_best(rows, D, causal, cfg):
    """Fusion is measured for the first config and for the best one so far."""
    cand = [r for r in rows if r["D"] == D and r["causal"] == causal and not r["fusion"] and "tflops" in r]
    return bool(cand) and max(cand, key=lambda r: r["tflops"])["cfg"] == list(cfg)


def adopt_sweep_winners(rows):
    """Use, for the benchmark, the contract-keeping (no fusion) config with
    the best summed causal + non-causal throughput per head dim."""
    for D in (64, 128):
        score = {}
        for r in rows:
            if r["D"] == D and not r["fusion"] and "tflops" in r:
                score[tuple(r["cfg"])] = score.get(tuple(r["cfg"]), 0.0) + r["tflops"]
        if score:
            best = max(score, key=score.get)
            triton_flash._GPU_FWD[D] = best
            print(f"forward config for D={D}: {best}", flush=True)


def main(argv):
    out_dir = argv[1] if len(argv) > 1 else "."
    os.makedirs(out_dir, exist_ok=True)
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    t0 = time.time()
    rows = []
    for i, cfg in enumerate(CHECKS):
        try:
            rows.append(run_check(*cfg, seed=1000 + i))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"config": str(cfg), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        print(check_table(rows[-1:]).splitlines()[-1], flush=True)
    with open(os.path.join(out_dir, "check.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"checks took {time.time() - t0:.0f} s", flush=True)
    sweep_rows = []
    if "--skip-sweep" not in argv:  # forward sweep
        sweep_rows = sweep()
        with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
            json.dump(sweep_rows, fh, indent=1)
    print(f"sweep done at {time.time() - t0:.0f} s", flush=True)
    adopt_sweep_winners(sweep_rows)
    bwd_rows = []
    if "--skip-bwd-sweep" not in argv:
        bwd_rows = bwd_sweep()
        with open(os.path.join(out_dir, "bwd_sweep.json"), "w") as fh:
            json.dump(bwd_rows, fh, indent=1)
        adopt_bwd_winners(bwd_rows)
    bench_rows = []
    if "--skip-bench" not in argv:
        bench_rows = bench_kernel.run_grid()
        with open(os.path.join(out_dir, "bench.json"), "w") as fh:
            json.dump(bench_rows, fh, indent=1)
    print(f"all done at {time.time() - t0:.0f} s\n", flush=True)
    print(check_table(rows))
    for r in sweep_rows:
        if "tflops" in r:
            print(f"sweep D={r['D']} causal={r['causal']!s:5} cfg={r['cfg']} fusion={r['fusion']!s:5} "
                  f"{r['tflops']:6.1f} TFLOP/s")
    for r in bwd_rows:
        if "tflops" in r:
            print(f"bwd-sweep D={r['D']} causal={r['causal']!s:5} dkdv={r['dkdv']} dq={r['dq']} "
                  f"{r['tflops']:6.1f} TFLOP/s")
    print("forward defaults", triton_flash._GPU_FWD, "\nbackward defaults", triton_flash._GPU_BWD)
    if bench_rows:
        print(bench_kernel.format_table(bench_rows))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
