"""From failures to findings: features, diagnoses, signatures, minimization,
known issues, and the campaign's grouped report with standalone repros."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashcheck.properties.case import Case
from flashcheck.reports.diff import diff_runs
from flashcheck.reports.records import dumps, read_cases
from flashcheck.verify.campaign import CampaignConfig, ConfigError, run_campaign
from flashcheck.verify.check import run_case
from flashcheck.verify.cli import main
from flashcheck.verify.explain import case_features, diagnose, row_features
from flashcheck.verify.known import KnownIssueError, load_known, mark_known
from flashcheck.verify.minimize import minimize
from flashcheck.verify.signatures import normalize_message, signature_key, slug, symptom_for
from flashcheck.verify.targets import resolve_target


def _planted(name):
    return resolve_target(f"flashcheck.verify.planted:{name}")


def _case(B=1, H=2, Hkv=2, Nq=8, Nk=12, D=16, *, seed=0, dtype=np.float16, **options):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    return Case(q, k, v, enable_gqa=Hkv != H, **options)


def _fully_masked_case(**kw):
    case = _case(**kw)
    mask = np.ones((case.q.shape[2], case.k.shape[2]), dtype=bool)
    mask[3] = False
    return case.replace(attn_mask=mask, mask_kind="fully-masked-rows")


# -- explain ---------------------------------------------------------------------
def test_row_features_name_fully_masked_and_nan_rows():
    case = _fully_masked_case()
    assert row_features(case, (0, 1, 3, 0))[0] == "fully masked row"
    assert "fully masked row" not in row_features(case, (0, 1, 2, 0))
    q = case.q.copy()
    q[0, 0, 5, 2] = np.nan
    nan_case = case.replace(q=q, attn_mask=None)
    assert "NaN in query row" in row_features(nan_case, (0, 0, 5, 0))
    assert "NaN in inputs" in case_features(nan_case)
    k = case.k.copy()
    k[0, 0, 7] = np.inf
    hidden = case.replace(k=k, attn_mask=np.arange(12)[None, :] < 7 * np.ones((8, 1), bool))
    assert "NaN/Inf only in masked keys" in row_features(hidden, (0, 0, 2, 0))


def test_case_features_name_structure():
    case = _case(H=4, Hkv=2, Nq=70, Nk=64, D=72, is_causal=True, layout="strided")
    feats = case_features(case)
    for f in ("GQA", "causal", "causal with Nq != Nk", "strided layout", "head dim not a multiple of 16",
              "Nq not a multiple of 64"):
        assert f in feats, (f, feats)
    assert "Nk not a multiple of 64" not in feats and "MQA" not in feats


def test_diagnose_recognises_wrong_semantics():
    case = _fully_masked_case()
    # What cuDNN was measured to do: a fully masked row gets the unmasked row.
    unmasked = run_case(case.replace(attn_mask=None), resolve_target("sdpa-math")).case
    import torch

    q, k, v, _ = unmasked.to_torch()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy()
    assert diagnose(case, out, (0, 1, 3, 0)) == "output row equals the attn_mask ignored"
    zeros = np.zeros_like(out)
    assert diagnose(case, zeros, (0, 1, 2, 0)) == "output row is all zero"
    assert diagnose(case, np.full_like(out, np.nan), (0, 1, 2, 0)) == "output row is all NaN"


@pytest.mark.parametrize(("bug", "case_options", "expected"), [
    ("gqa_head_mapping", dict(H=4, Hkv=2), "output row equals the wrong KV head (KV head h % Hkv)"),
    ("ignored_scale", dict(scale=0.5), "output row equals the default scale 1/sqrt(D)"),
])
def test_planted_bugs_get_their_diagnosis_and_signature(bug, case_options, expected):
    case = _case(Nq=8, Nk=24, D=16, seed=3, dtype=np.float32, **case_options)
    res = run_case(case, _planted(bug))
    assert res.verdict == "fail"
    assert res.failure["class"] == "wrong"
    assert res.failure["symptom"] == expected
    assert res.failure["signature"] == signature_key(f"flashcheck.verify.planted:{bug}", "wrong", expected)
    assert expected in res.reason, "the reason says what the wrong value looks like"


def test_fully_masked_nan_rows_are_non_finite_with_their_trigger():
    res = run_case(_fully_masked_case(), _planted("fully_masked_rows"))
    assert res.failure["class"] == "non-finite"
    assert res.failure["trigger"] == "fully masked row"
    assert "fully masked row" in res.reason


# -- signatures --------------------------------------------------------------------
def test_signature_helpers():
    assert normalize_message("ValueError: shape (3, 4) at 0xdeadbeef\nmore") == "ValueError: shape (N, N) at ADDR"
    assert symptom_for("hang") == "no answer within the timeout"
    assert slug("a | b / c") == "a-b-c"
    with pytest.raises(ValueError, match="unknown failure class 'nope'"):
        symptom_for("nope")


# -- minimization --------------------------------------------------------------------
def test_minimize_keeps_what_the_bug_needs():
    target = _planted("gqa_head_mapping")
    case = _case(B=2, H=8, Hkv=2, Nq=40, Nk=50, D=32, seed=5, dtype=np.float32, layout="bnhd")
    first = run_case(case, target)
    sig = first.failure["signature"]

    def reproduces(c):
        r = run_case(c, target, baseline=False)
        return r if r.verdict == "fail" and r.failure["signature"] == sig else None

    small = minimize(case, reproduces, at=first.failure["at"], budget_s=60, locate=lambda r: r.failure["at"])
    assert small.case.q.shape[0] == 1 and small.case.q.shape[2] <= 2 and small.case.k.shape[2] <= 2
    assert small.case.q.shape[1] > small.case.k.shape[1], "a head-mapping bug needs more query than KV heads"
    assert "shared KV heads" in small.needs
    assert "non-contiguous layout" not in small.needs and small.case.layout == "contiguous"
    # Every minimal value is one of the failing case's: minimization slices, never invents.
    assert set(small.case.q.ravel().tolist()) <= set(case.q.ravel().tolist())


def test_minimize_validates_its_budget():
    with pytest.raises(ValueError, match="positive budget"):
        minimize(_case(), lambda c: True, budget_s=0)


# -- known issues ------------------------------------------------------------------
def test_known_file_errors_name_the_problem(tmp_path):
    bad = {
        "no-note": '[[issue]]\ntarget = "x"\nclass = "wrong"\n',
        "bad-class": '[[issue]]\ntarget = "x"\nclass = "oops"\nnote = "n"\n',
        "bad-key": '[[issue]]\ntarget = "x"\nclass = "wrong"\nnote = "n"\ncolour = "red"\n',
        "bad-toml": "[[issue]\n",
    }
    expected = {"no-note": "missing note", "bad-class": "class 'oops'", "bad-key": "unknown keys",
                "bad-toml": "not valid TOML"}
    for name, text in bad.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        with pytest.raises(KnownIssueError, match=expected[name]):
            load_known(path)
    with pytest.raises(KnownIssueError, match="does not exist"):
        load_known(tmp_path / "missing.toml")


def test_known_matching(tmp_path):
    path = tmp_path / "known.toml"
    path.write_text('[[issue]]\ntarget = "sdpa-*"\nclass = "wrong"\ndevice = "cuda"\n'
                    'features = ["fully masked row"]\nnote = "unmasked row"\nlink = "https://example.org/1"\n')
    known = load_known(path)
    row = {"target": "sdpa-cudnn", "verdict": "fail", "failure_class": "wrong", "device": "cuda",
           "features": ["fully masked row", "bool mask"]}
    other = dict(row, features=["bool mask"])
    cpu = dict(row, device="cpu")
    rows = [row, other, cpu, dict(row, verdict="pass")]
    assert mark_known(rows, known) == 1
    assert row["known"] == "unmasked row (https://example.org/1)"
    assert "known" not in other and "known" not in cpu


# -- the campaign ------------------------------------------------------------------
KNOWN = """
[[issue]]
target = "*:fully_masked_rows"
class = "non-finite"
features = ["fully masked row"]
note = "planted: rows with no visible key give 0/0"
"""
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """Two planted bugs on fully masked rows: one listed as known, one new."""
    out = tmp_path_factory.mktemp("findings")
    known = _write(out / "known.toml", KNOWN)
    cfg = CampaignConfig(targets=[f"flashcheck.verify.planted:{b}" for b in ("fully_masked_rows", "ignored_scale")],
                         dtypes=("fp32",), masks=("fully-masked-rows",), magnitudes=("normal",), max_examples=8,
                         seed=1, isolate=False, progress=False, out=out / "run", known=known, minimize=20)
    return run_campaign(cfg), cfg


def test_known_failures_do_not_count_as_new(planted_run):
    result, cfg = planted_run
    known = [r for r in result.rows if r["verdict"] == "fail" and r.get("known")]
    new = [r for r in result.rows if r["verdict"] == "fail" and not r.get("known")]
    assert known and all(r["target"].endswith("fully_masked_rows") for r in known)
    assert new and all(r["target"].endswith("ignored_scale") for r in new)
    assert (result.known_failures, result.failures) == (len(known), len(new))
    assert result.exit_code == 1, "the new failures still fail the run"
    html = (cfg.out / "index.html").read_text()
    assert "Known issues" in html and "planted: rows with no visible key" in html


def test_only_known_failures_exit_zero_but_never_say_pass(tmp_path):
    known = _write(tmp_path / "known.toml", KNOWN)
    cfg = CampaignConfig(targets=["flashcheck.verify.planted:fully_masked_rows"], dtypes=("fp32",),
                         masks=("fully-masked-rows",), magnitudes=("normal",), max_examples=6, seed=1, isolate=False,
                         progress=False, out=tmp_path / "run", known=known, minimize=0)
    result = run_campaign(cfg)
    assert result.known_failures and not result.failures and result.exit_code == 0
    summary = json.loads((cfg.out / "summary.json").read_text())
    assert summary["totals"]["verdict"] == "known-only"
    assert "NO NEW FAILURE" in (cfg.out / "index.html").read_text()


def test_findings_are_grouped_minimized_and_get_a_standalone_repro(planted_run):
    result, cfg = planted_run
    by_target = {f.target.split(":")[1]: f for f in result.findings}
    assert set(by_target) == {"fully_masked_rows", "ignored_scale"}, [f.signature for f in result.findings]
    nan_rows = by_target["fully_masked_rows"]
    assert nan_rows.failure_class == "non-finite" and nan_rows.trigger == "fully masked row"
    assert nan_rows.needs == ["attn_mask"], "no mask, no fully masked row"
    small = nan_rows.minimized
    assert small["reproduced"] and (small["B"], small["H"], small["Nq"]) == (1, 1, 1), small
    rows = read_cases(cfg.out / "cases.jsonl")
    assert {r["signature"] for r in rows if r["target"] == nan_rows.target and r["verdict"] == "fail"} == {
        nan_rows.signature}
    summary = json.loads((cfg.out / "summary.json").read_text())
    grouped = {g["signature"]: g for g in summary["findings"]}
    assert grouped[nan_rows.signature]["count"] == len(nan_rows.rows)
    assert grouped[nan_rows.signature]["repro"] == nan_rows.repro
    # The script runs without the harness on the path: only the "user's kernel" module is imported.
    script = cfg.out / nan_rows.repro / "repro.py"
    assert "import flashcheck\n" not in script.read_text()
    proc = subprocess.run([sys.executable, script.name], cwd=script.parent, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "bug reproduced" in proc.stdout, proc.stdout + proc.stderr
    # The minimized case replays through the harness too.
    assert main(["replay", str(cfg.out / nan_rows.repro)]) == 1


def test_torch_cpu_flash_nan_dropping_matches_the_repo_known_issue():
    """The main job's known issue: torch's fused CPU backend returns 0 for a
    query row holding a NaN (seen on torch 2.13 for Nq = Nk = 4)."""
    case = _case(Nq=4, Nk=4, D=16, dtype=np.float32)
    q = case.q.copy()
    q[0, 0, 2, 3] = np.nan
    res = run_case(case.replace(q=q, magnitude="nan-inf"), resolve_target("sdpa-flash"))
    if res.verdict == "pass":
        pytest.skip("this torch's CPU flash backend propagates the NaN: the known issue is fixed")
    assert res.failure["class"] == "nan-dropped" and res.failure["trigger"] == "NaN in query row"
    row = res.row() | {"device": "cpu"}
    assert mark_known([row], load_known(ROOT / "known-issues.toml")) == 1


def test_known_file_errors_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[issue]]\ntarget = "x"\n')
    with pytest.raises(ConfigError, match="missing class, note"):
        CampaignConfig(targets=["sdpa-math"], known=bad)


def test_diff_with_known_issues(tmp_path, planted_run):
    result, cfg = planted_run
    rows = read_cases(cfg.out / "cases.jsonl")
    plain = [dict(r, known=None) if r["verdict"] == "fail" else r for r in rows]
    for r in plain:
        r.pop("known", None)
    old = [dict(r, verdict="pass") for r in plain]
    assert diff_runs(old, plain).regression
    known = load_known(_write(tmp_path / "k.toml", KNOWN))
    res = diff_runs(old, plain, mark_known=lambda rs: mark_known(rs, known))
    assert res.known_failures and not any(f["target"].endswith("fully_masked_rows") for f in res.new_failures)
    only_known = [r for r in plain if r["target"].endswith("fully_masked_rows")]
    old_known = [dict(r, verdict="pass") for r in only_known]
    assert diff_runs(old_known, only_known).regression
    old_path, new_path = _write(tmp_path / "old.jsonl", old_known), _write(tmp_path / "new.jsonl", only_known)
    assert main(["diff", str(old_path), str(new_path), "--known", str(tmp_path / "k.toml")]) == 0


def _write(path, content):
    if isinstance(content, list):
        path.write_text("".join(dumps(r) + "\n" for r in content))
    else:
        path.write_text(content)
    return path


def test_a_device_fault_stays_with_the_case_that_caused_it(tmp_path):
    """The H100 run that motivated this: after one cuDNN "misaligned address",
    every later case of the target failed the same way. Here a simulated
    fault kills the worker's "context" on head dims that are not multiples
    of 16; every other case must still be judged on its own."""
    cfg = CampaignConfig(targets=["flashcheck.verify.planted:poisons_device"], dtypes=("fp16",),
                         head_dims=(24, 32, 64), masks=("none",), magnitudes=("normal",), sizes=("tiny",),
                         max_examples=8, seed=4, isolate=True, timeout=60, progress=False, out=tmp_path, minimize=15)
    result = run_campaign(cfg)
    ran = [r for r in result.rows if r["verdict"] != "unsupported"]
    faulty = [r for r in ran if r["D"] % 16]
    assert faulty and len(faulty) < len(ran), [r["D"] for r in ran]
    first_fault = result.rows.index(faulty[0])
    assert any(r["D"] % 16 == 0 for r in result.rows[first_fault + 1:]), "a good case must come after a fault"
    for r in ran:
        if r["D"] % 16:
            assert (r["verdict"], r["failure_class"], r["symptom"]) == ("fail", "fault", "misaligned address"), r
        else:
            assert r["verdict"] == "pass", r["reason"]
    (finding,) = result.findings
    assert finding.signature.startswith("flashcheck.verify.planted:poisons_device | fault | misaligned address")
    assert finding.minimized["reproduced"] and finding.minimized["D"] % 16


def test_needs_pass_builds_on_each_accepted_removal():
    """Two removals that each keep the failure: the final case has neither,
    and what it still needs (the layout) is the only need."""
    case = _case(H=4, Hkv=2, is_causal=True, layout="strided")
    small = minimize(case, lambda c: c.layout == "strided", budget_s=30)
    assert small.case.layout == "strided" and small.needs == ["non-contiguous layout"]
    assert small.case.q.shape[1] == small.case.k.shape[1] and not small.case.is_causal


def test_flushed_subnormal_rows_are_one_symptom():
    """cuDNN on the H100 returned zeros for rows whose exact values are bf16
    subnormals: a whole zero row and a single zero element are one symptom."""
    case = _case(Nq=2, Nk=8, D=8, dtype=np.float32)
    tiny = np.float32(2.0 ** -130)
    case = case.replace(v=(case.v * tiny).astype(np.float32), magnitude="subnormal")
    out = np.zeros(case.q.shape[:3] + (case.v.shape[3],), np.float32)
    assert diagnose(case, out, (0, 0, 1, 2)) == "subnormal output flushed to zero"
    from flashcheck.verify.oracle import attention_case

    partial = attention_case(case).out.astype(np.float32)
    partial[0, 0, 1, 2] = 0.0
    assert diagnose(case, partial, (0, 0, 1, 2)) == "subnormal output flushed to zero"
    assert diagnose(_case(Nq=2, Nk=8, D=8), np.zeros((1, 2, 2, 8)), (0, 0, 1, 2)) == "output row is all zero"
