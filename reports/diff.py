"""Compare two campaign runs and decide whether the new one regressed.

Each side is report rows (a list of dicts), a summary dict, or a path: a
``cases.jsonl`` file, a ``summary.json`` file, or a run directory holding
either (rows are preferred, since they allow per-case comparison).

The new run regresses when any of these holds:

1. a new failure: a (case_id, target) pair fails now and passed, or was
   absent, before (needs rows on both sides), and matches no known issue
   (a row's ``known`` field, set by the campaign's ``--known`` file or by
   ``mark_known`` here);
2. without rows on both sides: a (target, dtype) has more failures than
   before;
3. the median error/bound ratio of a (target, dtype) grew by more than
   `MEDIAN_FACTOR` (2x), medians below `MEDIAN_FLOOR` counting as the
   floor, so noise far below the bound does not flag;
4. the max error/bound ratio of a (target, dtype) crossed 1 (was <= 1,
   is > 1);
5. in runs with gradients (``--grad``) on both sides: 3 and 4 for the
   error/bound ratio of each gradient (dq, dk, dv) of a (target, dtype).

Cases that pass now and failed before, and groups that disappeared, are
reported but are no regression.

>>> old = [{"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "pass", "ratio": 0.1}]
>>> new = [{"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "fail", "ratio": 4.0}]
>>> diff_runs(old, new).regression
True
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flashcheck.reports.records import CASES_FILE, SUMMARY_FILE, read_cases
from flashcheck.reports.summary import GRADS, read_summary, summarize, validate_rows

__all__ = ["MEDIAN_FACTOR", "MEDIAN_FLOOR", "DiffResult", "GroupShift", "diff_runs", "load_run", "main_diff"]

#: A median error/bound ratio that grows by more than this factor regresses.
MEDIAN_FACTOR = 2.0
#: Medians below this are treated as this (1/1000 of the bound is noise).
MEDIAN_FLOOR = 1e-3


@dataclass
class GroupShift:
    """Old and new statistics of one (target, dtype)."""

    target: str
    dtype: str
    old_cases: int | None
    new_cases: int | None
    old_failures: int | None
    new_failures: int | None
    old_median: float | None
    new_median: float | None
    old_max: float | None
    new_max: float | None
    flags: list[str] = field(default_factory=list)
    old_grad: dict | None = None  # the summary's gradient statistics (`summary._grad_summary`)
    new_grad: dict | None = None


@dataclass
class DiffResult:
    """What changed between two runs; ``regression`` is the verdict."""

    regression: bool
    reasons: list[str]
    new_failures: list[dict]  # case_id, target, dtype, before ("pass" or "absent"), reason
    fixed: list[dict]  # case_id, target, dtype: failed before, pass now
    groups: list[GroupShift]
    per_case: bool  # whether both sides had rows, so cases were matched
    common_cases: int
    known_failures: list[dict] = field(default_factory=list)  # like new_failures, but matching a known issue
    new_signatures: list[str] = field(default_factory=list)  # failure signatures absent from the old run

    def text(self) -> str:
        """A printable report."""
        lines = [f"REGRESSION ({len(self.reasons)} finding{'s' if len(self.reasons) != 1 else ''})"
                 if self.regression else "no regression"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.per_case:
            lines.append(f"cases in both runs: {self.common_cases} (target, case) pairs")
        else:
            lines.append("per-case comparison skipped: one side has only a summary")
        lines.append("")
        lines.append(f"{'target':<18} {'dtype':<6} {'rows':>11} {'failures':>11} {'median ratio':>21} "
                     f"{'max ratio':>21}  flags")
        for g in self.groups:
            lines.append(
                f"{g.target:<18} {g.dtype:<6} {_pair(g.old_cases, g.new_cases):>11} "
                f"{_pair(g.old_failures, g.new_failures):>11} {_pair(g.old_median, g.new_median):>21} "
                f"{_pair(g.old_max, g.new_max):>21}  {'; '.join(g.flags)}".rstrip())
            if g.new_grad:
                og = g.old_grad or {}
                lines.append(f"{'':<18} {'':<6} gradients " + "; ".join(
                    f"{n} median {_pair(og.get(f'{n}_ratio_median'), g.new_grad.get(f'{n}_ratio_median'))} "
                    f"max {_pair(og.get(f'{n}_ratio_max'), g.new_grad.get(f'{n}_ratio_max'))}" for n in GRADS))
        if self.new_failures:
            lines.append("")
            lines.append(f"new failures ({len(self.new_failures)}):")
            for f in self.new_failures[:50]:
                lines.append(f"  {f['case_id']} {f['target']} {f['dtype']} (was {f['before']}): {f['reason']}")
            if len(self.new_failures) > 50:
                lines.append(f"  ... {len(self.new_failures) - 50} more")
        if self.new_signatures:
            lines.append("")
            lines.append(f"new failure signatures ({len(self.new_signatures)}):")
            lines += [f"  {s}" for s in self.new_signatures]
        if self.known_failures:
            lines.append("")
            lines.append(f"failing, but known issues ({len(self.known_failures)}; no regression):")
            for f in self.known_failures[:20]:
                lines.append(f"  {f['case_id']} {f['target']} {f['dtype']}: {f['known']}")
        if self.fixed:
            lines.append("")
            lines.append(f"fixed (failed before, pass now): {len(self.fixed)}")
            for f in self.fixed[:20]:
                lines.append(f"  {f['case_id']} {f['target']} {f['dtype']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}"


def _pair(old, new) -> str:
    return f"{_fmt(old)} -> {_fmt(new)}"


def load_run(source) -> tuple[list[dict] | None, dict]:
    """(rows or None, summary) of one side of a diff; see the module doc."""
    if isinstance(source, dict):
        if "groups" not in source or "totals" not in source:
            raise ValueError("a summary dict needs 'groups' and 'totals' (from flashcheck.reports.summary.summarize)")
        return None, source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if (path / CASES_FILE).is_file():
                rows = read_cases(path / CASES_FILE)
                return rows, summarize(rows)
            if (path / SUMMARY_FILE).is_file():
                return None, read_summary(path / SUMMARY_FILE)
            raise FileNotFoundError(f"{path} holds neither {CASES_FILE} nor {SUMMARY_FILE}")
        if not path.is_file():
            raise FileNotFoundError(f"no such run file or directory: {path}")
        if path.suffix == ".jsonl":
            rows = read_cases(path)
            return rows, summarize(rows)
        if path.suffix == ".json":
            return None, read_summary(path)
        raise ValueError(f"{path}: expected a .jsonl rows file, a .json summary or a run directory")
    if isinstance(source, (list, tuple)):
        rows = validate_rows(source)
        return rows, summarize(rows)
    raise TypeError(f"a run must be rows, a summary dict or a path, got {type(source).__name__}")


def _effective(x) -> float | None:
    return math.inf if x is not None and math.isnan(x) else x


def _compare_ratios(g: GroupShift, label: str, old_med, new_med, old_max, new_max, factor, floor) -> None:
    old_med, new_med, old_max, new_max = (_effective(x) for x in (old_med, new_med, old_max, new_max))
    if old_med is not None and new_med is not None:
        if max(new_med, floor) > factor * max(old_med, floor):
            g.flags.append(f"{label}median ratio grew {_fmt(old_med)} -> {_fmt(new_med)} (> {factor:g}x)")
    if old_max is not None and new_max is not None and old_max <= 1 < new_max:
        g.flags.append(f"{label}max ratio crossed 1: {_fmt(old_max)} -> {_fmt(new_max)}")


def _compare_group(g: GroupShift, factor: float, floor: float, per_case: bool) -> None:
    _compare_ratios(g, "", g.old_median, g.new_median, g.old_max, g.new_max, factor, floor)
    if g.old_grad and g.new_grad:
        for name in GRADS:
            _compare_ratios(g, f"{name} ", g.old_grad.get(f"{name}_ratio_median"),
                            g.new_grad.get(f"{name}_ratio_median"), g.old_grad.get(f"{name}_ratio_max"),
                            g.new_grad.get(f"{name}_ratio_max"), factor, floor)
    if not per_case and (g.new_failures or 0) > (g.old_failures or 0):
        g.flags.append(f"failures rose {g.old_failures or 0} -> {g.new_failures}")


def diff_runs(old, new, *, median_factor: float = MEDIAN_FACTOR, median_floor: float = MEDIAN_FLOOR,
              mark_known=None) -> DiffResult:
    """Compare run ``old`` with run ``new`` (rows, summary dict, or path).
    ``mark_known(rows)``: sets ``known`` on the rows of known issues (e.g.
    `flashcheck.verify.known.mark_known` bound to a file), applied to both sides."""
    for name, value in (("median_factor", median_factor), ("median_floor", median_floor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if median_factor <= 1:
        raise ValueError(f"median_factor must exceed 1, got {median_factor}")
    if median_floor <= 0:
        raise ValueError(f"median_floor must be positive, got {median_floor}")
    old_rows, old_sum = load_run(old)
    new_rows, new_sum = load_run(new)
    if mark_known is not None:  # on copies: the caller's rows stay as they were
        old_rows, new_rows = ([dict(r) for r in rows] if rows is not None else None for rows in (old_rows, new_rows))
        for rows in (old_rows, new_rows):
            if rows is not None:
                mark_known(rows)
        old_sum = summarize(old_rows) if old_rows is not None else old_sum
        new_sum = summarize(new_rows) if new_rows is not None else new_sum
    per_case = old_rows is not None and new_rows is not None

    new_failures, known_failures, fixed, common = [], [], [], 0
    if per_case:
        before = {(r.get("case_id"), r["target"]): r for r in old_rows}
        for r in new_rows:
            key = (r.get("case_id"), r["target"])
            prev = before.get(key)
            if prev is not None:
                common += 1
            if r["verdict"] == "fail" and (prev is None or prev["verdict"] == "pass"):
                entry = {"case_id": key[0], "target": key[1], "dtype": r["dtype"],
                         "before": "absent" if prev is None else "pass", "reason": r.get("reason")}
                if r.get("known"):
                    known_failures.append({**entry, "known": r["known"]})
                else:
                    new_failures.append(entry)
            elif r["verdict"] == "pass" and prev is not None and prev["verdict"] == "fail":
                fixed.append({"case_id": key[0], "target": key[1], "dtype": r["dtype"]})

    groups = []
    keys = sorted({(t, d) for s in (old_sum, new_sum) for t, per in s["groups"].items() for d in per})
    for target, dtype in keys:
        o = old_sum["groups"].get(target, {}).get(dtype)
        n = new_sum["groups"].get(target, {}).get(dtype)
        g = GroupShift(
            target, dtype,
            o and o["cases"], n and n["cases"], o and o["failures"], n and n["failures"],
            o and o["ratio_median"], n and n["ratio_median"], o and o["ratio_max"], n and n["ratio_max"],
            old_grad=o and o.get("grad"), new_grad=n and n.get("grad"),
        )
        _compare_group(g, float(median_factor), float(median_floor), per_case)
        if o is None:
            g.flags.append("new in this run")
        elif n is None:
            g.flags.append("missing from this run")
        groups.append(g)

    new_signatures = []
    if per_case:
        old_sigs = {r.get("signature") for r in old_rows if r["verdict"] == "fail"}
        new_signatures = sorted({r["signature"] for r in new_rows if r["verdict"] == "fail" and r.get("signature")
                                 and not r.get("known") and r["signature"] not in old_sigs})
    reasons = []
    if new_failures:
        absent = sum(f["before"] == "absent" for f in new_failures)
        reasons.append(f"{len(new_failures)} new failing (case, target) pairs "
                       f"({len(new_failures) - absent} passed before, {absent} not run before)")
    for g in groups:
        reasons += [f"{g.target} {g.dtype}: {flag}" for flag in g.flags
                    if flag not in ("new in this run", "missing from this run")]
    return DiffResult(bool(reasons), reasons, new_failures, fixed, groups, per_case, common, known_failures,
                      new_signatures)


def main_diff(old, new, *, file=None, mark_known=None) -> int:
    """Print the diff of runs ``old`` and ``new``; return 0 (no regression),
    1 (regression) or 2 (a run could not be read: message on stderr)."""
    out = sys.stdout if file is None else file
    try:
        result = diff_runs(old, new, mark_known=mark_known)
    except (OSError, ValueError, TypeError) as exc:
        print(f"diff: {exc}", file=sys.stderr)
        return 2
    print(result.text(), file=out)
    return 1 if result.regression else 0
