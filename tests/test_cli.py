"""The ``tinymoe`` command: its subcommands, params, gradcheck, repro, bench and the tour.

Most tests call :func:`tinymoe.app.cli.main` in-process (no interpreter start-up, and a stub's
NotImplementedError reaches pytest as itself); ``--help`` runs in a subprocess to check the
real ``python -m tinymoe`` entry point.

Markers: the gradcheck and tour tests run library code inside solution regions, so they
carry the marker of every task whose region they reach (found by tracing the executed lines).
Both pin the Numba dispatch backend: with ``TINYMOE_DISPATCH=numpy`` they would also run
``reference.assign_positions`` (task 5_2), which their tags do not claim.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.autograd import Function
from tinymoe.app.gradcheck_table import CHECKS
from tinymoe.app.cli import FORWARDED, REPRO, main
from tinymoe.app.tour import STAGES

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["tour", "train", "sample", "gradcheck", "bench", "params", "classroom", "repro"]

# the regions a full `tinymoe gradcheck` runs (mixture NLL and posteriors, the 2013-15
# estimators and regularisers, the noisy top-k gate and load estimator, capacity, the
# balancing and z-losses)
GRADCHECK_TASKS = ["task1_1", "task1_2", "task2b_1", "task2b_2", "task2b_3", "task3_1",
                   "task3_2", "task3_3", "task4_1", "task4_2", "task4_3", "task6_1", "task6_2",
                   "task7_1", "task8_1", "task8_2"]
# the regions `tinymoe tour --fast` runs: the 1991 NLL, the EM of 1994 (E-step, least
# squares, IRLS, the EM step), the 2013-15 estimators and regularisers, noisy top-k, GShard
# and Switch (capacity, balancing loss, z-loss)
TOUR_TASKS = ["task1_1", "task2_1", "task2_2", "task2_3", "task2_4", "task2b_1", "task2b_2",
              "task2b_3", "task3_1", "task3_2", "task3_3", "task4_1", "task4_2", "task4_3",
              "task6_1", "task6_2", "task6_3", "task8_1", "task8_3"]


def tagged(tasks):
    def wrap(f):
        for task in reversed(tasks):
            f = getattr(pytest.mark, task)(f)
        return f
    return wrap


# --- the command and its subcommands ------------------------------------------------------------
def test_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "tinymoe", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"^ {4}([\w-]+)", proc.stdout, flags=re.M))
    assert set(SUBCOMMANDS) <= listed, proc.stdout
    assert set(FORWARDED) <= listed


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: tinymoe" in capsys.readouterr().out


def test_params_mixtral(capsys):
    assert main(["params", "--preset", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^total\s+46,702,792,704\b", out, flags=re.M), out
    assert re.search(r"^active per token \(top-2 of 8\)\s+12,879,925,248\b", out, flags=re.M)


def test_repro_lists_reproductions_and_rejects_unknown_ones(capsys):
    assert main(["repro"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, what) in REPRO.items():
        assert re.search(rf"^  {name}\s+{re.escape(what)}$", out, flags=re.M), name
    assert main(["repro", "no-such-paper"]) == 2
    captured = capsys.readouterr()
    assert "unknown reproduction 'no-such-paper'" in captured.err
    assert "vowels" in captured.out  # the list, to pick from


def test_bench_lists_benchmarks(capsys):
    scripts = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks")
                     .glob("bench_*.py"))
    assert scripts
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert f"benchmarks: {', '.join(scripts)}" in out
    assert main(["bench", "no-such-benchmark"]) == 2


# --- gradcheck ------------------------------------------------------------------------------------
def test_gradcheck_list_and_only(capsys):
    assert main(["gradcheck", "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == list(CHECKS)
    assert main(["gradcheck", "--only", "CV_SQUARED"]) == 0  # case-insensitive substring
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(" ok")]
    assert len(rows) == 1 and rows[0].startswith("2017 cv_squared")
    assert "1 of 1 gradient checks passed" in out
    assert main(["gradcheck", "--only", "no such check"]) == 2
    assert "no check name contains 'no such check'" in capsys.readouterr().err


class WrongSquare(Function):
    """x² with a wrong backward (x instead of 2x)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * a,)


def test_gradcheck_reports_failures_and_errors(monkeypatch, capsys):
    x = np.array([1.0, 2.0])
    monkeypatch.setitem(CHECKS, "zz wrong backward",
                        lambda rng: (WrongSquare.apply, [tm.tensor(x, requires_grad=True)]))

    def unfinished(rng):
        raise NotImplementedError("tinymoe task 9_9: not written yet")
    monkeypatch.setitem(CHECKS, "zz unfinished", unfinished)
    assert main(["gradcheck", "--only", "zz "]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^zz wrong backward .* FAILED$", out, flags=re.M)
    assert "MISMATCH input 0 at (0,)" in out  # the report follows a failed row
    assert re.search(r"^zz unfinished .* ERROR NotImplementedError: tinymoe task 9_9", out,
                     flags=re.M)
    assert "0 of 2 gradient checks passed" in out
    from tinymoe.app.gradcheck_table import main_gradcheck

    with pytest.raises(NotImplementedError, match="task 9_9"):
        main_gradcheck(only="zz unfinished", raise_errors=True)


def test_every_stage_has_gradient_checks():
    groups = {name.split()[0] for name in CHECKS}
    assert {"op", "nn", "1991", "1994", "2017", "dispatch", "2020", "2021", "2022", "2024",
            "parallel"} <= groups


@tagged(GRADCHECK_TASKS)
def test_gradcheck_passes_every_registered_check(capsys):
    from tinymoe.app.gradcheck_table import main_gradcheck

    with tm.dispatch.use_backend("numba"):
        status = main_gradcheck(raise_errors=True)  # an unfinished task raises its stub
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    for name in CHECKS:
        row = [line for line in lines if line.startswith(name + " ")]
        assert len(row) == 1 and row[0].endswith("  ok"), f"{name}:\n{out}"
    assert f"{len(CHECKS)} of {len(CHECKS)} gradient checks passed" in out


# --- the tour -------------------------------------------------------------------------------------
@pytest.mark.slow
@tagged(TOUR_TASKS)
def test_tour_fast_end_to_end(tmp_path, capsys):
    """About 30 s on two cores: every stage's summary, both reports and the figures."""
    out_dir = tmp_path / "tour"
    with tm.dispatch.use_backend("numba"):
        assert main(["tour", "--fast", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    titles = []
    # each stage's block: a title numbered by its lesson ("2", "2b", ...), then four labelled
    # lines; the blocks come in the order of STAGES
    blocks = [n for n, line in enumerate(lines)
              if re.fullmatch(r"\d+[a-z]? · .+  —  .+  \(\d+\.\d s\)", line)]
    assert len(blocks) == len(STAGES), f"{len(blocks)} summaries for {len(STAGES)} stages:\n{out}"
    for n in blocks:
        for label, line in zip(["trained :", "params  :", "measured:", "paper   :"],
                               lines[n + 1:n + 5]):
            assert line.startswith(f"    {label} ") and line.strip() != label, line
        titles.append(lines[n].split("  —  ")[0])
    end = re.search(rf"^{len(STAGES)} stages in \d+ s\. Report: .*report\.md and "
                    rf".*report\.html; (\d+) figures in ", out, flags=re.M)
    assert end, out

    md, page = out_dir / "report.md", out_dir / "report.html"
    assert md.is_file() and page.is_file()
    md_text, html_text = md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")
    for title in titles:
        assert f"| {title} |" in md_text and f"<td>{title}</td>" in html_text, title
    # the tour adapts its threads by default and says so; the caller's policy is back after
    assert re.search(r"^Threads: .+\.$", out, flags=re.M) and "Threads: " in md_text
    assert tm.threads.describe()["mode"] != "adaptive" or tm.threads._POLICY.user_vars
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == int(end.group(1)) >= len(STAGES)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png.name})" in md_text and f'src="{png.name}"' in html_text
