"""verify/repro_script.py: standalone reproducer scripts.

The scripts run in child processes with ``python -I`` (isolated mode: no
PYTHONPATH, no current directory on sys.path) from a temporary directory, so
a script that needed flashcheck would fail. The real bug reproduced here:
torch's CPU flash backend returns 0, not NaN, for a query row holding a NaN.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from flashcheck.kernels.models import get_model
from flashcheck.properties.case import Case
from flashcheck.properties.grads import with_output_gradient
from flashcheck.verify.check import run_case
from flashcheck.verify.findings import Finding, FindingTracker
from flashcheck.verify.repro_script import INLINE_LIMIT, int_list_literal, script_text, write_repro
from flashcheck.verify.targets import resolve_target

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
BITS = {"fp16": np.uint16, "bf16": np.uint16, "fp32": np.uint32}


def _case(dtype="fp16", shape=(1, 2, 4, 8), kv_heads=None, nk=None, seed=0, **options) -> Case:
    rng = np.random.default_rng(seed)
    B, H, Nq, D = shape
    kv_shape = (B, kv_heads or H, nk or Nq, D)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype]) for s in (shape, kv_shape, kv_shape))
    return Case(q, k, v, **options)


def _special_values(case: Case) -> Case:
    """NaN (with a payload), infinities, -0.0 and subnormals in q, k, v."""
    q, k, v = case.q.copy(), case.k.copy(), case.v.copy()
    uint = BITS[case.dtype]
    tiny = np.array(1, dtype=uint).view(case.q.dtype)  # the smallest subnormal
    q.reshape(-1)[:3] = [np.nan, -0.0, tiny]
    q.reshape(-1).view(uint)[3] = q.reshape(-1).view(uint)[0] | 1  # another NaN payload
    k.reshape(-1)[:2] = [np.inf, -tiny]
    v.reshape(-1)[:2] = [-np.inf, 3 * tiny]
    return case.replace(q=q, k=k, v=v)


def _failure(cls="wrong", **changes) -> dict:
    failure = {"class": cls, "reason": "what the harness said", "signature": "sig", "at": [0, 0, 0, 0],
               "allowed": 1e-2, "model": "fa2", "features": ["a feature"]}
    failure.update(changes)
    return failure


def _run(directory: Path, *args: str, isolated: bool = True) -> subprocess.CompletedProcess:
    """Run repro.py as a person would, from its own directory."""
    return _run_many([(directory, args, isolated)])[0]


def _run_many(runs) -> list[subprocess.CompletedProcess]:
    """Several ``(directory, args, isolated)`` runs at once (each mostly imports torch).
    ``isolated``: True runs ``python -I``; False puts this checkout on
    PYTHONPATH, a directory puts that directory there (for scripts that
    import a MODULE:FUNCTION target)."""
    procs = []
    for directory, args, isolated in runs:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["OMP_NUM_THREADS"] = "1"  # several run at once
        if isolated is not True:
            env["PYTHONPATH"] = str(ROOT if isolated is False else isolated)
        cmd = [sys.executable, *(["-I"] if isolated is True else []), "repro.py", *args]
        procs.append(subprocess.Popen(cmd, cwd=directory, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _load_script(path: Path):
    """The generated script as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"repro_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_bits(t) -> np.ndarray:
    import torch

    ints = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(ints).contiguous().numpy()


def _imports(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


# -- running the scripts -------------------------------------------------------------------------
# Each scenario writes one reproducer; the `ran` fixture runs them all at once
# (each run is mostly torch's import) and the tests below check what they did.
SCENARIOS = {}


def scenario(build):
    """``build(directory) -> (args, isolated, info)``: write a reproducer there
    (``isolated`` as `_run_many` takes it)."""
    SCENARIOS[build.__name__] = build
    return build


def _nan_query_case() -> Case:
    case = _case("fp16", layout="strided")
    case.q[0, 1, 2, 5] = np.nan
    return case


NAN_ROW_FAILURE = _failure("nan-dropped", at=[0, 1, 2], allowed=None,
                           reason="row (0, 1, 2) reads a NaN input but its output is finite",
                           signature="nan-dropped:q-nan", features=["NaN in q", "strided layout"])


@scenario
def flash_nan_row(directory):
    script = write_repro(directory, _nan_query_case(), "sdpa-flash", NAN_ROW_FAILURE, device="cpu",
                         meta={"torch": "2.13.0+cpu", "host": "laptop"})
    return (), True, {"script": script}


@scenario
def math_nan_row(directory):
    write_repro(directory, _nan_query_case(), "sdpa-math", NAN_ROW_FAILURE, device="cpu")
    return (), True, {}


@scenario
def math_correct(directory):
    case = _case("bf16", shape=(2, 4, 5, 8), kv_heads=2, nk=7, is_causal=True, scale=0.3, enable_gqa=True,
                 layout="bnhd")
    write_repro(directory, case, "sdpa-math", _failure("wrong", at=[1, 3, 4, 7], allowed=0.05), device="cpu")
    return (), True, {}


@scenario
def planted_ignored_scale(directory):
    """MODULE:FUNCTION target, failure filled in from the harness's own verdict."""
    from flashcheck.verify.check import judge
    from flashcheck.verify.planted import ignored_scale

    case = _case("fp16", shape=(1, 2, 6, 16), scale=0.5, layout="strided")
    q, k, v, _ = case.to_torch()
    j = judge(case, ignored_scale(q, k, v, scale=case.scale), model=get_model("fa2", "fp16"))
    assert j.verdict == "fail"
    allowed = float(j.bound.out[j.worst_at])
    failure = _failure("wrong", at=list(j.worst_at), allowed=allowed, reason=j.reason)
    write_repro(directory, case, "flashcheck.verify.planted:ignored_scale", failure, device="cpu")
    return (), False, {"allowed": allowed, "at": tuple(j.worst_at)}


@scenario
def raises(directory):
    write_repro(directory, _case(), "flashcheck.verify.planted:raises", _failure("raised", at=None),
                device="cpu")
    return (), False, {}


@scenario
def segfaults(directory):
    write_repro(directory, _case(), "flashcheck.verify.planted:segfaults", _failure("crash", at=None),
                device="cpu")
    return (), False, {}


@scenario
def hangs(directory):
    script = write_repro(directory, _case(), "flashcheck.verify.planted:hangs", _failure("hang", at=None),
                         device="cpu")
    text = script.read_text()
    assert "HANG_TIMEOUT_S = 120" in text
    script.write_text(text.replace("HANG_TIMEOUT_S = 120", "HANG_TIMEOUT_S = 2"))  # the user's knob
    return (), False, {}


@scenario
def cudnn_declines(directory):
    write_repro(directory, _case(), "sdpa-cudnn", _failure("fault", at=None), device="cpu")
    return (), True, {}


def _large_case() -> Case:
    case = _special_values(_case("bf16", shape=(2, 3, 40, 24), nk=50, layout="strided"))
    mask = np.random.default_rng(1).random((2, 1, 40, 50)) > 0.4
    return case.replace(attn_mask=mask)


@scenario
def large_dump(directory):
    write_repro(directory, _large_case(), "sdpa-flash", _failure("non-finite", at=None), device="cpu")
    return ("--dump", str(directory / "dumped.npz")), True, {}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Scenario name -> (directory, completed process, info)."""
    base = tmp_path_factory.mktemp("repro")
    runs, infos = [], []
    for name, build in SCENARIOS.items():
        args, isolated, info = build(base / name)
        runs.append((base / name, args, isolated))
        infos.append(info)
    results = _run_many(runs)
    return {name: (run[0], result, info) for name, run, result, info in zip(SCENARIOS, runs, results, infos)}


def _output(result) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


# -- the real bug, and a correct case ---------------------------------------------------------
def test_cpu_flash_backend_dropping_a_nan_query_row_reproduces(ran):
    directory, result, info = ran["flash_nan_row"]
    assert info["script"] == directory / "repro.py"
    text = info["script"].read_text()
    assert "flashcheck" not in text
    assert not (directory / "inputs.npz").exists()  # small: inline
    assert Case.load(directory / "case.npz").case_id == _nan_query_case().case_id
    for expected in ("row (0, 1, 2) reads a NaN input", "nan-dropped:q-nan", "NaN in q; strided layout",
                     "Found on: device cpu, torch 2.13.0+cpu, host laptop", "B=1 H=2 Hkv=2 Nq=4 Nk=4 D=8",
                     "SDPBackend.FLASH_ATTENTION"):
        assert expected in text
    assert result.returncode == 1, _output(result)
    assert "bug reproduced" in result.stdout
    assert "1 rows read a NaN input; 1 of them have a finite output" in result.stdout
    assert "torch 2." in result.stdout and "device cpu" in result.stdout


def test_the_math_backend_propagates_the_nan_so_it_is_not_reproduced(ran):
    _, result, _ = ran["math_nan_row"]
    assert result.returncode == 0, _output(result)
    assert "not reproduced" in result.stdout


def test_a_correct_backend_is_not_reproduced(ran):
    directory, result, _ = ran["math_correct"]
    assert result.returncode == 0, _output(result)
    assert "not reproduced" in result.stdout and "bug reproduced" not in result.stdout
    assert "max |observed - expected| over the output" in result.stdout
    assert "precision model 'fa2'" in result.stdout
    assert "flashcheck's certified error bound" in (directory / "repro.py").read_text()


def test_a_wrong_kernel_with_the_harness_bound_reproduces(ran):
    directory, result, info = ran["planted_ignored_scale"]
    text = (directory / "repro.py").read_text()
    assert "from flashcheck.verify.planted import ignored_scale" in text
    assert "return ignored_scale(" in text and "scale=0.5" in text
    assert f"ALLOWED = {info['allowed']!r}" in text  # exact
    assert result.returncode == 1, _output(result)
    assert "bug reproduced" in result.stdout
    assert f"at {info['at']}: |observed - expected|" in result.stdout


def test_raising_crashing_and_declining_kernels(ran):
    _, raised, _ = ran["raises"]
    assert raised.returncode == 1 and "RuntimeError: planted failure" in raised.stdout, _output(raised)
    assert "bug reproduced" in raised.stdout
    _, crashed, _ = ran["segfaults"]
    assert crashed.returncode < 0 or crashed.returncode >= 128, _output(crashed)
    assert "if the process dies now, the bug reproduced" in crashed.stdout
    _, hung, _ = ran["hangs"]
    assert hung.returncode == 1, _output(hung)
    assert "no return within 2 s means bug reproduced" in hung.stdout
    assert "in hangs" in hung.stderr  # the watchdog's stack dump
    # An SDPA backend that does not exist here declines: not the bug.
    _, declined, _ = ran["cudnn_declines"]
    assert declined.returncode == 2 and "declines this case" in declined.stdout, _output(declined)


# -- exact inputs and layouts ------------------------------------------------------------------
EXPECTED_STRIDES = {
    "contiguous": lambda B, H, N, D: (H * N * D, N * D, D, 1),
    "bnhd": lambda B, H, N, D: (N * H * D, D, H * D, 1),
    "strided": lambda B, H, N, D: ((H + 1) * N * (D + 3), N * (D + 3), D + 3, 1),
}


@pytest.mark.parametrize("layout", list(EXPECTED_STRIDES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_script_builds_the_exact_inputs_in_the_layout(tmp_path, dtype, layout):
    case = _special_values(_case(dtype, shape=(2, 4, 3, 5), kv_heads=2, nk=6, enable_gqa=True, layout=layout))
    mask = np.zeros((3, 6), dtype=case.q.dtype)
    mask[1, ::2] = -np.inf
    mask[2, 1] = np.array(1, dtype=BITS[dtype]).view(case.q.dtype)  # subnormal bias
    case = case.replace(attn_mask=mask)
    script = write_repro(tmp_path, case, "sdpa-math", _failure(), device="cpu")
    q, k, v, attn_mask = _load_script(script).make_inputs("cpu")
    for got, want in ((q, case.q), (k, case.k), (v, case.v), (attn_mask, case.attn_mask)):
        assert tuple(got.shape) == want.shape
        assert np.array_equal(_torch_bits(got), np.ascontiguousarray(want).view(_torch_bits(got).dtype))
    for got, want in ((q, case.q), (k, case.k)):
        assert got.stride() == EXPECTED_STRIDES[layout](*want.shape)
    # The same layout as the harness's own tensors.
    assert [t.stride() for t in case.to_torch()[:3]] == [q.stride(), k.stride(), v.stride()]


def test_bool_masks_and_large_inputs_go_through_inputs_npz(ran, tmp_path):
    directory, result, _ = ran["large_dump"]
    case = _large_case()
    assert case.q.size + case.k.size + case.v.size > INLINE_LIMIT
    assert (directory / "inputs.npz").exists()
    assert (directory / "repro.py").stat().st_size < 20_000  # the values are not inline
    with np.load(directory / "inputs.npz") as data:
        assert data["q"].dtype == np.uint16 and data["attn_mask"].dtype == bool

    assert result.returncode == 0, _output(result)
    with np.load(directory / "dumped.npz") as data:  # --dump: what the script built
        for name in ("q", "k", "v"):
            want = getattr(case, name)
            assert np.array_equal(data[name], want.view(np.int16))
            assert tuple(data[name + "_strides"]) == EXPECTED_STRIDES["strided"](*want.shape)
        assert np.array_equal(data["attn_mask"], case.attn_mask)

    # Written again with small inputs, a stale inputs.npz goes.
    write_repro(tmp_path, case, "sdpa-flash", _failure("non-finite", at=None), device="cpu")
    assert (tmp_path / "inputs.npz").exists()
    write_repro(tmp_path, _case(), "sdpa-flash", _failure("non-finite", at=None), device="cpu")
    assert not (tmp_path / "inputs.npz").exists()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_int_literals_hold_the_exact_bits(dtype):
    arr = _special_values(_case(dtype, shape=(1, 1, 3, 7))).q
    literal = int_list_literal("Q_BITS", arr)
    assert all(len(line) <= 79 for line in literal.splitlines())
    values = ast.literal_eval(literal.split("=", 1)[1].strip())
    ints = np.ascontiguousarray(arr).view(np.int16 if arr.itemsize == 2 else np.int32).ravel()
    assert values == ints.tolist()


# -- the generated code ------------------------------------------------------------------------
TARGETS = ["sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "compiled-math", "flash-attn",
           "mykernels.attn:fused", "triton"]
CLASSES = ["wrong", "non-finite", "nan-dropped", "nan-leak", "raised", "fault", "crash", "hang"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_and_class_gives_a_short_standalone_script(target):
    for i, cls in enumerate(CLASSES):
        mask = [None, np.ones((4, 4), bool), np.zeros((1, 2, 4, 4), np.float16)][i % 3]
        case = _case(shape=(1, 2, 4, 8), attn_mask=mask, is_causal=bool(i % 2), layout="strided")
        text = script_text(case, target, _failure(cls, at=[0, 1, 3, 7]), device="cuda")
        assert all(len(line) <= 79 for line in text.splitlines()), target
        flashcheck_imports = {m for m in _imports(text) if m.split(".")[0] == "flashcheck"}
        if target == "triton":
            assert flashcheck_imports == {"flashcheck.kernels.triton_flash"}
            assert "needs the flashcheck package" in text
        else:
            assert not flashcheck_imports
        assert "def reference_attention" in text and "def check(" in text


def test_target_specific_calls():
    add = np.zeros((1, 1, 4, 4), np.float16)
    flex = script_text(_case(attn_mask=add, is_causal=True), "flex", _failure(), device="cuda")
    assert "torch.compile(flex_attention)" in flex and "create_block_mask(mask_mod" in flex
    assert "(kv_idx <= q_idx)" in flex and "score + bias[b, h, q_idx, kv_idx]" in flex
    plain = script_text(_case(), "flex", _failure(), device="cuda")
    assert "block_mask = None" in plain and "score_mod = None" in plain
    compiled = script_text(_case(scale=0.25), "compiled-math", _failure(), device="cpu")
    assert "torch.compile(float32_attention)" in compiled and "q.float()" in compiled and "* 0.25" in compiled
    dotted = script_text(_case(), "pkg.mod:Kernels.forward", _failure(), device="cpu")
    assert "from pkg.mod import Kernels" in dotted and "return Kernels.forward(" in dotted
    sdpa = script_text(_case(is_causal=True, scale=0.1, enable_gqa=True), "sdpa-efficient", _failure(),
                       device="cuda")
    assert "with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):" in sdpa
    assert "is_causal=True, scale=0.1, enable_gqa=True" in sdpa and 'DEVICE = "cuda"' in sdpa
    hang = script_text(_case(), "sdpa-flash", _failure("hang"), device="cuda")
    assert "faulthandler.dump_traceback_later" in hang
    fault = script_text(_case(), "sdpa-flash", _failure("fault"), device="cuda")
    assert "torch.cuda.synchronize()" in fault


def test_docstring_text_cannot_break_the_script():
    reason = 'tricky """ reason \\ with quotes\n and a newline'
    text = script_text(_case(), "sdpa-math", _failure(reason=reason), device="cpu", meta={"gpu": 'x"""y'})
    assert ast.get_docstring(ast.parse(text)).count('"""') == 2


# -- bad arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "failure", "message"), [
    ("sdpa-math", _failure("slow"), "unknown failure class 'slow'"),
    ("sdpa-fast", _failure(), "unknown target 'sdpa-fast'"),
    ("numpy-tiled", _failure(), "flashcheck's own NumPy model"),
    ("mod:not an identifier", _failure(), "MODULE:FUNCTION"),
    ("sdpa-math", _failure(at=[0, 0, 0]), "failure['at'] has length 3"),
    ("sdpa-math", _failure("nan-leak", at=[0, 0]), "failure['at'] has length 2"),
    ("sdpa-math", _failure(at=[0, 0, 9, 0]), "outside the output's shape"),
    ("sdpa-math", _failure(at=None), "needs 'at'"),
    ("sdpa-math", _failure(allowed=None), "needs 'allowed'"),
    ("sdpa-math", _failure(allowed=float("nan")), "needs 'allowed'"),
    ("sdpa-math", _failure(features="one string"), "list of strings"),
    ("sdpa-math", "wrong", "failure must be a dict"),
])
def test_bad_arguments_raise_value_error_naming_the_problem(tmp_path, target, failure, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_repro(tmp_path / "out", _case(), target, failure, device="cpu")
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_device_and_meta(tmp_path):
    with pytest.raises(ValueError, match="device"):
        write_repro(tmp_path, _case(), "sdpa-math", _failure(), device="")
    with pytest.raises(ValueError, match="meta"):
        write_repro(tmp_path, _case(), "sdpa-math", _failure(), device="cpu", meta=["torch"])


# -- gradient failures ----------------------------------------------------------------------------
#: Planted backward bugs: SDPA with one gradient broken, as a module that the
#: scripts import (a MODULE:FUNCTION target), written beside the scenarios.
GRAD_MODULE = "flashcheck_planted_grad"
GRAD_BUGS = '''\
"""Planted backward bugs: SDPA with one gradient broken (by `how`)."""
import torch
import torch.nn.functional as F


class _Broken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, how):
        ctx.how = how
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if ctx.how == "zero last key":
            g[:, :, -1] = 0
        elif ctx.how == "nan":
            g[0, 0, 0, 0] = float("nan")
        else:
            raise RuntimeError("planted failure in the backward")
        return g, None


def zero_last_dk(q, k, v, attn_mask=None, **options):
    k = _Broken.apply(k, "zero last key")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)


def nan_dv(q, k, v, attn_mask=None, **options):
    v = _Broken.apply(v, "nan")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)


def raising_dq(q, k, v, attn_mask=None, **options):
    q = _Broken.apply(q, "raise")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)
'''


def _grad_case() -> Case:
    """MQA, strided layout, a fully masked query row (2), and an output gradient."""
    mask = np.ones((6, 7), bool)
    mask[2] = False
    case = _case("fp16", shape=(1, 2, 6, 8), kv_heads=1, nk=7, enable_gqa=True, layout="strided", attn_mask=mask)
    return with_output_gradient(case, "normal")


def _grad_module_dir(directory: Path) -> Path:
    """The directory holding GRAD_MODULE (written once, beside ``directory``)."""
    where = directory.parent / "planted_grad"
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{GRAD_MODULE}.py").write_text(GRAD_BUGS)
    return where


@contextlib.contextmanager
def _importable(where: Path):
    sys.path.insert(0, str(where))
    try:
        yield
    finally:
        sys.path.remove(str(where))


@functools.cache
def _harness_failure(where: Path, name: str) -> dict:
    """The failure dict the harness gives planted bug ``name`` on `_grad_case`,
    as `FindingTracker` passes it on."""
    with _importable(where):
        target = resolve_target(f"{GRAD_MODULE}:{name}")
    result = run_case(_grad_case(), target)
    assert result.verdict == "fail", result.reason
    return dict(result.failure, reason=result.reason, model=result.model)


@scenario
def grad_wrong_planted(directory):
    where = _grad_module_dir(directory)
    failure = _harness_failure(where, "zero_last_dk")
    write_repro(directory, _grad_case(), f"{GRAD_MODULE}:zero_last_dk", failure, device="cpu")
    return (), where, {"failure": failure}


@scenario
def grad_wrong_correct(directory):
    failure = _harness_failure(_grad_module_dir(directory), "zero_last_dk")
    write_repro(directory, _grad_case(), "sdpa-math", failure, device="cpu")
    return (), True, {}


@scenario
def grad_nan_planted(directory):
    where = _grad_module_dir(directory)
    failure = _harness_failure(where, "nan_dv")
    write_repro(directory, _grad_case(), f"{GRAD_MODULE}:nan_dv", failure, device="cpu")
    return (), where, {"failure": failure}


@scenario
def grad_raised_planted(directory):
    where = _grad_module_dir(directory)
    failure = _harness_failure(where, "raising_dq")
    write_repro(directory, _grad_case(), f"{GRAD_MODULE}:raising_dq", failure, device="cpu")
    return (), where, {"failure": failure}


@scenario
def grad_raised_correct(directory):
    failure = _harness_failure(_grad_module_dir(directory), "raising_dq")
    write_repro(directory, _grad_case(), "sdpa-math", failure, device="cpu")
    return (), True, {}


def test_a_wrong_gradient_reproduces_and_a_correct_backward_does_not(ran):
    directory, result, info = ran["grad_wrong_planted"]
    failure = info["failure"]
    assert failure["class"] == "grad-wrong" and failure["gradient"] == "dk" and failure["at"][2] == 6
    text = (directory / "repro.py").read_text()
    assert {m for m in _imports(text) if "flashcheck" in m} == {GRAD_MODULE}
    for expected in ("DO_BITS = [", "torch.autograd.grad(out, (q, k, v), do)", 'GRADIENT = "dk"',
                     f"ALLOWED = {failure['allowed']!r}", f"ALLOWED_MAX = {failure['allowed_max']!r}",
                     "AT = (0, 0, 6, 0)  # failing element of dk (b, kv_head, j, d)"):
        assert expected in text
    assert result.returncode == 1, _output(result)
    for expected in ("dk of key (b=0, kv_head=0, j=6), dims 0..2:", "at (0, 0, 6, 0): |observed - expected|",
                     "largest error anywhere in dk", "precision model 'fa2'", "bug reproduced"):
        assert expected in result.stdout

    _, correct, _ = ran["grad_wrong_correct"]  # sdpa-math, the same case and failure, python -I
    assert correct.returncode == 0, _output(correct)
    assert "not reproduced" in correct.stdout and "bug reproduced" not in correct.stdout


def test_non_finite_and_raising_backwards_reproduce(ran):
    _, nan, info = ran["grad_nan_planted"]
    assert info["failure"]["class"] == "grad-non-finite" and info["failure"]["gradient"] == "dv"
    assert nan.returncode == 1, _output(nan)
    assert "1 of 56 dv elements are NaN/Inf where the float64 reference is finite" in nan.stdout
    assert "bug reproduced" in nan.stdout

    _, raised, info = ran["grad_raised_planted"]
    assert info["failure"]["class"] == "grad-raised"
    assert raised.returncode == 1, _output(raised)
    assert "the backward raised RuntimeError: planted failure in the backward" in raised.stdout
    assert "bug reproduced" in raised.stdout

    _, correct, _ = ran["grad_raised_correct"]
    assert correct.returncode == 0, _output(correct)
    assert "the backward returned normally" in correct.stdout and "not reproduced" in correct.stdout
    assert "max |observed - expected| over dv" in correct.stdout


def test_gradient_scripts_build_the_exact_output_gradient_and_zero_masked_row_gradients(tmp_path):
    import torch

    from flashcheck.verify import oracle

    case = _grad_case()
    script = write_repro(tmp_path, case, "sdpa-math", _failure("grad-wrong", gradient="dq", at=[0, 1, 5, 7]),
                         device="cpu")
    module = _load_script(script)
    q, k, v, attn_mask, do = module.make_inputs("cpu")
    assert np.array_equal(_torch_bits(do), case.do.view(np.int16)) and do.stride() == case.do_torch().stride()
    grads = module.reference_gradients(q, k, v, attn_mask, do, is_causal=False, scale=None, enable_gqa=True)
    assert [tuple(g.shape) for g in grads] == [case.q.shape, case.k.shape, case.v.shape]
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert not grads[0][:, :, 2].any() and grads[0][:, :, 3].abs().sum() > 0  # fully masked row 2: exactly 0
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    for got, exact in zip(grads, (ref.dq, ref.dk, ref.dv)):
        assert np.allclose(got.numpy(), exact, rtol=1e-9, atol=1e-12)


def test_a_large_output_gradient_goes_through_inputs_npz(tmp_path):
    case = _grad_case()
    large = case.replace(q=np.tile(case.q, (1, 1, 60, 1)), do=np.tile(case.do, (1, 1, 60, 1)), attn_mask=None)
    assert large.q.size + large.k.size + large.v.size <= INLINE_LIMIT < _num_inputs(large)  # dO tips it over
    script = write_repro(tmp_path, large, "sdpa-math", _failure("grad-raised", at=None), device="cpu")
    with np.load(tmp_path / "inputs.npz") as data:
        assert set(data.files) == {"q", "k", "v", "do"}
    do = _load_script(script).make_inputs("cpu")[-1]
    assert np.array_equal(_torch_bits(do), large.do.view(np.int16)) and do.stride() == large.do_torch().stride()


def _num_inputs(case: Case) -> int:
    return sum(a.size for a in (case.q, case.k, case.v, case.do))


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_gives_a_short_gradient_script(target):
    case = _grad_case().replace(layout="bnhd")
    for cls, failure in (("grad-wrong", _failure("grad-wrong", gradient="dv", at=[0, 0, 6, 7])),
                         ("grad-non-finite", _failure("grad-non-finite", gradient="dq", at=[0, 1, 5, 0])),
                         ("grad-raised", _failure("grad-raised", at=None))):
        text = script_text(case, target, failure, device="cuda")
        assert all(len(line) <= 79 for line in text.splitlines()), (target, cls)
        assert "def reference_gradients" in text and "torch.cuda.synchronize()" in text
        assert "check(q, k, v, attn_mask, do)" in text


@pytest.mark.parametrize(("case", "failure", "message"), [
    (_case(), _failure("grad-raised"), "needs case.do, the output gradient"),
    (_grad_case(), _failure("grad-wrong"), "needs 'gradient', one of ('dq', 'dk', 'dv')"),
    (_grad_case(), _failure("grad-wrong", gradient="dk", at=[0, 1, 0, 0]), "outside dk's shape (1, 1, 7, 8)"),
    (_grad_case(), _failure("grad-wrong", gradient="dk", at=[0, 0, 0]), "failing element of dk, (b, kv_head, j, d)"),
    (_grad_case(), _failure("grad-wrong", gradient="dq", at=None), "'grad-wrong' needs 'at'"),
    (_grad_case(), _failure("grad-wrong", gradient="dq", allowed=None), "'grad-wrong' needs 'allowed'"),
    (_grad_case(), _failure("grad-wrong", gradient="dq", allowed_max=0.0), "allowed_max"),
    (_grad_case(), _failure("grad-non-finite", gradient="dv", at=None), "'grad-non-finite' needs 'at'"),
])
def test_bad_gradient_failures_raise_value_error(tmp_path, case, failure, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_repro(tmp_path / "out", case, "sdpa-math", failure, device="cpu")
    assert not (tmp_path / "out").exists()


def test_findings_write_a_script_for_gradient_failures_only_where_one_can_check(tmp_path):
    case = _grad_case()
    failure = _harness_failure(_grad_module_dir(tmp_path / "x"), "zero_last_dk")
    result = run_case(case, resolve_target("sdpa-math"))  # stands in for a re-run: only failure is read
    tracker = FindingTracker(tmp_path, "cpu")
    written = {}
    for cls in ("grad-wrong", "grad-dtype"):
        result.failure = dict(failure, **{"class": cls})
        finding = Finding(signature=cls, base=cls, target="sdpa-math", failure_class=cls, symptom="", trigger=None)
        tracker._write(finding, case, {}, result)
        written[cls] = sorted(p.name for p in (tmp_path / finding.repro).iterdir())
    assert written == {"grad-wrong": ["case.npz", "repro.py"], "grad-dtype": ["README.txt", "case.npz"]}
