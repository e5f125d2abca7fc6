"""torch's scaled_dot_product_attention backends against the oracle, each
judged by the model its target declares (`flashcheck.verify.targets`): on a GPU the
``+gpu`` variant of ``fa2`` / ``fp32-ieee``. A backend that does not support
a case (it raises "No available kernel") is recorded as an event, not a
failure. Each backend runs in a child process (`flashcheck.verify.isolation`): on the
H100 one of them hit "CUDA error: misaligned address", which poisons the
CUDA context of the process that ran it."""

import numpy as np
import pytest
from hypothesis import event, given, target
from hypothesis import strategies as st

from flashcheck.properties import strategies as fs
from flashcheck.properties._support import save_failure
from flashcheck.verify import oracle
from flashcheck.verify.check import judge
from flashcheck.verify.isolation import IsolatedTarget, TargetCrash
from flashcheck.verify.targets import resolve_target

NO_NAN = [m for m in fs.MAGNITUDES if m != "nan-inf"]
GPU_SIZES = dict(max_seq=2048, max_scores=2**20, max_batch=2, max_heads=8)
BACKENDS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")


_WORKERS = {}


def _check(case, name, device):
    t = resolve_target(name)
    runner = _WORKERS.setdefault(name, IsolatedTarget(t, timeout=120)) if device == "cuda" else t
    try:
        produced = runner.run(case, device)
    except NotImplementedError:
        event(f"{name}: unsupported")
        return
    except TargetCrash as exc:
        saved = save_failure(case, f"{name}-{device}")
        raise AssertionError(f"{name}: {exc} (case saved to {saved})") from None
    ref = oracle.attention_case(case, keep=True, with_grad=False)
    verdict = judge(case, produced.out, produced.lse, model=t.model_for(case.dtype, device), ref=ref)
    if verdict.ratio is not None and np.isfinite(verdict.ratio):
        target(float(verdict.ratio), label=f"{name}/{case.dtype}")
    if verdict.verdict != "pass":
        saved = save_failure(case, f"{name}-{device}")
        raise AssertionError(f"{name}: {verdict.reason} (case saved to {saved})")


@pytest.mark.fuzz
@pytest.mark.gpu
@given(fs.cases(magnitudes=NO_NAN, **GPU_SIZES), st.sampled_from(BACKENDS))
def test_sdpa_backend_within_bound_gpu(case, backend):
    _check(case, backend, "cuda")


@pytest.mark.fuzz
@given(fs.cases(magnitudes=NO_NAN, max_seq=48, max_scores=2**11))
def test_sdpa_math_within_bound_cpu(case):
    _check(case, "sdpa-math", "cpu")
