"""Command line of the harness: ``python -m flashcheck COMMAND ...``.

Each subcommand is a pair of functions registered with `register_command`:
``setup(parser)`` adds its arguments, ``run(args) -> int`` does the work.
To add ``fuzz``, ``replay`` or ``diff``, register them from this module
(below ``bench``). Benchmarks themselves live in the `flashcheck.verify.bench`
registry; ``bench`` lists whatever is registered there.

Exit status: 0 success (every target tested and within bound), 1 a run
that found a problem, 2 a usage error, 3 inconclusive (a target ran too few
cases to say anything; the message lists what it declined).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COMMANDS", "build_parser", "main", "register_command"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}

#: Modules imported before ``bench`` lists its choices; each registers its
#: benchmarks with `flashcheck.verify.bench.register_bench` when imported
#: (verify.bench registers the kernel benchmark, kernels/bench_kernel.py, too:
#: kernels must not import verify).
BENCH_MODULES = ["flashcheck.verify.bench"]


def register_command(name: str, help: str, setup, run) -> None:
    if name in COMMANDS:
        raise ValueError(f"a command named {name!r} is already registered")
    COMMANDS[name] = Command(name, help, setup, run)


# -- bench ------------------------------------------------------------------

def _bench_registry() -> dict:
    import importlib

    for module in BENCH_MODULES:
        importlib.import_module(module)
    from flashcheck.verify.bench import BENCHES

    return BENCHES


def setup_bench(parser: argparse.ArgumentParser) -> None:
    benches = _bench_registry()
    parser.add_argument("name", choices=sorted(benches),
                        help="; ".join(f"{b.name}: {b.help}" for b in benches.values()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="options of the benchmark (see: bench NAME --help)")


def run_bench(args: argparse.Namespace) -> int:
    return _bench_registry()[args.name].run(args.bench_args)


register_command("bench", "run a benchmark", setup_bench, run_bench)


# -- fuzz -------------------------------------------------------------------

class UsageError(Exception):
    """A bad option or target: exit status 2."""


def _dtypes(text: str) -> tuple:
    from flashcheck.kernels.precision import format_of

    names = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            name = format_of(part).name
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--dtype: {exc}") from None
        if name not in ("fp16", "bf16", "fp32"):
            raise UsageError(f"--dtype: {part!r} is not one of fp16, bf16, fp32")
        names.append(name)
    if not names:
        raise UsageError("--dtype needs at least one of fp16, bf16, fp32")
    return tuple(dict.fromkeys(names))


def _names(text, what, known):
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {unknown or text!r}; expected some of {', '.join(known)}")
    return names


def _head_dims(text):
    from flashcheck.properties.plans import HEAD_DIM_CLASSES

    if text is None:
        return None
    dims = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in HEAD_DIM_CLASSES:
            dims.append(part)
        elif part.isdigit() and int(part) >= 1:
            dims.append(int(part))
        else:
            raise UsageError(f"--head-dims: {part!r} is neither a positive integer nor a class "
                             f"({', '.join(HEAD_DIM_CLASSES)})")
    if not dims:
        raise UsageError("--head-dims needs at least one head dim or class")
    return tuple(dims)


def setup_fuzz(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", required=True, metavar="T",
                        help="triton, numpy-tiled, sdpa-math, sdpa-flash, sdpa-efficient, sdpa-cudnn, flash-attn, "
                             "flex, compiled-math or MODULE:FUNCTION; repeat to compare targets on identical cases")
    parser.add_argument("--dtype", default="fp16,bf16,fp32", help="comma-separated dtypes (default: all three)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="stop after this much time")
    parser.add_argument("--max-examples", type=int, default=100, metavar="N", help="number of cases (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator (default 0)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default=None, help="precision model for every target (default: each target's "
                        "own, else fa2 for fp16/bf16 and fp32-ieee for fp32)")
    parser.add_argument("--out", default="reports/latest", help="output directory (default reports/latest)")
    parser.add_argument("--max-seq", type=int, default=None,
                        help="cap on Nq and Nk (default: the size strata's own, up to 1536 on cpu)")
    parser.add_argument("--max-scores", type=int, default=None,
                        help="cap on B*H*Nq*Nk per case (default 2**16 on cpu; on cuda the strata's own caps, "
                             "2**26 with --grad)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-case timeout of a target in seconds")
    parser.add_argument("--no-isolate", action="store_true", help="run targets in this process (no crash isolation)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="run the I-th of N interleaved shards of the cases")
    parser.add_argument("--masks", default=None, help="comma-separated mask kinds (default: all): none, causal, "
                        "bool-random, additive, sliding-window, fully-masked-rows")
    parser.add_argument("--magnitudes", default=None, help="comma-separated magnitude classes (default: all)")
    parser.add_argument("--sizes", default=None, help="comma-separated size strata (default: the device's): tiny, "
                        "one-tile, key-tiles, query-tiles, both-tiles, long; on cuda also decode, past-64k and "
                        "(only when named) huge")
    parser.add_argument("--heads", default=None, help="comma-separated head layouts (default: all): MHA, MQA, GQA")
    parser.add_argument("--layouts", default=None, help="comma-separated memory layouts (default: all): "
                        "contiguous, bnhd, strided")
    parser.add_argument("--head-dims", default=None, help="comma-separated head dims (e.g. 64,128) or head-dim "
                        "classes (tiny, 16-32, 64, 128, odd, 192-256); default: every class")
    parser.add_argument("--equal-lengths", action="store_true", help="only cases with Nq == Nk")
    parser.add_argument("--same-dv", action="store_true", help="only cases with V's head dim equal to Q's")
    parser.add_argument("--exploit", type=float, default=0.2, metavar="SHARE",
                        help="share of cases that reuse the plan of a worst case so far (default 0.2, at most 0.5)")
    parser.add_argument("--crosscheck", type=int, default=0, metavar="ROWS",
                        help="re-check this many oracle rows per case with pure mpmath at twice the precision")
    parser.add_argument("--known", default=None, metavar="FILE",
                        help="known-issues file (TOML): matching failures are reported as known and do not fail "
                             "the exit status")
    parser.add_argument("--minimize", type=float, default=60.0, metavar="SECONDS",
                        help="time to shrink each finding's smallest case into a standalone repro (default 60; "
                             "0: none)")
    parser.add_argument("--max-findings", type=int, default=20, metavar="N",
                        help="findings minimized at most, new ones first (default 20)")
    parser.add_argument("--grad", action="store_true",
                        help="also run each target's backward for a drawn output gradient dO and judge dQ, dK, dV "
                             "against the oracle's certified gradients")
    parser.add_argument("--do-kinds", default=None, help="with --grad: comma-separated output-gradient classes "
                        "(default: all): normal, tiny, huge, zero-rows, delta-cancel")
    parser.add_argument("--profile", action="store_true",
                        help="print where the time went, phase by phase (always saved in meta.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_fuzz(args: argparse.Namespace) -> int:
    from flashcheck.properties.case import LAYOUTS
    from flashcheck.properties.grads import DO_KINDS
    from flashcheck.properties.inputs import MAGNITUDES
    from flashcheck.properties.masks import MASK_KINDS
    from flashcheck.properties.plans import HEAD_KINDS, strata_names
    from flashcheck.verify.campaign import CampaignConfig, ConfigError, run_campaign
    from flashcheck.verify.targets import TargetError

    try:
        index, count = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N, got {args.shard!r}") from None
    if args.model is not None:
        from flashcheck.kernels.models import check_model_name

        try:
            check_model_name(args.model)
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device")
    try:
        cfg = CampaignConfig(
            targets=args.target, dtypes=_dtypes(args.dtype), budget=args.budget, max_examples=args.max_examples,
            seed=args.seed, device=args.device, model=args.model, out=args.out, max_seq=args.max_seq,
            max_scores=args.max_scores, masks=_names(args.masks, "mask kind", MASK_KINDS),
            magnitudes=_names(args.magnitudes, "magnitude class", MAGNITUDES), crosscheck=args.crosscheck,
            sizes=_names(args.sizes, "size stratum", strata_names("cuda", every=True)),
            heads=_names(args.heads, "head layout", HEAD_KINDS),
            layouts=_names(args.layouts, "layout", LAYOUTS), head_dims=_head_dims(args.head_dims),
            equal_lengths=args.equal_lengths, same_dv=args.same_dv, exploit=args.exploit,
            timeout=args.timeout, isolate=not args.no_isolate, progress=not args.no_progress, shard=(index, count),
            known=args.known, minimize=args.minimize, max_findings=args.max_findings, grad=args.grad,
            do_kinds=_names(args.do_kinds, "output-gradient class", DO_KINDS),
        )
        result = run_campaign(cfg)
    except (ConfigError, TargetError) as exc:
        raise UsageError(str(exc)) from None
    known = f" ({result.known_failures} more match known issues)" if result.known_failures else ""
    print(f"{result.cases} cases, {len(result.rows)} runs: {result.failures} failed{known}, "
          f"{result.unsupported} unsupported, in {result.seconds:.0f} s; report: {cfg.out / 'index.html'}")
    if cfg.grad:
        counts = {}
        for row in result.rows:
            counts[row.get("grad_verdict")] = counts.get(row.get("grad_verdict"), 0) + 1
        print("gradients: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("pass", "fail", "unsupported",
                                                                           "not judged")))
    for finding in result.findings:
        mark = "known" if finding.known else "NEW"
        where = f"; repro: {cfg.out / finding.repro}" if finding.repro else ""
        print(f"  [{mark}] {finding.signature} ({len(finding.rows)} runs){where}")
    for name, cap in result.capabilities.items():
        if cap.rules:
            print(f"{name} declined: " + "; ".join(d["text"] for d in cap.summary()["declined"]))
    if args.profile:
        print(result.profile.table(result.loop_seconds, result.cases))
    for name, why in result.inconclusive.items():
        print(f"INCONCLUSIVE: {name} {why}", file=sys.stderr)
    return result.exit_code


register_command("fuzz", "run a fuzz campaign against one or more targets", setup_fuzz, run_fuzz)


# -- replay -------------------------------------------------------------------

def setup_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a repro .npz written by a campaign (repro/) or a property (reports/failures/), "
                        "or a finding's repro directory (repro/<signature>/)")
    parser.add_argument("--target", default=None, help="target to run (default: the one recorded in the file)")
    parser.add_argument("--model", default=None, help="precision model (default: the recorded one)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"))


def run_replay(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flashcheck.kernels.models import MODEL_NAMES
    from flashcheck.properties.case import Case
    from flashcheck.verify.check import run_case
    from flashcheck.verify.targets import TargetError, resolve_target

    path = Path(args.file)
    if path.is_dir() and (path / "case.npz").is_file():
        path = path / "case.npz"
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        case = Case.load(path)
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{path} is not a saved case: {exc}") from None
    recorded = case.tags.get("repro", {})
    target_name = args.target or recorded.get("target")
    if not target_name:
        raise UsageError(f"{path} records no target: pass --target")
    model = args.model or (recorded.get("model") if recorded.get("model", "").partition("+")[0] in MODEL_NAMES
                           else None)
    device = args.device or recorded.get("device", "cpu")
    try:
        target = resolve_target(target_name, model)
    except (TargetError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    res = run_case(case, target, device=device)
    print(f"case {case.case_id}: {json.dumps(case.describe())}")
    print(f"target {res.target} under model {res.model} on {device}: {res.verdict.upper()}")
    if res.reason:
        print(f"reason: {res.reason}")
    if res.ratio is not None:
        print(f"error/bound: {res.ratio:.4g}" + (f", lse error/bound: {res.lse_ratio:.4g}" if res.lse_ratio else ""))
    if res.grad:
        ratios = ", ".join(f"{g} {res.grad[g + '_ratio']:.4g}" for g in ("dq", "dk", "dv")
                           if res.grad.get(g + "_ratio") is not None)
        print(f"gradients ({case.tags.get('do', 'given')} dO): {res.grad['verdict'].upper()}"
              + (f"; error/bound {ratios}" if ratios else "") + (f"; {res.grad['reason']}" if res.grad.get("reason")
                                                                  else ""))
    for key, value in res.metrics.items():
        if key not in ("traceback",):
            print(f"  {key}: {value}")
    if recorded.get("verdict"):
        print(f"recorded verdict: {recorded['verdict']} ({recorded.get('reason')})")
    return {"pass": 0, "unsupported": 0}.get(res.verdict, 1)


register_command("replay", "re-run one saved case and print its verdict and metrics", setup_replay, run_replay)


# -- diff ---------------------------------------------------------------------

def setup_diff(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="previous run: a directory, cases.jsonl or summary.json")
    parser.add_argument("new", help="new run: a directory, cases.jsonl or summary.json")
    parser.add_argument("--known", default=None, metavar="FILE",
                        help="known-issues file: failures that match it are no regression")


def run_diff(args: argparse.Namespace) -> int:
    from flashcheck.reports.diff import main_diff

    known = None
    if args.known is not None:
        from flashcheck.verify.known import KnownIssueError, load_known, mark_known

        try:
            issues = load_known(args.known)
        except KnownIssueError as exc:
            raise UsageError(str(exc)) from None

        def known(rows):
            mark_known(rows, issues)

    return main_diff(args.old, args.new, mark_known=known)


register_command("diff", "compare two runs; exit 1 on a regression", setup_diff, run_diff)


# -- entry point --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashcheck",
                                     description="Numerics verification harness for fused attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.setup(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (2 for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        return int(args._run(args))
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    except UsageError as exc:
        print(f"flashcheck: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``flashcheck`` console script."""
    sys.exit(main())
