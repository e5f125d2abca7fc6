"""What a target declines, learnt from its `NotImplementedError`s.

Most real kernels support a slice of SDPA (some head dims, no masks, no
GQA, Nq == Nk, fp16/bf16 only) and raise `NotImplementedError` elsewhere.
When a target declines a case, `Capabilities.learn` finds which feature
values of the case's plan it declined, by delta debugging over the plan
(Zeller and Hildebrandt, IEEE TSE 2002): each non-plain feature in turn is
set to its plain value (`flashcheck.properties.plans.PLAIN`); if the target
still declines, the feature was not needed for the decline and stays plain,
otherwise its value is part of the cause. What remains is a rule, a set of
feature values the target declines together (usually one). The campaign
then stops drawing plans that match a rule for that target, so a narrow
kernel gets a full campaign inside the slice it supports.

If even the plainest case is declined, the plain value of some feature is
itself unsupported (an fp32-only kernel, a kernel with head dim 128 only):
each other value of each feature is tried on the plain case, and the first
one the target takes replaces the plain value for this target. If none does,
the target declines everything the campaign can build.

On a target's first decline, every other value of every feature is also
probed once on the plain case, so the declines of single feature values are
all learnt at once; later declines find the combinations.

Probes run the target on cases built from the declined case's raw choices
with one feature changed; they are not judged and not reported as cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flashcheck.properties.plans import FEATURES, PLAIN, Plan

__all__ = ["Capabilities", "describe_rule"]


def describe_rule(rule: dict) -> str:
    """``"mask=causal"``, ``"heads=GQA and dtype=fp32"``, or "everything" for {}."""
    return " and ".join(f"{f}={v}" for f, v in rule.items()) if rule else "everything"


@dataclass
class Capabilities:
    """The declines of one target: rules, the reason the target gave for
    each, and how many probe calls it took to learn them."""

    target: str
    values: dict  # feature -> values the campaign may draw
    rules: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    plain: dict = field(default_factory=dict)
    probes: int = 0
    swept: bool = False  # every single feature value probed once already
    skipped: int = 0  # cases not run on this target because they matched a rule

    def __post_init__(self):
        if not self.plain:
            self.plain = {f: PLAIN[f] if PLAIN[f] in self.values[f] else self.values[f][0] for f in FEATURES}

    @property
    def everything(self) -> bool:
        """True once the target declined even the plainest case it was offered."""
        return {} in self.rules

    def declines(self, plan: Plan) -> bool:
        """True if ``plan`` matches a learnt rule."""
        return any(plan.matches(rule) for rule in self.rules)

    def learn(self, plan: Plan, reason: str, declined: Callable[[Plan], bool]) -> dict:
        """Find and record the rule behind a decline of ``plan``.

        ``declined(p)`` runs the target on the case of plan ``p`` (same raw
        choices) and says whether it raised `NotImplementedError`.
        """
        def probe(p):
            self.probes += 1
            return declined(p)

        current, needed = plan, {}
        for f in FEATURES:
            if getattr(current, f) == self.plain[f]:
                continue
            trial = current.with_(**{f: self.plain[f]})
            if probe(trial):
                current = trial
            else:
                needed[f] = getattr(plan, f)
        if not needed:
            needed = self._unsupported_plain(current, probe)
        self.add(needed, reason)
        # A target that declines one thing usually declines more: on its first
        # decline, every other value of every feature is probed once on the
        # plain case, so the single-feature declines are learnt now instead of
        # costing a case each later (about 40 probes, most of them declines).
        if needed and not self.swept:
            self.swept = True
            plain = current.with_(**{f: self.plain[f] for f in needed})
            for f in FEATURES:
                for v in self.values[f]:
                    rule = {f: v}
                    if v != self.plain[f] and rule not in self.rules and probe(plain.with_(**rule)):
                        self.add(rule, reason)
        return needed

    def add(self, rule: dict, reason: str) -> None:
        """Record ``rule`` (once) with the reason the target gave."""
        if rule not in self.rules:
            self.rules.append(rule)
            self.reasons.append(reason)

    def _unsupported_plain(self, plain_plan: Plan, probe) -> dict:
        for f in FEATURES:
            for v in self.values[f]:
                if v == self.plain[f]:
                    continue
                if not probe(plain_plan.with_(**{f: v})):
                    rule = {f: self.plain[f]}
                    self.plain[f] = v
                    return rule
        return {}

    def summary(self) -> dict:
        """Plain-JSON account for the report."""
        return {
            "declined": [{"rule": rule, "text": describe_rule(rule), "reason": reason}
                         for rule, reason in zip(self.rules, self.reasons)],
            "probes": self.probes,
            "skipped_cases": self.skipped,
        }
