"""The harness tests itself: a campaign must flag every planted bug and pass
every correct implementation, and must survive targets that hang or crash."""

import time

import pytest

from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.planted import BROKEN, CORRECT, MISBEHAVING

EXAMPLES = 40


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    targets = [f"flashcheck.verify.planted:{name}" for name in (*BROKEN, *CORRECT)]
    out = tmp_path_factory.mktemp("selftest")
    start = time.perf_counter()
    result = run_campaign(CampaignConfig(targets=targets, max_examples=EXAMPLES, seed=0, isolate=False,
                                         progress=False, out=out))
    return result, time.perf_counter() - start, out


def _first_failure(rows, target):
    for row in rows:
        if row["target"] == target and row["verdict"] == "fail":
            return row
    return None


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_every_planted_bug_is_caught(planted_run, bug):
    result, seconds, _ = planted_run
    target = f"flashcheck.verify.planted:{bug}"
    row = _first_failure(result.rows, target)
    assert row is not None, f"{bug} ({BROKEN[bug]}) passed {EXAMPLES} cases"
    # How long it took to be caught: the campaign's time up to this case.
    index = next(i for i, r in enumerate(result.rows) if r is row) // len(BROKEN | dict.fromkeys(CORRECT))
    print(f"{bug}: caught at case {index} ({row['magnitude']}, {row['mask_kind']}, {row['layout']}): {row['reason']}")


@pytest.mark.parametrize("name", CORRECT)
def test_correct_implementations_pass(planted_run, name):
    result, _, _ = planted_run
    rows = [r for r in result.rows if r["target"] == f"flashcheck.verify.planted:{name}"]
    assert len(rows) >= EXAMPLES
    failures = [r["reason"] for r in rows if r["verdict"] == "fail"]
    assert not failures, failures[:3]


def test_campaign_writes_report_and_repro(planted_run):
    result, _, out = planted_run
    assert result.exit_code == 1
    for name in ("cases.jsonl", "summary.json", "index.html"):
        assert (out / name).stat().st_size > 0
    assert list((out / "repro").glob("*.npz")), "failing cases must be saved for replay"


def test_misbehaving_targets_are_failures_not_crashes(tmp_path):
    targets = [f"flashcheck.verify.planted:{name}" for name in (*MISBEHAVING, "correct_tiled")]
    result = run_campaign(CampaignConfig(targets=targets, max_examples=2, seed=1, isolate=True, timeout=4,
                                         progress=False, out=tmp_path, dtypes=("fp16",)))
    by_target = {}
    for row in result.rows:
        by_target.setdefault(row["target"].split(":")[1], []).append(row)
    for name in MISBEHAVING:
        verdicts = {r["verdict"] for r in by_target[name]}
        assert verdicts == {"fail"}, (name, verdicts)
    assert "hung" in by_target["hangs"][0]["reason"]
    assert "SIGSEGV" in by_target["segfaults"][0]["reason"]
    assert "shape" in by_target["wrong_shape"][0]["reason"]
    assert "dtype" in by_target["wrong_dtype"][0]["reason"]
    assert {r["verdict"] for r in by_target["correct_tiled"]} == {"pass"}, "the campaign continues after crashes"
