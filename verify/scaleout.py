"""Spreading GPU work over the GPUs of one host.

Two kinds of work scale out:

- the pytest properties under pytest-xdist (``pytest -n N``): each worker
  ``gw0``, ``gw1``, ... is pinned to one GPU by setting
  ``CUDA_VISIBLE_DEVICES`` before torch initialises CUDA
  (`gpu_for_worker`, `pin_worker_gpu`);
- a fuzz campaign: one shard per GPU (``--shard i/N``), each in its own
  process and output directory, merged afterwards into one report
  (`shard_commands`, `merge_shards`, ``python -m flashcheck.verify.scaleout run``).

Nothing here imports torch: pinning must happen before CUDA starts, and
CUDA reads ``CUDA_VISIBLE_DEVICES`` only once, when it initialises.

>>> gpu_for_worker("gw5", 4)
1
>>> env = {"PYTEST_XDIST_WORKER": "gw3", "CUDA_VISIBLE_DEVICES": "2,5"}
>>> pin_worker_gpu(env)
'5'
>>> env["CUDA_VISIBLE_DEVICES"]
'5'
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

__all__ = [
    "GPUS_ENV",
    "PINNED_ENV",
    "count_gpus",
    "gpu_for_worker",
    "main",
    "merge_shards",
    "pin_worker_gpu",
    "run_shards",
    "shard_commands",
    "visible_devices",
]

#: Number of GPUs to spread xdist workers over (overrides detection).
GPUS_ENV = "FLASHCHECK_GPUS"
#: Set by `pin_worker_gpu` to the worker it pinned, so a second call is a no-op.
PINNED_ENV = "FLASHCHECK_PINNED_WORKER"

_WORKER_RE = re.compile(r"gw(\d+)")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def gpu_for_worker(worker_id: str | None, n_gpus: int) -> int | None:
    """GPU index (0 <= index < n_gpus) for a pytest-xdist worker, round robin.

    ``worker_id`` is the value of ``PYTEST_XDIST_WORKER`` ("gw0", "gw1",
    ...); None means not running under xdist, and gives None.

    >>> [gpu_for_worker(f"gw{i}", 2) for i in range(4)]
    [0, 1, 0, 1]
    >>> gpu_for_worker(None, 8) is None
    True
    """
    _check_count("n_gpus", n_gpus)
    if worker_id is None:
        return None
    if not isinstance(worker_id, str):
        raise TypeError(f"worker_id must be a str like 'gw0' or None, got {type(worker_id).__name__}")
    match = _WORKER_RE.fullmatch(worker_id)
    if match is None:
        raise ValueError(f"worker_id must look like 'gw0', 'gw1', ... (pytest-xdist), got {worker_id!r}")
    return int(match.group(1)) % n_gpus


def visible_devices(environ=None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (indices or GPU-/MIG- UUIDs),
    or None when it is unset.

    >>> visible_devices({"CUDA_VISIBLE_DEVICES": "2, 5"})
    ['2', '5']
    >>> visible_devices({}) is None
    True
    """
    environ = os.environ if environ is None else environ
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def count_gpus() -> int:
    """Number of GPUs ``nvidia-smi -L`` lists; 0 without nvidia-smi.

    Used instead of ``torch.cuda.device_count()``, which would cache the
    count before ``CUDA_VISIBLE_DEVICES`` is narrowed.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def pin_worker_gpu(environ=None, n_gpus: int | None = None) -> str | None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to this pytest-xdist worker's GPU.

    Call it before anything initialises CUDA (top of ``conftest.py``).
    The GPUs to share out are, in order of preference: the first
    ``n_gpus`` entries of ``CUDA_VISIBLE_DEVICES`` (all of them if
    ``n_gpus`` is None), else ``0 .. n_gpus-1``, with ``n_gpus`` from the
    argument, else ``$FLASHCHECK_GPUS``, else ``nvidia-smi -L``.

    Returns the device string the worker now sees as ``cuda:0``, or None
    when nothing was changed: not under xdist, no GPU known, or CUDA
    already initialised in this process (then a RuntimeWarning says so,
    since narrowing the variable would no longer have any effect).
    Calling it again in the same worker returns the same pin.

    >>> env = {"PYTEST_XDIST_WORKER": "gw6", "FLASHCHECK_GPUS": "4"}
    >>> pin_worker_gpu(env), env["CUDA_VISIBLE_DEVICES"]
    ('2', '2')
    >>> pin_worker_gpu({}) is None   # not under xdist
    True
    """
    environ = os.environ if environ is None else environ
    if n_gpus is not None:
        _check_count("n_gpus", n_gpus)
    worker = environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return None
    if environ.get(PINNED_ENV) == worker:
        return environ.get("CUDA_VISIBLE_DEVICES")
    gpu_for_worker(worker, 1)  # validates the worker id
    if _cuda_initialised():
        warnings.warn("pin_worker_gpu: CUDA is already initialised in this process; "
                      "CUDA_VISIBLE_DEVICES is left unchanged", RuntimeWarning, stacklevel=2)
        return None
    devices = visible_devices(environ)
    if n_gpus is None and environ.get(GPUS_ENV, "").strip():
        text = environ[GPUS_ENV].strip()
        try:
            n_gpus = _check_count(GPUS_ENV, int(text))
        except (ValueError, TypeError):
            raise ValueError(f"${GPUS_ENV} must be a positive integer, got {text!r}") from None
    if devices is not None:
        if not devices:
            return None  # CUDA_VISIBLE_DEVICES="" hides every GPU on purpose
        if n_gpus is not None:
            if n_gpus > len(devices):
                raise ValueError(f"{n_gpus} GPUs requested but CUDA_VISIBLE_DEVICES lists only {len(devices)}: "
                                 f"{','.join(devices)}")
            devices = devices[:n_gpus]
    else:
        if n_gpus is None:
            n_gpus = count_gpus()
        if n_gpus == 0:
            return None
        devices = [str(i) for i in range(n_gpus)]
    chosen = devices[gpu_for_worker(worker, len(devices))]
    environ["CUDA_VISIBLE_DEVICES"] = chosen
    environ[PINNED_ENV] = worker
    return chosen


# -- campaign shards ---------------------------------------------------------

def _split_out(base_args: list[str]) -> tuple[list[str], str]:
    """``base_args`` without its ``--out``, and the ``--out`` value."""
    rest, out, i = [], "reports/latest", 0
    while i < len(base_args):
        arg = base_args[i]
        if arg == "--out":
            if i + 1 >= len(base_args):
                raise ValueError("--out needs a directory")
            out, i = base_args[i + 1], i + 2
            continue
        if arg.startswith("--out="):
            out = arg[len("--out="):]
        else:
            rest.append(arg)
        i += 1
    return rest, out


def shard_commands(n_gpus: int, base_args, *, devices=None, python: str | None = None,
                   per_gpu: int = 1) -> list[tuple[dict, list]]:
    """One ``python -m flashcheck fuzz`` command per GPU: shard i of n_gpus
    (``per_gpu`` > 1: that many shards share each GPU, n_gpus * per_gpu in
    all, shard i on GPU i mod n_gpus; a case's host-side work, generation,
    the isolated worker's transfers, mpmath rows, then overlaps another's
    GPU work).

    ``base_args`` are the fuzz options shared by every shard (``--target``,
    ``--seed``, ``--out DIR`` ...); they must not contain ``--shard``. Shard
    i gets ``--shard i/N``, ``--out DIR/shard-i`` and the environment
    overlay ``{"CUDA_VISIBLE_DEVICES": devices[i]}`` (``devices`` defaults to
    ``"0" .. "N-1"``). Returns ``[(env_overlay, argv), ...]``; merge the
    overlay into ``os.environ`` to run one.

    >>> env, argv = shard_commands(2, ["--target", "triton", "--out", "r"], python="py")[1]
    >>> env
    {'CUDA_VISIBLE_DEVICES': '1'}
    >>> " ".join(argv)
    'py -m flashcheck fuzz --target triton --shard 1/2 --out r/shard-1'
    """
    _check_count("n_gpus", n_gpus)
    if isinstance(base_args, str) or not all(isinstance(a, str) for a in base_args):
        raise TypeError("base_args must be a list of strings (the fuzz options), not one string")
    base_args = list(base_args)
    if any(a == "--shard" or a.startswith("--shard=") for a in base_args):
        raise ValueError("base_args must not contain --shard: shard_commands sets it per GPU")
    if devices is None:
        devices = [str(i) for i in range(n_gpus)]
    else:
        devices = [str(d) for d in devices]
        if len(devices) != n_gpus:
            raise ValueError(f"devices lists {len(devices)} GPUs but n_gpus is {n_gpus}")
    per_gpu = _check_count("per_gpu", per_gpu)
    rest, out = _split_out(base_args)
    python = sys.executable if python is None else python
    commands = []
    n = n_gpus * per_gpu
    for i in range(n):
        argv = [python, "-m", "flashcheck", "fuzz", *rest, "--shard", f"{i}/{n}",
                "--out", str(Path(out) / f"shard-{i}")]
        commands.append(({"CUDA_VISIBLE_DEVICES": devices[i % n_gpus]}, argv))
    return commands


def merge_shards(dirs, out, meta: dict | None = None) -> list[dict]:
    """Concatenate the ``cases.jsonl`` of shard directories into ``out``
    and write its ``summary.json``, ``meta.json`` and ``index.html``.

    Repro files of the shards are copied into ``out/repro``. A case id that
    appears in two shards is an error (shards must partition the cases).
    Returns the merged rows.
    """
    from flashcheck.reports.records import CASES_FILE, REPRO_DIR, CaseWriter, read_cases
    from flashcheck.verify.campaign import write_reports

    if isinstance(dirs, (str, os.PathLike)):
        raise TypeError("dirs must be a list of shard directories, not one path")
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("merge_shards needs at least one shard directory")
    out = Path(out)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise ValueError(f"out {out} must differ from the shard directories")
    rows, owner = [], {}
    for d in dirs:
        shard_rows = read_cases(d)  # raises FileNotFoundError naming the file
        for row in shard_rows:
            key = (row.get("case_id"), row.get("target"))
            if owner.setdefault(key, d) != d:
                raise ValueError(f"case {key[0]} (target {key[1]}) is in both {owner[key]} and {d}: "
                                 "the shards overlap (different seeds or options?)")
        rows += shard_rows
    out.mkdir(parents=True, exist_ok=True)
    (out / CASES_FILE).unlink(missing_ok=True)  # CaseWriter appends
    with CaseWriter(out / CASES_FILE, fsync_every=max(1, len(rows))) as writer:
        writer.write_all(rows)
    for d in dirs:
        if (d / REPRO_DIR).is_dir():
            shutil.copytree(d / REPRO_DIR, out / REPRO_DIR, dirs_exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("shards", [str(d) for d in dirs])
    write_reports(rows, out, meta)
    return rows


def merged_profile(dirs, wall: float) -> dict:
    """The shards' campaign profiles (``meta.json``) added up, with the
    cases per second of the whole run (all shards' cases over ``wall``)."""
    import json

    phases, cases = {}, 0
    for d in dirs:
        meta_path = Path(d) / "meta.json"
        if not meta_path.is_file():
            continue
        prof = json.loads(meta_path.read_text()).get("profile") or {}
        cases += int(prof.get("cases") or 0)
        for name, entry in (prof.get("phases") or {}).items():
            acc = phases.setdefault(name, {"seconds": 0.0, "calls": 0})
            acc["seconds"] = round(acc["seconds"] + entry["seconds"], 3)
            acc["calls"] += entry["calls"]
    return {"phases": phases, "wall_s": round(wall, 3), "cases": cases,
            "cases_per_s": round(cases / wall, 3) if wall > 0 else None, "summed_over_shards": len(dirs)}


def run_shards(n_gpus: int, fuzz_args, *, devices=None, per_gpu: int = 1) -> int:
    """Run the shards in parallel, wait, merge; 0 if every shard exited 0.

    The merged report goes to the ``--out`` of ``fuzz_args``; each shard
    keeps its own under ``OUT/shard-i``. The exit status is the worst one
    of the shards (2, a usage error, beats 1, failing cases).
    """
    commands = shard_commands(n_gpus, fuzz_args, devices=devices, per_gpu=per_gpu)
    n_gpus = len(commands)  # shards
    _, out = _split_out(list(fuzz_args))
    start = time.monotonic()
    procs = [subprocess.Popen(argv, env={**os.environ, **env}) for env, argv in commands]
    codes = [p.wait() for p in procs]
    for i, code in enumerate(codes):
        if code != 0:
            print(f"shard {i}/{n_gpus} exited with status {code}", file=sys.stderr)
    dirs = [Path(argv[-1]) for _, argv in commands]
    present = [d for d in dirs if (d / "cases.jsonl").is_file()]
    if present:
        wall = time.monotonic() - start
        prof = merged_profile(present, wall)
        rows = merge_shards(present, out, meta={"shard_exit_codes": codes, "seconds": round(wall, 1),
                                                "profile": prof})
        fails = sum(r.get("verdict") == "fail" for r in rows)
        print(f"merged {len(present)} of {n_gpus} shards: {len(rows)} runs, {fails} failed, {prof['cases']} cases in "
              f"{wall:.0f} s ({prof['cases_per_s']} cases/s); report: {out}/index.html")
    if any(c == 2 for c in codes):
        return 2
    return 1 if any(codes) or len(present) < n_gpus else 0


def main(argv=None) -> int:
    """``python -m flashcheck.verify.scaleout run --gpus N [--devices 2,5] -- FUZZ_ARGS``."""
    parser = argparse.ArgumentParser(prog="python -m flashcheck.verify.scaleout",
                                     description="Run a fuzz campaign as one shard per GPU and merge the reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one campaign shard per GPU in parallel, then merge")
    run.add_argument("--gpus", type=int, default=None,
                     help="number of GPUs (default: CUDA_VISIBLE_DEVICES, else nvidia-smi)")
    run.add_argument("--devices", default=None, help="comma-separated CUDA device ids to use (default 0..N-1)")
    run.add_argument("--per-gpu", type=int, default=1, metavar="K",
                     help="shards per GPU (default 1): K campaigns share each GPU, N*K shards in all")
    run.add_argument("fuzz_args", nargs=argparse.REMAINDER, help="-- then the options of 'python -m flashcheck fuzz'")
    merge = sub.add_parser("merge", help="merge existing shard directories")
    merge.add_argument("--out", required=True)
    merge.add_argument("dirs", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            rows = merge_shards(args.dirs, args.out)
            print(f"merged {len(args.dirs)} shards: {len(rows)} runs; report: {args.out}/index.html")
            return 0
        fuzz_args = args.fuzz_args[1:] if args.fuzz_args[:1] == ["--"] else args.fuzz_args
        if not fuzz_args:
            parser.error("give the fuzz options after --")
        devices = [d.strip() for d in args.devices.split(",")] if args.devices else visible_devices()
        n = args.gpus if args.gpus is not None else (len(devices) if devices else count_gpus())
        if not n:
            parser.error("no GPU found: pass --gpus N")
        if devices is not None:
            if n > len(devices):
                raise ValueError(f"--gpus {n} but only {len(devices)} devices are listed: {','.join(devices)}")
            devices = devices[:n]
        return run_shards(n, fuzz_args, devices=devices, per_gpu=args.per_gpu)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"python -m flashcheck.verify.scaleout: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
