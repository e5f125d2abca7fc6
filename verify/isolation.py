"""Run a target in a child process, so that a hang or a crash is a verdict.

`IsolatedTarget` wraps a `flashcheck.verify.targets.Target`: each call sends the case
to a long-lived worker process and waits at most ``timeout`` seconds. A
worker that hangs is killed; one that dies (segfault, CUDA error, os._exit)
is noticed; either way the call raises `TargetCrash` with the reason and
the next call starts a fresh worker. Exceptions the target raises come back
as the same type where possible (NotImplementedError must, since it means
"unsupported").
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback

import numpy as np

from flashcheck.verify.targets import Target, TargetOutput, resolve_target

__all__ = ["IsolatedTarget", "TargetCrash"]


class TargetCrash(RuntimeError):
    """The target's process hung past its timeout or died."""


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
    if spec == "triton" or spec.startswith("sdpa"):
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
        try:
            produced = target.run(case, device)
            conn.send(("ok", _to_numpy(produced.out), _to_numpy(produced.lse)))
        except NotImplementedError as exc:
            conn.send(("unsupported", str(exc), None))
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)))


def _describe_exit(code) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class IsolatedTarget:
    """Same interface as `Target`, but the work happens in a child process."""

    def __init__(self, target: Target, *, timeout: float = 120.0, startup_timeout: float = 300.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.target = target
        self.name = target.name
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None

    def model_for(self, dtype, device: str = "cpu"):
        return self.target.model_for(dtype, device)

    def _start(self):
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_worker, args=(child, self.target.name, self.target.model_name), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        # Start-up (imports) is not part of any case's time budget.
        if not parent.poll(self.startup_timeout):
            self._kill()
            raise TargetCrash(f"target process did not start within {self.startup_timeout:g} s")
        try:
            parent.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise TargetCrash(f"target process {_describe_exit(code)} while starting") from None

    def _kill(self):
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        self._proc = self._conn = None

    def close(self):
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def run(self, case, device: str) -> TargetOutput:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((case, device))
        except (BrokenPipeError, OSError) as exc:
            self._kill()
            raise TargetCrash(f"could not send the case to the target process: {exc}") from None
        if not self._conn.poll(self.timeout):
            alive = self._proc.is_alive()
            self._kill()
            if alive:
                raise TargetCrash(f"target hung: no answer within the per-case timeout of {self.timeout:g} s")
            raise TargetCrash("target process died before answering")
        try:
            kind, a, b = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._kill()
            raise TargetCrash(f"target process {_describe_exit(code)}") from None
        if kind == "unsupported":
            raise NotImplementedError(a)
        if kind == "error":
            raise TargetCrash(f"target raised {a}")
        return TargetOutput(np.asarray(a) if isinstance(a, np.ndarray) else a, b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
