"""--grad: output-gradient classes, targets' backward through autograd, the
gradient verdict, and a gradient run from campaign to report, diff and replay."""

import json

import numpy as np
import pytest
import torch

from flashcheck.kernels.precision import FORMATS, to_float64
from flashcheck.properties.case import Case
from flashcheck.properties.grads import DO_KINDS, DoDealer, output_gradient, with_output_gradient
from flashcheck.reports.diff import diff_runs
from flashcheck.reports.records import read_cases
from flashcheck.reports.summary import summarize
from flashcheck.verify.campaign import CampaignConfig, ConfigError, run_campaign
from flashcheck.verify.check import judge_gradients, run_case
from flashcheck.verify.cli import main
from flashcheck.verify.minimize import take
from flashcheck.verify.targets import Target, TargetOutput, resolve_target


def _case(B=1, H=2, Hkv=2, Nq=8, Nk=12, D=16, Dv=None, *, seed=0, dtype=np.float16, **options):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, Dv or D)).astype(dtype)
    return Case(q, k, v, enable_gqa=Hkv != H, seed=seed, **options)


# -- output-gradient classes --------------------------------------------------------
@pytest.mark.parametrize("kind", DO_KINDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_output_gradients_are_exact_seeded_and_shaped_like_the_output(kind, dtype):
    case = _case(Dv=8, dtype=dtype)
    do = output_gradient(case, kind, seed=3)
    assert do.shape == (1, 2, 8, 8) and do.dtype == case.q.dtype
    assert np.isfinite(to_float64(do)).all()
    assert np.array_equal(do, output_gradient(case, kind, seed=3))
    assert not np.array_equal(do, output_gradient(case, kind, seed=4)) or kind == "zero-rows" and not do.any()


def test_output_gradient_classes_do_what_they_say():
    case = _case(Nq=40, Nk=30, D=32)
    fmt = FORMATS["fp16"]
    tiny = to_float64(output_gradient(case, "tiny", 0))
    assert np.abs(tiny).max() < 64 * fmt.tiny and (np.abs(tiny[tiny != 0]) < fmt.tiny).any()
    huge = to_float64(output_gradient(case, "huge", 0))
    assert np.abs(huge).max() > 128 and np.isfinite(huge).all()
    zero = to_float64(output_gradient(case, "zero-rows", 0))
    rows_zero = ~zero.any(-1)
    assert rows_zero.any() and not rows_zero.all()
    # delta-cancel: Delta_i = dO_i . O_i is a sum of large terms that cancels.
    from flashcheck.kernels.numpy_attention import tiled_attention

    o = tiled_attention(case.q, case.k, case.v, block_m=40, block_n=30)
    dc = to_float64(output_gradient(case, "delta-cancel", 0))
    delta, mag = np.abs((dc * o).sum(-1)), (np.abs(dc) * np.abs(o)).sum(-1)
    assert np.all(delta <= 4 * fmt.u * mag) and mag.min() > 0


def test_output_gradient_validates_its_arguments():
    case = _case()
    with pytest.raises(ValueError, match="unknown output-gradient class 'big'"):
        output_gradient(case, "big", 0)
    with pytest.raises(ValueError, match="non-negative integer"):
        output_gradient(case, "normal", -1)
    q = case.q.copy()
    q[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="delta-cancel.*finite inputs"):
        output_gradient(case.replace(q=q), "delta-cancel", 0)
    with pytest.raises(ValueError, match="Case.do must be"):
        case.replace(do=np.zeros((1, 2, 8, 5), np.float16))
    with pytest.raises(ValueError, match="at least one class"):
        DoDealer(())


def test_do_dealer_deals_every_class_once_per_round():
    dealer = DoDealer(seed=1)
    dealt = [dealer.deal() for _ in range(2 * len(DO_KINDS))]
    for r in range(2):
        assert sorted(dealt[r * len(DO_KINDS):(r + 1) * len(DO_KINDS)]) == sorted(DO_KINDS)


# -- targets' backward ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["numpy-tiled", "sdpa-math", "sdpa-flash"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_builtin_targets_return_gradients_that_pass(name, dtype):
    case = with_output_gradient(_case(dtype=dtype, layout="bnhd"), "normal")
    produced = resolve_target(name).run(case, "cpu")
    assert produced.grad_error is None
    assert [tuple(g.shape) for g in produced.grads] == [(1, 2, 8, 16), (1, 2, 12, 16), (1, 2, 12, 16)]
    res = run_case(case, resolve_target(name))
    assert res.verdict == "pass", res.reason
    assert res.grad["verdict"] == "pass" and 0 <= res.grad["ratio"] <= 1
    row = res.row()
    assert row["grad_verdict"] == "pass" and row["do"] == "normal"
    assert {"dq_ratio", "dk_ratio", "dv_ratio", "dq_max_err", "dk_bound_max", "grad_judged"} <= set(row)


def test_gqa_gradients_are_summed_over_the_group():
    case = with_output_gradient(_case(H=4, Hkv=2, Nq=6, Nk=9), "normal")
    produced = resolve_target("sdpa-math").run(case, "cpu")
    assert tuple(produced.grads[1].shape) == (1, 2, 9, 16)
    res = run_case(case, resolve_target("numpy-tiled"))
    assert res.grad["verdict"] == "pass", res.grad


def _torch_target(name, fn):
    def run(case, device):
        from flashcheck.verify.targets import _run_torch

        return _run_torch(case, device, fn)

    return Target(name, run)


def _sdpa(q, k, v, mask, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _ZeroDk(torch.autograd.Function):
    """Identity forward on k; its backward drops k's gradient for the last key."""

    @staticmethod
    def forward(ctx, k):
        return k.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[:, :, -1] = 0
        return g


def test_a_wrong_gradient_fails_the_run_with_class_gradient_and_key_features():
    target = _torch_target("drops-last-dk", lambda q, k, v, m: _sdpa(q, _ZeroDk.apply(k), v, m))
    case = with_output_gradient(_case(Nk=70), "normal")
    res = run_case(case, target)
    assert res.verdict == "fail" and res.grad["verdict"] == "fail"
    assert res.failure["class"] == "grad-wrong" and res.failure["gradient"] == "dk"
    assert res.failure["symptom"] == "dk row is all zero"
    assert "key in last partial key tile" in res.failure["features"]
    assert res.reason.startswith("gradient: dk error")
    assert res.row()["failure_class"] == "grad-wrong"


def test_a_target_without_a_backward_is_unsupported_for_the_gradient_only():
    target = _torch_target("no-grad", lambda q, k, v, m: _sdpa(q.detach(), k.detach(), v.detach(), m))
    res = run_case(with_output_gradient(_case(), "normal"), target)
    assert res.verdict == "pass" and res.grad["verdict"] == "unsupported"
    assert "not differentiable" in res.grad["reason"]


class _Raises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("planted failure in the backward at 0x7f00")


def test_a_backward_that_raises_is_a_grad_raised_failure():
    target = _torch_target("bwd-raises", lambda q, k, v, m: _sdpa(_Raises.apply(q), k, v, m))
    res = run_case(with_output_gradient(_case(), "normal"), target)
    assert res.verdict == "fail" and res.failure["class"] == "grad-raised"
    assert res.failure["symptom"] == "RuntimeError: planted failure in the backward at ADDR"


def test_gradient_dtype_is_checked():
    def run(case, device):
        out = resolve_target("sdpa-math").run(case, device)
        return TargetOutput(out.out, None, tuple(g.float() for g in out.grads))

    res = run_case(with_output_gradient(_case(), "normal"), Target("fp32-grads", run))
    assert res.verdict == "fail" and res.failure["class"] == "grad-dtype"


def test_fully_masked_rows_must_get_zero_gradients():
    case = _case(Nq=6, Nk=10)
    mask = np.ones((6, 10), bool)
    mask[2] = False
    case = with_output_gradient(case.replace(attn_mask=mask), "normal")

    def leaky(q, k, v, m):  # a fully masked row that attends to every key, as cuDNN was seen to
        return _sdpa(q, k, v, m | ~m.any(-1, keepdim=True))

    res = run_case(case, _torch_target("leaky", leaky))
    assert res.verdict == "fail"
    ok = run_case(case, resolve_target("sdpa-math"))
    assert ok.grad["verdict"] == "pass", ok.grad


def test_judge_gradients_without_lse_uses_the_forward_bound():
    case = with_output_gradient(_case(), "delta-cancel")
    q, k, v, _ = case.to_torch(requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(torch.from_numpy(case.do))
    from flashcheck.kernels.models import get_model

    j = judge_gradients(case, q.grad, k.grad, v.grad, model=get_model("fa2", "fp16"), out=out)
    assert j.verdict == "pass" and set(j.judged) == {"dq", "dk", "dv"}


def test_minimization_slices_the_output_gradient_with_the_case():
    case = with_output_gradient(_case(B=2, H=4, Hkv=2, Nq=8, Dv=8), "normal")
    small = take(case, batch=[1], q_heads=[2, 3], kv_heads=[1], rows=[5], v_dims=[0, 1])
    assert small.do.shape == (1, 2, 1, 2)
    assert np.array_equal(small.do, case.do[1:2, 2:4, 5:6, :2])


# -- the campaign --------------------------------------------------------------------
@pytest.fixture(scope="module")
def grad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad")
    cfg = CampaignConfig(targets=["numpy-tiled", "sdpa-math"], grad=True, max_examples=12, seed=2, isolate=False,
                         progress=False, out=out, minimize=0, magnitudes=("normal", "uniform", "one-hot"))
    return run_campaign(cfg), out


def test_grad_campaign_judges_gradients_of_every_class(grad_run):
    result, out = grad_run
    rows = read_cases(out / "cases.jsonl")
    assert rows and all(r["grad_verdict"] in ("pass", "fail", "unsupported") for r in rows)
    assert {r["do"] for r in rows} == set(DO_KINDS)
    s = summarize(rows)
    assert s["totals"]["grad"]["pass"] + s["totals"]["grad"]["fail"] == len(rows)
    assert "dq_ratio_max" in s["groups"]["sdpa-math"]["fp16"]["grad"]
    assert set(s["coverage"]["sdpa-math"]["do"]) <= set(DO_KINDS)
    page = (out / "index.html").read_text()
    assert "<h2>Gradients</h2>" in page and "gradients judged in" in page
    assert json.loads((out / "meta.json").read_text())["grad"] is True


def test_diff_flags_a_gradient_ratio_that_crosses_one(grad_run):
    _, out = grad_run
    rows = read_cases(out / "cases.jsonl")
    worse = [dict(r, dq_ratio=(r.get("dq_ratio") or 0) * 1e6 + 2.0) for r in rows]
    d = diff_runs(rows, worse)
    assert d.regression and any("dq max ratio crossed 1" in r for r in d.reasons)
    assert not diff_runs(rows, rows).regression


def test_replay_runs_the_saved_output_gradient(tmp_path, capsys):
    case = with_output_gradient(_case(Nk=70), "zero-rows")
    path = case.replace(tags={**case.tags, "repro": {"target": "sdpa-math", "device": "cpu"}}).save(
        tmp_path / "c.npz")
    assert main(["replay", str(path)]) == 0
    text = capsys.readouterr().out
    assert "gradients (zero-rows dO): PASS; error/bound dq" in text


def test_do_kinds_need_grad_and_are_validated():
    with pytest.raises(ConfigError, match="--do-kinds needs --grad"):
        CampaignConfig(targets=["numpy-tiled"], do_kinds=("normal",))
    with pytest.raises(ConfigError, match="unknown output-gradient class"):
        CampaignConfig(targets=["numpy-tiled"], grad=True, do_kinds=("big",))


def test_report_plots_survive_extreme_ratios(tmp_path):
    from flashcheck.reports.html import render_html

    rows = [{"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "fail", "ratio": 1e308, "Nk": 5,
             "grad_verdict": "fail", "dq_ratio": 1e308, "dk_ratio": 0.5, "dv_ratio": 1e-320},
            {"case_id": "b", "target": "t", "dtype": "fp16", "verdict": "pass", "ratio": 1e-320, "Nk": 9}]
    assert "<h2>Gradients</h2>" in render_html(rows)
