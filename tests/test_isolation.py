"""Targets in child processes: a device fault is charged to the case that
caused it, the dead worker is replaced, and a fault or crash in a worker that
ran earlier cases is replayed in a fresh one to confirm whose it is.

The faults are simulated on the CPU (`flashcheck.verify.planted`: correct
on head dims that are multiples of FAULT_ALIGN, faulting on the others). Each
worker start costs 1-3 s (spawn, torch import), so the sequences are short."""

import pickle

import numpy as np
import pytest

from flashcheck.properties.case import Case
from flashcheck.verify import planted
from flashcheck.verify.check import judge, run_case
from flashcheck.verify.isolation import (
    DEVICE_FAULTS,
    IsolatedTarget,
    TargetCrash,
    classify_exception,
    fault_kind,
)
from flashcheck.verify.targets import resolve_target

GOOD = 2 * planted.FAULT_ALIGN  # head dims the simulated faults leave alone
BAD = planted.FAULT_ALIGN + 8  # and one that trips them


def _case(d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, 8, d)).astype(np.float16) for _ in range(3))
    return Case(q, k, v)


def _isolated(name, timeout=60.0):
    return IsolatedTarget(resolve_target(f"flashcheck.verify.planted:{name}"), timeout=timeout)


def _passes(runner, case):
    result = run_case(case, runner, baseline=False)
    assert result.verdict == "pass", result.reason
    return result


# -- recognising faults from their messages ------------------------------------------

@pytest.mark.parametrize("message, name", [
    ("RuntimeError: CUDA error: misaligned address\nCUDA kernel errors might be asynchronously reported",
     "misaligned address"),
    ("torch.AcceleratorError: CUDA error: an illegal memory access was encountered", "illegal memory access"),
    ("CUDA error: an illegal instruction was encountered", "illegal instruction"),
    ("CUDA error: device-side assert triggered", "device-side assert"),
    ("CUDA error: unspecified launch failure", "launch failure"),
    ("CUDA error: the launch timed out and was terminated", "launch timeout"),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k)`",
     "cuBLAS execution failed"),
    ("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED", "cuDNN execution failed"),
    ("Triton Error [CUDA]: misaligned address", "misaligned address"),
    ("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access", "illegal memory access"),
    ("HIP error: hipErrorIllegalAddress", "illegal memory access"),
    ("Memory access fault by GPU node-2 (Agent handle: 0x55d0) on address 0x7f00. Reason: Page not present",
     "memory access fault"),
    ("CUDA driver error: unknown error", "CUDA error"),
    ("CUDA error: unknown error", "CUDA error"),
    ("HIP error: unknown error", "HIP error"),
    ("AcceleratorError: the device is gone", "accelerator error"),
])
def test_fault_kind_names_device_faults(message, name):
    assert fault_kind(message) == name


@pytest.mark.parametrize("message", [
    "RuntimeError: No available kernel. Aborting execution.",
    "ValueError: q, k, v must have rank 4 (B, H, N, D)",
    "NotImplementedError: SDPA backend CUDNN_ATTENTION does not support this case",
    "RuntimeError: cutlassF: no kernel found to launch!",
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: out of memory",  # refuses one call; the context lives
    "RuntimeError: CUDA error: invalid configuration argument",
    "RuntimeError: planted failure",
    "",
])
def test_fault_kind_is_none_for_errors_that_leave_the_device_usable(message):
    assert fault_kind(message) is None


def test_fault_list_is_data_with_reasons():
    names = [name for name, _, _ in DEVICE_FAULTS]
    assert len(names) == len(set(names))
    assert all(needles and why for _, needles, why in DEVICE_FAULTS)
    with pytest.raises(TypeError, match="classify_exception"):
        fault_kind(RuntimeError("CUDA error: misaligned address"))


def test_classify_exception_in_process():
    planted.reset_simulated_faults()
    try:
        with pytest.raises(RuntimeError) as bad:
            planted.poisons_device(*_case(BAD).to_torch()[:3])
        assert classify_exception(bad.value) == "fault"
        with pytest.raises(RuntimeError) as later:  # the simulated context stays dead
            planted.poisons_device(*_case(GOOD).to_torch()[:3])
        assert classify_exception(later.value, device="cpu") == "fault"
    finally:
        planted.reset_simulated_faults()
    assert planted.poisons_device(*_case(GOOD).to_torch()[:3]).shape == (1, 2, 8, GOOD)
    assert classify_exception(RuntimeError("No available kernel")) == "raised"
    assert classify_exception(ValueError("bad shape"), device="cpu") == "raised"
    try:  # a wrapped CUDA error still leaves the device dead
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as exc:
            raise NotImplementedError("backend gave up") from exc
    except NotImplementedError as wrapped:
        assert classify_exception(wrapped) == "fault"


def test_target_crash_carries_kind_and_replay():
    exc = TargetCrash("x", kind="fault", replay="not reproduced", fresh_output=None)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.kind, back.replay, str(back)) == ("fault", "not reproduced", "x")
    with pytest.raises(ValueError, match="kind 'died'"):
        TargetCrash("x", kind="died")
    with pytest.raises(ValueError, match="replay 'yes'"):
        TargetCrash("x", replay="yes")


# -- isolated workers (each start costs seconds) ---------------------------------------

def test_fault_fails_only_its_case_and_the_worker_is_replaced():
    """The H100 campaign's failure mode: after one fault, every later case of the
    target failed the same way. Here only the faulting case fails."""
    with _isolated("poisons_device") as runner:
        _passes(runner, _case(GOOD, 0))
        assert runner.starts == 1
        with pytest.raises(TargetCrash) as info:
            runner.run(_case(BAD), "cpu")
        exc = info.value
        assert (exc.kind, exc.replay) == ("fault", "reproduced"), str(exc)
        assert "device fault (misaligned address)" in str(exc)
        assert "in a warm process after 1 earlier case (reproduced in a fresh process)" in str(exc)
        assert runner.starts == 2  # the replay's worker, which faulted too and is gone
        _passes(runner, _case(GOOD, 1))
        _passes(runner, _case(GOOD, 2))
        assert runner.starts == 3  # one fresh worker serves both later cases


def test_fault_on_a_fresh_workers_first_case_is_not_replayed():
    with _isolated("poisons_device") as runner:
        with pytest.raises(TargetCrash) as info:
            runner.run(_case(BAD), "cpu")
        assert (info.value.kind, info.value.replay) == ("fault", None)
        assert "in a fresh process (its first case" in str(info.value)
        assert runner.starts == 1
        failed = run_case(_case(BAD), runner, baseline=False)  # how a campaign records it
        assert failed.verdict == "fail" and "misaligned address" in failed.reason
        _passes(runner, _case(GOOD))
        assert runner.starts == 3


def test_fault_that_belongs_to_an_earlier_case_is_not_reproduced():
    """faults_late: the bad case returns, the next (good) case raises. The replay
    in a fresh process clears the good case and hands back its output."""
    with _isolated("faults_late") as runner:
        assert runner.run(_case(BAD), "cpu").out.shape == (1, 2, 8, BAD)  # the real culprit, unnoticed
        good = _case(GOOD)
        with pytest.raises(TargetCrash) as info:
            runner.run(good, "cpu")
        exc = info.value
        assert (exc.kind, exc.replay) == ("fault", "not reproduced"), str(exc)
        assert "illegal memory access" in str(exc) and "a fresh process returned an output" in str(exc)
        assert judge(good, exc.fresh_output.out, model=runner.model_for(good.dtype)).verdict == "pass"
        assert runner.starts == 2
        _passes(runner, _case(GOOD, 1))
        assert runner.starts == 2  # the replay's worker lives on and serves later cases


def test_crash_in_a_warm_worker_is_replayed():
    with _isolated("crashes_sometimes") as runner:
        _passes(runner, _case(GOOD))
        with pytest.raises(TargetCrash) as info:
            runner.run(_case(BAD), "cpu")
        exc = info.value
        assert (exc.kind, exc.replay) == ("crash", "reproduced"), str(exc)
        assert "exited with status 1" in str(exc) and "(reproduced in a fresh process)" in str(exc)
        _passes(runner, _case(GOOD, 1))
        assert runner.starts == 3


def test_run_fresh_uses_a_new_worker_and_keeps_the_current_one():
    with _isolated("poisons_device") as runner:
        _passes(runner, _case(GOOD))
        with pytest.raises(TargetCrash) as info:
            runner.run_fresh(_case(BAD), "cpu")
        assert (info.value.kind, info.value.replay) == ("fault", None)
        assert runner.run_fresh(_case(GOOD, 1), "cpu").out.shape == (1, 2, 8, GOOD)
        assert runner.starts == 3
        _passes(runner, _case(GOOD, 2))
        assert runner.starts == 3  # the first worker was not disturbed


def test_ordinary_exception_keeps_the_worker():
    with _isolated("raises") as runner:
        for _ in range(2):
            with pytest.raises(TargetCrash, match="target raised RuntimeError: planted failure") as info:
                runner.run(_case(GOOD), "cpu")
            assert (info.value.kind, info.value.replay) == ("raised", None)
        assert runner.starts == 1


def test_hang_in_a_warm_worker_is_not_replayed():
    """A replay would cost a whole timeout again."""
    with _isolated("hangs_sometimes", timeout=1.0) as runner:
        _passes(runner, _case(GOOD))
        with pytest.raises(TargetCrash, match="hung") as info:
            runner.run(_case(BAD), "cpu")
        assert (info.value.kind, info.value.replay, runner.starts) == ("hang", None, 1)
        _passes(runner, _case(GOOD, 1))
        assert runner.starts == 2
