"""Command line of the harness: ``python -m verify COMMAND ...``.

Each subcommand is a pair of functions registered with `register_command`:
``setup(parser)`` adds its arguments, ``run(args) -> int`` does the work.
To add ``fuzz``, ``replay`` or ``diff``, register them from this module
(below ``bench``). Benchmarks themselves live in the `verify.bench`
registry; ``bench`` lists whatever is registered there.

Exit status: 0 success, 1 a run that found a problem, 2 a usage error.
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
#: benchmarks with `verify.bench.register_bench` when imported.
BENCH_MODULES = ["verify.bench"]


def register_command(name: str, help: str, setup, run) -> None:
    if name in COMMANDS:
        raise ValueError(f"a command named {name!r} is already registered")
    COMMANDS[name] = Command(name, help, setup, run)


# -- bench ------------------------------------------------------------------

def _bench_registry() -> dict:
    import importlib

    for module in BENCH_MODULES:
        importlib.import_module(module)
    from verify.bench import BENCHES

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


# -- entry point --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verify",
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
