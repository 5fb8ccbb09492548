"""The packages' modules import one another one way only: no import cycle, counting imports inside functions.

A lazy import inside a function hides a cycle from Python (the import runs after both
modules are loaded) but not from a reader: the two modules still need each other. So
the graph is built from every ``import`` / ``from ... import`` at any depth of each
module's syntax tree, relative imports resolved, and must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "glue_eval")


def module_names(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` (a package is its ``__init__``)."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its file.

    ``from P import x`` counts as importing ``P.x`` when that is a module, else ``P``.
    The parent packages that Python runs first when a submodule is imported are not
    counted: a package's ``__init__`` re-exporting its submodules is not a cycle.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:  # `import a.b.c` of a name in a.b
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_names(root, packages)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# --- the checker itself, on a small package written here -------------------------------------------

def test_the_checker_sees_lazy_relative_and_nested_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import thing\n",
        "a.py": "def f():\n    from .sub import c\n    return c\n",  # lazy, inside a function
        "b.py": "import pkg.a\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import b\nfrom ..a import f\n",  # two levels up, and a name in a module
        "d.py": "import os\nfrom pkg import thing\n",  # a name of the package: the package's __init__
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.c"}, "pkg.b": {"pkg.a"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.b", "pkg.a"}, "pkg.d": {"pkg"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("import json\nfrom ..sub import __name__ as n\n")  # the cycle broken
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


# --- the real packages ---------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["distill", "glue_eval"])
def test_no_import_cycle_in_the_package(package):
    graph = import_graph()
    assert any(name.startswith("distill.train.precision.") for name in graph)  # the package's subpackages are walked
    found = [c for c in cycles(graph) if any(m == package or m.startswith(package + ".") for m in c)]
    assert found == [], f"import cycles in {package}: {found}"


def test_distill_never_imports_glue_eval():
    graph = import_graph()
    reached = {(m, t) for m, targets in graph.items() if m.startswith("distill") for t in targets}
    assert not [pair for pair in reached if pair[1].startswith("glue_eval")]


# The floors of distill, bottom up: a sub-package imports its own modules and the floors below it, never one
# beside it or above. data and models share a floor: neither needs the other (a model is built in run setup
# and passed down; a batch is plain tensors).
FLOORS = {"distill.common": 0, "distill.data": 1, "distill.models": 1, "distill.export": 2, "distill.objective": 2,
          "distill.settings": 3, "distill.train": 4, "distill.cli": 5, "distill": 5, "glue_eval": 6}


def floor_of(module: str) -> tuple[str, int]:
    """The sub-package (the room) a module sits in, and its floor."""
    for room in sorted(FLOORS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room, FLOORS[room]
    raise AssertionError(f"{module} is in no room of FLOORS: add its sub-package there")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for module, targets in graph.items():
        room, floor = floor_of(module)
        for target in targets:
            if target == "distill":  # the package's __init__ (``__version__``) is everyone's
                continue
            other, other_floor = floor_of(target)
            if other != room and other_floor >= floor:
                out.append((module, target))
    return sorted(out)


def test_the_floor_checker_sees_sideways_and_upward_imports():
    graph = {"distill.data.corpus": {"distill.models.loading"}, "distill.models.card": {"distill.objective.terms"},
             "distill.objective.plan": {"distill.models.loading", "distill.objective.losses"},
             "distill.train.loop": {"distill.train.batches", "distill"}}
    assert upward_imports(graph) == [("distill.data.corpus", "distill.models.loading"),
                                     ("distill.models.card", "distill.objective.terms")]


def test_sub_packages_import_only_downward():
    graph = import_graph()
    assert {floor_of(m)[0] for m in graph} >= set(FLOORS) - {"distill.cli"} - {"distill"}  # every room is walked
    assert upward_imports(graph) == []


# glue-eval is a pipeline: cli -> grid -> finetune (one cell) -> the stages (encode, model, trainer or
# distillation, evaluate) -> what they share (arguments, tasks, data, metrics, record). A stage never calls
# back into the module that runs it.
PIPELINE_TOP = ("glue_eval.cli", "glue_eval.grid", "glue_eval.finetune")


def test_glue_eval_stages_never_call_back_into_the_pipeline():
    graph = import_graph()
    stages = [m for m in graph if m.startswith("glue_eval.") and m not in PIPELINE_TOP]
    assert {"glue_eval.encode", "glue_eval.model", "glue_eval.evaluate", "glue_eval.distillation"} <= set(stages)
    back = sorted((m, t) for m in stages for t in graph[m] if t in PIPELINE_TOP)
    assert back == []
    assert "glue_eval.grid" not in graph["glue_eval.finetune"] and "glue_eval.cli" not in graph["glue_eval.grid"]
