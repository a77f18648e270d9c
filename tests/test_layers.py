"""The package's shape stays one a newcomer can find their way in: imports flow one way
(cli → bench/serve → kpi → roi/report → quantize → calibration → engine → engine.loading → models → quant
→ attention → kernels → checkpoints → builtin → config/util → errors), there is no module-level import cycle, and no
source file (Python or the C kernels) grows past ~400 lines.

Read from the source with `ast`, so the check costs nothing at run time and fails with the exact
import that broke the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "optcli"
MAX_LINES = 400

# Rooms and their rank: a module may import its own room or any room of lower rank. A room is the
# longest prefix listed here.
RANKS = {
    "optcli.cli": 90,
    "optcli.builtin.train_tiny_llama": 90,  # a development script (retrains the demo model), not a library layer
    "optcli.bench": 80,
    "optcli.serve": 80,
    "optcli.kpi": 75,  # the KPIs as live thresholds and Prometheus rules: serve and bench both read them
    "optcli.roi": 70,
    "optcli.report": 70,
    "optcli.quantize": 60,
    "optcli.calibration": 50,
    "optcli.engine": 40,
    "optcli.engine.loading": 38,
    "optcli.engine.models": 35,
    "optcli.engine.quant": 30,
    "optcli.engine.attention": 27,
    "optcli.engine.kernels": 25,
    "optcli.checkpoints": 20,
    "optcli.builtin": 10,
    "optcli.config": 2,
    "optcli.util": 2,
    "optcli.errors": 0,
    "optcli": 0,  # the root __init__: the version string
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _room(module: str) -> str:
    name = module
    while name not in RANKS:
        name = name.rsplit(".", 1)[0]
    return name


def _resolve(name: str) -> str:
    """The module a dotted name lands in (`optcli.engine.Engine` → `optcli.engine`)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported optcli module, line, at module level) for every import in `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if`/`try` blocks at module level run at import time too (not `if TYPE_CHECKING:`)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            top_level.discard(id(node))
        elif isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [_resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in MODULES else _resolve(base)
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "optcli":
                found.append((_resolve(target), node.lineno, id(node) in top_level))
    return [f for f in found if f[0] != module]


def test_imports_follow_the_layer_order():
    """An import that climbs from a lower room to a higher one, at module level or inside a function."""
    bad = []
    for module in sorted(MODULES):
        for target, line, _ in _imports(module):
            src, dst = _room(module), _room(target)
            if src != dst and RANKS[dst] >= RANKS[src]:
                bad.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} ({src} may not import {dst})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    graph = {m: sorted({t for t, _, top in _imports(m) if top}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("module-level import cycle: " + " -> ".join(cycle))


def test_no_module_over_the_size_limit():
    sources = [p for pattern in ("*.py", "*.c", "*.h") for p in PACKAGE.rglob(pattern)]
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sources
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_the_checker_sees_a_violation():
    """The rules above are not vacuous: a climbing import is found where one is planted."""
    assert _room("optcli.engine.kernels.cpu_lowbit") == "optcli.engine.kernels"
    assert _room("optcli.engine.engine") == "optcli.engine"
    assert RANKS[_room("optcli.engine.kernels.tuning")] < RANKS[_room("optcli.cli.app")]
    imports = _imports("optcli.cli")  # the cli package's __init__
    assert any(t == "optcli.cli.app" for t, _, top in imports if top)
