"""The fuzz campaign: many generated cases, several targets, one report.

Cases come from the property strategies (`flashcheck.properties.strategies.cases`:
every magnitude class, mask kind, layout and shape class) driven by
Hypothesis with targeted search: each case reports its worst error/bound
ratio per target through `hypothesis.target`, so generation drifts toward
the cases closest to failing. Every target runs on the identical case, so
targets compare side by side. Each (case, target) row is appended to
``cases.jsonl`` as soon as it is judged; failing cases are saved under
``repro/`` for `python -m flashcheck replay`.

With ``max_examples`` and no time budget, the same seed and options give the
same cases and verdicts.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis import target as hypothesis_target
from hypothesis.errors import Flaky

from flashcheck.verify import oracle as _oracle
from flashcheck.verify.check import CaseResult, baseline_error, run_case
from flashcheck.verify.isolation import IsolatedTarget
from flashcheck.verify.targets import resolve_target

__all__ = ["CampaignConfig", "ConfigError", "CampaignResult", "run_campaign", "save_repro"]


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
        self.out = Path(self.out)
        if self.max_seq is None:
            self.max_seq = 80 if self.device == "cpu" else 4096
        if self.max_scores is None:
            # The oracle and the bound run on the host in float64: keep cases
            # to about a million scores on GPU runs.
            self.max_scores = 2**13 if self.device == "cpu" else 2**20


@dataclass
class CampaignResult:
    rows: list = field(default_factory=list)
    cases: int = 0
    failures: int = 0
    unsupported: int = 0
    seconds: float = 0.0
    out: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


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
        "max_seq": cfg.max_seq, "shard": list(cfg.shard),
        "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
        "triton": triton_version, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if cfg.device == "cuda" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def run_campaign(cfg: CampaignConfig) -> CampaignResult:
    """Run the campaign described by ``cfg``; write the report; return totals.

    Raises `flashcheck.verify.targets.TargetError` (a usage error) for a target that
    cannot be resolved, before anything runs.
    """
    from flashcheck.properties.strategies import cases as case_strategy
    from flashcheck.reports.records import CaseWriter

    targets = [resolve_target(name, cfg.model) for name in cfg.targets]
    runners = [IsolatedTarget(t, timeout=cfg.timeout) if cfg.isolate else t for t in targets]
    block_kind = "triton" if any(t.name == "triton" for t in targets) else "numpy"
    strategy = case_strategy(
        dtypes=tuple(cfg.dtypes), max_seq=cfg.max_seq, max_scores=cfg.max_scores,
        block_kind=block_kind, allow_nonfinite=True,
        masks=cfg.masks, magnitudes=cfg.magnitudes,
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "cases.jsonl").unlink(missing_ok=True)
    repro_dir = cfg.out / "repro"
    result = CampaignResult(out=cfg.out)
    start = time.monotonic()
    deadline = start + cfg.budget if cfg.budget else math.inf
    bar = _progress(cfg)
    counter = {"n": 0}

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
        case = data.draw(strategy, label="case")
        counter["n"] += 1
        if (counter["n"] - 1) % cfg.shard[1] != cfg.shard[0]:
            return
        ref = None
        if all(bool((abs(t.astype("float64")) < math.inf).all()) for t in (case.q, case.k, case.v)):
            # The oracle failing (or its cross-check) is a harness bug: let it surface.
            ref = _oracle.attention_case(case, keep=True, with_grad=False, crosscheck_rows=cfg.crosscheck)
        base_err = baseline_error(case, ref) if ref is not None else None
        result.cases += 1
        for runner in runners:
            row_result = run_case(case, runner, device=cfg.device, ref=ref, baseline_err=base_err)
            row = row_result.row()
            writer.write(row)
            result.rows.append(row)
            if row_result.verdict == "fail":
                result.failures += 1
                save_repro(row_result, repro_dir, cfg.device)
            elif row_result.verdict == "unsupported":
                result.unsupported += 1
            # Targeted search steers generation by what this process saw; shards
            # see different cases, so they generate without it and stay a partition.
            if cfg.shard[1] == 1 and row_result.ratio is not None and math.isfinite(row_result.ratio):
                hypothesis_target(float(row_result.ratio), label=f"ratio:{runner.name}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failures=result.failures, elapsed=f"{time.monotonic() - start:.0f}s")

    try:
        with CaseWriter(cfg.out / "cases.jsonl") as writer:
            try:
                explore()
            except Flaky:
                # Replaying an example after the budget ran out draws less than
                # before (we stop drawing then): only then is this expected.
                if time.monotonic() <= deadline:
                    raise
    finally:
        for runner in runners:
            if isinstance(runner, IsolatedTarget):
                runner.close()
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - start
    write_reports(result.rows, cfg.out, _meta(cfg) | {"seconds": round(result.seconds, 1)})
    return result


def write_reports(rows: list, out: Path, meta: dict) -> None:
    from flashcheck.reports.html import write_html
    from flashcheck.reports.summary import write_summary

    out = Path(out)
    write_summary(rows, out / "summary.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    write_html(rows, out / "index.html", title="flashcheck fuzz campaign", meta=meta)
