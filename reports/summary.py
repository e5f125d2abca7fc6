"""Summary statistics of a campaign's report rows.

`summarize` groups rows by target and dtype and reports, for each group,
how many cases passed, failed or were unsupported, the distribution of the
error/bound ratio (the verdict's own measure: > 1 fails), the worst ULP
and bits of error, the median RMSE and the worst cases. It also counts
failures per input class (magnitude, mask kind, layout).

Conventions (documented so that summaries of different runs compare):

- The ratio statistics use every row that ran (pass or fail) and has a
  ratio; a NaN ratio counts as inf (nothing certifies it).
- A failing row without a ratio (the target raised, or returned the wrong
  dtype) ranks as inf among the worst cases, but keeps ``ratio: None``.
- "unsupported" rows are counted but enter no statistic and no verdict.

>>> rows = [{"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "pass", "ratio": 0.25},
...         {"case_id": "b", "target": "t", "dtype": "fp16", "verdict": "fail", "ratio": 3.0}]
>>> s = summarize(rows)
>>> s["groups"]["t"]["fp16"]["failures"], s["groups"]["t"]["fp16"]["ratio_max"]
(1, 3.0)
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from flashcheck.reports.records import SUMMARY_FILE, dumps, loads

__all__ = [
    "CLASS_KEYS",
    "COVERAGE_KEYS",
    "GRADS",
    "VERDICTS",
    "WORST_PER_GROUP",
    "case_classes",
    "case_shape",
    "coverage",
    "effective_ratio",
    "attach_findings",
    "failure_groups",
    "row_size",
    "read_summary",
    "summarize",
    "validate_rows",
    "worst_rows",
    "write_summary",
]

VERDICTS = ("pass", "fail", "unsupported")
#: Features whose strata the coverage counts (the plan's, where the row has one).
COVERAGE_KEYS = ("size", "dtype", "mask", "magnitude", "layout", "heads", "head_dim", "lengths", "align", "dv")
#: Input classes whose failures are counted separately.
CLASS_KEYS = ("magnitude", "mask_kind", "layout")
WORST_PER_GROUP = 5
_REQUIRED = ("target", "dtype", "verdict")


def validate_rows(rows) -> list[dict]:
    """``rows`` as a list, after checking each is a dict with a target, a
    dtype and a known verdict. Raises TypeError/ValueError naming the row."""
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"row {i} must be a dict, got {type(row).__name__}")
        missing = [k for k in _REQUIRED if row.get(k) is None]
        if missing:
            raise ValueError(f"row {i} (case {row.get('case_id')!r}) lacks {', '.join(missing)}")
        if row["verdict"] not in VERDICTS:
            raise ValueError(f"row {i} has verdict {row['verdict']!r}; expected one of {VERDICTS}")
        ratio = row.get("ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number))):
            raise TypeError(f"row {i} has a non-numeric ratio {ratio!r}")
    return rows


def _float_or_none(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def effective_ratio(row: dict) -> float | None:
    """The row's error/bound ratio for ranking: NaN counts as inf, a failure
    without a ratio as inf, an unsupported row or a pass without one as None.

    >>> effective_ratio({"verdict": "fail", "ratio": None}), effective_ratio({"verdict": "pass", "ratio": 0.5})
    (inf, 0.5)
    """
    if row.get("verdict") == "unsupported":
        return None
    r = _float_or_none(row.get("ratio"))
    if r is None:
        return math.inf if row.get("verdict") == "fail" else None
    return math.inf if math.isnan(r) else r


def case_shape(row: dict) -> str:
    """Compact shape text: "B2 H8/2 Nq128 Nk1024 D64" (H/Hkv when GQA).

    >>> case_shape({"B": 1, "H": 4, "Hkv": 4, "Nq": 16, "Nk": 32, "D": 64})
    'B1 H4 Nq16 Nk32 D64'
    """
    if row.get("H") is None:
        return "?"
    heads = f"H{row['H']}" if row.get("Hkv") in (None, row["H"]) else f"H{row['H']}/{row['Hkv']}"
    return f"B{row.get('B', '?')} {heads} Nq{row.get('Nq', '?')} Nk{row.get('Nk', '?')} D{row.get('D', '?')}"


def case_classes(row: dict) -> str:
    """Input classes of the row: "magnitude/mask_kind/layout", plus causal."""
    text = "/".join(str(row.get(k, "?")) for k in CLASS_KEYS)
    return text + (" causal" if row.get("is_causal") else "")


def _size_stratum(row: dict) -> str:
    """A row's size stratum: its plan's, else one read off its lengths."""
    nq, nk = row.get("Nq") or 0, row.get("Nk") or 0
    if nk > 512:
        return "long"
    if nq > 64 and nk > 128:
        return "both-tiles"
    if nk > 128:
        return "key-tiles"
    if nq > 64:
        return "query-tiles"
    return "tiny" if max(nq, nk) <= 17 else "one-tile"


def _features(row: dict) -> dict:
    plan = row.get("plan") if isinstance(row.get("plan"), dict) else {}
    return {
        "size": plan.get("size") or _size_stratum(row),
        "dtype": row.get("dtype"),
        "mask": row.get("mask_kind"),
        "magnitude": row.get("magnitude"),
        "layout": row.get("layout"),
        "heads": row.get("heads") or plan.get("heads"),
        "head_dim": plan.get("head_dim", row.get("D")),
        "lengths": "equal" if row.get("Nq") == row.get("Nk") else "different",
        "align": plan.get("align"),
        "dv": "same" if row.get("Dv", row.get("D")) == row.get("D") else "different",
    }


def coverage(rows) -> dict:
    """What the runs covered, per target: for each feature of
    `COVERAGE_KEYS`, how many runs (pass or fail; unsupported runs left
    out) had each value, plus how many had more than 128 keys (three key
    tiles of 64) and more than 64 queries (two query tiles); in a --grad
    run, ``do`` counts the runs whose gradients were judged, by dO class.

    >>> c = coverage([{"target": "t", "dtype": "fp16", "verdict": "pass", "Nq": 70, "Nk": 300, "D": 64}])
    >>> c["t"]["runs"], c["t"]["size"], c["t"]["nk_over_128"]
    (1, {'both-tiles': 1}, 1)
    """
    out: dict = {}
    for row in validate_rows(rows):
        if row["verdict"] == "unsupported":
            continue
        entry = out.setdefault(row["target"], {"runs": 0, "nk_over_128": 0, "nq_over_64": 0,
                                               **{k: {} for k in COVERAGE_KEYS}})
        entry["runs"] += 1
        entry["nk_over_128"] += int((row.get("Nk") or 0) > 128)
        entry["nq_over_64"] += int((row.get("Nq") or 0) > 64)
        for key, value in _features(row).items():
            if value is not None:
                entry[key][str(value)] = entry[key].get(str(value), 0) + 1
        if row.get("grad_verdict") in ("pass", "fail"):  # gradients judged: by output-gradient class
            do = entry.setdefault("do", {})
            do[str(row.get("do"))] = do.get(str(row.get("do")), 0) + 1
    for entry in out.values():
        for key in COVERAGE_KEYS + (("do",) if "do" in entry else ()):
            entry[key] = dict(sorted(entry[key].items()))
    return out


def _stats(values) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return float(max(vals)), float(np.median(vals))


def _metric(rows, key) -> list[float]:
    out = []
    for row in rows:
        v = _float_or_none(row.get(key))
        if v is not None and not math.isnan(v):
            out.append(v)
    return out


def _worst_entry(row: dict) -> dict:
    return {
        "case_id": row.get("case_id"),
        "target": row["target"],
        "dtype": row["dtype"],
        "shape": case_shape(row),
        "classes": case_classes(row),
        "verdict": row["verdict"],
        "ratio": _float_or_none(row.get("ratio")),
        "max_ulp": row.get("m_max_ulp"),
        "reason": row.get("reason"),
    }


def worst_rows(rows, n: int) -> list[dict]:
    """The ``n`` rows with the largest `effective_ratio` (failures first on ties)."""
    ranked = [(effective_ratio(r), r["verdict"] == "fail", i, r) for i, r in enumerate(rows)]
    ranked = [t for t in ranked if t[0] is not None]
    ranked.sort(key=lambda t: (-t[0], not t[1], t[2]))
    return [t[3] for t in ranked[:n]]


#: The gradients a --grad run judges; each row has ``<name>_ratio``.
GRADS = ("dq", "dk", "dv")
GRAD_VERDICTS = ("pass", "fail", "unsupported", "not judged")


def _grad_summary(rows: list[dict]) -> dict | None:
    """Gradient verdict counts and per-gradient ratio statistics of rows
    from a --grad run (None when no row has a gradient verdict)."""
    graded = [r for r in rows if r.get("grad_verdict")]
    if not graded:
        return None
    out = {v.replace(" ", "_"): sum(r["grad_verdict"] == v for r in graded) for v in GRAD_VERDICTS}
    for name in GRADS:
        vals = [effective_ratio({"ratio": r.get(f"{name}_ratio"), "verdict": r["grad_verdict"]}) for r in graded
                if r.get(f"{name}_ratio") is not None]
        out[f"{name}_ratio_max"], out[f"{name}_ratio_median"] = _stats(vals)
    judged = [r["grad_judged"] for r in graded if r.get("grad_judged") is not None]
    out["judged_share_min"] = min(judged) if judged else None
    return out


def _group_summary(rows: list[dict]) -> dict:
    ran = [r for r in rows if r["verdict"] != "unsupported"]
    ratios = [effective_ratio(r) for r in ran if r.get("ratio") is not None]
    ratio_max, ratio_median = _stats(ratios)
    ulps, bits, rmse = _metric(ran, "m_max_ulp"), _metric(ran, "m_max_bits"), _metric(ran, "m_rmse")
    return {
        "cases": len(rows),
        "passed": sum(r["verdict"] == "pass" for r in rows),
        "failures": sum(r["verdict"] == "fail" and not r.get("known") for r in rows),
        "known_failures": sum(r["verdict"] == "fail" and bool(r.get("known")) for r in rows),
        "unsupported": sum(r["verdict"] == "unsupported" for r in rows),
        "ratio_max": ratio_max,
        "ratio_median": ratio_median,
        "max_ulp": max(ulps) if ulps else None,
        "max_bits": max(bits) if bits else None,
        "rmse_median": float(np.median(rmse)) if rmse else None,
        "worst": [_worst_entry(r) for r in worst_rows(ran, WORST_PER_GROUP)],
        **({"grad": g} if (g := _grad_summary(ran)) else {}),
    }


def summarize(rows) -> dict:
    """Per-target, per-dtype summary and overall totals of report rows.

    Returns a dict with
    ``totals``: rows, distinct cases, passed, failures, unsupported, the
    lists of targets and dtypes, and ``verdict`` ("pass" when no row failed,
    "fail" otherwise, "empty" when there are no rows);
    ``groups[target][dtype]``: cases, passed, failures, unsupported,
    ratio_max, ratio_median, max_ulp, max_bits, rmse_median (None where no
    row has the value) and ``worst``, the top 5 rows by ratio (case_id,
    shape, classes, verdict, ratio, max_ulp, reason);
    ``failures_by_class[key][class]``: failure counts for each key of
    `CLASS_KEYS` (classes without failures are listed with 0);
    ``coverage[target]``: what its runs covered (`coverage`).
    """
    rows = validate_rows(rows)
    targets = sorted({r["target"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    groups: dict = {}
    for target in targets:
        for dtype in dtypes:
            sel = [r for r in rows if r["target"] == target and r["dtype"] == dtype]
            if sel:
                groups.setdefault(target, {})[dtype] = _group_summary(sel)
    by_class = {}
    for key in CLASS_KEYS:
        counts = {str(r.get(key)): 0 for r in rows}
        for r in rows:
            if r["verdict"] == "fail":
                counts[str(r.get(key))] += 1
        by_class[key] = dict(sorted(counts.items()))
    failures = sum(r["verdict"] == "fail" and not r.get("known") for r in rows)
    known = sum(r["verdict"] == "fail" and bool(r.get("known")) for r in rows)
    totals = {
        "rows": len(rows),
        "cases": len({r.get("case_id") for r in rows}),
        "passed": sum(r["verdict"] == "pass" for r in rows),
        "failures": failures,
        "known_failures": known,
        "unsupported": sum(r["verdict"] == "unsupported" for r in rows),
        "targets": targets,
        "dtypes": dtypes,
        "verdict": "empty" if not rows else ("fail" if failures else "known-only" if known else "pass"),
    }
    grad = _grad_summary([r for r in rows if r["verdict"] != "unsupported"])
    if grad is not None:
        totals["grad"] = {k: grad[k] for k in ("pass", "fail", "unsupported", "not_judged")}
    return {"totals": totals, "groups": groups, "failures_by_class": by_class, "coverage": coverage(rows),
            "findings": failure_groups(rows)}


def failure_groups(rows) -> list[dict]:
    """Failing rows grouped by their ``signature`` (rows without one by
    target and reason), new findings first: signature, target, class,
    symptom, needs, count, known (the note, or None), first_case, and the
    smallest case (fewest q/k/v elements) with its shape and reason.

    >>> rows = [{"case_id": "a", "target": "t", "dtype": "fp16", "verdict": "fail", "signature": "t | wrong | x",
    ...          "B": 1, "H": 1, "Hkv": 1, "Nq": 8, "Nk": 8, "D": 16}]
    >>> [(g["signature"], g["count"]) for g in failure_groups(rows)]
    [('t | wrong | x', 1)]
    """
    groups: dict = {}
    for r in rows:
        if r.get("verdict") != "fail":
            continue
        key = r.get("signature") or f"{r['target']} | {r.get('reason')}"
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        smallest = min(members, key=row_size)
        out.append({
            "signature": key, "target": members[0]["target"], "class": members[0].get("failure_class"),
            "symptom": members[0].get("symptom"), "needs": members[0].get("needs") or [], "count": len(members),
            "known": members[0].get("known"), "first_case": members[0].get("case_id"),
            "smallest_case": smallest.get("case_id"), "smallest_shape": case_shape(smallest),
            "smallest_reason": smallest.get("reason"),
        })
    return sorted(out, key=lambda g: (g["known"] is not None, -g["count"]))


def attach_findings(summary: dict, findings) -> dict:
    """Add to ``summary["findings"]`` what the campaign learnt of each
    (``minimized`` and ``repro``, from `flashcheck.verify.findings`), matched by signature."""
    by_signature = {f["signature"]: f for f in findings or []}
    for group in summary["findings"]:
        extra = by_signature.get(group["signature"])
        if extra:
            group.update(minimized=extra.get("minimized"), repro=extra.get("repro"))
    return summary


def row_size(row: dict) -> int:
    """Elements of q, k and v of a report row's case (smaller reads easier)."""
    try:
        B, H, Hkv, Nq, Nk, D = (int(row[k]) for k in ("B", "H", "Hkv", "Nq", "Nk", "D"))
    except (KeyError, TypeError, ValueError):
        return 1 << 62
    return B * H * Nq * D + 2 * B * Hkv * Nk * D


def write_summary(rows, path, *, meta: dict | None = None) -> dict:
    """Write `summarize(rows)` (plus ``meta`` and a UTC timestamp) as JSON
    to ``path`` (a ``.json`` file, or a directory that gets ``summary.json``) and
    return it. Non-finite numbers are stored as "inf"/"-inf"/"nan"."""
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    summary = summarize(rows)
    summary["meta"] = dict(meta or {})
    # What each target declined, whether the run said anything, and the
    # campaign's minimized findings belong beside the coverage.
    for key in ("declined", "inconclusive"):
        if key in summary["meta"]:
            summary[key] = summary["meta"].pop(key)
    attach_findings(summary, summary["meta"].pop("findings", None))
    if summary.get("inconclusive") and summary["totals"]["verdict"] in ("pass", "known-only"):
        summary["totals"]["verdict"] = "inconclusive"
    summary["written"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = _summary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(summary, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written summary behind
    return summary


def read_summary(path) -> dict:
    """A summary written by `write_summary` (file or directory)."""
    path = _summary_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no summary at {path}")
    summary = loads(path.read_text(encoding="utf-8"))
    if not isinstance(summary, dict) or "groups" not in summary or "totals" not in summary:
        raise ValueError(f"{path} is not a summary written by flashcheck.reports.summary.write_summary")
    return summary


def _summary_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    # A path that is a directory, or names none yet without ".json", is a run directory.
    if path.is_dir() or (not path.exists() and path.suffix != ".json"):
        return path / SUMMARY_FILE
    return path
