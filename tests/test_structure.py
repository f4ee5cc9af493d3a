"""The package's import structure, read from the source (ast): data flows one way, with no import
cycle between modules, and no module reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "jaxprune"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package is its
    ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Imports:
    """What one module imports (at any depth: function-level imports count) and which private
    names of other modules it uses."""

    def __init__(self, module: str, path: Path, modules: set[str]):
        self.module = module
        self.targets: set[str] = set()
        self.private: list[str] = []
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] != PACKAGE:
                        continue
                    self.targets.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(module, is_package, node)
                if src.split(".")[0] != PACKAGE:
                    continue
                for a in node.names:
                    full = f"{src}.{a.name}"
                    if full in modules:  # `from pkg import submodule`
                        self.targets.add(full)
                        aliases[a.asname or a.name] = full
                    else:
                        self.targets.add(src)
                        if _is_private(a.name):
                            self.private.append(f"from {src} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = _dotted(node.value)
                if owner is None:
                    continue
                head, *rest = owner.split(".")
                if head in aliases:
                    target = ".".join([aliases[head]] + rest)
                    if target in modules and target != module:
                        self.private.append(f"{target}.{node.attr}")
        self.targets.discard(module)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules loading it runs (an import of ``a.b.c`` also runs the packages
    ``a.b`` and ``a``, except the importer's own ancestors, which are loading already)."""
    files = module_files(root)
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for m, path in files.items():
        own = set(_ancestors(m))
        edges = set()
        for t in Imports(m, path, modules).targets:
            while t not in modules and "." in t:  # `from pkg.mod import name`: pkg.mod
                t = t.rsplit(".", 1)[0]
            edges.update(x for x in _ancestors(t) + [t] if x in modules and x not in own)
        edges.discard(m)
        graph[m] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed list of modules) per strongly connected component with more than
    one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A closed path through one module of a strongly connected component."""
    start = min(comp)
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


# ----------------------------------------------------------------------------- the checker itself

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / PACKAGE


def test_checker_finds_a_cycle_hidden_in_a_function_and_through_a_package(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from jaxprune.b import g\n",
        "b.py": "from jaxprune import a\n",
        "pkg/__init__.py": "from jaxprune.pkg.inner import h\n",
        "pkg/inner.py": "from jaxprune.c import k\n",
        "c.py": "from jaxprune.pkg.other import z\n",
        "pkg/other.py": "z = 1\n",
        "d.py": "from jaxprune.pkg.other import z\n",  # not in a cycle
    })
    g = import_graph(root)
    assert g["jaxprune.a"] == {"jaxprune.b"} and g["jaxprune.b"] == {"jaxprune.a"}
    assert g["jaxprune.pkg.inner"] == {"jaxprune.c"}  # its own package is loading already
    assert g["jaxprune.c"] == {"jaxprune.pkg", "jaxprune.pkg.other"}
    cycles = sorted(sorted(set(c)) for c in find_cycles(g))
    assert cycles == [["jaxprune.a", "jaxprune.b"],
                      ["jaxprune.c", "jaxprune.pkg", "jaxprune.pkg.inner"]]
    for c in find_cycles(g):
        assert c[0] == c[-1] and all(b in g[a] for a, b in zip(c, c[1:]))


def test_checker_finds_private_names_of_other_modules(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "_x = 1\n__all__ = []\n",
        "b.py": ("from jaxprune.a import _x, __all__\nfrom jaxprune import a as _a\n"
                 "import jaxprune.a\ny = _a._x + jaxprune.a._x + _a.__name__\n"),
        "c.py": "class C:\n    def f(self):\n        return self._x\n",
    })
    files = module_files(root)
    found = Imports("jaxprune.b", files["jaxprune.b"], set(files)).private
    assert sorted(found) == ["from jaxprune.a import _x", "jaxprune.a._x", "jaxprune.a._x"]
    assert Imports("jaxprune.c", files["jaxprune.c"], set(files)).private == []


# ----------------------------------------------------------------------------- the package

def test_no_import_cycle_between_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_uses_another_modules_private_names():
    files = module_files()
    bad = [f"{m}: {use}" for m, p in files.items() for use in Imports(m, p, set(files)).private]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_graph_never_imports_compaction():
    """Compaction builds on the traced graph and its rule registry, never the other way."""
    g = import_graph()
    for m in (m for m in g if m == "jaxprune.graph" or m.startswith("jaxprune.graph.")):
        assert not any(t.startswith("jaxprune.compaction") for t in g[m]), m


@pytest.mark.parametrize("package", ["jaxprune.graph", "jaxprune.compaction"])
def test_graph_and_compaction_import_jaxprune_at_module_level(package):
    """No import of jaxprune inside a function body (the way an import cycle hides)."""
    bad = []
    for m, path in module_files().items():
        if m != package and not m.startswith(package + "."):
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    bad += [f"{m}.{fn.name}: {n}" for n in names if n.split(".")[0] == PACKAGE]
    assert not bad, bad


def test_the_experiment_layer_is_thin():
    """experiment.py holds setup / run / finish; the CLI commands, the resume policy, the
    metrics log and the factories live in modules of their own."""
    lines = len((ROOT / "experiment.py").read_text().splitlines())
    assert lines < 500, f"experiment.py has {lines} lines"
    tree = ast.parse((ROOT / "experiment.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for moved in ("model_info", "evaluate_path", "sensitivity_run", "import_weights", "compact_run",
                  "restore_run", "check_resume", "load_trained", "make_method", "load_dataset"):
        assert moved not in defined, moved


def test_checkpoints_hold_training_checkpoints_only():
    """The compact-model file format is `jaxprune.artifact`; checkpoints.py never touches it."""
    tree = ast.parse((ROOT / "checkpoints.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"save_compact", "load", "verify_checksums", "CorruptArtifactError"}
    assert "jaxprune.artifact" not in import_graph()["jaxprune.checkpoints"]


def test_validate_imports_nothing_of_jaxprune():
    """Every module may use `jaxprune.validate` (the methods too) without an import cycle."""
    assert import_graph()["jaxprune.validate"] == set()
