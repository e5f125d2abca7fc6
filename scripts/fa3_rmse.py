"""RMSE of attention outputs on outlier-heavy inputs, after FlashAttention-3.

Reproduces the numerical-error experiment of Shah et al., "FlashAttention-3:
Fast and Accurate Attention with Asynchrony and Low-precision" (2024),
section 4.3: entries of Q, K, V are N(0, 1) + N(0, 100) * Bernoulli(0.001)
(a rare outlier with standard deviation 10, mimicking outlier features in
LLMs), and the output of each implementation is compared with a float64
reference by its root mean squared error. The paper's FP16 figures (its
Table 3): standard attention 3.2e-4, FlashAttention-2 1.9e-4,
FlashAttention-3 1.9e-4.

The paper does not fix the sizes in that section; B=4, H=16, N=2048,
D=128 (non-causal, scale 1/sqrt(D)) is our choice.

The inputs are the harness's own ``fa3-outliers`` magnitude class
(`flashcheck.properties.strategies.qkv`): one seed draws the same values
for every dtype, each rounded once to it. The SDPA backends and the Triton kernel are run
as the harness's targets (`flashcheck.verify.targets`).

The reference is float64 attention computed with torch on the *same*
quantized inputs the kernels receive, so the RMSE measures the kernels'
arithmetic only; it is validated on one head against the certified
`flashcheck.verify.oracle.attention`.

    python scripts/fa3_rmse.py --out reports/fa3             # GPU, full size
    python scripts/fa3_rmse.py --device cpu --small --out /tmp/fa3   # quick CPU check

Exit status: 0 done, 1 the reference disagreed with the oracle, 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

#: The paper's FP16 RMSE (Table 3 of Shah et al. 2024), for comparison.
PAPER_FP16 = {"standard attention": 3.2e-4, "FlashAttention-2": 1.9e-4, "FlashAttention-3": 1.9e-4}

#: Relative agreement required between the torch float64 reference and the oracle.
REFERENCE_RTOL = 1e-10

#: The magnitude class of `flashcheck.properties.strategies` that is the paper's distribution.
MAGNITUDE = "fa3-outliers"


def outlier_case(*, batch, heads, seqlen, head_dim, dtype: str, seed: int):
    """A `Case` (non-causal, scale 1/sqrt(D)) whose q, k, v are the paper's
    N(0,1) + N(0,100) * Bernoulli(0.001), exact in ``dtype``. Equal seeds
    draw equal values for every dtype (each rounded once to it)."""
    from flashcheck.properties.case import Case
    from flashcheck.properties.strategies import qkv

    shape = dict(B=batch, H=heads, Hkv=heads, Nq=seqlen, Nk=seqlen, D=head_dim, Dv=head_dim)
    t = qkv(shape, dtype, MAGNITUDE, seed)
    return Case(q=t.q, k=t.k, v=t.v, scale=1.0 / math.sqrt(head_dim), magnitude=MAGNITUDE, seed=seed, tags=t.tags)


def reference_attention(q, k, v, scale: float, *, chunk: int = 1):
    """float64 softmax(q k^T * scale) v, ``chunk`` batch entries at a time."""
    import torch

    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for b in range(0, q.shape[0], chunk):
        s = (q[b:b + chunk] @ k[b:b + chunk].transpose(-1, -2)) * scale
        out[b:b + chunk] = torch.softmax(s, dim=-1) @ v[b:b + chunk]
    return out


def standard_attention(q, k, v, scale: float):
    """The paper's baseline: matmuls and softmax in the input dtype."""
    import torch

    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v


def rmse(x, ref) -> float:
    return math.sqrt(float(((x.double() - ref) ** 2).mean()))


def _standard(case, device):
    q, k, v, _ = case.to_torch(device)
    return standard_attention(q, k, v, case.scale)


def _target(name: str):
    from flashcheck.verify.targets import resolve_target

    target = resolve_target(name)
    return lambda case, device: target.run(case, device).out


def methods(device: str) -> dict:
    """name -> callable(case, device) giving the output, or a string saying why it is n/a."""
    from flashcheck.verify.targets import SDPA_BACKENDS

    table = {"standard attention (torch, input dtype)": _standard}
    for target in SDPA_BACKENDS:  # "sdpa-math", "sdpa-flash", ...
        name = f"torch SDPA {target.removeprefix('sdpa-')}"
        table[name] = _target(target) if device == "cuda" or target == "sdpa-math" else "n/a on CPU"
    table["flashcheck Triton kernel"] = _target("triton")
    return table


def check_reference(q, k, v, ref, scale: float) -> dict:
    """Compare the torch float64 reference of head (0, 0) with the oracle."""
    import numpy as np

    from flashcheck.verify.oracle import attention

    to_np = [t[:1, :1].detach().cpu() for t in (q, k, v)]  # the oracle reads bf16 tensors exactly
    res = attention(*to_np, scale=scale)
    ours = ref[:1, :1].cpu().numpy()
    diff = float(np.max(np.abs(ours - res.out)))
    size = float(np.max(np.abs(res.out)))
    return {"head": [0, 0], "max_abs_diff": diff, "max_abs_out": size,
            "oracle_err_bound": float(np.max(res.err_bound)), "ok": diff <= REFERENCE_RTOL * max(size, 1e-300)}


def run_experiment(*, batch, heads, seqlen, head_dim, device, seed, dtypes=("fp16", "bf16"), log=print) -> dict:
    import torch

    for name, value in (("batch", batch), ("heads", heads), ("seqlen", seqlen), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    torch_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    unknown = [d for d in dtypes if d not in torch_dtypes]
    if unknown:
        raise ValueError(f"dtypes must be among fp16, bf16; got {unknown}")
    scale = 1.0 / math.sqrt(head_dim)
    table = methods(device)
    rmses = {name: {} for name in table}
    notes, checks, outliers = {}, {}, {}
    for dname in dtypes:
        # The quantized inputs every method sees (the same draws for each dtype).
        case = outlier_case(batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim, dtype=dname, seed=seed)
        outliers[dname] = case.tags.get("outliers")
        q, k, v, _ = case.to_torch(device)
        ref = reference_attention(q, k, v, scale)
        checks[dname] = check_reference(q, k, v, ref, scale)
        log(f"{dname}: reference vs oracle on one head: max |diff| {checks[dname]['max_abs_diff']:.3g} "
            f"({'ok' if checks[dname]['ok'] else 'MISMATCH'})")
        for name, fn in table.items():
            if isinstance(fn, str):
                rmses[name][dname] = None
                notes[name] = fn
                continue
            try:
                out = fn(case, device)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # a backend that does not support this input
                rmses[name][dname] = None
                notes.setdefault(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            if out.shape != ref.shape:
                raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
            rmses[name][dname] = rmse(out, ref)
            log(f"  {name:42s} {dname}: RMSE {rmses[name][dname]:.3e}")
    return {
        "setup": {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim, "causal": False,
                  "scale": scale, "seed": seed, "distribution": "N(0,1) + N(0,100) * Bernoulli(0.001)",
                  "magnitude_class": MAGNITUDE, "outliers": outliers, "device": device},
        "paper_fp16": PAPER_FP16, "rmse": rmses, "notes": notes, "reference_check": checks,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def markdown_table(result: dict) -> str:
    lines = ["| method | RMSE fp16 | RMSE bf16 |", "| --- | --- | --- |"]
    for name, per in result["rmse"].items():
        lines.append(f"| {name} | {_fmt(per.get('fp16'))} | {_fmt(per.get('bf16'))} |")
    lines += ["", "Paper (Shah et al. 2024, Table 3, FP16; sizes not stated there):", "",
              "| method | RMSE fp16 |", "| --- | --- |"]
    lines += [f"| {name} | {_fmt(x)} |" for name, x in PAPER_FP16.items()]
    if result["notes"]:
        lines += ["", "n/a: " + "; ".join(f"{k}: {v}" for k, v in result["notes"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--small", action="store_true", help="tiny sizes (B=1, H=2, N=64, D=32) for a quick check")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16")
    parser.add_argument("--out", required=True, help="directory for fa3_rmse.json and fa3_rmse.md")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # The Triton kernel runs in Triton's interpreter on CPU; set before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
    sizes = (1, 2, 64, 32) if args.small else (4, 16, 2048, 128)
    batch, heads, seqlen, head_dim = (given if given is not None else default for given, default in
                                      zip((args.batch, args.heads, args.seqlen, args.head_dim), sizes))
    start = time.monotonic()
    try:
        result = run_experiment(batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim, device=device,
                                seed=args.seed, dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()))
    except ValueError as exc:
        print(f"fa3_rmse: error: {exc}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.monotonic() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fa3_rmse.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    (out / "fa3_rmse.md").write_text(table + "\n")
    print(table)
    if not all(c["ok"] for c in result["reference_check"].values()):
        print("fa3_rmse: the float64 reference disagrees with the oracle (see reference_check)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
