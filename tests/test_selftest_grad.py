"""The harness tests its gradient checks: a --grad campaign must flag every
planted backward bug (`flashcheck.verify.planted_backward`) and pass both
correct backward passes, each bug caught by gradients (its forward is
correct), and the multi-tile bugs only on cases with several tiles."""

import time

import pytest

from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.planted_backward import BROKEN_BACKWARD, CORRECT_BACKWARD, MULTI_TILE_BACKWARD

EXAMPLES = 30


def _target(name):
    return f"flashcheck.verify.planted_backward:{name}"


@pytest.fixture(scope="module")
def grad_selftest(tmp_path_factory):
    targets = [_target(name) for name in (*BROKEN_BACKWARD, *CORRECT_BACKWARD)]
    out = tmp_path_factory.mktemp("selftest-grad")
    start = time.perf_counter()
    result = run_campaign(CampaignConfig(targets=targets, grad=True, max_examples=EXAMPLES, seed=0, isolate=False,
                                         progress=False, out=out, minimize=0))
    return result, time.perf_counter() - start


@pytest.mark.parametrize("bug", sorted(BROKEN_BACKWARD))
def test_every_planted_backward_bug_is_caught_by_its_gradients(grad_selftest, bug):
    result, _ = grad_selftest
    rows = [r for r in result.rows if r["target"] == _target(bug)]
    caught = [r for r in rows if r["verdict"] == "fail"]
    assert caught, f"{bug} ({BROKEN_BACKWARD[bug]}) passed {len(rows)} runs"
    first = caught[0]
    assert first["failure_class"].startswith("grad-"), first["reason"]
    index = list(dict.fromkeys(r["case_id"] for r in result.rows)).index(first["case_id"])
    print(f"{bug}: caught at case {index + 1} (dO {first['do']}, {first['mask_kind']}): {first['reason']}")


@pytest.mark.parametrize("bug", MULTI_TILE_BACKWARD)
def test_multi_tile_backward_bugs_need_several_tiles(grad_selftest, bug):
    result, _ = grad_selftest
    for row in result.rows:
        if row["target"] == _target(bug) and row["verdict"] == "fail":
            assert row["Nq"] > 64 or row["Nk"] > 64, row


@pytest.mark.parametrize("name", CORRECT_BACKWARD)
def test_correct_backward_passes_are_never_flagged(grad_selftest, name):
    result, _ = grad_selftest
    rows = [r for r in result.rows if r["target"] == _target(name)]
    judged = [r for r in rows if r.get("grad_verdict") in ("pass", "fail")]
    assert len(judged) >= 0.7 * EXAMPLES, (len(judged), len(rows))
    failures = [r["reason"] for r in rows if r["verdict"] == "fail"]
    assert not failures, failures[:3]


def test_grad_selftest_ran_every_case(grad_selftest):
    result, seconds = grad_selftest
    print(f"{result.cases} cases, {len(result.rows)} runs in {seconds:.0f} s")
    assert result.cases == EXAMPLES
