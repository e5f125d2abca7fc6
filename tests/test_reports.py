import json
import math
import re
import warnings

import numpy as np
import pytest

from flashcheck.reports import records
from flashcheck.reports.diff import diff_runs, main_diff
from flashcheck.reports.html import render_html, write_html
from flashcheck.reports.records import CaseWriter, dumps, loads, read_cases
from flashcheck.reports.summary import read_summary, summarize, write_summary


def row(case_id, target="tri", dtype="fp16", verdict="pass", ratio=0.5, **extra):
    base = {
        "case_id": case_id, "seed": 1, "dtype": dtype, "B": 1, "H": 4, "Hkv": 2, "Nq": 64, "Nk": 256, "D": 64,
        "is_causal": False, "scale": None, "enable_gqa": True, "layout": "contiguous", "block_m": None,
        "block_n": None, "magnitude": "normal", "mask_kind": "none", "mask_dtype": None, "target": target,
        "model": "m", "verdict": verdict, "reason": None if verdict == "pass" else "error exceeds bound",
        "ratio": ratio, "lse_ratio": None, "baseline_ratio": None, "bound_max": 1e-3, "oracle_mp_rows": 0,
        "seconds": 0.01, "m_max_ulp": 1, "m_max_bits": 1.0, "m_rmse": 1e-4,
    }
    base.update(extra)
    return base


def strict_json(text):
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=reject)


# -- records ------------------------------------------------------------------

def test_writer_fsyncs_at_most_once_per_interval(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(records.os, "fsync", lambda fd: synced.append(fd))
    clock = [100.0]
    monkeypatch.setattr(records.time, "monotonic", lambda: clock[0])
    with CaseWriter(tmp_path / "rows.jsonl", fsync_seconds=1.0) as w:
        w.write(row("a"))
        w.write(row("b"))
        assert synced == []  # within a second of opening
        clock[0] += 1.5
        w.write(row("c"))
        assert len(synced) == 1
        w.write(row("d"))
        assert len(synced) == 1
    assert len(synced) == 2  # close always syncs
    assert [r["case_id"] for r in read_cases(tmp_path / "rows.jsonl")] == ["a", "b", "c", "d"]


def test_writer_flushes_each_row_before_close(tmp_path, monkeypatch):
    synced = []
    real_fsync = records.os.fsync
    monkeypatch.setattr(records.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "run" / "cases.jsonl"
    w = CaseWriter(path, fsync_every=2, fsync_seconds=0)
    w.write(row("a"))
    assert [r["case_id"] for r in read_cases(path)] == ["a"]  # visible while the writer is open
    assert synced == []
    w.write(row("b"))
    assert len(synced) == 1
    w.close()
    assert len(synced) == 2 and w.closed
    with pytest.raises(ValueError, match="closed"):
        w.write(row("c"))
    with CaseWriter(path) as w2:  # appends
        w2.write(row("c"))
    assert [r["case_id"] for r in read_cases(tmp_path / "run")] == ["a", "b", "c"]


def test_crash_truncated_last_line_is_dropped_then_overwritten(tmp_path):
    path = tmp_path / "cases.jsonl"
    with CaseWriter(path) as w:
        w.write_all([row("a"), row("b")])
    full = dumps(row("c"))
    with open(path, "a") as f:
        f.write(full[: len(full) // 2])  # the crash: half a line, no newline
    with pytest.warns(RuntimeWarning, match="unreadable last line"):
        assert [r["case_id"] for r in read_cases(path)] == ["a", "b"]
    with pytest.warns(RuntimeWarning, match="partial last line"):
        w = CaseWriter(path)
    with w:
        w.write(row("d"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["case_id"] for r in read_cases(path)] == ["a", "b", "d"]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(dumps(row("a")) + "\n{oops\n" + dumps(row("b")) + "\n")
    with pytest.raises(ValueError, match=":2: not a JSON line"):
        read_cases(path)


def test_nonfinite_and_numpy_values_round_trip_as_strict_json(tmp_path):
    r = row("a", ratio=math.inf, lse_ratio=-math.inf, baseline_ratio=math.nan, reason="nan",
            m_max_abs_err=np.float32(0.25), m_max_ulp=np.int64(7), m_nan_at=((0, 1, 2, 3),),
            m_flag=np.bool_(True), m_list=[1.0, np.float64(np.inf)], m_arr=np.array([1.5, np.nan]))
    path = tmp_path / "cases.jsonl"
    with CaseWriter(path) as w:
        w.write(r)
    strict_json(path.read_text().strip())
    back = read_cases(path)[0]
    assert back["ratio"] == math.inf and back["lse_ratio"] == -math.inf and math.isnan(back["baseline_ratio"])
    assert back["reason"] == "nan"  # free text is never decoded
    assert back["m_max_abs_err"] == 0.25 and back["m_max_ulp"] == 7 and back["m_flag"] is True
    assert back["m_nan_at"] == [[0, 1, 2, 3]]
    assert back["m_list"] == [1.0, math.inf]
    assert back["m_arr"][0] == 1.5 and math.isnan(back["m_arr"][1])
    assert loads(dumps({"x": [math.nan]}))["x"][0] != 0


def test_encoding_rejects_what_it_cannot_represent(tmp_path):
    with pytest.raises(TypeError, match="cannot encode"):
        dumps({"x": object()})
    with pytest.raises(TypeError, match="keys must be strings"):
        dumps({1: 2})
    with pytest.raises(TypeError, match="must be a dict"):
        CaseWriter(tmp_path / "x.jsonl").write([1])
    with pytest.raises(ValueError, match="fsync_every"):
        CaseWriter(tmp_path / "y.jsonl", fsync_every=0)
    with pytest.raises(ValueError, match="fsync_seconds"):
        CaseWriter(tmp_path / "z.jsonl", fsync_seconds=-1)
    with pytest.raises(FileNotFoundError):
        read_cases(tmp_path / "missing.jsonl")


def test_real_case_result_row_round_trips(tmp_path):
    from flashcheck.properties.case import Case
    from flashcheck.verify.check import CaseResult
    from flashcheck.verify.metrics import compare

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float16) for _ in range(3))
    case = Case(q, k, v, magnitude="normal", seed=3)
    ref = rng.standard_normal((1, 2, 4, 8))
    metrics = compare(ref.astype(np.float16), ref, "fp16").as_dict()
    result = CaseResult(case=case, target="torch", model="fp16-default", verdict="pass", ratio=0.2,
                        metrics=metrics, seconds=0.5)
    path = tmp_path / "cases.jsonl"
    with CaseWriter(path) as w:
        w.write(result.row())
    back = read_cases(path)[0]
    assert back["case_id"] == case.case_id and back["Nk"] == 4
    assert back["m_max_ulp"] == metrics["max_ulp"] and back["m_rmse"] == metrics["rmse"]
    assert summarize([back])["groups"]["torch"]["fp16"]["passed"] == 1


# -- summary ------------------------------------------------------------------

def hand_rows():
    return [
        row("c1", ratio=0.1, m_max_ulp=1, m_max_bits=1.0, m_rmse=1e-4),
        row("c2", ratio=0.3, m_max_ulp=2, m_max_bits=1.6, m_rmse=2e-4, magnitude="large"),
        row("c3", ratio=0.5, m_max_ulp=3, m_max_bits=2.0, m_rmse=3e-4, mask_kind="causal"),
        row("c4", verdict="fail", ratio=2.0, m_max_ulp=9, m_max_bits=3.3, m_rmse=4e-4, magnitude="large",
            layout="bnhd"),
        row("c5", verdict="unsupported", ratio=None, m_max_ulp=None, m_max_bits=None, m_rmse=None),
        row("c1", target="ref", ratio=0.05),
        row("c4", target="ref", ratio=0.2),
        row("b1", dtype="bf16", verdict="fail", ratio=None, reason="raised RuntimeError: boom", m_rmse=None),
        row("b2", dtype="bf16", verdict="fail", ratio=math.nan),
        row("b3", dtype="bf16", ratio=0.7),
    ]


def test_summary_numbers_on_hand_made_rows():
    s = summarize(hand_rows())
    g = s["groups"]["tri"]["fp16"]
    assert (g["cases"], g["passed"], g["failures"], g["unsupported"]) == (5, 3, 1, 1)
    assert g["ratio_max"] == 2.0
    assert g["ratio_median"] == pytest.approx(0.4)  # median of 0.1, 0.3, 0.5, 2.0
    assert g["max_ulp"] == 9 and g["max_bits"] == 3.3
    assert g["rmse_median"] == pytest.approx(2.5e-4)
    assert [w["case_id"] for w in g["worst"]] == ["c4", "c3", "c2", "c1"]  # unsupported c5 left out
    assert g["worst"][0]["shape"] == "B1 H4/2 Nq64 Nk256 D64"
    assert g["worst"][0]["classes"] == "large/none/bnhd"

    b = s["groups"]["tri"]["bf16"]
    assert (b["cases"], b["failures"]) == (3, 2)
    assert b["ratio_max"] == math.inf  # the NaN ratio counts as inf
    assert b["ratio_median"] == math.inf  # of 0.7, inf (b1 has no ratio)
    assert [w["case_id"] for w in b["worst"]] == ["b1", "b2", "b3"]  # a ratio-less failure ranks as inf
    assert b["worst"][0]["ratio"] is None and "boom" in b["worst"][0]["reason"]

    assert s["groups"]["ref"]["fp16"]["ratio_median"] == pytest.approx(0.125)
    t = s["totals"]
    assert (t["rows"], t["cases"], t["passed"], t["failures"], t["unsupported"]) == (10, 8, 6, 3, 1)
    assert t["targets"] == ["ref", "tri"] and t["dtypes"] == ["bf16", "fp16"] and t["verdict"] == "fail"
    assert s["failures_by_class"]["magnitude"] == {"large": 1, "normal": 2}
    assert s["failures_by_class"]["layout"] == {"bnhd": 1, "contiguous": 2}
    assert s["failures_by_class"]["mask_kind"] == {"causal": 0, "none": 3}


def test_summary_validates_and_writes(tmp_path):
    with pytest.raises(ValueError, match="row 1 .* lacks target"):
        summarize([row("a"), {"case_id": "b", "dtype": "fp16", "verdict": "pass"}])
    with pytest.raises(ValueError, match="verdict 'ok'"):
        summarize([row("a", verdict="ok")])
    with pytest.raises(TypeError, match="non-numeric ratio"):
        summarize([row("a", ratio="big")])
    with pytest.raises(TypeError, match="list of dicts"):
        summarize(row("a"))
    assert summarize([])["totals"]["verdict"] == "empty"
    written = write_summary(hand_rows(), tmp_path, meta={"seed": 7})
    strict_json((tmp_path / "summary.json").read_text())
    back = read_summary(tmp_path)
    assert back["meta"] == {"seed": 7}
    assert back["groups"]["tri"]["bf16"]["ratio_max"] == math.inf
    assert back["totals"] == written["totals"]


# -- html ---------------------------------------------------------------------

def test_html_is_self_contained_with_plots_tables_and_escaping(tmp_path):
    rows = hand_rows() + [row("x1", verdict="fail", ratio=5.0, reason="<script>alert(1)</script> & more")]
    (tmp_path / "repro").mkdir()
    (tmp_path / "repro" / "x1-tri.npz").write_bytes(b"")
    path = write_html(rows, tmp_path, title="Run <7>", meta={"seed": 7, "device": "cpu"})
    assert path == tmp_path / "index.html"
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "Run &lt;7&gt;" in page
    assert page.count('<img alt="plot" src="data:image/png;base64,') == 3  # vs Nk, histogram, A vs B
    assert "Worst 20 runs" in page and "FAIL: 4 of 10 runs" in page
    assert 'href="repro/x1-tri.npz"' in page
    assert 'href="repro/c4-tri.npz"' not in page  # no file, no link
    assert "<th>seed</th><td>7</td>" in page


def test_html_handles_one_three_and_no_targets(tmp_path):
    one = render_html([row("a"), row("b", ratio=0.0)])
    assert "Only one target" in one and "PASS: all 2 runs" in one
    three = render_html([row("a", target=t, ratio=r) for t, r in (("t1", 0.1), ("t2", 3.0), ("t3", 0.2))])
    assert "<th>t1</th><th>t2</th><th>t3</th>" in three
    empty = write_html([], tmp_path / "empty.html")
    assert "NO DATA" in empty.read_text()
    with pytest.raises(TypeError, match="meta must be a dict"):
        render_html([row("a")], meta=["seed"])


# -- diff ---------------------------------------------------------------------

def test_diff_identical_runs_is_no_regression(capsys):
    result = diff_runs(hand_rows(), hand_rows())
    assert not result.regression and result.new_failures == [] and result.reasons == []
    assert result.per_case and result.common_cases == 10
    assert main_diff(hand_rows(), hand_rows()) == 0
    assert "no regression" in capsys.readouterr().out


def test_diff_detects_new_failure_and_fix(tmp_path, capsys):
    old = hand_rows()
    new = hand_rows()
    new[0] = row("c1", verdict="fail", ratio=1.5, reason="error 3e-3 exceeds bound")  # was pass
    new[3] = row("c4", ratio=0.9, magnitude="large", layout="bnhd")  # was fail
    new.append(row("n1", verdict="fail", ratio=4.0))  # not in the old run
    result = diff_runs(old, new)
    assert result.regression
    assert {(f["case_id"], f["before"]) for f in result.new_failures} == {("c1", "pass"), ("n1", "absent")}
    assert [f["case_id"] for f in result.fixed] == ["c4"]
    with CaseWriter(tmp_path / "old" / "cases.jsonl") as w:
        w.write_all(old)
    with CaseWriter(tmp_path / "new" / "cases.jsonl") as w:
        w.write_all(new)
    assert main_diff(tmp_path / "old", tmp_path / "new") == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "c1 tri fp16 (was pass)" in out


def test_diff_detects_distribution_shift_without_new_failures():
    old = [row(f"c{i}", ratio=0.01 * (i + 1)) for i in range(10)]  # median 0.055, max 0.1
    worse = [dict(r, ratio=r["ratio"] * 3) for r in old]  # all still pass
    result = diff_runs(old, worse)
    assert result.regression and result.new_failures == []
    assert any("median ratio grew" in reason for reason in result.reasons)
    slightly = [dict(r, ratio=r["ratio"] * 1.5) for r in old]
    assert not diff_runs(old, slightly).regression  # below the 2x factor
    noise = [dict(r, ratio=r["ratio"] * 1e-4) for r in old]
    assert not diff_runs(noise, [dict(r, ratio=r["ratio"] * 5) for r in noise]).regression  # under the floor
    crossed = [dict(r, ratio=r["ratio"] * 15) for r in old]  # max 1.5 > 1 while verdicts say pass
    assert any("crossed 1" in reason for reason in diff_runs(old, crossed).reasons)


def test_diff_with_summaries_compares_failure_counts(tmp_path):
    old, new = hand_rows(), hand_rows() + [row("n1", verdict="fail", ratio=0.4)]
    write_summary(old, tmp_path / "old")
    write_summary(new, tmp_path / "new")
    result = diff_runs(tmp_path / "old" / "summary.json", tmp_path / "new")
    assert not result.per_case and result.regression
    assert any("failures rose 1 -> 2" in reason for reason in result.reasons)
    assert not diff_runs(summarize(old), tmp_path / "old").regression
    with pytest.raises(FileNotFoundError):
        diff_runs(tmp_path / "nowhere", old)
    with pytest.raises(ValueError, match="median_factor"):
        diff_runs(old, old, median_factor=0.5)
    assert main_diff(tmp_path / "nowhere", old) == 2


def test_summary_and_page_show_coverage_per_target(tmp_path):
    from flashcheck.reports.html import render_html
    from flashcheck.reports.summary import coverage, summarize

    plan = {"size": "key-tiles", "align": "ragged", "head_dim": "64"}
    rows = [
        {"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "pass", "ratio": 0.5, "Nq": 70, "Nk": 300,
         "D": 64, "mask_kind": "causal", "magnitude": "normal", "layout": "bnhd", "heads": "GQA", "plan": plan},
        {"case_id": "b", "target": "t", "dtype": "bf16", "verdict": "unsupported", "Nq": 3, "Nk": 3, "D": 8},
        {"case_id": "a", "target": "u", "dtype": "fp16", "verdict": "fail", "ratio": 3.0, "Nq": 70, "Nk": 300,
         "D": 64, "mask_kind": "causal", "magnitude": "normal", "layout": "bnhd", "heads": "GQA", "plan": plan},
    ]
    cov = coverage(rows)
    assert cov["t"]["runs"] == 1 and cov["u"]["runs"] == 1, "unsupported rows cover nothing"
    assert cov["t"]["size"] == {"key-tiles": 1} and cov["t"]["nk_over_128"] == 1 and cov["t"]["nq_over_64"] == 1
    assert cov["t"]["align"] == {"ragged": 1} and cov["t"]["lengths"] == {"different": 1}
    assert summarize(rows)["coverage"] == cov
    page = render_html(rows, meta={"declined": {"t": {"declined": [
        {"rule": {"dtype": "bf16"}, "text": "dtype=bf16", "reason": "no bf16"}], "probes": 9, "skipped_cases": 4}}})
    assert "What the runs covered" in page and "key-tiles 1" in page
    assert "dtype=bf16" in page and "no bf16" in page
