"""The layers hold: read from the source with ast, nothing imported.

Bottom to top (a module may import its own group and groups of a lower rank only):
  0 core     errors, volume, segments, geometry, prompts, results, imaging_guess, vocabulary,
           modality_guard, decisions, run_report (what a request means, before any model)
  1 io       io/, preview                 (files)
  1 runtime  runtime/                     (device, memory, weights, slice-wise, sliding windows, clean-up)
  2 models   models/                      (the contract and one folder per model)
  3 engine   catalog, engine/
  4 worker   worker/
  4 bridge   slicer_bridge/               (the only engine package that touches MRML)
  5 remote   remote/                      (the worker behind HTTP, and its client)
  6 panel    panel/, panel_logic
  6 batch    batch/                       (cohorts: a warm worker or Ray tasks, the summary)
  7 cli      cli
and, on top, BiomedSeg.py (the Slicer module) with BiomedSegLib/ (its Slicer-side helpers). Also checked: no import cycle between files;
slicer, qt, vtk, ctk and PySide only in slicer_bridge and BiomedSeg.py; torch at module level
only under models/; no torch import at all in what the Slicer process imports (core, io, the
catalogue, the bridge, the panel, the worker client and protocol); and every file, and
BiomedSeg.py, under 600 lines.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "BiomedSeg"
PACKAGE_DIR = MODULE_DIR / "biomedseg"
MAX_LINES = 600

#: group -> (rank, module prefixes under biomedseg)
LAYERS = {
    "core": (0, ["__init__", "errors", "volume", "segments", "geometry", "prompts", "results", "imaging_guess",
                 "resources", "vocabulary", "modality_guard", "decisions", "run_report"]),
    "io": (1, ["io", "preview"]),
    "runtime": (1, ["runtime"]),
    "models": (2, ["models"]),
    "engine": (3, ["catalog", "engine"]),
    "worker": (4, ["worker"]),
    "bridge": (4, ["slicer_bridge"]),
    "remote": (5, ["remote"]),
    "panel": (6, ["panel", "panel_logic"]),
    "batch": (6, ["batch"]),
    "cli": (7, ["cli"]),
}
SLICER_LIBRARIES = {"slicer", "qt", "vtk", "vtkmodules", "ctk", "PySide2", "PySide6", "PythonQt", "mrml"}
#: what the Slicer process imports: none of it may import torch, not even lazily
SLICER_SIDE_GROUPS = {"core", "io", "bridge", "panel"}
SLICER_SIDE_MODULES = {"biomedseg.catalog", "biomedseg.worker.client", "biomedseg.worker.protocol",
                       "biomedseg.remote.client", "biomedseg.remote.arrays", "biomedseg.remote.schema",
                       "biomedseg.remote.tokens",
                       "biomedseg.worker", "biomedseg.runtime.weights", "biomedseg.runtime"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (dotted, absolute)
    line: int
    top_level: bool


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, package_dir): p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts}


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    base = module.split(".") if is_package(path) else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes that run when the module is imported (not inside a def or class body)."""
    top = set()

    def visit(node, inside_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not inside_function:
                top.add(id(child))
            visit(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top


def imports_of(path: Path, module: str, modules: dict) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    top = _top_level_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, alias.name, node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(module, sub if sub in modules else base, node.lineno, id(node) in top))
    return out


def scan(package_dir: Path = PACKAGE_DIR) -> tuple[dict, dict]:
    """(module -> path, module -> imports) of a package tree."""
    modules = package_modules(package_dir)
    return modules, {m: imports_of(p, m, modules) for m, p in modules.items()}


MODULES, ALL_IMPORTS = scan()


def group_of(module: str) -> str | None:
    if not module.startswith("biomedseg"):
        return None
    rest = module.split(".")[1:] or ["__init__"]
    for group, (_, prefixes) in LAYERS.items():
        if rest[0] in prefixes:
            return group
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def internal(target: str, modules: dict = MODULES) -> str | None:
    """The package module an import resolves to (walking up to an existing module), or None."""
    if target != "biomedseg" and not target.startswith("biomedseg."):
        return None
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def upward_imports(modules: dict, imports: dict) -> list[str]:
    wrong = []
    for module, found in imports.items():
        mine = group_of(module)
        rank = LAYERS[mine][0]
        for imp in found:
            target = internal(imp.target, modules)
            if target is None:
                continue
            theirs = group_of(target)
            if theirs != mine and LAYERS[theirs][0] >= rank:
                wrong.append(f"{module}:{imp.line} ({mine}) imports {target} ({theirs})")
    return wrong


def import_cycles(modules: dict, imports: dict) -> list[list[str]]:
    graph = {m: sorted({internal(i.target, modules) for i in imps} - {None, m}) for m, imps in imports.items()}
    # a package's __init__ re-exporting its submodules is how Python packages work, not a cycle of files
    for module in list(graph):
        graph[module] = [t for t in graph[module] if not (module.startswith(t + ".") and is_package(modules[t]))]
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def module_level_torch(imports: dict) -> list[str]:
    return [f"{m}:{i.line}" for m, imps in imports.items() for i in imps
            if i.top_level and i.target.split(".")[0] == "torch" and group_of(m) != "models"]


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        assert group_of(module) in LAYERS


def test_no_import_goes_up_a_layer_or_across_to_a_peer():
    assert upward_imports(MODULES, ALL_IMPORTS) == []


def test_no_import_cycle_between_files():
    cycles = import_cycles(MODULES, ALL_IMPORTS)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_slicer_and_qt_only_in_the_bridge_and_the_module_file():
    wrong = [f"{m}:{i.line} imports {i.target}" for m, imps in ALL_IMPORTS.items() for i in imps
             if i.target.split(".")[0] in SLICER_LIBRARIES and group_of(m) != "bridge"]
    assert wrong == []


def test_torch_at_module_level_only_in_model_code():
    assert module_level_torch(ALL_IMPORTS) == []


def _slicer_side(module: str) -> bool:
    return group_of(module) in SLICER_SIDE_GROUPS or module in SLICER_SIDE_MODULES


def test_the_slicer_side_never_imports_torch_or_model_code():
    wrong = [f"{m}:{i.line} imports {i.target}" for m, imps in ALL_IMPORTS.items() if _slicer_side(m)
             for i in imps if i.target.split(".")[0] == "torch"]
    assert wrong == []
    # what the module file pulls in when Slicer starts: the closure of module-level imports
    tree = ast.parse((MODULE_DIR / "BiomedSeg.py").read_text())
    start = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("biomedseg"):
            for alias in node.names:
                start.add(internal(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            start |= {internal(a.name) for a in node.names}
    seen, todo = set(), [m for m in start if m]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts)) if ".".join(parts[:n]) in MODULES]
        todo += [t for i in ALL_IMPORTS[module] if i.top_level and (t := internal(i.target))]
    assert seen, "BiomedSeg.py imports nothing of the engine?"
    loaded_at_start = sorted(m for m in seen if not _slicer_side(m))
    assert loaded_at_start == []
    torch_at_start = [f"{m}:{i.line}" for m in seen for i in ALL_IMPORTS[m]
                      if i.top_level and i.target.split(".")[0] == "torch"]
    assert torch_at_start == []


@pytest.mark.parametrize("path", sorted([*PACKAGE_DIR.rglob("*.py"), MODULE_DIR / "BiomedSeg.py",
                                         *(MODULE_DIR / "BiomedSegLib").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_no_file_is_over_600_lines(path):
    if "__pycache__" in path.parts:
        return
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.name}: {n} lines (split it: a file this long does two jobs)"


def test_the_checker_catches_what_it_is_for(tmp_path):
    """The rules have teeth: on a small package with planted faults, each check finds its fault."""
    root = tmp_path / "biomedseg"
    files = {"__init__.py": "", "volume.py": "from .engine import segment\n",  # core importing the engine
             "engine/__init__.py": "from .running import segment\n",
             "engine/running.py": "from ..volume import Volume\n\ndef segment():\n    import torch\n",
             "io/__init__.py": "", "io/a.py": "from .b import x\n", "io/b.py": "def f():\n    from . import a\n",
             "geometry.py": "import torch\n", "models/__init__.py": "", "models/net.py": "import torch\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules, imports = scan(root)
    assert upward_imports(modules, imports) == ["biomedseg.volume:1 (core) imports biomedseg.engine (engine)"]
    cycles = import_cycles(modules, imports)
    assert ["biomedseg.io.a", "biomedseg.io.b", "biomedseg.io.a"] in cycles  # a lazy import closes it too
    assert any("biomedseg.volume" in c and "biomedseg.engine.running" in c for c in cycles)
    assert module_level_torch(imports) == ["biomedseg.geometry:1"]  # not models/net.py, not a lazy import
