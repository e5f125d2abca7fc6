"""Which causal alignment does each SDPA backend use when Nq != Nk?

SDPA's documented convention is top-left (query i sees keys j <= i). Prints,
per fused backend, the count of NaN outputs and the max difference from the
certified oracle (`flashcheck.verify.oracle`) under top-left (``is_causal``)
and under bottom-right (query i sees keys j <= i + Nk - Nq, as a bool mask)
alignment, for Nq > Nk and Nq < Nk, in fp16 on the GPU.

    python scripts/causal_alignment.py
"""

import numpy as np

from flashcheck.kernels.precision import from_float64, to_float64
from flashcheck.properties.case import Case
from flashcheck.verify import oracle
from flashcheck.verify.targets import SDPA_BACKENDS, resolve_target

FUSED = [name for name in SDPA_BACKENDS if name != "sdpa-math"]


def main() -> None:
    rng = np.random.default_rng(0)
    for nq, nk in ((96, 48), (48, 96), (64, 64)):
        q, k, v = (from_float64(rng.standard_normal((1, 2, n, 64)), "fp16") for n in (nq, nk, nk))
        case = Case(q=q, k=k, v=v, is_causal=True)
        top_left = oracle.attention(q, k, v, is_causal=True).out
        bottom_right_mask = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)
        # Rows with no visible key give 0, as the oracle and SDPA define them.
        bottom_right = oracle.attention(q, k, v, attn_mask=bottom_right_mask).out
        for name in FUSED:
            try:
                out = to_float64(resolve_target(name).run(case, "cuda").out)
            except (NotImplementedError, RuntimeError) as exc:
                print(f"Nq={nq} Nk={nk} {name}: unsupported ({str(exc).splitlines()[0][:60]})")
                continue
            nan = int(np.isnan(out).sum())
            out = np.nan_to_num(out)
            print(f"Nq={nq} Nk={nk} {name}: NaN {nan}, max|out - top-left| {np.abs(out - top_left).max():.3g}, "
                  f"max|out - bottom-right| {np.abs(out - bottom_right).max():.3g}")


if __name__ == "__main__":
    main()
