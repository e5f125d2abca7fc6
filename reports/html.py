"""A single self-contained HTML page for a campaign's report rows.

`write_html` writes one ``index.html`` with everything inline: CSS in a
``<style>`` block, plots as base64 PNG images drawn by matplotlib's Agg
canvas (no pyplot, so no global backend is switched), no scripts and no
external links except relative links to ``repro/<case_id>-<target>.npz``
files that exist next to the page. Every piece of text from the rows or
the metadata goes through `html.escape`.

Page order: verdict banner and metadata; per-target/dtype table; plots
(ratio vs Nk, ratio histogram, target vs target); failure clusters by
class; the 20 worst cases; every failure with its reason.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

from flashcheck.reports.records import HTML_FILE, REPRO_DIR
from flashcheck.reports.summary import (
    COVERAGE_KEYS,
    GRADS,
    attach_findings,
    case_classes,
    case_shape,
    effective_ratio,
    summarize,
    validate_rows,
    worst_rows,
)

__all__ = ["MAX_FAILURE_ROWS", "WORST_ROWS", "render_html", "write_html"]

WORST_ROWS = 20
#: The failures table stops here; the JSONL file has the rest.
MAX_FAILURE_ROWS = 500
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.banner { font-size: 1.5em; font-weight: bold; padding: .6em 1em; border-radius: 6px; margin: .6em 0; }
.pass { background: #d8f0d8; color: #145214; } .fail { background: #f8d4d4; color: #7a1010; }
.empty { background: #eee; color: #444; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { color: #a00; font-weight: bold; } .reason { max-width: 40em; word-break: break-word; }
.note { color: #555; font-size: .9em; } img { max-width: 100%; }
code { font-size: .9em; }
"""


# -- formatting ---------------------------------------------------------------

def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def _ratio_cell(row_or_ratio, verdict=None) -> str:
    ratio = row_or_ratio
    cls = "num bad" if verdict == "fail" or (isinstance(ratio, (int, float)) and ratio > 1) else "num"
    return f'<td class="{cls}">{_num(ratio)}</td>'


def _table(header, body_rows) -> str:
    """``body_rows`` are lists of ready-made ``<td>`` strings."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in body_rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value, cls="") -> str:
    return f'<td class="{cls}">{_esc(value)}</td>' if cls else f"<td>{_esc(value)}</td>"


def _tdn(value) -> str:
    return f'<td class="num">{_num(value)}</td>'


# -- plots --------------------------------------------------------------------

def _figure(ncols: int, *, height=3.4, width_each=4.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width_each * ncols, 5.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _plot_range(ratios) -> tuple[float, float]:
    """Log-axis limits: positive finite ratios widened, always around 1."""
    # Clipped to [1e-30, 1e30]: further out is off the chart (and matplotlib overflows near float64's ends).
    finite = [min(max(r, 1e-30), 1e30) for r in ratios if 0 < r < math.inf]
    lo = min(finite + [1.0]) / 10
    hi = max(finite + [1.0]) * 10
    return lo, hi


def _clip(r: float, lo: float, hi: float) -> float:
    return min(max(r, lo), hi)


def _scatter_vs_nk(panels: dict, targets) -> str:
    """One log-log panel per key of ``panels`` ({title: [(row, ratio)]}):
    error/bound against Nk, one marker per target, dashed line at 1."""
    lo, hi = _plot_range([x for pts in panels.values() for _, x in pts])
    fig, axes = _figure(len(panels))
    for ax, (title, pts_all) in zip(axes, panels.items()):
        for i, target in enumerate(targets):
            pts = [(r["Nk"], x) for r, x in pts_all if r["target"] == target]
            if not pts:
                continue
            shift = 2 ** (0.06 * (i - (len(targets) - 1) / 2))  # keep targets apart on shared Nk
            ax.scatter([n * shift for n, _ in pts], [_clip(x, lo, hi) for _, x in pts],
                       marker=_MARKERS[i % len(_MARKERS)], color=_COLORS[i % len(_COLORS)],
                       alpha=0.6, s=22, label=target)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.5, hi * 1.5)
        _label(ax, title, "Nk (keys per query)", "error / bound")
    return _png(fig)


def _ratio_vs_nk(rows, targets, dtypes) -> str:
    ran = [(r, effective_ratio(r)) for r in rows if r.get("Nk") is not None]
    ran = [(r, x) for r, x in ran if x is not None]
    if not ran:
        return '<p class="note">No rows with a ratio and a sequence length to plot.</p>'
    return _scatter_vs_nk({d: [(r, x) for r, x in ran if r["dtype"] == d] for d in dtypes}, targets)


def _grad_ratio(row: dict, name: str) -> float | None:
    """A row's error/bound of gradient ``name``, ranked as `effective_ratio`."""
    if row.get("grad_verdict") not in ("pass", "fail") or row.get(f"{name}_ratio") is None:
        return None
    return effective_ratio({"ratio": row.get(f"{name}_ratio"), "verdict": row["grad_verdict"]})


def _grad_ratio_vs_nk(rows, targets) -> str:
    """One panel per gradient (dQ, dK, dV): error/bound against Nk."""
    panels = {g: [(r, x) for r in rows if r.get("Nk") and (x := _grad_ratio(r, g)) is not None] for g in GRADS}
    if not any(panels.values()):
        return '<p class="note">No gradient was judged.</p>'
    return _scatter_vs_nk(panels, targets)


def _grad_table(summary) -> str:
    body = []
    for target, per_dtype in summary["groups"].items():
        for dtype, g in per_dtype.items():
            gr = g.get("grad")
            if not gr:
                continue
            body.append([
                _td(target), _td(dtype), _tdn(gr["pass"]),
                f'<td class="num{" bad" if gr["fail"] else ""}">{gr["fail"]}</td>', _tdn(gr["unsupported"]),
                _tdn(gr["not_judged"]),
                *(_ratio_cell(gr[f"{n}_ratio_{s}"]) for n in GRADS for s in ("median", "max")),
                _tdn(gr["judged_share_min"]),
            ])
    if not body:
        return '<p class="note">Gradients were not checked in this run (no --grad).</p>'
    return _table(["target", "dtype", "passed", "failed", "unsupported", "not judged",
                   *(f"{n} {s} error/bound" for n in GRADS for s in ("median", "max")),
                   "least share with a finite bound"], body)


def _label(ax, title, xlabel, ylabel) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _ratio_histogram(rows, targets, dtypes) -> str:
    import numpy as np

    ran = [(r, effective_ratio(r)) for r in rows]
    ran = [(r, x) for r, x in ran if x is not None]
    if not ran:
        return '<p class="note">No rows with a ratio to plot.</p>'
    lo, hi = _plot_range([x for _, x in ran])
    bins = np.geomspace(lo / 1.5, hi * 1.5, 41)
    fig, axes = _figure(len(dtypes))
    for ax, dtype in zip(axes, dtypes):
        for i, target in enumerate(targets):
            vals = [_clip(x, lo, hi) for r, x in ran if r["dtype"] == dtype and r["target"] == target]
            if vals:
                ax.hist(vals, bins=bins, histtype="step", lw=1.5, color=_COLORS[i % len(_COLORS)], label=target)
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        _label(ax, dtype, "error / bound", "rows")
    return _png(fig)


def _by_case(rows) -> dict:
    """{case_id: {target: effective ratio}} over rows that ran."""
    table: dict = {}
    for r in rows:
        x = effective_ratio(r)
        if x is not None and r.get("case_id") is not None:
            table.setdefault(r["case_id"], {})[r["target"]] = (x, r)
    return table


def _target_comparison(rows, targets) -> str:
    if len(targets) < 2:
        return f'<p class="note">Only one target ({_esc(targets[0] if targets else "none")}): nothing to compare.</p>'
    per_case = _by_case(rows)
    if len(targets) == 2:
        a, b = targets
        pairs = [(v[a], v[b]) for v in per_case.values() if a in v and b in v]
        if not pairs:
            return '<p class="note">The two targets share no case that both ran.</p>'
        lo, hi = _plot_range([x for (x, _), _ in pairs] + [y for _, (y, _) in pairs])
        dtypes = sorted({ra["dtype"] for (_, ra), _ in pairs})
        fig, (ax,) = _figure(1, height=4.2, width_each=5.2)
        for i, dtype in enumerate(dtypes):
            sel = [(x, y) for (x, ra), (y, _) in pairs if ra["dtype"] == dtype]
            ax.scatter([_clip(x, lo, hi) for x, _ in sel], [_clip(y, lo, hi) for _, y in sel],
                       color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)], s=22, alpha=0.6,
                       label=dtype)
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{a}: error / bound")
        ax.set_ylabel(f"{b}: error / bound")
        ax.legend(fontsize=8)
        return (f'<p class="note">{len(pairs)} cases run by both. Points above the diagonal: '
                f'{_esc(b)} is worse than {_esc(a)} on that case.</p>' + _png(fig))
    # More than two targets: the cases with the largest ratio of any target, side by side.
    shared = [(cid, v) for cid, v in per_case.items() if len(v) >= 2]
    if not shared:
        return '<p class="note">No case was run by two or more targets.</p>'
    shared.sort(key=lambda kv: -max(x for x, _ in kv[1].values()))
    body = []
    for cid, v in shared[:WORST_ROWS]:
        any_row = next(iter(v.values()))[1]
        cells = [_td(cid), _td(any_row["dtype"]), _td(case_shape(any_row))]
        for t in targets:
            cells.append(_ratio_cell(v[t][0], v[t][1]["verdict"]) if t in v else "<td>–</td>")
        body.append(cells)
    return (f'<p class="note">{len(shared)} cases run by two or more targets; the {min(WORST_ROWS, len(shared))} '
            'with the largest error/bound are shown (– = not run or unsupported).</p>'
            + _table(["case", "dtype", "shape", *targets], body))


# -- tables -------------------------------------------------------------------

def _heatmap(rows, row_key, col_key) -> str:
    """Failures / rows that ran, for each (row class, column class)."""
    ran = [r for r in rows if r["verdict"] != "unsupported"]
    if not ran:
        return '<p class="note">No rows ran.</p>'
    rvals = sorted({str(r.get(row_key)) for r in ran})
    cvals = sorted({str(r.get(col_key)) for r in ran})
    counts = {}
    for r in ran:
        key = (str(r.get(row_key)), str(r.get(col_key)))
        fails, total = counts.get(key, (0, 0))
        counts[key] = (fails + (r["verdict"] == "fail"), total + 1)
    worst = max((f for f, _ in counts.values()), default=0)
    body = []
    for rv in rvals:
        cells = [f"<th>{_esc(rv)}</th>"]
        for cv in cvals:
            fails, total = counts.get((rv, cv), (0, 0))
            if total == 0:
                cells.append('<td class="num">·</td>')
                continue
            alpha = 0.15 + 0.75 * fails / worst if fails else 0.0
            style = f' style="background: rgba(214, 39, 40, {alpha:.2f})"' if fails else ""
            cells.append(f'<td class="num"{style}>{fails} / {total}</td>')
        body.append(cells)
    head = "".join(f"<th>{_esc(c)}</th>" for c in cvals)
    rows_html = "".join("<tr>" + "".join(c) + "</tr>" for c in body)
    return (f"<table><thead><tr><th>{_esc(row_key)} \\ {_esc(col_key)}</th>{head}</tr></thead>"
            f"<tbody>{rows_html}</tbody></table>")


def _group_table(summary) -> str:
    body = []
    for target, per_dtype in summary["groups"].items():
        for dtype, g in per_dtype.items():
            body.append([
                _td(target), _td(dtype), _tdn(g["cases"]), _tdn(g["passed"]),
                f'<td class="num{" bad" if g["failures"] else ""}">{g["failures"]}</td>', _tdn(g["unsupported"]),
                _ratio_cell(g["ratio_median"]), _ratio_cell(g["ratio_max"]),
                _tdn(g["max_ulp"]), _tdn(g["max_bits"]), _tdn(g["rmse_median"]),
            ])
    return _table(["target", "dtype", "rows", "passed", "failed", "unsupported", "median error/bound",
                   "max error/bound", "max ULP", "max bits", "median RMSE"], body)


def _worst_table(rows) -> str:
    worst = worst_rows([r for r in rows if r["verdict"] != "unsupported"], WORST_ROWS)
    if not worst:
        return '<p class="note">No rows ran.</p>'
    body = [[
        _td(r["target"]), _td(r["dtype"]), _td(case_shape(r)), _td(case_classes(r)), _td(r["verdict"]),
        _ratio_cell(effective_ratio(r) if r.get("ratio") is not None else None, r["verdict"]),
        _tdn(r.get("m_max_ulp")), _td(r.get("reason") or "", "reason"), _td(r.get("case_id")),
    ] for r in worst]
    return _table(["target", "dtype", "shape", "classes", "verdict", "error/bound", "max ULP", "reason", "case"],
                  body)


def _failure_table(rows, out_dir: Path) -> str:
    fails = [r for r in rows if r["verdict"] == "fail"]
    if not fails:
        return '<p class="note">No failures.</p>'
    body = []
    for r in fails[:MAX_FAILURE_ROWS]:
        name = f"{r.get('case_id')}-{r['target']}.npz"
        if (out_dir / REPRO_DIR / name).is_file():
            href = urllib.parse.quote(f"{REPRO_DIR}/{name}")
            repro = f'<td><a href="{_esc(href)}">{_esc(name)}</a></td>'
        else:
            repro = "<td>–</td>"
        body.append([_td(r.get("case_id")), _td(r["target"]), _td(r["dtype"]), _td(case_shape(r)),
                     _td(case_classes(r)), _ratio_cell(r.get("ratio"), "fail"), _td(r.get("reason") or "", "reason"),
                     repro])
    more = (f'<p class="note">{len(fails) - MAX_FAILURE_ROWS} more failures are in the JSONL rows.</p>'
            if len(fails) > MAX_FAILURE_ROWS else "")
    return _table(["case", "target", "dtype", "shape", "classes", "error/bound", "reason", "repro"], body) + more


def _findings_table(summary, *, known: bool) -> str:
    groups = [g for g in summary.get("findings") or [] if bool(g.get("known")) == known]
    if not groups:
        return f'<p class="note">{"No known issue showed." if known else "No new failure."}</p>'
    body = []
    for g in groups:
        small = g.get("minimized") or {}
        if small.get("reproduced"):
            shape = case_shape(small)
            minimal = f"{small.get('dtype')} {shape}, {small.get('layout')}" + (
                ", causal" if small.get("is_causal") else "") + (f", mask {small['mask']}" if small.get("mask") else "")
            minimal += f" ({small.get('attempts')} runs, {small.get('seconds')} s)"
        elif small:
            minimal = small.get("note", "not reproduced")
        else:
            minimal = "–"
        repro = g.get("repro")
        link = (f'<td><a href="{_esc(urllib.parse.quote(repro + "/repro.py"))}">{_esc(repro)}/repro.py</a></td>'
                if repro else "<td>–</td>")
        cells = [_td(g["target"]), _td(g.get("class") or ""), _td(g.get("symptom") or "", "reason"),
                 _td(", ".join(g.get("needs") or []) or "–"), _tdn(g["count"]),
                 _td(f"{g.get('smallest_shape')} ({g.get('smallest_case')})"), _td(minimal), link]
        if known:
            cells.append(_td(g.get("known") or "", "reason"))
        cells.append(_td(g.get("smallest_reason") or "", "reason"))
        body.append(cells)
    header = ["target", "class", "symptom", "needs", "runs", "smallest case found", "minimal case", "repro",
              *(["known issue"] if known else []), "reason (smallest case)"]
    return _table(header, body)


def _banner(summary, inconclusive=None) -> str:
    t = summary["totals"]
    if t["verdict"] == "empty":
        return '<div class="banner empty">NO DATA: the run produced no rows</div>'
    ran = t["rows"] - t["unsupported"]
    extra = f"; {t['unsupported']} unsupported" if t["unsupported"] else ""
    known = f"; {t['known_failures']} runs fail on known issues" if t.get("known_failures") else ""
    if t["verdict"] in ("pass", "known-only") and inconclusive:
        why = "; ".join(f"{name}: {text}" for name, text in inconclusive.items())
        text = (f"INCONCLUSIVE: no new failure in {ran} runs{known}, but too few cases ran on some target "
                f"({why})")
        return f'<div class="banner empty">{_esc(text)}</div>'
    if t.get("grad"):
        g = t["grad"]
        extra += (f"; gradients judged in {g['pass'] + g['fail']} runs" +
                  (f", unsupported in {g['unsupported']}" if g["unsupported"] else "") +
                  (f", not judged (NaN/Inf inputs) in {g['not_judged']}" if g["not_judged"] else ""))
    if t["verdict"] == "pass":
        text = f"PASS: all {ran} runs within their error bounds ({t['cases']} cases{extra})"
    elif t["verdict"] == "known-only":
        text = (f"NO NEW FAILURE: {t['passed']} of {ran} runs within their error bounds; the other "
                f"{t['known_failures']} fail on known issues, listed below ({t['cases']} cases{extra})")
        return f'<div class="banner empty">{_esc(text)}</div>'

    else:
        bad = sorted({f"{target} {dtype}" for target, d in summary["groups"].items()
                      for dtype, g in d.items() if g["failures"]})
        text = (f"FAIL: {t['failures']} of {ran} runs exceed their error bounds or misbehave "
                f"({t['cases']} cases{extra}{known}); failing: {', '.join(bad)}")
    return f'<div class="banner {t["verdict"]}">{_esc(text)}</div>'


def _coverage_table(summary) -> str:
    cov = summary.get("coverage") or {}
    if not cov:
        return '<p class="note">No run was judged.</p>'
    body = []
    grad = "grad" in summary["totals"]
    for target, entry in cov.items():
        n = max(entry["runs"], 1)
        cells = [_td(target), _tdn(entry["runs"]),
                 _td(f"{entry['nk_over_128']} ({100 * entry['nk_over_128'] / n:.0f}%)"),
                 _td(f"{entry['nq_over_64']} ({100 * entry['nq_over_64'] / n:.0f}%)")]
        keys = COVERAGE_KEYS + (("do",) if grad else ())
        for key in keys:
            cells.append(_td(", ".join(f"{v} {c}" for v, c in entry.get(key, {}).items()) or "–"))
        body.append(cells)
    return _table(["target", "runs", "Nk > 128", "Nq > 64", *COVERAGE_KEYS,
                   *(("gradients judged, by dO class",) if grad else ())], body)


def _declined_table(declined) -> str:
    body = [[_td(target), _td(d["text"]), _td(d["reason"] or "", "reason"), _tdn(info["probes"]),
             _tdn(info["skipped_cases"])]
            for target, info in (declined or {}).items() for d in info["declined"]]
    if not body:
        return '<p class="note">No target declined anything.</p>'
    return _table(["target", "declined", "the target's reason", "probe calls", "cases skipped"], body)


def render_html(rows, *, title: str = "Attention numerics report", meta: dict | None = None,
                out_dir=".") -> str:
    """The report page as a string (see `write_html`); ``out_dir`` is where
    the page will live, used to find ``repro/`` files to link."""
    rows = validate_rows(rows)
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    summary = summarize(rows)
    targets, dtypes = summary["totals"]["targets"], summary["totals"]["dtypes"]
    meta = dict(meta or {})
    declined, inconclusive = meta.pop("declined", None), meta.pop("inconclusive", None)
    attach_findings(summary, meta.pop("findings", None))
    info = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "targets": ", ".join(targets), "dtypes": ", ".join(dtypes), **meta}
    info_table = "<table><tbody>" + "".join(
        f"<tr><th>{_esc(k)}</th>{_td(v)}</tr>" for k, v in info.items()) + "</tbody></table>"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>", _banner(summary, inconclusive),
        '<p class="note">A run passes when every output element is within the bound its precision model '
        "certifies (error / bound ≤ 1) and no NaN/Inf appears that the exact answer lacks.</p>",
        info_table,
        "<h2>Findings</h2>",
        '<p class="note">New failures grouped by signature (target, class, symptom, trigger and what the '
        "minimal case needs), each with the smallest case found, the minimized case and a standalone script "
        "(torch only) to paste into an upstream issue.</p>",
        _findings_table(summary, known=False),
        "<h2>Known issues</h2>",
        '<p class="note">Failures that match the known-issues file: they do not fail the run.</p>',
        _findings_table(summary, known=True),
        "<h2>What the runs covered</h2>",
        '<p class="note">Runs per stratum and target (pass or fail; declined cases left out). A PASS '
        "covers these strata and nothing else.</p>",
        _coverage_table(summary),
        "<h2>What targets declined</h2>",
        '<p class="note">Learnt from each target\'s NotImplementedError: the feature values it declined '
        "(found by simplifying the declined case one feature at a time); later cases avoid them for that "
        "target.</p>",
        _declined_table(declined),
    ]
    if rows:
        parts += [
            "<h2>Per target and dtype</h2>", _group_table(summary),
            "<h2>Error / bound against sequence length</h2>",
            '<p class="note">One point per run; above the dashed line = failure. Zero errors are drawn at the '
            "bottom edge, inf (and failures without a ratio) at the top edge.</p>",
            _ratio_vs_nk(rows, targets, dtypes),
            "<h2>Distribution of error / bound</h2>", _ratio_histogram(rows, targets, dtypes),
            "<h2>Gradients</h2>",
            '<p class="note">With --grad: each run also drew an output gradient dO (its class is the row\'s '
            "<code>do</code>) and judged dQ, dK and dV against the oracle's certified gradients under the "
            "backward bound of the target's model. A run fails when its forward or any gradient fails. "
            "Elements whose bound is infinite (the model does not apply: overflow) are not judged; the last "
            "column is the smallest share of judged elements in any run.</p>",
            _grad_table(summary), _grad_ratio_vs_nk(rows, targets),
            "<h2>Targets on identical cases</h2>", _target_comparison(rows, targets),
            "<h2>Where failures cluster</h2>",
            '<p class="note">Failures / runs per class (unsupported runs left out).</p>',
            _heatmap(rows, "magnitude", "mask_kind"), _heatmap(rows, "layout", "dtype"),
            f"<h2>Worst {WORST_ROWS} runs by error / bound</h2>", _worst_table(rows),
            "<h2>Failures, one row per run</h2>", _failure_table(rows, Path(out_dir)),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(rows, path, *, title: str = "Attention numerics report", meta: dict | None = None) -> Path:
    """Write the report page for ``rows`` to ``path`` (an ``.html`` file,
    or a directory that gets ``index.html``) and return the file's path.

    ``meta`` holds what the header shows besides the totals: seed, device,
    versions, command line ... (any keys; values are shown as text).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix.lower() not in (".html", ".htm")):
        path = path / HTML_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(rows, title=title, meta=meta, out_dir=path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
