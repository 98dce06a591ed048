"""The ``tinymoe`` command (also ``python -m tinymoe``).

Subcommands import what they need when they run, so ``tinymoe --help`` is instant.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _tour(args: argparse.Namespace) -> int:
    from tinymoe.app.tour import run_tour, use_threads

    try:
        with use_threads(args.threads):
            run_tour(fast=args.fast, out=args.out, progress=not args.no_progress)
    except ValueError as e:
        if "--threads" not in str(e):
            raise
        print(f"tinymoe tour: {e}", file=sys.stderr)
        return 2
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    from tinymoe.app.gradcheck_table import main_gradcheck

    return main_gradcheck(verbose=args.verbose, only=args.only, list_only=args.list)


def _forward(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose own argparse lives in ``module.func(argv)``."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args.rest) or 0)
    return run


def main_repro(argv: Sequence[str]) -> int:
    """``tinymoe repro NAME [options]``: run one paper's reproduction script."""
    import importlib

    if not argv or argv[0] in ("-h", "--help") or argv[0] not in REPRO:
        print("usage: tinymoe repro NAME [options]   (NAME --help for its options)\n")
        for name, (module, _, what) in REPRO.items():
            print(f"  {name:<8} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntinymoe repro: unknown reproduction {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from tinymoe.app import records

    if "--fast" in argv and "--record" in argv and not records.pinned():
        # a fast record is what CI re-runs on whatever CPU it gets: make it in the pinned
        # numeric environment (one thread, the same code paths on every x86-64 CPU)
        return records.run_pinned(list(argv))
    module, func, _ = REPRO[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def main_train(argv: Sequence[str]) -> int:
    """``tinymoe train [options]``: one process (:mod:`tinymoe.app.train`), or with
    ``--expert-parallel D`` D MPI ranks (:mod:`tinymoe.app.train_mpi`, which needs mpi4py)."""
    if any(a == "--expert-parallel" or a.startswith("--expert-parallel=") for a in argv):
        from tinymoe.parallel.mpi_launch import mpi_status

        ok, what = mpi_status()
        if not ok:
            print(f"tinymoe train: error: --expert-parallel needs MPI: {what}")
            return 2
        from tinymoe.app.train_mpi import main_expert_parallel

        return main_expert_parallel(argv)
    from tinymoe.app.train import main_train as train_one_process

    return train_one_process(argv)


def main_bench(argv: Sequence[str]) -> int:
    """``tinymoe bench [NAME] [options]``: run a script from the checkout's benchmarks/."""
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
    if not scripts:
        print("tinymoe bench: no benchmarks/ folder next to the package; the benchmarks ship "
              "with the source checkout (pip install -e . from a clone)", file=sys.stderr)
        return 2
    if argv and argv[0] == "render":  # docs/benchmarks.md from benchmarks/results/
        sys.argv = [str(folder / "render.py"), *argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in scripts:
        print("usage: tinymoe bench NAME [--quick]\n\nbenchmarks: " + ", ".join(scripts))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    sys.argv = [str(folder / f"bench_{argv[0]}.py"), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


# name -> (module, function taking argv, one line on what it reproduces)
REPRO = {
    "vowels": ("tinymoe.app.experiments.vowels_1991", "main_vowels",
               "Jacobs et al. 1991, Table 1: mixtures vs backprop on the vowel task"),
    "hme": ("tinymoe.app.experiments.hme_1994", "main_hme",
            "Jordan & Jacobs 1994: HME trained by EM vs by gradient"),
    "deep_moe": ("tinymoe.app.experiments.deep_moe_2013", "main_deep_moe",
                 "Eigen, Ranzato & Sutskever 2013: a two-layer deep MoE learns where, then what"),
    "conditional": ("tinymoe.app.experiments.conditional_2015", "main_conditional",
                    "Bengio et al. 2013-15: binary-gate gradient estimators, block-gated nets"),
    "table6": ("tinymoe.app.experiments.table6_2017", "main_table6",
               "Shazeer et al. 2017, Table 6: the balancing losses"),
    "switch": ("tinymoe.app.experiments.switch_2021", "main_switch",
               "Fedus et al. 2021: Switch vs dense, capacity factors, router precision"),
    "switch_scaling": ("tinymoe.app.experiments.switch_scaling", "main_switch_scaling",
                       "Fedus et al. 2021, Fig. 1: loss vs number of experts, paired seeds"),
    "switch_precision": ("tinymoe.app.experiments.switch_scaling", "main_switch_precision",
                         "Fedus et al. 2021, Table 2: simulated bfloat16, float32 router"),
    "modern": ("tinymoe.app.experiments.modern_2024", "main_modern",
               "Mixtral, expert choice, DeepSeekMoE and loss-free balancing side by side"),
    "inference": ("tinymoe.app.experiments.inference", "main_inference",
                  "MoE vs dense (same active, same total) at inference: speed and memory"),
    "finetune": ("tinymoe.app.experiments.finetune", "main_finetune",
                 "Fedus et al. 2021 §2.4, Zoph et al. 2022 §4: sparse models fine-tuned"),
    "experts": ("tinymoe.app.experiments.experts_learn", "main_experts",
                "what each expert of a char LM receives, with and without balancing"),
    "gshard": ("tinymoe.app.experiments.gshard_2020", "main_gshard",
               "Lepikhin et al. 2020: top-2 with capacity and random routing vs Switch top-1"),
    "render": ("tinymoe.app.render", "main_render",
               "write docs/reproductions.md from the recorded runs (--check: compare only)"),
}

# name -> (help, (module, function) taking the remaining argv)
FORWARDED = {
    "train": ("train the tiny Switch Transformer LM (checkpoints, resume)",
              ("tinymoe.app.cli", "main_train")),
    "sample": ("print text sampled from a checkpoint", ("tinymoe.app.train", "main_sample")),
    "repro": ("reproduce a paper's table (vowels, hme, deep_moe, conditional, table6, gshard, "
              "switch, modern, inference, finetune, experts, render)",
              ("tinymoe.app.cli", "main_repro")),
    "bench": ("run a benchmark from benchmarks/ (autograd, dispatch, ...)",
              ("tinymoe.app.cli", "main_bench")),
    "params": ("total/active parameters and FLOPs per token of an MoE transformer config",
               ("tinymoe.app.params_cli", "main_params")),
    "classroom": ("student/instructor copies and grading for a course",
                  ("tinymoe.classroom.cli", "main_classroom")),
    "mpi-check": ("report the MPI found and run an all-to-all on 2 ranks",
                  ("tinymoe.parallel.mpi_launch", "main_mpi_check")),
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
    t.add_argument("--threads", default="auto", metavar="auto|all|N",
                   help="auto (default): adapt to the cores other programs leave free, unless "
                        "a thread variable such as OMP_NUM_THREADS is set; all: every core, "
                        "bit-for-bit repeatable numbers; N: N threads")
    t.set_defaults(handler=_tour)

    g = sub.add_parser("gradcheck", help="gradient-check every op, layer, gate and loss")
    g.add_argument("-v", "--verbose", action="store_true", help="print each report")
    g.add_argument("--only", metavar="TEXT", help="run the checks whose name contains TEXT")
    g.add_argument("--list", action="store_true", help="list the checks' names, run nothing")
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
