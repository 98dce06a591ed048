"""The ``tinymoe`` command (also ``python -m tinymoe``).

Subcommands import what they need when they run, so ``tinymoe --help`` is instant.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _tour(args: argparse.Namespace) -> int:
    from tinymoe.tour import run_tour

    run_tour(fast=args.fast, out=args.out, progress=not args.no_progress)
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    from tinymoe.checks import main_gradcheck

    return main_gradcheck(verbose=args.verbose)


def _forward(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose own argparse lives in ``module.func(argv)``."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args.rest) or 0)
    return run


# name -> (help, handler or (module, function) taking the remaining argv)
FORWARDED = {
    "params": ("total/active parameters and FLOPs per token of an MoE transformer config",
               ("tinymoe.params", "main_params")),
    "classroom": ("student/instructor copies and grading for a course",
                  ("tinymoe.classroom.cli", "main_classroom")),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinymoe",
        description="Mixture-of-Experts from first principles: run the tour, reproduce the "
                    "papers, check gradients, benchmark, or build a course.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("tour", help="run every stage end to end and write a report")
    t.add_argument("--fast", action="store_true", help="smaller runs (about a minute)")
    t.add_argument("--out", default="tinymoe-out", help="output folder (default: tinymoe-out)")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.set_defaults(handler=_tour)

    g = sub.add_parser("gradcheck", help="gradient-check every op, layer, gate and loss")
    g.add_argument("-v", "--verbose", action="store_true", help="print each report")
    g.set_defaults(handler=_gradcheck)

    for name, (helptext, target) in FORWARDED.items():
        f = sub.add_parser(name, help=helptext, add_help=False)
        f.add_argument("rest", nargs=argparse.REMAINDER)
        f.set_defaults(handler=_forward(*target))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:  # its own parser sees everything after the name
        import importlib

        module, func = FORWARDED[argv[0]][1]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
