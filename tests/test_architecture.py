"""The package's import layers, as docs/architecture.md's layer table states them: no cycle, no upward import.

The table in the doc is the one source of truth: this test parses it, so the doc and the code cannot disagree. Every
import counts, wherever it sits (inside a function, under TYPE_CHECKING), and so do imports by name through
importlib: a loader that builds the module name at run time must be listed in LOADERS with the table of names it
loads (the test reads that table from the module's source), or with the reason it imports nothing of texbridge.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "texbridge"
DOC = ROOT / "docs" / "architecture.md"

# Modules that import by a name computed at run time: the module-level table of submodule names they load
# (importlib.import_module(f"{__name__}.{name}") for each key), or None and why no texbridge module is loaded.
LOADERS: dict[str, str | tuple[None, str]] = {
    "texbridge.backends": "BACKENDS",
    "texbridge.benchmarks": "BENCHMARKS",
    "texbridge.cli.bench": (None, "loads a folder of the user's own benchmarks ($TEXBRIDGE_BENCHMARKS), outside the "
                                  "package; the packaged ones go through texbridge.benchmarks.load"),
}

# -- the package's modules and their imports --------------------------------------------------------------------------
def package_modules(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every .py under src/texbridge, plus the C extensions (by their .c source)."""
    mods: dict[str, Path] = {}
    for path in sorted((src / PACKAGE).rglob("*")):
        if path.suffix not in (".py", ".c") or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def _is_package(mods: dict[str, Path], name: str) -> bool:
    return mods[name].name == "__init__.py"


def _resolve(mods: dict[str, Path], name: str) -> str | None:
    """The texbridge module that importing `name` names: the longest known prefix (`texbridge.x.Class` -> texbridge.x);
    None outside the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in mods:
            return candidate
        parts.pop()
    return None


def _relative_base(mods: dict[str, Path], module: str, level: int) -> str:
    base = module if _is_package(mods, module) else module.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return base


def _literal_names(tree: ast.Module, table: str) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == table for t in targets) and node.value is not None:
            value = ast.literal_eval(node.value)
            return list(value.keys() if isinstance(value, dict) else value)
    raise AssertionError(f"loader table {table} is not a literal assigned at module level")


def _is_import_module_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def imports(mods: dict[str, Path], module: str) -> Iterator[Edge]:
    """Every edge from `module` to another texbridge module (see the module docstring for what counts)."""
    path = mods[module]
    if path.suffix != ".py":
        return
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _relative_base(mods, module, node.level) if node.level else ""
            pkg = ".".join(p for p in (base, node.module or "") if p)
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
        elif _is_import_module_call(node):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):
                    package = next((k.value for k in node.keywords if k.arg == "package"), None)
                    if package is None and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                        package = node.args[1].value
                    if not isinstance(package, str):
                        raise AssertionError(f"{module} line {node.lineno}: relative import_module without a "
                                             "constant package")
                    level = len(name) - len(name.lstrip("."))
                    name = ".".join(p for p in (package.rsplit(".", level - 1)[0], name[level:]) if p)
                targets = [name]
            else:
                loader = LOADERS.get(module)
                if loader is None:
                    raise AssertionError(
                        f"{module} line {node.lineno} imports a module whose name is computed at run time: list "
                        "its loader table in tests/test_architecture.py's LOADERS so the layer check sees it")
                if isinstance(loader, str):
                    targets = [f"{module}.{name}" for name in _literal_names(tree, loader)]
        for target in targets:
            resolved = _resolve(mods, target)
            if resolved is not None and resolved != module:
                yield Edge(module, resolved, node.lineno)


def import_graph(mods: dict[str, Path]) -> dict[str, list[Edge]]:
    return {m: list(imports(mods, m)) for m in mods}


# -- the layer table ---------------------------------------------------------------------------------------------------
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|(.*)\|[^|]*\|\s*$")
_ENTRY = re.compile(r"`([\w/.]+?(?:\.py|\.c|/))`")


def layer_table(doc: str) -> list[tuple[int, str, list[str]]]:
    """[(rank, layer name, entries)] from the `## Layers` section: module entries are the backticked names ending
    in .py, .c or / (a package and everything in it), relative to src/texbridge; a package's entries that follow
    `pkg/:` are relative to it."""
    section = doc.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        entries: list[str] = []
        prefix = ""
        for e in _ENTRY.finditer(m.group(3)):
            name = e.group(1)
            after = m.group(3)[e.end():e.end() + 1]
            if name.endswith("/") and after == ":":
                prefix = name  # `backends/`: `memfd.py`, ... name files inside it
                entries.append(name)
            elif prefix and "/" not in name:
                entries.append(prefix + name)
            else:
                entries.append(name)
        rows.append((int(m.group(1)), m.group(2).strip(), entries))
    return rows


def _entry_module(entry: str) -> tuple[str, bool]:
    """(module name, covers submodules) for a table entry."""
    path = entry.rstrip("/")
    for suffix in (".py", ".c"):
        path = path.removesuffix(suffix)
    parts = [PACKAGE] + [p for p in path.split("/") if p]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts), entry.endswith("/")


def layers_of(mods: dict[str, Path], table: list[tuple[int, str, list[str]]]) -> tuple[dict[str, tuple[int, str]],
                                                                                        list[str]]:
    """Module -> (rank, layer) by the most specific entry covering it, and the entries that name no module."""
    covers: list[tuple[str, bool, int, str]] = []
    stale = []
    for rank, layer, entries in table:
        for entry in entries:
            name, tree = _entry_module(entry)
            if not any(m == name or (tree and m.startswith(name + ".")) for m in mods):
                stale.append(f"`{entry}` (layer {rank} {layer})")
            covers.append((name, tree, rank, layer))
    found = {}
    for m in mods:
        best = None
        for name, tree, rank, layer in covers:
            if m == name or (tree and m.startswith(name + ".")):
                if best is None or len(name) > len(best[0]):
                    best = (name, rank, layer)
        if best is not None:
            found[m] = best[1:]
    return found, stale


def find_cycle(graph: dict[str, list[Edge]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for e in graph.get(m, ()):
            if state.get(e.target) == 1:
                return stack[stack.index(e.target):] + [e.target]
            if e.target not in state:
                found = visit(e.target)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, list[Edge]], layers: dict[str, tuple[int, str]]) -> list[str]:
    out = []
    for edges in graph.values():
        for e in edges:
            (src_rank, src_layer), (dst_rank, dst_layer) = layers[e.source], layers[e.target]
            if dst_rank > src_rank:
                out.append(f"{e}: layer {src_rank} ({src_layer}) imports layer {dst_rank} ({dst_layer})")
    return out


# -- the checks --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mods() -> dict[str, Path]:
    return package_modules()


@pytest.fixture(scope="module")
def graph(mods) -> dict[str, list[Edge]]:
    return import_graph(mods)


@pytest.fixture(scope="module")
def table():
    return layer_table(DOC.read_text())


def test_every_module_is_in_exactly_one_layer_of_the_doc_table(mods, table):
    assert [r for r, _, _ in table] == list(range(1, len(table) + 1)), "layers are numbered 1, 2, ... lowest first"
    layers, stale = layers_of(mods, table)
    missing = sorted(set(mods) - set(layers))
    assert not missing, f"modules in no layer of docs/architecture.md's table (add each to its layer's row): {missing}"
    assert not stale, f"docs/architecture.md's layer table names modules that do not exist: {stale}"


def test_loaders_name_existing_modules(mods):
    stale = [m for m in LOADERS if m not in mods]
    assert not stale, f"tests/test_architecture.py names modules that do not exist: {stale}"


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_from_a_higher_layer(mods, graph, table):
    layers, _ = layers_of(mods, table)
    bad = layer_violations(graph, {m: layers.get(m, (0, "?")) for m in mods})
    assert not bad, "upward imports (see docs/architecture.md's layer table):\n" + "\n".join(bad)


def test_the_walk_sees_function_level_type_checking_and_loader_imports(graph):
    """The edges that a top-level-only walk would miss are seen (so the checks above are not vacuous)."""
    targets = {(e.source, e.target) for edges in graph.values() for e in edges}
    assert ("texbridge.backends", "texbridge.backends.vulkan") in targets  # through the loader's name table
    assert ("texbridge._resources", "texbridge.keyed_mutex") in targets  # under TYPE_CHECKING
    assert ("texbridge._client", "texbridge.keyed_mutex") in targets  # inside a function


# -- the checker itself catches what it must (a package written to tmp_path) -------------------------------------------
def _fake(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules(tmp_path)


_FAKE_DOC = """# x
## Layers
| # | layer | modules | IO? |
|---|---|---|---|
| 1 | low | `low.py`, `pkg/`: `a.py` | — |
| 2 | high | `high.py`, `__init__.py` | — |
## Next
"""


def test_the_checker_reports_a_cycle_made_by_a_function_level_import(tmp_path):
    mods = _fake(tmp_path, {"__init__.py": "", "low.py": "def f():\n    from . import high\n",
                            "high.py": "from .low import f\n", "pkg/__init__.py": "", "pkg/a.py": ""})
    assert find_cycle(import_graph(mods)) in (["texbridge.high", "texbridge.low", "texbridge.high"],
                                              ["texbridge.low", "texbridge.high", "texbridge.low"])


def test_the_checker_reports_an_upward_type_only_import(tmp_path):
    mods = _fake(tmp_path, {"__init__.py": "", "high.py": "", "pkg/__init__.py": "",
                            "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import X\n",
                            "pkg/a.py": "import importlib\nm = importlib.import_module('..high', 'texbridge.pkg')\n"})
    layers, stale = layers_of(mods, layer_table(_FAKE_DOC))
    assert not stale and set(layers) == set(mods)
    bad = layer_violations(import_graph(mods), layers)
    assert [b.split(":")[0] for b in bad] == ["texbridge.low -> texbridge.high (line 3)",
                                              "texbridge.pkg.a -> texbridge.high (line 2)"]


def test_the_checker_reports_a_module_missing_from_the_table_and_a_stale_entry(tmp_path):
    mods = _fake(tmp_path, {"__init__.py": "", "low.py": "", "high.py": "", "new.py": "", "pkg/__init__.py": ""})
    layers, stale = layers_of(mods, layer_table(_FAKE_DOC))
    assert sorted(set(mods) - set(layers)) == ["texbridge.new"]
    assert stale == ["`pkg/a.py` (layer 1 low)"]
