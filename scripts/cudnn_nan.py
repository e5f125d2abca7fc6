"""Narrow down the cuDNN NaN the H100 campaign found: replay the saved case
with sdpa-cudnn and change one thing at a time."""

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from flashcheck.properties.case import Case


def nans(q, k, v, causal, gqa):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
    torch.cuda.synchronize()
    bad = out.isnan()
    rows = bad.any(-1)
    return f"NaN elements {int(bad.sum())}, NaN rows {int(rows.sum())} of {rows.numel()}"


case = Case.load(sys.argv[1])
print(case.describe())
q, k, v, _ = case.to_torch("cuda")
gqa = case.enable_gqa
print(f"as found (layout {case.layout}):", nans(q, k, v, case.is_causal, gqa))
qc, kc, vc = (t.contiguous() for t in (q, k, v))
print("contiguous copies:", nans(qc, kc, vc, case.is_causal, gqa))
if gqa:
    rep = q.shape[1] // k.shape[1]
    print("kv heads expanded (no GQA):", nans(qc, kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1),
                                             case.is_causal, False))
print("not causal:", nans(qc, kc, vc, False, gqa))
sub = torch.finfo(q.dtype).tiny
for name, t in (("q", qc), ("k", kc), ("v", vc)):
    print(f"{name}: subnormal fraction {float((t.abs() < sub).float().mean()):.3f}, max |x| {float(t.abs().max()):.3g}")
scaled = [t.double() * 2.0**14 for t in (qc, kc, vc)]
print("inputs times 2**14 (no subnormals):", nans(*(t.to(q.dtype) for t in scaled), case.is_causal, gqa))
print("q only scaled up:", nans(scaled[0].to(q.dtype), kc, vc, case.is_causal, gqa))
print("v only scaled up:", nans(qc, kc, scaled[2].to(q.dtype), case.is_causal, gqa))

