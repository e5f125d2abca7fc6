"""Report layer: JSONL rows, summaries, the HTML page and run diffs."""

from flashcheck.reports.diff import DiffResult, diff_runs, main_diff
from flashcheck.reports.html import write_html
from flashcheck.reports.records import CaseWriter, read_cases
from flashcheck.reports.summary import read_summary, summarize, write_summary

__all__ = [
    "CaseWriter",
    "DiffResult",
    "diff_runs",
    "main_diff",
    "read_cases",
    "read_summary",
    "summarize",
    "write_html",
    "write_summary",
]
