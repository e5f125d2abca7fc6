"""From failing rows to findings: one per bug, each with a minimal repro.

During a campaign, `FindingTracker.add` files every failing row under its
signature (`flashcheck.verify.signatures`). At the end, `FindingTracker.finish`
takes each signature's smallest case, re-runs it (a failure that does not
come back is said to be flaky), shrinks it with
`flashcheck.verify.minimize.minimize` while the same signature reproduces, and
writes the minimal case and a standalone script under
``repro/<signature slug>/`` (`flashcheck.verify.repro_script.write_repro`).

The structural features the minimal case could not lose ("needs") become
part of the signature. Rows of the signature that lack one of them are a
different manifestation: they form a new group whose own smallest case is
minimized next, while the budget lasts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from flashcheck.properties.case import Case
from flashcheck.reports.summary import row_size
from flashcheck.verify.check import run_case
from flashcheck.verify.minimize import minimize
from flashcheck.verify.signatures import slug

__all__ = ["Finding", "FindingTracker"]


@dataclass
class Finding:
    """One bug: a signature, the rows that show it and its minimal case."""

    signature: str  # final: the base signature plus what the minimal case needs
    base: str  # the signature the rows were filed under
    target: str
    failure_class: str
    symptom: str
    trigger: str | None
    rows: list = field(default_factory=list)  # indices into the campaign's rows
    needs: list = field(default_factory=list)
    known: str | None = None
    minimized: dict | None = None  # case_id, shape, steps, attempts, seconds, reason, reproduced
    repro: str | None = None  # the repro directory, relative to the campaign's output

    def as_dict(self) -> dict:
        """What the campaign learnt of the finding beyond its rows (the counts,
        first and smallest case come from the rows:
        `flashcheck.reports.summary.failure_groups`)."""
        return {"signature": self.signature, "minimized": self.minimized, "repro": self.repro}


class FindingTracker:
    """Files failing rows by signature during a campaign; minimizes at the end."""

    def __init__(self, out: Path, device: str, *, budget_s: float = 60.0, max_findings: int = 20,
                 meta: dict | None = None):
        self.out, self.device = Path(out), device
        self.budget_s, self.max_findings = budget_s, max_findings
        self.meta = meta or {}
        self.groups: dict = {}  # base signature -> row indices
        self.npz: dict = {}  # row index -> saved case file

    def add(self, index: int, row: dict, saved: Path | None) -> None:
        """File failing row number ``index`` (its case saved at ``saved``)."""
        if row.get("verdict") != "fail" or not row.get("signature"):
            return
        self.groups.setdefault(row["signature"], []).append(index)
        if saved is not None:
            self.npz[index] = Path(saved)

    def finish(self, rows: list, runners: dict) -> list[Finding]:
        """Minimize each group and write its repro; update the rows'
        ``signature`` and ``needs``; return the findings, new ones first.
        ``runners``: target name -> the runner the campaign used."""
        queue = sorted(self.groups.items(), key=lambda kv: (rows[kv[1][0]].get("known") is not None, kv[1][0]))
        queue = [(base, list(members)) for base, members in queue]
        findings: list[Finding] = []
        while queue:
            base, members = queue.pop(0)
            first = rows[members[0]]
            finding = Finding(signature=base, base=base, target=first["target"],
                              failure_class=first.get("failure_class") or "wrong",
                              symptom=first.get("symptom") or "", trigger=first.get("trigger"),
                              rows=members, known=first.get("known"))
            findings.append(finding)
            runner = runners.get(finding.target)
            if runner is None or self.budget_s <= 0 or len(findings) > self.max_findings:
                continue
            smallest = min(members, key=lambda i: (i not in self.npz, row_size(rows[i])))
            if smallest not in self.npz:
                continue
            self._minimize(finding, Case.load(self.npz[smallest]), rows[smallest], runner)
            if finding.needs:
                keep = [i for i in members if set(finding.needs) <= set(rows[i].get("features") or ())]
                rest = [i for i in members if i not in keep]
                if keep and rest:
                    finding.rows = keep
                    queue.insert(0, (base, rest))  # another manifestation: minimize it next
            finding.signature = base + (f" | needs {', '.join(finding.needs)}" if finding.needs else "")
            for i in finding.rows:
                rows[i]["signature"], rows[i]["needs"] = finding.signature, finding.needs
        return findings

    def _minimize(self, finding: Finding, case: Case, row: dict, runner) -> None:
        start = time.monotonic()

        def reproduces(candidate: Case):
            result = run_case(candidate, runner, device=self.device, baseline=False)
            if result.verdict == "fail" and result.failure.get("signature") == finding.base:
                return result
            return None

        again = reproduces(case)
        if again is None:
            finding.minimized = {"reproduced": False, "seconds": round(time.monotonic() - start, 2),
                                 "note": "the smallest case did not fail the same way when run again"}
            self._write(finding, case, row, None)
            return
        left = max(self.budget_s - (time.monotonic() - start), 1e-3)
        small = minimize(case, reproduces, at=_query_index(again), budget_s=left, locate=_query_index)
        result = small.result or again
        finding.needs = list(small.needs)
        shape, mask = small.case.shape, small.case.attn_mask
        finding.minimized = {
            "reproduced": True, "case_id": small.case.case_id, "dtype": small.case.dtype, **shape,
            "is_causal": small.case.is_causal, "layout": small.case.layout,
            "mask": None if mask is None else f"{mask.dtype} {mask.shape}",
            "steps": small.steps, "attempts": small.attempts + 1, "seconds": round(time.monotonic() - start, 2),
            "exhausted": small.exhausted, "reason": result.reason, "from_case": case.case_id,
        }
        self._write(finding, small.case, row, result)

    def _write(self, finding: Finding, case: Case, row: dict, result) -> None:
        from flashcheck.verify.repro_script import FAILURE_CLASSES as SCRIPTED
        from flashcheck.verify.repro_script import write_repro

        failure = dict(result.failure) if result is not None else {
            "class": row.get("failure_class"), "symptom": row.get("symptom"), "trigger": row.get("trigger"),
            "features": row.get("features") or [], "at": row.get("failure_at"), "allowed": row.get("allowed"),
            "allowed_max": row.get("allowed_max"), "gradient": row.get("gradient")}
        reason = result.reason if result is not None else row.get("reason")
        model = result.model if result is not None else row.get("model")
        failure.update(signature=finding.base, reason=reason, model=model)
        name = slug(finding.base)
        directory = self.out / "repro" / name
        n = 2
        while directory.exists():  # a second manifestation of one base signature
            directory = self.out / "repro" / f"{name}-{n}"
            n += 1
        # The saved case replays through `flashcheck replay DIR` with its target and model.
        case = case.replace(tags={**case.tags, "repro": {"target": finding.target, "model": model,
                                                         "device": self.device, "verdict": "fail", "reason": reason}})
        if finding.target == "numpy-tiled" or failure["class"] not in SCRIPTED:
            # No standalone script: the NumPy model is flashcheck's own, and the
            # LSE, shape and dtype checks (of outputs and gradients) need the
            # harness's conventions. grad-wrong, grad-non-finite and grad-raised
            # get a script that runs the backward too.
            directory.mkdir(parents=True)
            case.save(directory / "case.npz")
            (directory / "README.txt").write_text(
                f"{finding.base}\n\n{reason}\n\nNo standalone script for this target or failure class; "
                f"replay it with: python -m flashcheck replay {directory.name}\n", encoding="utf-8")
        else:
            write_repro(directory, case, finding.target, failure, device=self.device, meta=self.meta)
        finding.repro = str(directory.relative_to(self.out))


def _query_index(result):
    """The failing (b, h, i, ...) index of a result, when it names a query
    row (a dK or dV failure names a key row: minimization then goes by halves)."""
    if result.failure.get("gradient") in ("dk", "dv"):
        return None
    return result.failure.get("at")
