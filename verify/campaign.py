"""The fuzz campaign: many generated cases, several targets, one report.

Each case starts as a plan (`flashcheck.properties.plans`): one value per
feature (dtype, size stratum, Nq == Nk or not, tile-aligned lengths or not,
MHA/MQA/GQA, head-dim class, Dv, mask kind, layout, magnitude class), dealt
in shuffled rounds so that every value keeps its share whatever else is
drawn. Hypothesis then draws the details inside the plan
(`flashcheck.properties.plans.case_from_plan`) and shrinks them.

Search stays diverse: a bounded share of the cases (``exploit``, 20% by
default) reuses the plan of one of the worst cases so far (error/bound
closest to 1 or above) with fresh details, and `hypothesis.target` still
sees every ratio; the other cases follow the dealer.

Targets are learnt as they go (`flashcheck.verify.capabilities`): when one
declines a case (`NotImplementedError`), the feature values it declined are
found and never drawn for it again. Cases take turns being dealt inside
each target's supported slice and run on every target that supports them,
so a narrow kernel gets a full campaign. A target that ran fewer cases than
the floor (5, or 10% of the requested cases if more) leaves the campaign
inconclusive: exit status 3, never 0.

Each (case, target) row is appended to ``cases.jsonl`` as soon as it is
judged; failing cases are saved under ``repro/`` for `flashcheck replay`.
With ``max_examples`` and no time budget, the same seed and options give the
same cases and verdicts.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis import target as hypothesis_target
from hypothesis.errors import Flaky

from flashcheck.properties.grads import DO_KINDS, DoDealer, with_output_gradient
from flashcheck.properties.plans import DEFAULT_MAX_SCORES, PlanDealer, case_from_plan, feature_values
from flashcheck.properties.strategies import plan_choices
from flashcheck.verify.capabilities import Capabilities, describe_rule
from flashcheck.verify.check import BASELINE_MAX_SCORES, CaseResult, baseline_error, run_case
from flashcheck.verify.findings import FindingTracker
from flashcheck.verify.isolation import IsolatedTarget
from flashcheck.verify.known import match
from flashcheck.verify.profile import Profile, active, timed
from flashcheck.verify.reference import (
    FULL_MAX_SCORES,
    case_scores,
    oracle_device,
    reference,
    release_device_memory,
)
from flashcheck.verify.targets import resolve_target

__all__ = ["CampaignConfig", "ConfigError", "CampaignResult", "run_campaign", "save_repro", "support_floor"]

#: Exit status of a campaign in which some target ran too few cases to say anything.
EXIT_INCONCLUSIVE = 3


class ConfigError(ValueError):
    """An invalid campaign option (a usage error on the command line)."""


@dataclass
class CampaignConfig:
    targets: list
    dtypes: tuple = ("fp16", "bf16", "fp32")
    budget: float | None = None  # seconds
    max_examples: int = 100
    seed: int = 0
    device: str = "cpu"
    model: str | None = None
    out: Path = Path("reports/latest")
    max_seq: int | None = None
    max_scores: int | None = None
    timeout: float = 300.0
    isolate: bool = True
    progress: bool = True
    shard: tuple = (0, 1)  # (index, count): run only cases whose number % count == index
    crosscheck: int = 0  # oracle rows re-checked per case against mpmath at twice the precision
    masks: tuple | None = None  # mask kinds (None: all)
    magnitudes: tuple | None = None  # magnitude classes (None: all, NaN/Inf included)
    sizes: tuple | None = None  # size strata (None: all)
    heads: tuple | None = None  # "MHA", "MQA", "GQA" (None: all)
    layouts: tuple | None = None  # memory layouts (None: all)
    head_dims: tuple | None = None  # head-dim classes or exact head dims (None: every class)
    equal_lengths: bool = False  # only Nq == Nk
    same_dv: bool = False  # only Dv == D
    exploit: float = 0.2  # share of cases that reuse the plan of a worst case so far
    known: Path | None = None  # known-issues file (flashcheck.verify.known)
    minimize: float = 60.0  # seconds to shrink each finding's smallest case (0: no minimization)
    max_findings: int = 20  # findings minimized at most (new ones first)
    grad: bool = False  # also judge dQ, dK, dV for a drawn output gradient
    do_kinds: tuple | None = None  # output-gradient classes (None: all of DO_KINDS)

    def __post_init__(self):
        if not self.targets:
            raise ConfigError("at least one --target is needed")
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"--budget must be positive, got {self.budget}")
        if self.max_examples < 1:
            raise ConfigError(f"--max-examples must be at least 1, got {self.max_examples}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise ConfigError(f"shard index {index} must be in [0, {count})")
        if not 0 <= self.exploit <= 0.5:
            raise ConfigError(f"--exploit must be in [0, 0.5] (a share of the cases), got {self.exploit}")
        if self.max_seq is not None and self.max_seq < 1:
            raise ConfigError(f"--max-seq must be at least 1, got {self.max_seq}")
        self.out = Path(self.out)
        if self.minimize < 0:
            raise ConfigError(f"--minimize must be >= 0 seconds, got {self.minimize}")
        self.known_issues = []
        if self.known is not None:
            from flashcheck.verify.known import KnownIssueError, load_known

            try:
                self.known_issues = load_known(self.known)
            except KnownIssueError as exc:
                raise ConfigError(str(exc)) from None
        if self.do_kinds is not None and not self.grad:
            raise ConfigError("--do-kinds needs --grad")
        try:
            self.do_dealer = DoDealer(self.do_kinds or DO_KINDS, seed=self.seed) if self.grad else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.max_scores is None:
            self.max_scores = DEFAULT_MAX_SCORES[self.device]
            if self.grad:  # gradients are certified untiled (flashcheck.verify.reference)
                self.max_scores = min(self.max_scores, FULL_MAX_SCORES)
        try:
            self.values = feature_values(
                device=self.device, dtypes=self.dtypes, sizes=self.sizes,
                lengths=("equal",) if self.equal_lengths else None,
                heads=self.heads, head_dims=self.head_dims, dvs=("same",) if self.same_dv else None,
                masks=self.masks, layouts=self.layouts, magnitudes=self.magnitudes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def support_floor(requested: int) -> int:
    """Fewest cases a target must run for a campaign of ``requested`` cases
    to say anything about it: 5, or 10% of the requested cases if more,
    and never more than were requested.

    >>> support_floor(150), support_floor(40), support_floor(2)
    (15, 5, 2)
    """
    return min(requested, max(5, math.ceil(0.1 * requested)))


@dataclass
class CampaignResult:
    rows: list = field(default_factory=list)
    cases: int = 0
    failures: int = 0  # failing rows that match no known issue
    known_failures: int = 0  # failing rows that match a known issue
    unsupported: int = 0
    seconds: float = 0.0
    out: Path | None = None
    capabilities: dict = field(default_factory=dict)  # target -> Capabilities
    inconclusive: dict = field(default_factory=dict)  # target -> why it says nothing
    findings: list = field(default_factory=list)  # flashcheck.verify.findings.Finding, new ones first
    profile: Profile = field(default_factory=Profile)  # where the time went, by phase
    loop_seconds: float = 0.0  # the case loop's wall time (without minimizing and the report)

    @property
    def exit_code(self) -> int:
        """1: a new failure (one no known issue matches); 3: no new failure, but
        some target ran too few cases; 0: every target tested and every failure known or none."""
        if self.failures:
            return 1
        return EXIT_INCONCLUSIVE if self.inconclusive else 0


def save_repro(result: CaseResult, directory: Path, device: str) -> Path:
    """Exact inputs and options of a failing case, replayable."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{result.case.case_id}-{result.target.replace(':', '_').replace('/', '_')}"
    path = directory / f"{stem}.npz"
    case = result.case.replace(tags={**result.case.tags, "repro": {
        "target": result.target, "model": result.model, "device": device,
        "verdict": result.verdict, "reason": result.reason,
    }})
    case.save(path)
    return path


def _progress(cfg: CampaignConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_examples, unit="case", dynamic_ncols=True, mininterval=0.5)


def _meta(cfg: CampaignConfig) -> dict:
    import numpy
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "targets": cfg.targets, "dtypes": list(cfg.dtypes), "seed": cfg.seed, "device": cfg.device,
        "model": cfg.model, "max_examples": cfg.max_examples, "budget": cfg.budget,
        "known": None if cfg.known is None else str(cfg.known), "minimize": cfg.minimize,
        "grad": cfg.grad, "do_kinds": list(cfg.do_kinds or DO_KINDS) if cfg.grad else None,
        "max_seq": cfg.max_seq, "shard": list(cfg.shard), "exploit": cfg.exploit,
        "narrowed to": {f: list(v) for f, v in cfg.values.items() if len(v) < len(feature_values()[f])} or "nothing",
        "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
        "triton": triton_version, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if cfg.device == "cuda" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


class _Planner:
    """Which plan each case gets: dealt in the supported slice of the target
    whose turn it is, or (a bounded share) the plan of one of the worst
    cases so far."""

    def __init__(self, cfg: CampaignConfig, names: list[str], caps: dict):
        self.cfg, self.names, self.caps = cfg, names, caps
        self.dealers = {name: PlanDealer(cfg.values, seed=cfg.seed * 1009 + i) for i, name in enumerate(names)}
        self.worst: list = []  # (ratio, plan), the highest first, one entry per plan
        self.turn = 0
        self.dropped = dict.fromkeys(names, 0)  # how many of each target's rules its dealer has applied

    def next_plan(self, index: int):
        """The plan of case ``index`` and how it was chosen ("dealt" or "exploit").

        Shards deal every index in the same order, with neither learnt
        declines nor exploitation (both depend on what one shard saw), so
        that they partition one campaign; their targets still skip the
        plans they learnt to decline.
        """
        sharded = self.cfg.shard[1] > 1
        owners = self.names if sharded else [n for n in self.names if not self.caps[n].everything]
        if not owners:
            return None, None
        owner = owners[self.turn % len(owners)]
        self.turn += 1
        period = round(1 / self.cfg.exploit) if self.cfg.exploit > 0 and not sharded else 0
        if period and index % period == period - 1 and self.worst:
            plan = self.worst[(index // period) % len(self.worst)][1]
            if not self.caps[owner].declines(plan):
                return plan, "exploit"
        if sharded:
            return self.dealers[owner].deal(), "dealt"
        dealer, cap = self.dealers[owner], self.caps[owner]
        for rule in cap.rules[self.dropped[owner]:]:  # new single-value declines leave the decks
            if len(rule) == 1:
                dealer.drop(*next(iter(rule.items())))
        self.dropped[owner] = len(cap.rules)
        plan = dealer.deal(avoid=cap.rules)  # combinations are dealt around
        if plan is None:  # nothing left in this target's slice
            cap.add({}, "no plan within the allowed feature values avoids its declines")
            return self.next_plan(index)
        return plan, "dealt"

    def record(self, plan, ratio: float | None):
        if ratio is None or not math.isfinite(ratio) or plan is None:
            return
        kept = [(r, p) for r, p in self.worst if p != plan]
        best = max([r for r, p in self.worst if p == plan] + [ratio])
        self.worst = sorted(kept + [(best, plan)], key=lambda e: -e[0])[:5]


def _declines(runner, device: str, build):
    """``declined(plan) -> bool`` for capability probes: runs ``runner`` on
    ``build(plan)``; True only for NotImplementedError."""
    def declined(plan) -> bool:
        try:
            runner.run(build(plan), device)
        except NotImplementedError:
            return True
        except Exception:  # a crash or a wrong answer is not a decline; the real case judges it
            return False
        return False

    return declined


def run_campaign(cfg: CampaignConfig) -> CampaignResult:
    """Run the campaign described by ``cfg``; write the report; return totals.

    Raises `flashcheck.verify.targets.TargetError` (a usage error) for a target that
    cannot be resolved, before anything runs.
    """
    from flashcheck.reports.records import CaseWriter

    targets = [resolve_target(name, cfg.model) for name in cfg.targets]
    runners = [IsolatedTarget(t, timeout=cfg.timeout) if cfg.isolate else t for t in targets]
    names = [t.name for t in targets]
    block_kind = "triton" if "triton" in names else "numpy"
    caps = {name: Capabilities(name, cfg.values) for name in names}
    planner = _Planner(cfg, names, caps)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "cases.jsonl").unlink(missing_ok=True)
    repro_dir = cfg.out / "repro"
    if repro_dir.is_dir():  # an earlier run's repros in the same place would pass for this run's
        shutil.rmtree(repro_dir)
    result = CampaignResult(out=cfg.out, capabilities=caps)
    start = time.monotonic()
    deadline = start + cfg.budget if cfg.budget else math.inf
    bar = _progress(cfg)
    counter = {"n": 0}
    found_on = {k: v for k, v in _meta(cfg).items() if k in ("gpu", "torch", "python", "date")}
    tracker = FindingTracker(cfg.out, cfg.device, budget_s=cfg.minimize, max_findings=cfg.max_findings,
                             meta=found_on)

    def build(plan, raw):
        return case_from_plan(plan, raw, device=cfg.device, max_scores=cfg.max_scores, max_seq=cfg.max_seq,
                              block_kind=block_kind)

    @settings(
        max_examples=cfg.max_examples, database=None, deadline=None, derandomize=False,
        phases=[Phase.explicit, Phase.generate, Phase.target], suppress_health_check=list(HealthCheck),
        print_blob=False, report_multiple_bugs=False,
    )
    @seed(cfg.seed)
    @given(st.data())
    def explore(data):
        # Past the budget, return before drawing: generating a case is the
        # expensive part, and Hypothesis then runs out its examples at once.
        if time.monotonic() > deadline:
            return
        raw = data.draw(plan_choices, label="choices")
        index = counter["n"]
        counter["n"] += 1
        plan, how = planner.next_plan(index)
        if plan is None or index % cfg.shard[1] != cfg.shard[0]:
            return  # another shard's case, or every target declines everything we can build
        with timed("generate"):
            case = build(plan, raw)
            case.tags["drawn"] = how
            finite = all(bool((abs(t.astype("float64")) < math.inf).all()) for t in (case.q, case.k, case.v))
            if cfg.grad:
                kind = cfg.do_dealer.deal()
                case = with_output_gradient(case, kind if finite or kind != "delta-cancel" else "normal")
        ref, bounds = None, {}
        live = [r for r in runners if not caps[r.name].declines(plan)]
        if finite:
            # The oracle failing (or its cross-check) is a harness bug: let it surface.
            models = [r.model_for(case.dtype, cfg.device) for r in live]
            ref, bounds = reference(case, device=cfg.device, models=models, with_grad=cfg.grad,
                                    crosscheck_rows=cfg.crosscheck)
        with timed("baseline"):
            small = case_scores(case) <= BASELINE_MAX_SCORES
            base_err = baseline_error(case, ref) if ref is not None and small else None
        result.cases += 1
        worst = None
        for runner in runners:
            cap = caps[runner.name]
            if cap.declines(plan):
                cap.skipped += 1
                continue
            spent = {name: prof.seconds[name] for name in ("target", "bound", "oracle")}
            t0 = time.perf_counter()
            row_result = run_case(case, runner, device=cfg.device, ref=ref, baseline_err=base_err, bounds=bounds)
            # judging: run_case's time less what its target, bounds and oracle already counted
            prof.add("judge", time.perf_counter() - t0 - sum(prof.seconds[n] - spent[n] for n in spent))
            if row_result.verdict == "unsupported":
                with timed("target"):  # learning what was declined runs the target on simpler plans
                    rule = cap.learn(plan, row_result.reason,
                                     _declines(runner, cfg.device, functools.partial(build, raw=raw)))
                row_result.reason = f"{row_result.reason} [declined: {describe_rule(rule)}]"
            t_record = time.perf_counter()
            row = row_result.row() | {"device": cfg.device}
            if row_result.verdict == "fail":
                issue = match(row, cfg.known_issues, cfg.device)
                if issue is not None:
                    row["known"] = issue.text()
                    result.known_failures += 1
                else:
                    result.failures += 1
                tracker.add(len(result.rows), row, save_repro(row_result, repro_dir, cfg.device))
            writer.write(row)
            result.rows.append(row)
            if row_result.verdict == "unsupported":
                result.unsupported += 1
            if row_result.ratio is not None and math.isfinite(row_result.ratio):
                worst = max(worst or 0.0, row_result.ratio)
                # Targeted search steers generation by what this process saw; shards
                # see different cases, so they generate without it and stay a partition.
                if cfg.shard[1] == 1:
                    hypothesis_target(float(row_result.ratio), label=f"ratio:{runner.name}")
            prof.add("record", time.perf_counter() - t_record)
        planner.record(plan, worst)
        if ref is not None and oracle_device(case, cfg.device) is not None:
            # Campaigns sharing a GPU (scaleout --per-gpu) each keep a caching
            # allocator: give a large case's float64 intermediates back.
            del ref, bounds
            release_device_memory()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failures=result.failures, known=result.known_failures,
                            elapsed=f"{time.monotonic() - start:.0f}s")

    prof = result.profile
    try:
        with CaseWriter(cfg.out / "cases.jsonl") as writer, active(prof):
            t_loop = time.perf_counter()
            try:
                explore()
            except Flaky:
                # Replaying an example after the budget ran out draws less than
                # before (we stop drawing then): only then is this expected.
                if time.monotonic() <= deadline:
                    raise
            result.loop_seconds = loop = time.perf_counter() - t_loop
            prof.add("other", max(0.0, loop - sum(prof.seconds.values())))
            if bar is not None:
                bar.set_description("minimizing")
            with timed("minimize"):
                result.findings = tracker.finish(result.rows, {r.name: r for r in runners})
        if result.findings:  # the rows' signatures now carry what each bug needs
            _rewrite_rows(cfg.out / "cases.jsonl", result.rows)
    finally:
        for runner in runners:
            if isinstance(runner, IsolatedTarget):
                runner.close()
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - start
    result.inconclusive = _inconclusive(result, cfg)
    meta = _meta(cfg) | {"seconds": round(result.seconds, 1),
                         "declined": {n: c.summary() for n, c in caps.items()},
                         "inconclusive": result.inconclusive,
                         "findings": [f.as_dict() for f in result.findings],
                         "profile": prof.as_dict(wall=loop, cases=result.cases)}
    with timed("report", prof):
        write_reports(result.rows, cfg.out, meta)
    return result


def _inconclusive(result: CampaignResult, cfg: CampaignConfig) -> dict:
    """Targets that ran fewer cases than the floor, with what they declined."""
    # A shard is asked for its share of the cases; a budget may stop a campaign before its count.
    requested = math.ceil(cfg.max_examples / cfg.shard[1])
    floor = support_floor(min(requested, max(result.cases, 1)) if cfg.budget else requested)
    out = {}
    for name, cap in result.capabilities.items():
        ran = sum(r["target"] == name and r["verdict"] != "unsupported" for r in result.rows)
        if ran < floor:
            declined = "; ".join(describe_rule(r) for r in cap.rules) or "nothing"
            out[name] = (f"ran {ran} of {result.cases} cases (floor {floor}); declined: {declined}")
    return out


def _rewrite_rows(path: Path, rows: list) -> None:
    """Replace ``cases.jsonl`` by ``rows`` (atomically: a crash keeps the old file)."""
    from flashcheck.reports.records import CaseWriter

    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with CaseWriter(tmp) as writer:
        for row in rows:
            writer.write(row)
    tmp.replace(path)


def write_reports(rows: list, out: Path, meta: dict) -> None:
    from flashcheck.reports.html import write_html
    from flashcheck.reports.summary import write_summary

    out = Path(out)
    write_summary(rows, out / "summary.json", meta=meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    write_html(rows, out / "index.html", title="flashcheck fuzz campaign", meta=meta)
