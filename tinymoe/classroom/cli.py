"""``tinymoe classroom ...``: student/instructor copies, check, site, grade, test, prove.

Bad arguments (a missing folder, an unknown task, a bad number) end with one line
``error: ...`` on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .copies import check, instructor, student
from .grading import grade, self_test
from .sandbox import DEFAULT_MEMORY, DEFAULT_TIMEOUT
from .markers import ClassroomError


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tinymoe classroom",
                                description="Classroom copies and grading (docs/teaching.md).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, what in (("student", ("the student copy: solution regions become task stubs, "
                                    "hidden tests removed, notebook outputs cleared")),
                       ("instructor", "the instructor copy: the same files, unchanged")):
        s = sub.add_parser(name, help=what, description=what)
        s.add_argument("out", metavar="OUT", help="directory to write (empty, or use --force)")
        s.add_argument("--force", action="store_true",
                       help="replace the copy's entries in a non-empty OUT; other files stay")
        s.add_argument("--src", default=".", help="source tree (default: .)")
        if name == "student":
            s.add_argument("--no-answers", action="store_true",
                           help="do not ship the probes' answers for the public seed")
    g = sub.add_parser("grade", help="grade a submission task by task (the trusted grader)",
                       description="Grade a submission: each task's probes run in a sandboxed "
                       "child on the instructor's tree with only that task's regions taken "
                       "from the submission (docs/teaching.md, 'Grading').")
    g.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="the submission to grade (default: .)")
    g.add_argument("--json", metavar="PATH", help="write GitHub Classroom results JSON here")
    g.add_argument("--solutions", metavar="DIR",
                   help="the instructor's tree (default: the tree this grader runs from)")
    g.add_argument("--task", action="append", metavar="taskN_M", help="grade only this task "
                   "(repeatable)")
    _limit_args(g)
    g.add_argument("--seed", type=SEED, default=None,
                   help="seed of the probes' inputs (default: a fresh random one)")
    t = sub.add_parser("test", help="students: run a task's probes against this copy",
                       description="Run the grader's probes of the tasks against the copy "
                       "(default: .) and print what differed from the answers shipped with "
                       "the copy.")
    t.add_argument("tasks", nargs="+", metavar="taskN_M", help="task names, or all")
    t.add_argument("--dir", default=".", metavar="DIR", help="the copy's root (default: .)")
    t.add_argument("--solutions", metavar="DIR", help="compare with this instructor tree")
    t.add_argument("--json", metavar="PATH", help="write GitHub Classroom results JSON here")
    _limit_args(t, memory=False)
    w = sub.add_parser("site", help="build the students' course site (Sphinx HTML, -W) from "
                       "a student copy, lessons not executed, MathJax shipped")
    w.add_argument("src", metavar="STUDENT_COPY", help="the student copy (or any tinymoe tree: "
                   "its student version is built)")
    w.add_argument("out", metavar="OUT", help="directory to write (new, empty, or an earlier site)")
    w.add_argument("--solutions", metavar="DIR", help="the instructor's tree: refuse the site if "
                   "any of its solution lines shows")
    c = sub.add_parser("check", help="validate every marker; list tasks and regions")
    c.add_argument("dir", nargs="?", default=".", metavar="DIR")
    v = sub.add_parser("prove", help="build both copies in a temp dir and prove them (slow)")
    v.add_argument("dir", nargs="?", default=".", metavar="DIR")
    v.add_argument("--work", metavar="DIR", help="keep the copies here instead of a temp dir")
    v.add_argument("--no-notebooks", action="store_true", help="do not execute the lessons")
    v.add_argument("--instructor-tests", action="store_true",
                   help="also run the instructor copy's suite and notebooks")
    v.add_argument("--credit", action="store_true",
                   help="run the credit matrix (fast mode) instead of the copy proofs")
    v.add_argument("--full", action="store_true",
                   help="run the full credit matrix: every task of every submission")
    v.add_argument("--record", metavar="PATH", help="write the credit matrix's JSON here")
    v.add_argument("--jobs", type=JOBS, default=2, help="graded submissions in parallel")
    return p


def _number(kind, low, what):
    """An argparse type: a ``kind`` number >= ``low`` (a finite one), else a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


SECONDS = _number(float, 1e-3, "a number of seconds > 0")
MIB = _number(int, 1, "a positive whole number of MiB")
SEED = _number(int, 0, "a whole number >= 0")
JOBS = _number(int, 1, "a whole number >= 1")


def _limit_args(p, memory: bool = True) -> None:
    p.add_argument("--timeout", type=SECONDS, default=DEFAULT_TIMEOUT,
                   help=f"seconds per task (default: {DEFAULT_TIMEOUT:g})")
    if memory:
        p.add_argument("--memory", type=MIB, default=DEFAULT_MEMORY >> 20, metavar="MB",
                       help=f"address space of the child in MiB (default: {DEFAULT_MEMORY >> 20})")


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors (``error: ...``, exit status 2) and no usage dump."""

    def error(self, message):
        raise ClassroomError(self.prog, None, message)


def main_classroom(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failing tasks/problems, 2 errors)."""
    try:
        args = _parser().parse_args(argv)
        if args.command in ("student", "instructor"):
            make = student if args.command == "student" else instructor
            tree = make(args.out, args.src, force=args.force)
            n = sum(r.kind == "solution" for r in tree.regions)
            print(f"wrote the {args.command} copy to {args.out}: {len(tree.files)} files, "
                  f"{n} solution regions" + (" stubbed" if args.command == "student" else ""))
            if args.command == "student" and not args.no_answers and \
                    (Path(args.src) / "tinymoe" / "classroom" / "probes.py").is_file():
                from .grading import write_answers
                written = write_answers(args.src, args.out)
                print(f"wrote the answers of {len(written)} tasks for the public seed (what "
                      f"'tinymoe classroom test' compares with; grading draws another seed)")
            return 0
        if args.command == "site":
            from .site import site
            site(args.src, args.out, solutions=args.solutions)
            print(f"wrote the students' site to {args.out}: open {args.out}/index.html")
            return 0
        if args.command == "check":
            report = check(args.dir)
            print(report.text())
            return 1 if report.problems else 0
        if args.command in ("grade", "test") and args.timeout <= 0:
            raise ClassroomError("--timeout", None, f"must be > 0 seconds, got {args.timeout:g}")
        if args.command == "grade":
            for path in [args.dir] + ([args.solutions] if args.solutions else []):
                if not Path(path).is_dir():
                    raise ClassroomError(path, None, "no such directory")
            report = grade(args.dir, args.json, solutions=args.solutions, tasks=args.task,
                           timeout=args.timeout, memory=args.memory << 20, seed=args.seed)
            return 0 if report.status == "pass" else 1
        if args.command == "test":
            if not (Path(args.dir) / "tinymoe").is_dir():
                raise ClassroomError(args.dir, None, "not the root of a tinymoe copy (no "
                                     "tinymoe/ here); run from the copy's root or pass --dir")
            report = self_test(args.dir, args.tasks, solutions=args.solutions,
                               timeout=args.timeout, json_path=args.json)
            return 0 if report.status == "pass" else 1
        if args.credit or args.full or args.record:
            from .credit import credit_matrix
            if not Path(args.dir).is_dir():
                raise ClassroomError(args.dir, None, "no such directory")
            matrix = credit_matrix(args.dir, full=args.full, record=args.record,
                                   jobs=args.jobs)
            print(matrix.text())
            return 1 if matrix.problems else 0
        from .proofs import prove
        proof = prove(args.dir, args.work, notebooks=not args.no_notebooks,
                      instructor_tests=args.instructor_tests)
        print(proof.text())
        return 1 if proof.problems else 0
    except ClassroomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable source, unwritable OUT, disk full: no traceback
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_classroom())
