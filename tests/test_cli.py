"""`python -m flashcheck`: exit codes, outputs, replay and diff, as a user runs them."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashcheck.properties.case import Case
from flashcheck.verify.cli import main


def _fuzz(tmp_path, *targets, extra=()):
    argv = ["fuzz", "--max-examples", "6", "--seed", "3", "--no-isolate", "--no-progress", "--out", str(tmp_path)]
    for t in targets:
        argv += ["--target", t]
    return main(argv + list(extra))


@pytest.mark.parametrize("argv, message", [
    (["fuzz", "--target", "no-such-target"], "unknown target"),
    (["fuzz", "--target", "no_such_module_xyz:fn"], "cannot import"),
    (["fuzz", "--target", "flashcheck.verify.planted:nothing_here"], "no attribute"),
    (["fuzz", "--target", "numpy-tiled", "--dtype", "fp8"], "--dtype"),
    (["fuzz", "--target", "numpy-tiled", "--shard", "3/2"], "shard"),
    (["fuzz", "--target", "numpy-tiled", "--model", "fa9"], "--model"),
    (["fuzz", "--target", "numpy-tiled", "--budget", "-1"], "--budget"),
    (["replay", "/no/such/file.npz"], "no such file"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err


def test_fuzz_exit_0_on_correct_target_and_writes_outputs(tmp_path):
    assert _fuzz(tmp_path, "numpy-tiled", "flashcheck.verify.planted:correct_tiled") == 0
    rows = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert {r["target"] for r in rows} == {"numpy-tiled", "flashcheck.verify.planted:correct_tiled"}
    # identical cases for both targets
    ids = {}
    for r in rows:
        ids.setdefault(r["target"], []).append(r["case_id"])
    assert ids["numpy-tiled"] == ids["flashcheck.verify.planted:correct_tiled"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["failures"] == 0
    assert "<img" in (tmp_path / "index.html").read_text()


def test_fuzz_exit_1_on_broken_target_and_replay_reproduces(tmp_path, capsys):
    assert _fuzz(tmp_path, "flashcheck.verify.planted:missing_rescale", extra=["--max-examples", "12"]) == 1
    # A finite-input failure: NaN/Inf cases are judged on semantics and have no error metrics to print.
    repros = [p for p in sorted((tmp_path / "repro").glob("*.npz")) if Case.load(p).magnitude != "nan-inf"]
    assert repros
    capsys.readouterr()
    assert main(["replay", str(repros[0])]) == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "max_abs_err" in printed


def test_same_seed_same_cases_and_verdicts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fuzz(a, "numpy-tiled")
    _fuzz(b, "numpy-tiled")
    ra = [(json.loads(x)["case_id"], json.loads(x)["verdict"]) for x in (a / "cases.jsonl").read_text().splitlines()]
    rb = [(json.loads(x)["case_id"], json.loads(x)["verdict"]) for x in (b / "cases.jsonl").read_text().splitlines()]
    assert ra == rb and len(ra) == 6


def test_diff_exit_codes(tmp_path):
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    _fuzz(ok, "flashcheck.verify.planted:correct_tiled")
    _fuzz(bad, "flashcheck.verify.planted:correct_tiled")
    assert main(["diff", str(ok), str(bad)]) == 0
    # The same target name failing on the same cases is a regression.
    rows = [json.loads(x) for x in (bad / "cases.jsonl").read_text().splitlines()]
    rows[0]["verdict"], rows[0]["reason"] = "fail", "planted"
    (bad / "cases.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (bad / "summary.json").unlink()
    assert main(["diff", str(ok), str(bad)]) == 1


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "flashcheck"],
    [sys.executable, "-m", "flashcheck.verify"],
    [str(Path(sys.executable).with_name("flashcheck"))],
], ids=["python -m flashcheck", "python -m flashcheck.verify", "console script"])
def test_entry_points_run(argv, tmp_path):
    # From a directory outside the checkout: the installed package, not the source folders.
    try:
        importlib.metadata.distribution("flashcheck")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flashcheck is not installed here (a source checkout on PYTHONPATH)")
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("fuzz", "replay", "diff", "bench"):
        assert command in proc.stdout


def test_kernel_bench_is_registered_by_the_harness_not_by_the_kernel():
    # Layering: kernels <- properties <- verify. Importing the kernel benchmark
    # must not pull in the harness; the harness registers it.
    code = ("import sys, flashcheck.kernels.bench_kernel\n"
            "bad = sorted(m for m in sys.modules if m.startswith('flashcheck.verify'))\n"
            "assert not bad, bad\n"
            "from flashcheck.verify.bench import BENCHES\n"
            "assert BENCHES['kernel'].run is flashcheck.kernels.bench_kernel.main\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    src = (Path(__file__).parents[1] / "kernels" / "bench_kernel.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+flashcheck\.verify", src, re.MULTILINE)


@pytest.mark.parametrize("argv", [
    ["-m", "flashcheck", "bench", "kernel", "--smoke"],
    ["-m", "flashcheck.kernels.bench_kernel", "--smoke"],
], ids=["python -m flashcheck bench kernel", "python -m flashcheck.kernels.bench_kernel"])
@pytest.mark.interpreted_kernel
def test_kernel_bench_smoke_runs_in_the_interpreter(argv, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    path = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, *argv, "--json", str(path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(path.read_text())
    assert len(rows) == 4 and all("ms" in r["triton"] for r in rows)
    assert "tri/flash" in proc.stdout
