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
from helpers import find_cycle

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
    "optcli.vllm": 75,  # the vLLM hand-off: used by bench (profile --engine vllm) and serve (--engine vllm)
    "optcli.roi": 70,
    "optcli.report": 70,
    "optcli.schema": 65,  # report.json as types: written by bench, read by report, roi and compare
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
    """(imported optcli module, line, at module level) for every import in `module`. "Module level" counts
    an import under `if TYPE_CHECKING:` too: it runs only for a type checker, but a type checker (and a
    reader) follows it like any other, so a circle through one is still a circle."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if`/`try` blocks at module level run at import time (or type-check time) too
        if isinstance(node, (ast.If, ast.Try)):
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
    """Imports at module level, `if TYPE_CHECKING:` ones included, form no circle."""
    graph = {m: sorted({t for t, _, top in _imports(m) if top}) for m in MODULES}
    if cycle := find_cycle(graph):
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


def test_the_cycle_finder_sees_a_circle():
    """The cycle check is not vacuous: a planted circle is found, a chain is not, and an import under
    `if TYPE_CHECKING:` counts as a module-level edge."""
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    typed = [t for t, _, top in _imports("optcli.engine.models.rotary") if top]  # ModelConfig, for annotations
    assert typed == ["optcli.engine.models.config"]


def test_tests_share_helpers_not_each_other():
    """Test modules take shared helpers from `tests/helpers.py`: none imports `conftest` (pytest's, loaded
    by pytest alone) or another test module (which would run its module-level setup a second time)."""
    bad = []
    for path in sorted(PACKAGE.parent.joinpath("tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                last = name.split(".")[-1]
                if name.split(".")[0] in ("conftest", "tests") or last.startswith("test_"):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert not bad, "tests importing conftest or other test modules:\n" + "\n".join(bad)
