"""Where a campaign's time goes, phase by phase.

A `Profile` adds up wall-clock seconds per named phase of the case flow
(generation, oracle, target, bound, judging, recording, ...). The campaign
fills one and writes it to ``meta.json`` (``profile``); ``fuzz --profile``
prints its table. Time outside every phase of the campaign's case loop is
what Hypothesis and Python spend between cases ("other").

>>> p = Profile()
>>> with p.phase("oracle"):
...     pass
>>> p.counts["oracle"], p.seconds["oracle"] >= 0
(1, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict

__all__ = ["PHASES", "Profile", "active", "current", "timed"]

#: The phases of the case flow, in the order a case meets them.
PHASES = ("generate", "oracle", "baseline", "target", "bound", "judge", "record", "other", "minimize", "report")


class Profile:
    """Seconds and call counts per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        self.seconds[name] += seconds
        self.counts[name] += count

    def as_dict(self, wall: float | None = None, cases: int | None = None) -> dict:
        """``{phase: {"seconds", "calls", "share"}}`` plus wall time and cases per second."""
        out = {name: {"seconds": round(self.seconds[name], 3), "calls": self.counts[name]}
               for name in PHASES if self.counts.get(name)}
        total = wall if wall else sum(self.seconds.values())
        for entry in out.values():
            entry["share"] = round(entry["seconds"] / total, 4) if total else 0.0
        result = {"phases": out}
        if wall is not None:
            result["wall_s"] = round(wall, 3)
        if wall and cases is not None:
            result["cases"] = cases
            result["cases_per_s"] = round(cases / wall, 3)
        return result

    def table(self, wall: float, cases: int) -> str:
        """A Markdown table of the phases, with ms per case and share of the wall time."""
        lines = ["| phase | seconds | calls | ms per case | share |", "|---|---:|---:|---:|---:|"]
        for name in PHASES:
            if not self.counts.get(name):
                continue
            s = self.seconds[name]
            per = 1e3 * s / cases if cases else float("nan")
            lines.append(f"| {name} | {s:.2f} | {self.counts[name]} | {per:.1f} | {s / wall:.1%} |")
        rate = cases / wall if wall else float("nan")
        lines.append(f"| **wall** | {wall:.2f} | {cases} cases | {1e3 / rate if rate else float('nan'):.1f} | "
                     f"{rate:.2f} cases/s |")
        return "\n".join(lines)


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("flashcheck_profile", default=None)


def current() -> Profile | None:
    """The profile of the campaign running in this context, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def active(profile: Profile):
    """Make ``profile`` the one `timed` adds to (deep callees such as the
    bound cache time themselves without a profile argument)."""
    token = _CURRENT.set(profile)
    try:
        yield profile
    finally:
        _CURRENT.reset(token)


def timed(name: str, profile: Profile | None = None):
    """``profile.phase(name)`` (default: the active profile), or a no-op without one."""
    profile = profile if profile is not None else current()
    return contextlib.nullcontext() if profile is None else profile.phase(name)
