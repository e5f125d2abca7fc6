"""The Triton kernel's backward pass (dq, dk, dv through autograd) against
the oracle's gradients, within the gradient bound derived from the kernel's
declared precision model, given the output and LSE its forward saved.
CPU (interpreter, small shapes) and GPU (``gpu`` marker) variants."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import event, given, target  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flashcheck.kernels import triton_flash  # noqa: E402
from flashcheck.kernels.precision import to_float64  # noqa: E402
from flashcheck.properties import strategies as fs  # noqa: E402
from flashcheck.properties._support import ratio_of, save_failure  # noqa: E402
from flashcheck.verify import oracle  # noqa: E402
from flashcheck.verify.grad_bounds import gradient_bound  # noqa: E402

pytestmark = pytest.mark.interpreted_kernel  # skipped where the host's Triton interpreter is too old

INTERPRETED = triton_flash.is_interpreted()
NO_NAN = [m for m in fs.MAGNITUDES if m != "nan-inf"]
CPU_SIZES = dict(max_seq=24, max_scores=2**10, max_batch=2, max_heads=4, distinct_dv=False,
                 head_dims=st.sampled_from([1, 16, 33, 64]))
GPU_SIZES = dict(max_seq=2048, max_scores=2**20, max_batch=2, max_heads=8, distinct_dv=False)


def _check_backward(case, device, allow_tf32):
    import torch

    q, k, v, mask = case.to_torch(device)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = triton_flash.attention(
        q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
        return_lse=True, block_m=case.block_m, block_n=case.block_n, allow_tf32=allow_tf32,
    )
    do = torch.from_numpy(to_float64(case.do)).to(device=device, dtype=out.dtype)
    out.backward(do)
    if device == "cuda":
        torch.cuda.synchronize()
    ref = oracle.attention_case(case, keep=True)
    model = triton_flash.precision_model(case.dtype, allow_tf32=allow_tf32, device=device)
    bound = gradient_bound(ref, model, dout=case.do, out_target=to_float64(out), lse_target=to_float64(lse),
                           attn_mask=case.attn_mask)
    worst = 0.0
    for name, got, exact, b, e in (("dq", q.grad, ref.dq, bound.dq, ref.dq_err_bound),
                                   ("dk", k.grad, ref.dk, bound.dk, ref.dk_err_bound),
                                   ("dv", v.grad, ref.dv, bound.dv, ref.dv_err_bound)):
        g = to_float64(got)
        finite_bound = np.isfinite(b)
        if not finite_bound.all():
            event(f"{name}: gradient bound infinite (overflow) on some elements")
        assert np.isfinite(g[finite_bound]).all(), f"{name}: non-finite gradient where the model has no overflow"
        r = ratio_of(g[finite_bound], exact[finite_bound], b[finite_bound] + e[finite_bound])
        worst = max(worst, r)
        if not r <= 1:
            saved = save_failure(case, f"triton-backward-{device}")
            raise AssertionError(f"{name}: error/bound {r:.3g} under {model.name} (case saved to {saved})")
    target(worst, label=f"triton-backward/{case.dtype}")


@pytest.mark.fuzz
@pytest.mark.skipif(not INTERPRETED, reason="CPU variant: set TRITON_INTERPRET=1")
@given(fs.cases(block_kind="triton", with_grad=True, magnitudes=NO_NAN, **CPU_SIZES), st.booleans())
def test_triton_backward_within_gradient_bound_cpu(case, allow_tf32):
    _check_backward(case, "cpu", allow_tf32)


@pytest.mark.fuzz
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="GPU variant: TRITON_INTERPRET must be unset")
@given(fs.cases(block_kind="triton", with_grad=True, magnitudes=NO_NAN, **GPU_SIZES), st.booleans())
def test_triton_backward_within_gradient_bound_gpu(case, allow_tf32):
    _check_backward(case, "cuda", allow_tf32)
