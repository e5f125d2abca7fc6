"""The built wheel: one top-level import package, flashcheck, with the four
repository folders inside it and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("flashcheck-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_one_top_level_package(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"flashcheck"}, tops
    for sub in ("kernels", "properties", "verify", "reports"):
        assert f"flashcheck/{sub}/__init__.py" in names
    assert "flashcheck/verify/cli.py" in names and "flashcheck/kernels/triton_flash.py" in names
    assert any(n.startswith("flashcheck/properties/regressions/") and n.endswith(".npz") for n in names)


def test_wheel_declares_the_console_script(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry).decode()
    assert "[console_scripts]" in text and "flashcheck = flashcheck.verify.cli:console_main" in text
