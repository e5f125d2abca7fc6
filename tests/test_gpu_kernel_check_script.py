"""scripts/gpu_kernel_check.py's correctness check, run on the CPU
interpreter at tiny sizes: it judges with the package's oracle and bounds."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_kernel_check.py"

pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter only"),
              pytest.mark.interpreted_kernel]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_kernel_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cfg", [
    ("bf16", False, 1, 2, 1, 17, 23, 16, True, None, "strided"),
    ("fp16", False, 1, 2, 2, 9, 12, 8, False, "bool", "bnhd"),
    ("fp32", True, 1, 2, 2, 9, 12, 8, False, "add", "contiguous"),
])
def test_run_check_passes_on_the_interpreter(cfg):
    mod = _module()
    row = mod.run_check(*cfg, seed=1, device="cpu")
    assert row["ok"], row
    for name in ("out", "dq", "dk", "dv"):
        assert 0 < row[name + "_ratio"] <= 1
    assert "triton-flash" in row["model"]
    assert "True" in mod.check_table([row]).splitlines()[-1]


def test_make_case_masks_row_three():
    case = _module().make_case("fp16", 1, 2, 2, 5, 7, 8, False, "bool", "contiguous", seed=0)
    assert not case.attn_mask[:, :, 3].any() and case.do.shape == case.q.shape
