"""Known issues: failures someone has already understood and reported.

A known-issues file is TOML, written by hand, one ``[[issue]]`` table per
known problem::

    [[issue]]
    target = "sdpa-flash"              # target name; shell wildcards allowed ("sdpa-*")
    class = "nan-dropped"              # failure class (flashcheck.verify.signatures.FAILURE_CLASSES)
    device = "cpu"                     # optional: "cpu" or "cuda"
    symptom = "all zero"               # optional: text the failure's symptom contains
    features = ["NaN in query row"]    # optional: features the failure must all have
    note = "fused CPU backend returns 0, not NaN, for a query row holding a NaN"
    link = "https://github.com/pytorch/pytorch/issues/..."   # optional

A failing report row matches an entry when every field the entry gives
matches (`matches`). `mark_known` writes the entry's note into the row's
``known`` field; the campaign's exit status, the report's banner and
``diff`` count only failures without one.

>>> issue = KnownIssue(target="sdpa-*", failure_class="raised", note="n", features=("GQA",))
>>> issue.matches({"target": "sdpa-cudnn", "verdict": "fail", "failure_class": "raised", "features": ["GQA", "causal"]})
True
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import tomllib

from flashcheck.verify.signatures import FAILURE_CLASSES

__all__ = ["KnownIssue", "KnownIssueError", "load_known", "mark_known", "match"]

_FIELDS = {"target", "class", "device", "symptom", "features", "note", "link"}
_REQUIRED = ("target", "class", "note")


class KnownIssueError(ValueError):
    """A known-issues file that cannot be read (a usage error)."""


@dataclass(frozen=True)
class KnownIssue:
    target: str
    failure_class: str
    note: str
    device: str | None = None
    symptom: str | None = None
    features: tuple = ()
    link: str | None = None

    def matches(self, row: dict, device: str | None = None) -> bool:
        """Whether a failing report row is this issue (``device``: the
        campaign's, when the row does not say)."""
        if row.get("verdict") != "fail" or row.get("failure_class") != self.failure_class:
            return False
        if not fnmatch.fnmatchcase(str(row.get("target")), self.target):
            return False
        where = row.get("device", device)
        if self.device is not None and where != self.device:
            return False
        if self.symptom is not None and self.symptom not in str(row.get("symptom") or ""):
            return False
        have = set(row.get("features") or ())
        return all(f in have for f in self.features)

    def text(self) -> str:
        return f"{self.note} ({self.link})" if self.link else self.note


def load_known(path) -> list[KnownIssue]:
    """The entries of a known-issues file; `KnownIssueError` names what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnownIssueError(f"known-issues file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise KnownIssueError(f"known-issues file {path} is not valid TOML: {exc}") from None
    extra = set(data) - {"issue"}
    if extra:
        raise KnownIssueError(f"{path}: unexpected top-level keys {sorted(extra)}; write one [[issue]] table per issue")
    entries = data.get("issue", [])
    if not isinstance(entries, list):
        raise KnownIssueError(f"{path}: 'issue' must be an array of tables ([[issue]]), got {type(entries).__name__}")
    issues = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}, issue {n}"
        unknown = set(entry) - _FIELDS
        if unknown:
            raise KnownIssueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        missing = [k for k in _REQUIRED if not entry.get(k)]
        if missing:
            raise KnownIssueError(f"{where}: missing {', '.join(missing)}")
        if entry["class"] not in FAILURE_CLASSES:
            raise KnownIssueError(f"{where}: class {entry['class']!r} is not one of {FAILURE_CLASSES}")
        if entry.get("device") not in (None, "cpu", "cuda"):
            raise KnownIssueError(f"{where}: device must be 'cpu' or 'cuda', got {entry['device']!r}")
        features = entry.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise KnownIssueError(f"{where}: features must be a list of strings, got {features!r}")
        issues.append(KnownIssue(target=str(entry["target"]), failure_class=entry["class"], note=str(entry["note"]),
                                 device=entry.get("device"), symptom=entry.get("symptom"),
                                 features=tuple(features), link=entry.get("link")))
    return issues


def match(row: dict, known, device: str | None = None) -> KnownIssue | None:
    """The first entry of ``known`` that ``row`` matches, or None."""
    for issue in known or ():
        if issue.matches(row, device):
            return issue
    return None


def mark_known(rows, known, device: str | None = None) -> int:
    """Set ``row["known"]`` (the note) on every failing row that matches an
    entry (and clear it elsewhere); return how many rows are known."""
    count = 0
    for row in rows:
        issue = match(row, known, device)
        if issue is None:
            row.pop("known", None)
        else:
            row["known"] = issue.text()
            count += 1
    return count
