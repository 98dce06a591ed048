"""The child of the trusted grader: run one task's probes in a hybrid tree, write arrays.

Stand-alone on purpose (no tinymoe import at module level): the grader copies this file into
the child's work directory and runs ``python -I child.py WORK``. ``WORK`` holds

* ``tree/``: the instructor's files with only the graded task's regions holding the
  student's code (the only tree on ``sys.path``);
* ``job.json``: ``{"task": "taskN_M", "cases": n, "max_bytes": cap}``;
* ``inputs.npz``: the inputs, ``case<i>.<name>`` (read with ``allow_pickle=False``);

and gets ``out/outputs.npz`` (``case<i>.<name>`` arrays, numeric only) and ``out/result.json``
(where tinymoe was imported from, and per case the exception a call raised, truncated). The
parent decides: nothing written here is trusted beyond being data to compare.
"""
import ast
import json
import os
import sys
import traceback

MESSAGE_CHARS = 500
# Imported before privileges are dropped: the interpreter's own files may sit where the
# unprivileged user cannot read them (e.g. a Python under /root).
PRELOAD = ("__future__", "abc", "argparse", "ast", "bisect", "collections", "collections.abc",
           "contextlib", "copy", "csv", "dataclasses", "decimal", "enum", "fractions",
           "functools", "hashlib", "heapq", "importlib", "importlib.util", "inspect", "io",
           "itertools", "json", "math", "numbers", "operator", "os", "pathlib", "random", "re",
           "secrets", "statistics", "string", "struct", "tempfile", "textwrap", "time",
           "traceback", "types", "typing", "warnings", "weakref", "zipfile", "numpy",
           "numpy.linalg", "numpy.random", "numpy.fft", "numpy.testing", "numpy.lib.stride_tricks",
           "encodings.cp437", "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
           "encodings.idna", "unicodedata",
           "numba")  # tinymoe imports it (dispatch and FFN kernels); loaded before the drop


def _short(text, n=MESSAGE_CHARS):
    text = str(text)
    return text if len(text) <= n else text[:n] + "…"


def _cell_source(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _notebook_cells(tree, notebook, task):
    """(import cell source, [exercise cell sources]) of the lesson."""
    with open(os.path.join(tree, notebook), encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c.get("cell_type") == "code"]
    begin = f"### BEGIN SOLUTION {task}"
    mine = [_cell_source(c) for c in cells if any(
        line.strip() == begin for line in _cell_source(c).splitlines())]
    return _cell_source(cells[0]), mine


def _exercise_code(source, mode):
    """What runs of an exercise cell: up to its last END marker ("cell"), or only its
    imports, functions and classes ("defs")."""
    lines = source.splitlines(True)
    if mode == "cell":
        ends = [i for i, line in enumerate(lines) if line.strip() == "### END SOLUTION"]
        return "".join(lines[:ends[-1] + 1]) if ends else source
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)
    module = ast.parse(source)
    module.body = [node for node in module.body if isinstance(node, keep)]
    return module


def _first_lines(source, n=3):
    return "\n".join(source.strip().splitlines()[:n])


def _preload(names):
    import importlib
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional modules may be absent
            continue
        if name == "numba":  # numba imports more of itself on first use: use it once
            import math

            import numba
            import numpy
            numba.vectorize(["float64(float64)"])(lambda x: math.erf(x))(numpy.zeros(1))


def drop_privileges(uid, gid):
    """Become ``uid:gid`` for good (real, effective and saved ids), with no extra groups."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SystemExit("could not drop privileges")


def main(work):
    with open(os.path.join(work, "job.json"), encoding="utf-8") as f:
        job = json.load(f)
    _preload(PRELOAD + tuple(job.get("preload", ())))
    if job.get("drop"):
        drop_privileges(*job["drop"])
    import numpy as np

    tree = os.path.join(work, "tree")
    sys.path.insert(0, tree)
    os.chdir(os.path.join(work, "home"))
    inputs = np.load(os.path.join(work, "inputs.npz"), allow_pickle=False)
    cases = [{} for _ in range(job["cases"])]
    for key in inputs.files:
        i, name = key.split(".", 1)
        cases[int(i.removeprefix("case"))][name] = inputs[key]
    result = {"tinymoe_file": None, "errors": {}}
    outputs = {}
    try:
        import importlib.util

        import tinymoe
        result["tinymoe_file"] = tinymoe.__file__
        # the probes by path: tinymoe.classroom's __init__ (the grader itself) is not needed
        spec = importlib.util.spec_from_file_location(
            "_tinymoe_probes", os.path.join(tree, "tinymoe", "classroom", "probes.py"))
        probes = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = probes
        spec.loader.exec_module(probes)
        probe = probes.PROBES[job["task"]]
        if probe.notebook:
            import_cell, exercise = _notebook_cells(tree, probe.notebook, job["task"])
    except BaseException as e:  # noqa: BLE001 - a broken import is the student's answer
        result["errors"]["import"] = {"type": type(e).__name__, "message": _short(e),
                                      "where": _short(traceback.format_exc(limit=-3), 1500)}
        cases = []
    for i, inp in enumerate(cases):
        where = None
        try:
            ns = {"__name__": "__main__"}
            if probe.notebook:
                where = _first_lines(import_cell)
                exec(compile(import_cell, "<lesson import cell>", "exec"), ns)
                if probe.setup is not None:
                    where = "(the grader's setup: the lesson's earlier cells)"
                    probe.setup(inp, ns)
                for source in exercise:
                    where = _first_lines(source)
                    exec(compile(_exercise_code(source, probe.mode), "<exercise cell>", "exec"),
                         ns)
                where = None
            out = probe.run(inp, ns)
            for name, value in out.items():
                arr = np.asarray(value)
                if arr.dtype.kind not in "biuf":
                    raise TypeError(f"output {name!r} has dtype {arr.dtype}, not a number")
                outputs[f"case{i}.{name}"] = arr
        except BaseException as e:  # noqa: BLE001 - reported to the parent as data
            result["errors"][str(i)] = {"type": type(e).__name__, "message": _short(e),
                                        "cell": where}
    size = sum(a.nbytes for a in outputs.values())
    os.makedirs(os.path.join(work, "out"), exist_ok=True)
    if size > job["max_bytes"]:
        result["errors"]["size"] = {"type": "OutputTooLarge",
                                    "message": f"{size} bytes of outputs", "cell": None}
        outputs = {}
    np.savez(os.path.join(work, "out", "outputs.npz"), **outputs)
    with open(os.path.join(work, "out", "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
