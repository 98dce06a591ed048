"""``tinymoe classroom ...``: student/instructor copies, check, site, grade, prove."""
from __future__ import annotations

import argparse
import sys

from .copies import check, instructor, student
from .grading import grade
from .markers import ClassroomError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinymoe classroom",
                                description="Classroom copies and grading (docs/teaching.md).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("student", ("the student copy: solution regions become task stubs, "
                                    "hidden tests removed, notebook outputs cleared")),
                       ("instructor", "the instructor copy: the same files, unchanged")):
        s = sub.add_parser(name, help=what, description=what)
        s.add_argument("out", metavar="OUT", help="directory to write (empty, or use --force)")
        s.add_argument("--force", action="store_true",
                       help="replace the copy's entries in a non-empty OUT; other files stay")
        s.add_argument("--src", default=".", help="source tree (default: .)")
    g = sub.add_parser("grade", help="run each task's tests; print points; write JSON")
    g.add_argument("dir", nargs="?", default=".", metavar="DIR", help="tree to grade (default: .)")
    g.add_argument("--json", metavar="PATH", help="write GitHub Classroom results JSON here")
    g.add_argument("--separate", action="store_true", help="one pytest run per task")
    g.add_argument("--timeout", type=float, default=None, help="seconds per pytest run")
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
    return p


def main_classroom(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failing tasks/problems, 2 errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command in ("student", "instructor"):
            make = student if args.command == "student" else instructor
            tree = make(args.out, args.src, force=args.force)
            n = sum(r.kind == "solution" for r in tree.regions)
            print(f"wrote the {args.command} copy to {args.out}: {len(tree.files)} files, "
                  f"{n} solution regions" + (" stubbed" if args.command == "student" else ""))
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
        if args.command == "grade":
            report = grade(args.dir, args.json, separate=args.separate, timeout=args.timeout)
            return 0 if report.status == "pass" else 1
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
