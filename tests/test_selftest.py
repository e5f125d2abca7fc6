"""The harness tests itself: a campaign must flag every planted bug and pass
every correct implementation, reach the bugs that live past the first tile,
give narrow kernels a full campaign inside their slice, say "inconclusive"
(exit 3) for a kernel that runs nothing, and survive targets that hang or crash."""

import json
import time

import pytest

from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.cli import main
from flashcheck.verify.planted import BLOCK_M, BLOCK_N, BROKEN, CORRECT, MISBEHAVING, MULTI_TILE

EXAMPLES = 40


def _target(name):
    return f"flashcheck.verify.planted:{name}"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    targets = [_target(name) for name in (*BROKEN, *CORRECT)]
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
    row = _first_failure(result.rows, _target(bug))
    assert row is not None, f"{bug} ({BROKEN[bug]}) passed {EXAMPLES} cases"
    index = list(dict.fromkeys(r["case_id"] for r in result.rows)).index(row["case_id"])
    print(f"{bug}: caught at case {index + 1} ({row['magnitude']}, {row['mask_kind']}, {row['layout']}): "
          f"{row['reason']}")


@pytest.mark.parametrize("bug", MULTI_TILE)
def test_multi_tile_bugs_are_caught_past_the_first_tiles(planted_run, bug):
    """Each multi-tile bug is caught, and only on a case with several query
    tiles or more than two key tiles: the strata reach them, the bug is real."""
    result, _, _ = planted_run
    failing = [r for r in result.rows if r["target"] == _target(bug) and r["verdict"] == "fail"]
    assert failing, f"{bug} was not caught in {EXAMPLES} cases"
    for row in failing:
        assert row["Nq"] > BLOCK_M or row["Nk"] > 2 * BLOCK_N or row["magnitude"] == "nan-inf", row


@pytest.mark.parametrize("name", CORRECT)
def test_correct_implementations_pass(planted_run, name):
    result, _, _ = planted_run
    rows = [r for r in result.rows if r["target"] == _target(name)]
    ran = [r for r in rows if r["verdict"] != "unsupported"]
    # correct_reference declines NaN/Inf inputs (the float64 oracle takes finite ones only).
    assert len(ran) >= 0.8 * EXAMPLES, (len(ran), result.capabilities[_target(name)].rules)
    failures = [r["reason"] for r in rows if r["verdict"] == "fail"]
    assert not failures, failures[:3]


def test_campaign_writes_report_and_repro(planted_run):
    result, _, out = planted_run
    assert result.exit_code == 1
    for name in ("cases.jsonl", "summary.json", "index.html"):
        assert (out / name).stat().st_size > 0
    assert list((out / "repro").glob("*.npz")), "failing cases must be saved for replay"


def test_misbehaving_targets_are_failures_not_crashes(tmp_path):
    targets = [_target(name) for name in (*MISBEHAVING, "correct_tiled")]
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


# -- narrow kernels -------------------------------------------------------------

NARROW_SLICE = {"dtype": {"fp16", "bf16"}, "D": {64, 128}, "mask_kind": {"none", "causal"}, "heads": {"MHA"}}


def _contiguous(row) -> bool:
    """Whether the case's tensors are contiguous: a "bnhd" layout with one
    head, or padded batch/head strides with one of each, still are."""
    return (row["layout"] == "contiguous" or (row["layout"] == "bnhd" and row["H"] == 1)
            or (row["layout"] == "strided" and row["B"] == row["H"] == 1))


def _narrow(tmp_path, name, n=30, seed=0):
    return run_campaign(CampaignConfig(targets=[_target(name)], max_examples=n, seed=seed, isolate=False,
                                       progress=False, out=tmp_path))


def test_narrow_correct_kernel_gets_a_full_campaign_in_its_slice(tmp_path):
    result = _narrow(tmp_path, "narrow_correct")
    ran = [r for r in result.rows if r["verdict"] != "unsupported"]
    assert result.exit_code == 0, result.inconclusive
    assert len(ran) > result.cases / 2, f"only {len(ran)} of {result.cases} cases ran"
    assert all(r["verdict"] == "pass" for r in ran)
    for row in ran:  # every run case lies inside the slice
        for key, allowed in NARROW_SLICE.items():
            assert row[key] in allowed, (key, row[key])
        assert row["Nq"] == row["Nk"] and row.get("Dv", row["D"]) == row["D"] and _contiguous(row)
    learnt = {f for rule in result.capabilities[_target("narrow_correct")].rules for f in rule}
    assert {"dtype", "mask", "heads", "lengths", "layout", "head_dim"} <= learnt
    assert any(r["Nk"] > 2 * BLOCK_N for r in ran), "the slice's campaign must reach several key tiles"


def test_narrow_buggy_kernel_fails(tmp_path):
    result = _narrow(tmp_path, "narrow_buggy")
    assert result.exit_code == 1
    assert any(r["verdict"] == "fail" for r in result.rows)


def test_narrowing_options_put_every_case_in_the_slice(tmp_path, capsys):
    argv = ["fuzz", "--target", _target("narrow_correct"), "--max-examples", "12", "--seed", "1", "--no-isolate",
            "--no-progress", "--out", str(tmp_path), "--dtype", "fp16,bf16", "--head-dims", "64,128",
            "--masks", "none,causal", "--heads", "MHA", "--layouts", "contiguous", "--equal-lengths",
            "--same-dv", "--magnitudes", "normal,one-hot,uniform"]
    assert main(argv) == 0
    assert "0 unsupported" in capsys.readouterr().out


def test_kernel_that_declines_everything_is_inconclusive(tmp_path, capsys):
    argv = ["fuzz", "--target", _target("declines_everything"), "--max-examples", "10", "--no-isolate",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "INCONCLUSIVE" in err and "declines_everything" in err and "declined: everything" in err
    html = (tmp_path / "index.html").read_text()
    assert '<div class="banner empty">INCONCLUSIVE' in html and "PASS:" not in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["verdict"] == "inconclusive"
    assert summary["declined"][_target("declines_everything")]["declined"][0]["text"] == "everything"


def test_too_few_supported_cases_is_inconclusive(tmp_path):
    """A kernel of fp16/bf16 only, in a campaign narrowed to fp32, runs nothing: the campaign says so."""
    cfg = CampaignConfig(targets=[_target("narrow_correct")], dtypes=("fp32",), max_examples=8, seed=0,
                         isolate=False, progress=False, out=tmp_path)
    result = run_campaign(cfg)
    assert result.exit_code == 3 and _target("narrow_correct") in result.inconclusive
