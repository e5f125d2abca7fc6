"""Which computation does a target's backward follow? For one saved case,
compare the target's dQ, dK, dV with float64 gradients of variants of the
exact computation (each a plausible kernel shortcut), printing the largest
error relative to each gradient's largest value per variant: the variant
the target matches best is the smallest.

    python scripts/grad_variants.py reports/.../repro/<finding>/case.npz --device cuda

Variants: exact; q scaled by the softmax scale and rounded to the input
dtype before Q K^T (the scale folded into q); logits rounded to the input
dtype; P rounded to the input dtype before dS (and P V). Rounding is
straight-through: the variant's gradient is that of the unrounded graph
evaluated at the rounded values.
"""

from __future__ import annotations

import argparse
import math

import torch

from flashcheck.properties.case import Case
from flashcheck.verify.targets import resolve_target


def _rounded(t, dtype):
    """t's value rounded to ``dtype``, with t's gradient (straight through)."""
    return t + (t.detach().to(dtype).to(torch.float64) - t.detach())


def _grads(q, k, v, mask, do, scale, causal, gqa, variant, dtype):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kk, vv = (k, v) if not gqa else (k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                      v.repeat_interleave(q.shape[1] // k.shape[1], 1))
    if variant == "q pre-scaled, rounded":
        s = _rounded(q * scale, dtype) @ kk.transpose(-1, -2)
    else:
        s = (q @ kk.transpose(-1, -2)) * scale
    if variant == "logits rounded":
        s = _rounded(s, dtype)
    vis = torch.ones_like(s, dtype=torch.bool)
    if causal:
        vis &= torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            vis &= mask.cpu()
        else:
            s = s + mask.cpu().to(torch.float64)
    s = s.masked_fill(~vis, -math.inf)
    dead = ~vis.any(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    p = torch.softmax(s, -1)
    if variant == "P rounded before dS":
        p = _rounded(p, dtype)
    out = (p @ vv).masked_fill(dead, 0.0)
    return torch.autograd.grad(out, (q, k, v), do)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("--target", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    case = Case.load(args.case)
    name = args.target or case.tags["repro"]["target"]
    got = resolve_target(name).run(case, args.device)
    if got.grads is None:
        raise SystemExit(f"{name} returned no gradients: {got.grad_error}")
    dtype = got.out.dtype
    q, k, v, mask = case.to_torch("cpu")
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    do = torch.from_numpy(case.do.astype("float64")) if case.do.dtype.name != "bfloat16" else \
        torch.from_numpy(case.do.astype("float32")).to(torch.float64)
    scale = case.scale if case.scale is not None else 1 / math.sqrt(q.shape[-1])
    print(f"{name} on {args.device}: {case.dtype} {case.shape}")
    for variant in ("exact", "q pre-scaled, rounded", "logits rounded", "P rounded before dS"):
        ref = _grads(q, k, v, mask, do, scale, case.is_causal, case.enable_gqa, variant, dtype)
        errs = []
        for n, g, r in zip("qkv", got.grads, ref):
            g = g.detach().cpu().to(torch.float64)
            errs.append(f"d{n} {float((g - r).abs().max() / r.abs().max().clamp_min(1e-300)):.3g}")
        print(f"  {variant:<24} max |target - variant| / max |variant|: {', '.join(errs)}")


if __name__ == "__main__":
    main()
