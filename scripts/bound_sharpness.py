"""Sharpness and soundness of the forward bound (or, with --grad, of the
gradient bound) on the NumPy emulations.

For every dtype and precision model, Hypothesis (targeted search on, the
``long``-style budget given by --examples) generates cases and runs the
emulation under the model; each case's max error/bound ratio is recorded.
Prints, per dtype and model, the number of cases, the median and the
maximum ratio, and whether any ratio exceeded 1 (a soundness failure).

Forward: `tiled_attention` against `attention_bound` (docs/bounds-sharpness.md):

    PYTHONPATH=. python scripts/bound_sharpness.py --examples 200 --out docs/bounds-sharpness.json

Gradients (--grad): the emulated forward, then `attention_backward` fed with
that forward's own output and LSE, against `gradient_bound` told those saved
values; a case's ratio is the largest over dq, dk and dv
(docs/error-bounds-backward.md):

    PYTHONPATH=. python scripts/bound_sharpness.py --grad --examples 150 --jobs 2 --out grad-sharpness.json

--jobs runs the (dtype, model) searches in that many processes; each search
is seeded by --seed alone, so the table does not depend on --jobs.
"""

import argparse
import json
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings, target

from flashcheck.kernels import numpy_attention as na
from flashcheck.kernels import numpy_backward as nb
from flashcheck.kernels.models import MODELS_FOR_DTYPE, get_model
from flashcheck.properties import strategies as fs
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound
from flashcheck.verify.check import error_ratio
from flashcheck.verify.grad_bounds import gradient_bound

#: Case sizes of each mode: the backward emulation loops over every
#: reduction index, so its cases are kept as small as the property test's.
SIZES = {"forward": dict(max_seq=48, max_scores=2**12), "grad": dict(max_seq=64, max_scores=2**13)}


def _forward_ratio(case, model):
    ref = oracle.attention_case(case, keep=True, with_grad=False)
    bound = attention_bound(ref, model, attn_mask=case.attn_mask)
    if not np.isfinite(bound.out).all():
        return None  # the model overflows on this case: no bound to test
    out = na.tiled_attention(case.q, case.k, case.v, case.attn_mask, case.is_causal, case.scale,
                             case.enable_gqa, block_m=case.block_m, block_n=case.block_n, model=model)
    return error_ratio(out, ref.out, bound.out + ref.err_bound)


def _grad_ratio(case, model):
    """Largest error/bound over dq, dk, dv where the bound is finite; None
    when the model overflows in the forward pass or nowhere applies."""
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    opts = dict(attn_mask=case.attn_mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
                block_m=case.block_m, block_n=case.block_n, model=model)
    try:
        out, lse = na.tiled_attention(case.q, case.k, case.v, **opts, return_lse=True)
    except ValueError:
        return None  # values the model cannot hold (tf32 overflow): not applicable
    grads = nb.attention_backward(case.q, case.k, case.v, out, lse, case.do, **opts)
    bound = gradient_bound(ref, model, dout=case.do, out_target=out, lse_target=lse, attn_mask=case.attn_mask)
    ratios = []
    for got, exact, b, e in zip(grads, (ref.dq, ref.dk, ref.dv), (bound.dq, bound.dk, bound.dv),
                                (ref.dq_err_bound, ref.dk_err_bound, ref.dv_err_bound)):
        fin = np.isfinite(b)
        if fin.any():
            ratios.append(error_ratio(got[fin], exact[fin], b[fin] + e[fin]))
    return max(ratios) if ratios else None


def run(dtype: str, name: str, examples: int, seed_value: int, grad: bool = False) -> list:
    model = get_model(name, dtype)
    ratios = []
    magnitudes = [m for m in fs.MAGNITUDES if m != "nan-inf"]
    ratio_of = _grad_ratio if grad else _forward_ratio

    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.target])
    @seed(seed_value)
    @given(fs.cases(dtypes=(dtype,), block_kind="numpy", magnitudes=magnitudes, with_grad=grad,
                    **SIZES["grad" if grad else "forward"]))
    def probe(case):
        with np.errstate(all="ignore"):  # overflow in an emulated format is expected on near-max cases
            r = ratio_of(case, model)
        if r is None:
            return
        ratios.append(r)
        if np.isfinite(r):
            target(r)

    probe()
    return ratios


def _row(job):
    dtype, name, examples, seed_value, grad = job
    start = time.time()
    r = np.asarray(run(dtype, name, examples, seed_value, grad))
    return dtype, name, {"cases": int(r.size), "median": float(np.median(r)) if r.size else None,
                         "max": float(r.max()) if r.size else None, "over_1": int((r > 1).sum()),
                         "at_least_0.1": int((r >= 0.1).sum()), "seconds": round(time.time() - start, 1)}


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad", action="store_true", help="the gradient bound on the backward emulation")
    ap.add_argument("--jobs", type=int, default=1, help="processes running the (dtype, model) searches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.examples < 1 or args.jobs < 1:
        ap.error(f"--examples and --jobs must be positive, got {args.examples} and {args.jobs}")
    jobs = [(dtype, name, args.examples, args.seed, args.grad)
            for dtype, names in MODELS_FOR_DTYPE.items() for name in names]
    table = defaultdict(dict)
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for dtype, name, row in pool.map(_row, jobs):
            table[dtype][name] = row
            print(f"{dtype:5s} {name:15s} cases {row['cases']:4d}  median {_fmt(row['median'])}  max {_fmt(row['max'])}"
                  f"  >=0.1: {row['at_least_0.1']}  >1: {row['over_1']}  ({row['seconds']} s)", flush=True)
    print(f"{time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": "grad" if args.grad else "forward", "examples_per_model": args.examples,
                       "seed": args.seed, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
