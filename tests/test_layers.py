"""The layers of livehist/ hold: the engine imports no Tango, Sardana or Qt, nothing imports
upward, and no module-level import circle exists (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import livehist

ROOT = Path(livehist.__file__).parent
# layer -> the livehist layers it may import (besides itself and the small top-level modules)
ALLOWED = {
    "engine": set(),
    "components": {"engine", "recorders"},
    "recorders": {"engine", "components"},
    "devices": {"engine", "components", "recorders"},
    "macros": {"engine", "components", "recorders", "site"},
    "views": {"engine", "components", "recorders", "site"},
    "site": {"engine", "components", "recorders", "tangodb", "views"},
    "tangodb": {"site", "devices", "macros", "recorders"},  # config resolves their folders
    "bench": {"engine", "components", "recorders", "site", "views", "tangodb"},
}
TOP = {"livehist", "livehist.errors", "livehist.spec", "livehist.sources", "livehist.cli"}


def _modules() -> dict[str, Path]:
    """Every livehist module -> its file (the design card maps devices/ recorders/ ... in)."""
    import livehist.devices
    import livehist.macros
    import livehist.recorders
    import livehist.tangodb

    roots = {"livehist": ROOT}
    for pkg in (livehist.devices, livehist.macros, livehist.recorders, livehist.tangodb):
        roots[pkg.__name__] = Path(pkg.__file__).parent
    out = {}
    for name, root in roots.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mod = ".".join([name, *parts])
            if name == "livehist" and parts and parts[0] in {"devices", "macros", "recorders", "tangodb"}:
                continue
            out[mod] = f
    return out


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = (
                    module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                )
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_no_layer_imports_upward():
    modules = _modules()
    wrong = []
    for mod, path in modules.items():
        layer = _layer(mod)
        if layer is None:
            continue
        for imp in _imports(path, mod, top_level_only=False):
            if not imp.startswith("livehist.") or imp in TOP:
                continue
            target = _layer(imp)
            if target and target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{mod} imports {imp}")
    assert not wrong, "\n".join(wrong)


def test_engine_imports_no_tango_sardana_or_qt():
    code = (
        "import sys, importlib, pkgutil, livehist.engine as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'livehist.engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tango', 'PyTango', 'sardana', 'taurus', 'PyQt5', 'PyQt6', 'PySide6', 'qtpy'})\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the engine pulled in: {out.stdout}"


def test_no_module_level_import_circle():
    modules = _modules()
    graph = {m: {i for i in _imports(p, m, top_level_only=True) if i in modules} for m, p in modules.items()}
    # a package imports its own submodules in __init__ on purpose; those edges are not circles
    for m in graph:
        graph[m] = {i for i in graph[m] if not (i.startswith(m + ".") or m.startswith(i + "."))}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_top_of_livehist_stays_small():
    top = [p.name for p in ROOT.iterdir() if p.suffix == ".py"]
    assert len(top) <= 8, top
