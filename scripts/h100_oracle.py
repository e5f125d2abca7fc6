"""Issue #14 on a GPU: the certified oracle's torch path on the device,
checked against the NumPy path and against mpmath, on cases with masks,
GQA, gradients and adversarial magnitudes; prints one line per case.

Run: python scripts/h100_oracle.py  (on a CUDA machine)
"""

import time

import numpy as np
import torch

from flashcheck.properties.grads import with_output_gradient
from flashcheck.properties.plans import N_CHOICES, PlanDealer, case_from_plan, feature_values
from flashcheck.verify import oracle


def main():
    rng = np.random.default_rng(0)
    dealer = PlanDealer(feature_values(device="cuda", sizes=("tiny", "one-tile", "key-tiles", "both-tiles", "long",
                                                            "decode", "past-64k"),
                                       magnitudes=tuple(m for m in feature_values()["magnitude"] if m != "nan-inf")),
                        seed=7)
    worst = 0.0
    for n in range(24):
        case = case_from_plan(dealer.deal(), rng.integers(0, 2**16, N_CHOICES).tolist(), device="cuda")
        s = case.describe()
        small = s["B"] * s["H"] * s["Nq"] * s["Nk"] <= 2**22
        if small:
            case = with_output_gradient(case, "normal")
        t0 = time.perf_counter()
        gpu = oracle.attention_case(case, device="cuda")
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - t0
        ok = gpu.certified
        ratio = float("nan")
        if small:
            t0 = time.perf_counter()
            host = oracle.attention_case(case)
            t_host = time.perf_counter() - t0
            pairs = [("out", "err_bound"), ("dq", "dq_err_bound"), ("dk", "dk_err_bound"), ("dv", "dv_err_bound")]
            ratio = 0.0
            for val, err in pairs:
                a, b = getattr(gpu, val), getattr(host, val)
                if a is None:
                    continue
                allowed = getattr(gpu, err) + getattr(host, err)
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = np.where(allowed > 0, np.abs(a - b) / allowed, np.where(a == b, 0.0, np.inf))
                ratio = max(ratio, float(np.nanmax(r, initial=0.0)))
        else:
            t_host = float("nan")
        rep = oracle.crosscheck(gpu, case.q, case.k, case.v, attn_mask=case.attn_mask, is_causal=case.is_causal,
                                scale=case.scale, enable_gqa=case.enable_gqa, rows=3, seed=n)
        worst = max(worst, rep.worst_ratio, ratio if ratio == ratio else 0.0)
        print(f"{n:2d} {case.magnitude:22s} {case.mask_kind:18s} B{s['B']} H{s['H']}/{s['Hkv']} Nq{s['Nq']} "
              f"Nk{s['Nk']} D{s['D']} mp_rows={gpu.mp_rows} certified={ok} gpu={t_gpu:.3f}s host={t_host:.3f}s "
              f"|gpu-host|/(bounds)={ratio:.3g} crosscheck={'ok' if rep.ok else 'FAIL'} ({rep.worst_ratio:.3g})",
              flush=True)
    print(f"worst ratio {worst:.3g}")


if __name__ == "__main__":
    main()
