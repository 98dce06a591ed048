"""The shape of the package: who imports whom.

:func:`import_graph` reads every ``.py`` file of a package with :mod:`ast` (nothing is
imported or run) and returns, for each module, the modules of the same package it imports;
:func:`find_cycle` finds an import cycle in such a graph. The tests below hold the engine to
its layering: ``tensor <- autograd <- ops <- ops.methods``, no cycle, and each op written
once (the Tensor's methods are the functions of ``tinymoe.ops``); and the whole package to
its shape: no cycle anywhere, ``tinymoe/moe`` at most 5 floors deep with no paper's file
importing a later paper's, one MoE layer and one routing type, and the library never
importing the apps (``tinymoe.app``) or the classroom tools.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import tinymoe
from tinymoe import ops
from tinymoe.ops.methods import METHODS
from tinymoe.tensor import Tensor

PACKAGE = Path(tinymoe.__file__).resolve().parent

# The autograd engine: every other part of the library is built on these modules.
ENGINE = ("tinymoe.tensor", "tinymoe.autograd", "tinymoe.ops", "tinymoe.functional",
          "tinymoe.gradcheck", "tinymoe.losses")


# --- the import graph ------------------------------------------------------------------------
def _module_name(path: Path, package_dir: Path) -> str:
    """``tinymoe/ops/shape.py`` -> ``tinymoe.ops.shape``; ``tinymoe/ops/__init__.py`` ->
    ``tinymoe.ops``."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth (module level, inside functions and classes),
    except in the body of ``if TYPE_CHECKING:``, which never runs (its ``else:`` does)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from X import ...``, resolving ``from . import`` and
    ``from ..a import`` against ``module`` (relative imports count from its package)."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph(package_dir: str | Path) -> dict[str, set[str]]:
    """``{module: the modules of the same package it imports}`` for every ``.py`` file under
    ``package_dir`` (a package directory such as ``tinymoe/``), found by parsing, not running.

    Counted: ``import a.b`` and ``from a.b import c`` anywhere in a file, at module level or
    inside a function (a lazy import still ties the two modules together). ``from a import
    b`` is an import of the module ``a.b`` when ``a/b.py`` (or ``a/b/__init__.py``) exists,
    else of ``a``. Not counted: imports under ``if TYPE_CHECKING:``, imports from outside
    the package, a module importing itself, dynamic imports (``importlib.import_module``),
    and the parent packages that Python runs before a submodule (``import a.b`` runs
    ``a/__init__.py`` too, but counting that would put every package in a cycle with its
    own ``__init__``).
    """
    package_dir = Path(package_dir).resolve()
    files = {_module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}

    def known(name: str) -> str | None:
        """``name`` if it is a module of the package, else its longest known prefix."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in _import_statements(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = _from_base(node, module, path.name == "__init__.py")
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                         for alias in node.names]
            targets.update(t for t in map(known, names) if t is not None and t != module)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]`` (a imports b imports ... imports a), or
    None if there is none.

    Depth-first search that keeps the current path: reaching a module that is on the path
    closes a cycle. Iterative (no recursion limit) and in sorted order, so the answer is
    the same on every run.
    """
    ON_PATH, DONE = 1, 2
    state: dict[str, int] = {}
    for start in sorted(graph):
        if start in state:
            continue
        path, state[start] = [start], ON_PATH
        todo = [iter(sorted(graph[start]))]  # the modules still to visit from each on the path
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:  # everything below path[-1] visited: no cycle through it
                state[path.pop()] = DONE
                todo.pop()
            elif state.get(nxt) == ON_PATH:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                path.append(nxt)
                state[nxt] = ON_PATH
                todo.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _in_engine(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in ENGINE)


# --- the engine --------------------------------------------------------------------------------
def test_engine_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    engine = {m: {t for t in targets if _in_engine(t)}
              for m, targets in graph.items() if _in_engine(m)}
    assert {"tinymoe.tensor", "tinymoe.autograd", "tinymoe.ops.elementwise",
            "tinymoe.ops.methods"} <= set(engine)
    cycle = find_cycle(engine)
    assert cycle is None, f"import cycle in the engine: {' -> '.join(cycle)}"


def test_engine_layers_run_one_way():
    """tensor.py imports no other engine module; autograd.py imports only tensor.py; the op
    files never import the package that collects them (``tinymoe.ops``), only ops.methods
    does."""
    graph = import_graph(PACKAGE)
    engine = lambda m: {t for t in graph[m] if _in_engine(t)}  # noqa: E731
    assert engine("tinymoe.tensor") == set()
    assert engine("tinymoe.autograd") == {"tinymoe.tensor"}
    op_files = [m for m in graph if m.startswith("tinymoe.ops.") and m != "tinymoe.ops.methods"]
    assert len(op_files) >= 8
    for m in op_files:
        assert "tinymoe.ops" not in graph[m] and "tinymoe.ops.methods" not in graph[m], m


def test_tensor_methods_are_the_ops_functions():
    """Each op is written once: ``x.exp()`` runs ``ops.exp`` itself, not a copy of it."""
    for name, method in METHODS.items():
        assert Tensor.__dict__[name] is method, name
    for name in ("exp", "log", "sum", "mean", "max", "var", "softmax", "clip", "squeeze"):
        assert getattr(Tensor, name) is getattr(ops, name), name
    for op, fn in (("__add__", ops.add), ("__mul__", ops.mul), ("__matmul__", ops.matmul),
                   ("__getitem__", ops.getitem), ("__neg__", ops.neg), ("__pow__", ops.pow)):
        assert getattr(Tensor, op) is fn, op


# --- the checker itself --------------------------------------------------------------------------
def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    diamond = {"top": {"left", "right"}, "left": {"bottom"}, "right": {"bottom"}, "bottom": set()}
    assert find_cycle(diamond) is None
    assert find_cycle({"a": {"outside"}}) is None  # a target that is not a key is a dead end
    assert find_cycle({}) is None


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_import_graph_reads_every_kind_of_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "import numpy as np\nfrom pkg import a\n",
        "pkg/a.py": ("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from pkg import b  # not counted\n"
                     "else:\n    from pkg.sub import c\n"),
        "pkg/b.py": "def f():\n    from pkg.a import thing  # counted: lazy, but an import\n",
        "pkg/sub/__init__.py": "from . import c\nfrom .c import name\nfrom ..a import x\n",
        "pkg/sub/c.py": "from .. import b\nimport pkg.sub.c as me  # itself: not counted\n",
    })
    graph = import_graph(tmp_path / "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.c"}, "pkg.b": {"pkg.a"},
                     "pkg.sub": {"pkg.sub.c", "pkg.a"}, "pkg.sub.c": {"pkg.b"}}
    # the function-level import in b closes a cycle, and the checker finds it
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"]
    graph["pkg.b"] = set()  # without the lazy import: no cycle
    assert find_cycle(graph) is None


# --- the whole package ---------------------------------------------------------------------
# Each paper's file in tinymoe/moe, with its year: no file may import a later paper's file.
PAPER_YEARS = {
    "tinymoe.moe.mixture": 1991, "tinymoe.moe.hme": 1994, "tinymoe.moe.deep_moe": 2013,
    "tinymoe.moe.conditional": 2015, "tinymoe.moe.noisy_topk": 2017,
    "tinymoe.moe.balance": 2017, "tinymoe.moe.hierarchical": 2017, "tinymoe.moe.gshard": 2020,
    "tinymoe.moe.switch": 2021, "tinymoe.moe.expert_choice": 2022,
    "tinymoe.moe.topk_router": 2024, "tinymoe.moe.aux_free": 2024,
}
# The shared pieces, named for what they are (no paper's year).
SHARED = {"tinymoe.moe.layer", "tinymoe.moe.experts", "tinymoe.moe.capacity",
          "tinymoe.moe.router_weight", "tinymoe.moe.precision", "tinymoe.moe.aux_losses",
          "tinymoe.moe.swiglu", "tinymoe.moe.ffn_kernels"}


def package_graph():
    return import_graph(PACKAGE)


def floors(graph, members):
    """The longest chain of imports among ``members``, counted in files (1: imports none)."""
    memo = {}

    def depth(m):
        if m not in memo:
            memo[m] = 1 + max((depth(n) for n in graph[m] if n in members), default=0)
        return memo[m]
    return {m: depth(m) for m in members}


def test_the_whole_package_has_no_import_cycle():
    assert find_cycle(package_graph()) is None


def test_moe_stands_on_at_most_five_floors():
    graph = package_graph()
    moe = {m for m in graph if m.startswith("tinymoe.moe.")}
    depth = floors(graph, moe)
    assert max(depth.values()) <= 5, sorted(depth.items(), key=lambda kv: -kv[1])


def test_every_moe_file_is_a_paper_or_a_shared_piece():
    graph = package_graph()
    moe = {m for m in graph if m.startswith("tinymoe.moe.")}
    assert moe == set(PAPER_YEARS) | SHARED, moe ^ (set(PAPER_YEARS) | SHARED)


def test_no_paper_imports_a_later_paper_and_shared_pieces_import_no_paper():
    graph = package_graph()
    for m, year in PAPER_YEARS.items():
        later = {n for n in graph[m] if PAPER_YEARS.get(n, 0) > year}
        assert not later, f"{m} ({year}) imports the later {sorted(later)}"
    for m in SHARED:
        papers = graph[m] & set(PAPER_YEARS)
        assert not papers, f"the shared piece {m} imports the papers {sorted(papers)}"


def test_the_library_never_imports_the_apps_or_the_classroom():
    graph = package_graph()
    apps = ("tinymoe.app", "tinymoe.classroom")
    for m, deps in graph.items():
        if m.startswith(apps) or m == "tinymoe.__main__":
            continue
        bad = {n for n in deps if n.startswith(apps)}
        assert not bad, f"library module {m} imports {sorted(bad)}"


def test_one_mixture_layer_class_and_one_routing_type():
    import tinymoe as tm
    from tinymoe.nn.module import Module

    layers = [n for n, o in vars(tm.moe).items() if isinstance(o, type)
              and issubclass(o, Module) and n.endswith("Layer")]
    assert layers == ["MoELayer"]
    for gone in ("GateOutput", "CapacityRouting", "RouterOutput", "CapacityMoELayer",
                 "RoutedMoELayer", "SwitchGate"):
        assert not hasattr(tm.moe, gone)
    assert tm.moe.Routing is tm.dispatch.Routing


def test_the_negative_checks_catch_a_later_import_and_too_many_floors():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"e"}, "e": {"f"}, "f": set()}
    assert max(floors(graph, set(graph)).values()) == 6
