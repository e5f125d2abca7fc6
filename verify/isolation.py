"""Run a target in a child process, so that a hang, a crash or a dead device is a verdict.

`IsolatedTarget` wraps a `flashcheck.verify.targets.Target`: each call sends the case
to a long-lived worker process and waits at most ``timeout`` seconds. Every
failure raises `TargetCrash`, whose ``kind`` says what happened:

``"raised"``  the target raised an ordinary exception; the worker lives on;
``"fault"``   a device fault (`fault_kind`: a CUDA error such as "misaligned
              address", or a device that fails a probe after the error): the
              worker's CUDA context is dead, so the worker exits;
``"crash"``   the worker died (segfault, abort, os._exit);
``"hang"``    no answer within ``timeout``: the worker is killed.

After a fault, crash or hang the next call starts a fresh worker. A fault or
crash in a worker that had already run earlier cases may belong to one of
them (CUDA errors surface asynchronously), so the case is replayed once in a
fresh worker and ``replay`` says "reproduced" or "not reproduced" (then
``fresh_output`` holds what the fresh worker returned); ``replay`` is None
when the case was the worker's first, or for hangs (a replay costs a whole
timeout). NotImplementedError comes back as itself: it means "unsupported".

`fault_kind` and `classify_exception` serve callers that run targets in
their own process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback

import numpy as np

from flashcheck.verify.targets import Target, TargetOutput, resolve_target

__all__ = ["CRASH_KINDS", "DEVICE_FAULTS", "RECOVERABLE_DEVICE_ERRORS", "IsolatedTarget", "TargetCrash",
           "classify_exception", "fault_kind"]

#: TargetCrash.kind values.
CRASH_KINDS = ("raised", "fault", "crash", "hang")

#: Errors after which the device is unusable in this process: (canonical name,
#: substrings that identify it (any case), why it is here). First match wins,
#: so specific entries come before the generic ones at the end.
DEVICE_FAULTS = (
    ("misaligned address", ("misaligned address", "CUDA_ERROR_MISALIGNED_ADDRESS", "cudaErrorMisalignedAddress"),
     "a kernel's unaligned load or store; sticky: seen from cuDNN SDPA on the H100, every later case then failed"),
    ("illegal memory access", ("illegal memory access", "CUDA_ERROR_ILLEGAL_ADDRESS", "cudaErrorIllegalAddress",
                               "hipErrorIllegalAddress"),
     "an out-of-bounds access by a kernel; sticky for the context"),
    ("illegal instruction", ("illegal instruction", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "cudaErrorIllegalInstruction"),
     "a kernel executed an invalid instruction; sticky"),
    ("device-side assert", ("device-side assert", "CUDA_ERROR_ASSERT", "cudaErrorAssert", "hipErrorAssert"),
     "a kernel's assert fired; the context cannot launch again"),
    ("launch failure", ("unspecified launch failure", "CUDA_ERROR_LAUNCH_FAILED", "cudaErrorLaunchFailure",
                        "hipErrorLaunchFailure"),
     "a kernel died without a more specific reason; sticky"),
    ("launch timeout", ("launch timed out", "CUDA_ERROR_LAUNCH_TIMEOUT", "cudaErrorLaunchTimeout"),
     "the watchdog killed a kernel; the context is left unusable"),
    ("hardware stack error", ("hardware stack error", "CUDA_ERROR_HARDWARE_STACK_ERROR"),
     "stack corruption or overflow in a kernel; sticky"),
    ("invalid program counter", ("invalid program counter", "CUDA_ERROR_INVALID_PC"), "a kernel jumped astray; sticky"),
    ("ECC error", ("uncorrectable ECC error", "CUDA_ERROR_ECC_UNCORRECTABLE"), "device memory is corrupt"),
    ("cuBLAS execution failed", ("CUBLAS_STATUS_EXECUTION_FAILED",),
     "how cuBLAS reports a kernel fault (often an illegal access in an earlier kernel)"),
    ("cuDNN execution failed", ("CUDNN_STATUS_EXECUTION_FAILED",), "how cuDNN reports a kernel fault"),
    ("memory access fault", ("memory access fault", "HSA_STATUS_ERROR_MEMORY_APERTURE_VIOLATION",
                             "HSA_STATUS_ERROR_EXCEPTION"),
     "ROCm's words for an illegal access; the HSA queue is dead"),
    # Generic ones, after RECOVERABLE_DEVICE_ERRORS: the message alone cannot
    # tell which code it was, and a wrongly kept worker poisons every later
    # case, while a wrongly restarted one costs a few seconds.
    ("CUDA error", ("CUDA error:", "CUDA driver error", "Triton Error [CUDA]", "CUDA_ERROR_", "cudaError"),
     "torch's, the driver API's and Triton's wording for any other CUDA failure"),
    ("HIP error", ("HIP error:", "hipError"), "the same on ROCm"),
    ("accelerator error", ("AcceleratorError",),
     "torch.AcceleratorError's type name (torch >= 2.8 raises it for device errors)"),
)

#: CUDA errors that refuse one call and leave the context usable (not sticky),
#: so the generic "CUDA error" entry must not restart the worker for them; the
#: worker's device probe still catches a context that died anyway.
RECOVERABLE_DEVICE_ERRORS = (
    "out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "invalid argument", "invalid configuration argument",
    "CUDA_ERROR_INVALID_VALUE", "too many resources requested for launch", "no kernel image is available",
    "operation not supported", "CUDA_ERROR_NOT_SUPPORTED", "cudaErrorMemoryAllocation", "cudaErrorInvalidValue",
    "cudaErrorInvalidConfiguration", "cudaErrorLaunchOutOfResources", "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    "cudaErrorNoKernelImageForDevice", "CUDA_ERROR_NO_BINARY_FOR_GPU",
)

_GENERIC = {"CUDA error", "HIP error", "accelerator error"}


def fault_kind(message: str) -> str | None:
    """The canonical name of the device fault that ``message`` reports (see
    `DEVICE_FAULTS`), or None for an error that leaves the device usable.

    >>> fault_kind("RuntimeError: CUDA error: misaligned address")
    'misaligned address'
    >>> fault_kind("CUDA error: out of memory") is None
    True
    """
    if not isinstance(message, str):
        raise TypeError(f"fault_kind takes an error message (str), got {type(message).__name__}; "
                        f"pass str(exc), or use classify_exception(exc)")
    text = message.lower()
    recoverable = any(s.lower() in text for s in RECOVERABLE_DEVICE_ERRORS)
    for name, needles, _why in DEVICE_FAULTS:
        if name in _GENERIC and recoverable:
            return None
        if any(s.lower() in text for s in needles):
            return name
    return None


def _describe_exc(exc: BaseException) -> str:
    """"Type: first line of the message" (CUDA errors append boilerplate lines)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _fault_in_chain(exc: BaseException) -> tuple[str, str] | None:
    """(fault name, description) of the first exception in ``exc``'s
    cause/context chain that reports a device fault, or None. A target that
    wraps a CUDA error in another exception still leaves the device dead."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = fault_kind(f"{type(exc).__name__}: {exc}")
        if name is not None:
            return name, _describe_exc(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _on_gpu(device) -> bool:
    return str(device).startswith("cuda")  # ROCm builds of torch call their device "cuda" too


def _probe(device) -> str | None:
    """None if the device still runs a kernel, else what went wrong."""
    try:
        import torch

        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
    except BaseException as exc:  # noqa: BLE001 - any failure means the device is unusable
        return _describe_exc(exc)
    return None


def classify_exception(exc: BaseException, device: str | None = None) -> str:
    """"fault" when ``exc`` (or an exception it wraps) reports a device fault, or
    when ``device`` is a CUDA device that no longer runs a kernel; "raised"
    otherwise. For callers that run targets in their own process: after
    "fault", every later device call in that process fails too, so stop using it."""
    if not isinstance(exc, BaseException):
        raise TypeError(f"classify_exception takes an exception, got {type(exc).__name__}")
    if _fault_in_chain(exc) is not None:
        return "fault"
    if device is not None and _on_gpu(device) and _probe(device) is not None:
        return "fault"
    return "raised"


class TargetCrash(RuntimeError):
    """The target failed as a program: it raised, hit a device fault, died or hung.

    ``kind``: one of `CRASH_KINDS`. ``replay``: None (not replayed: the case
    was its process's first, or a hang or ordinary exception), "reproduced"
    or "not reproduced" (the case, replayed in a fresh process, did not fail
    that way; ``fresh_output`` is then the fresh process's `TargetOutput`,
    when it returned one, for the caller to judge). ``what``: what happened,
    without where it was replayed (the message by default), so that one bug
    reads the same whether it struck a fresh or a warm process.
    """

    def __init__(self, message: str, *, kind: str = "crash", replay: str | None = None, fresh_output=None,
                 what: str | None = None):
        if kind not in CRASH_KINDS:
            raise ValueError(f"TargetCrash kind {kind!r}; expected one of {CRASH_KINDS}")
        if replay not in (None, "reproduced", "not reproduced"):
            raise ValueError(f"TargetCrash replay {replay!r}; expected None, 'reproduced' or 'not reproduced'")
        super().__init__(message)
        self.kind = kind
        self.replay = replay
        self.fresh_output = fresh_output
        self.what = message if what is None else what


def _to_numpy(t):
    """A torch tensor as a NumPy array with the same dtype and values."""
    if t is None:
        return None
    if not hasattr(t, "detach"):
        return t  # let the parent judge whatever came back
    t = t.detach().to("cpu")
    if str(t.dtype) == "torch.bfloat16":
        import ml_dtypes
        import torch

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _worker(conn, spec: str, model_name):
    target = resolve_target(spec, model_name)
    if spec in ("triton", "flex", "compiled-math") or spec.startswith("sdpa"):
        import torch  # noqa: F401 - pay for the import before the first timed case
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        case, device = msg
        gpu = _on_gpu(device)
        try:
            produced = target.run(case, device)
            if gpu:
                # An asynchronous fault surfaces here, charged to the case that caused it.
                import torch

                torch.cuda.synchronize()
            grads = None if produced.grads is None else tuple(_to_numpy(g) for g in produced.grads)
            reply = ("ok", _to_numpy(produced.out), (_to_numpy(produced.lse), grads, produced.grad_error))
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            fault = _fault_in_chain(exc)
            probe = _probe(device) if gpu else None
            if fault is not None or probe is not None:
                conn.send(("fault", fault or (None, _describe_exc(exc)), probe))
                conn.close()
                os._exit(0)  # the context is dead: skip its teardown, which may hang
            if isinstance(exc, NotImplementedError):
                reply = ("unsupported", str(exc), None)
            else:
                reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4))
        conn.send(reply)


def _describe_exit(code) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _fault_message(name: str | None, text: str, probe: str | None) -> str:
    if name is not None:
        return f"device fault ({name}): {text}"
    return f"device fault: the device failed a probe ({probe}) after the target raised {text}"


def _cases(n: int) -> str:
    return f"{n} earlier case" + ("" if n == 1 else "s")


class _Worker:
    """One worker process and its pipe; ``cases`` counts the cases sent to it."""

    def __init__(self, ctx, spec: str, model_name, startup_timeout: float):
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec, model_name), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.cases = 0
        # Start-up (imports) is not part of any case's time budget.
        if not parent.poll(startup_timeout):
            self.kill()
            raise TargetCrash(f"target process did not start within {startup_timeout:g} s", kind="hang")
        try:
            parent.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.kill()
            raise TargetCrash(f"target process {_describe_exit(code)} while starting", kind="crash") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def ask(self, case, device: str, timeout: float) -> tuple[str, object]:
        """(status, payload): ("ok", TargetOutput), ("unsupported", message), or
        ("raised" | "fault" | "crash" | "hang", reason); after the last three
        the process is gone."""
        self.cases += 1
        try:
            self.conn.send((case, device))
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            return "crash", f"could not send the case to the target process: {exc}"
        if not self.conn.poll(timeout):
            alive = self.proc.is_alive()
            self.kill()
            if alive:
                return "hang", (f"target hung: no answer within the per-case timeout of {timeout:g} s "
                                f"(raise the timeout if the case is merely slow)")
            return "crash", "target process died before answering"
        try:
            status, a, b = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.kill()
            return "crash", f"target process {_describe_exit(code)}"
        if status == "ok":
            lse, grads, grad_error = b
            return "ok", TargetOutput(np.asarray(a) if isinstance(a, np.ndarray) else a, lse, grads, grad_error)
        if status == "unsupported":
            return "unsupported", a
        if status == "fault":
            self.proc.join(5)
            self.kill()
            return "fault", _fault_message(*a, b)
        return "raised", f"target raised {a}"

    def kill(self):
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
            try:
                self.proc.close()  # frees its handles now rather than at garbage collection
            except ValueError:
                pass  # still running after SIGKILL and 5 s: leave it to the daemon flag
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self):
        if self.alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


class IsolatedTarget:
    """Same interface as `Target`, but the work happens in a child process.

    ``starts`` counts the worker processes started (replays included).
    """

    def __init__(self, target: Target, *, timeout: float = 120.0, startup_timeout: float = 300.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.target = target
        self.name = target.name
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self.starts = 0
        self._ctx = mp.get_context("spawn")
        self._worker: _Worker | None = None

    def model_for(self, dtype, device: str = "cpu"):
        return self.target.model_for(dtype, device)

    def _new_worker(self) -> _Worker:
        self.starts += 1
        return _Worker(self._ctx, self.target.name, self.target.model_name, self.startup_timeout)

    def close(self):
        if self._worker is not None:
            self._worker.close()
        self._worker = None

    def _ask(self, worker: _Worker, case, device: str) -> tuple[str, object]:
        status, payload = worker.ask(case, device, self.timeout)
        if status in ("fault", "crash", "hang") and worker is self._worker:
            self._worker = None  # gone: the next case gets a fresh one
        return status, payload

    @staticmethod
    def _result(status: str, payload) -> TargetOutput:
        if status == "ok":
            return payload
        if status == "unsupported":
            raise NotImplementedError(payload)
        raise TargetCrash(payload, kind=status)

    def run(self, case, device: str) -> TargetOutput:
        if self._worker is not None and not self._worker.alive():
            self.close()  # died between cases
        if self._worker is None:
            self._worker = self._new_worker()
        earlier = self._worker.cases
        status, payload = self._ask(self._worker, case, device)
        if status not in ("fault", "crash"):
            return self._result(status, payload)
        if earlier == 0:
            raise TargetCrash(f"{payload}, in a fresh process (its first case, so this case caused it)", kind=status,
                              what=payload)
        return self._replay(case, device, status, payload, earlier)

    def _replay(self, case, device: str, kind: str, reason: str, earlier: int):
        """Run ``case`` again in a fresh worker, which then serves later cases if it survives."""
        first = f"{reason}, in a warm process after {_cases(earlier)}"
        try:
            self._worker = self._new_worker()
        except TargetCrash as exc:
            raise TargetCrash(f"{first}; replaying it in a fresh process failed: {exc}", kind=kind,
                              what=reason) from None
        status, payload = self._ask(self._worker, case, device)
        if status in ("fault", "crash"):
            again = "" if payload == reason else f": {payload}"
            raise TargetCrash(f"{first} (reproduced in a fresh process{again})", kind=kind, replay="reproduced",
                              what=reason)
        if status == "ok":
            raise TargetCrash(
                f"{first}; not reproduced: a fresh process returned an output for this case, so an earlier case "
                f"in the warm process may have caused it (device errors can surface a case late); judge the "
                f"fresh output (TargetCrash.fresh_output)", kind=kind, replay="not reproduced", fresh_output=payload,
                what=reason)
        fresh = f"the target declined it ({payload})" if status == "unsupported" else payload
        raise TargetCrash(f"{first}; not reproduced: in a fresh process, {fresh}", kind=kind, replay="not reproduced",
                          what=reason)

    def run_fresh(self, case, device: str) -> TargetOutput:
        """Run ``case`` in a brand-new worker that is closed afterwards (the
        current worker is kept): a verdict no earlier case can have caused."""
        worker = self._new_worker()
        try:
            status, payload = worker.ask(case, device, self.timeout)
        finally:
            worker.close()
        if status in ("fault", "crash"):
            raise TargetCrash(f"{payload}, in a fresh process (its first case, so this case caused it)", kind=status,
                              what=payload)
        return self._result(status, payload)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
