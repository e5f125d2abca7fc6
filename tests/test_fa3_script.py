"""scripts/fa3_rmse.py on CPU (--small): runs, validates its reference, and shows fp32 softmax helps."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fa3_rmse.py"


def _module():
    spec = importlib.util.spec_from_file_location("fa3_rmse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_outlier_distribution_has_the_papers_variance():
    from flashcheck.kernels.precision import to_float64

    case = _module().outlier_case(batch=1, heads=1, seqlen=1000, head_dim=1000, dtype="fp32", seed=1)
    assert case.magnitude == "fa3-outliers" and case.scale == 1000 ** -0.5
    x = to_float64(case.q).ravel()
    # Var = 1 + 100 * 0.001 = 1.1
    assert abs(float(x.var()) - 1.1) < 0.03
    assert float((abs(x) > 6).mean()) > 3e-4  # outliers far beyond N(0,1)'s range exist
    assert case.tags["outliers"] > 2000  # about 0.001 * 3e6 over q, k, v


def test_one_seed_draws_the_same_values_for_each_dtype():
    import numpy as np

    from flashcheck.kernels.precision import to_float64

    kw = dict(batch=1, heads=2, seqlen=16, head_dim=8, seed=3)
    wide = to_float64(_module().outlier_case(dtype="fp32", **kw).v)
    narrow = to_float64(_module().outlier_case(dtype="fp16", **kw).v)
    # fp16 is wide's value rounded once more (within half an fp16 ulp, plus the fp32 rounding)
    assert np.allclose(narrow, wide, rtol=2**-11 + 2**-23, atol=2**-25)
    assert not np.array_equal(narrow, wide)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="seqlen"):
        _module().run_experiment(batch=1, heads=1, seqlen=0, head_dim=8, device="cpu", seed=0)


@pytest.mark.interpreted_kernel
def test_small_cpu_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "fa3_rmse.json").read_text())
    assert all(check["ok"] for check in result["reference_check"].values())
    rmse = result["rmse"]
    for backend in ("flash", "efficient", "cudnn"):
        assert rmse[f"torch SDPA {backend}"] == {"fp16": None, "bf16": None}
    standard = rmse["standard attention (torch, input dtype)"]
    for name in ("torch SDPA math", "flashcheck Triton kernel"):
        for dtype in ("fp16", "bf16"):
            value = rmse[name][dtype]
            assert value is not None and math.isfinite(value) and value > 0
            # the paper's point: an fp32 softmax beats the all-fp16 (or all-bf16) baseline
            assert value < standard[dtype]
    assert rmse["flashcheck Triton kernel"]["bf16"] > rmse["flashcheck Triton kernel"]["fp16"]
    assert "| flashcheck Triton kernel |" in (tmp_path / "fa3_rmse.md").read_text()
