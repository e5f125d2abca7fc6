"""Properties 7 and 8 for the Triton kernel: it matches the oracle within the
bound of the precision model it declares (`flashcheck.kernels.triton_flash.precision_model`),
and it follows SDPA's semantics (fully masked rows give 0 and LSE -inf, a
NaN reaches exactly the rows that read it, finite inputs give finite output).

On a CPU the kernel runs in Triton's interpreter with small shapes; the
``gpu`` variants run on CUDA with long sequences and the nightly profile.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st

from flashcheck.kernels import triton_flash  # noqa: E402
from flashcheck.properties import strategies as fs  # noqa: E402
from flashcheck.properties.case import Case  # noqa: E402
from flashcheck.verify.check import judge  # noqa: E402

pytestmark = pytest.mark.interpreted_kernel  # skipped where the host's Triton interpreter is too old

REGRESSIONS = Path(__file__).parent / "regressions"

INTERPRETED = triton_flash.is_interpreted()
NO_NAN = [m for m in fs.MAGNITUDES if m != "nan-inf"]
CPU_SIZES = dict(max_seq=40, max_scores=2**11, max_batch=2, max_heads=4, distinct_dv=False,
                 head_dims=st.sampled_from([1, 2, 16, 33, 59, 64]))
GPU_SIZES = dict(max_seq=4096, max_scores=2**24, max_batch=4, max_heads=8, distinct_dv=False)


def _run(case, device, allow_tf32):
    import torch

    q, k, v, mask = case.to_torch(device)
    out, lse = triton_flash.attention(
        q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
        return_lse=True, block_m=case.block_m, block_n=case.block_n, allow_tf32=allow_tf32,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return out, lse


def _check(case, device, allow_tf32):
    out, lse = _run(case, device, allow_tf32)
    model = triton_flash.precision_model(case.dtype, allow_tf32=allow_tf32, device=device)
    verdict = judge(case, out, lse, model=model)
    if verdict.ratio is not None and np.isfinite(verdict.ratio):
        from hypothesis import target

        target(float(verdict.ratio), label=f"triton/{case.dtype}")
        if verdict.ratio > 0.1:
            event("error/bound > 0.1")
    if verdict.verdict != "pass":
        from flashcheck.properties._support import save_failure

        saved = save_failure(case, f"triton-{device}")
        raise AssertionError(f"{verdict.reason} (case saved to {saved})")


@pytest.mark.fuzz
@pytest.mark.skipif(not INTERPRETED, reason="CPU variant: set TRITON_INTERPRET=1")
@given(fs.cases(block_kind="triton", magnitudes=NO_NAN, **CPU_SIZES), st.booleans())
# Found by this property: the interpreter flushed a bf16 subnormal V to 0.
@example(Case.load(REGRESSIONS / "triton-bf16-subnormal-v.npz"), False)
def test_triton_matches_oracle_within_declared_bound_cpu(case, allow_tf32):
    _check(case, "cpu", allow_tf32)


@pytest.mark.fuzz
@pytest.mark.skipif(not INTERPRETED, reason="CPU variant: set TRITON_INTERPRET=1")
@given(fs.cases(block_kind="triton", masks=("fully-masked-rows", "causal", "additive", "bool-random"),
                magnitudes=("nan-inf", "normal", "all-negative-logits"), allow_nonfinite=True, **CPU_SIZES))
# Found by this property: a NaN query on a fully masked row gives 0, which is
# right (the row reads nothing); the semantics check wrongly demanded NaN.
@example(Case.load(REGRESSIONS / "nan-query-fully-masked-row.npz"))
def test_triton_semantics_cpu(case):
    """Property 8: fully masked rows, NaN propagation, finite in -> finite out."""
    _check(case, "cpu", False)


@pytest.mark.fuzz
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU variant: TRITON_INTERPRET must be unset")
@given(fs.cases(block_kind="triton", magnitudes=NO_NAN, **GPU_SIZES), st.booleans())
# Found on the H100: subnormal fp32 outputs; the accumulation bound was only
# relative, rounding in the subnormal range is absolute.
@example(Case.load(REGRESSIONS / "triton-gpu-fp32-subnormal-additive.npz"), False)
def test_triton_matches_oracle_within_declared_bound_gpu(case, allow_tf32):
    _check(case, "cuda", allow_tf32)


@pytest.mark.fuzz
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU variant: TRITON_INTERPRET must be unset")
@given(fs.cases(block_kind="triton", masks=("fully-masked-rows", "causal", "additive", "bool-random"),
                magnitudes=("nan-inf", "normal", "all-negative-logits"), allow_nonfinite=True, **GPU_SIZES))
def test_triton_semantics_gpu(case):
    _check(case, "cuda", False)
