"""No function in the rooms the profile pipeline lives in grows past 80 lines or 12 parameters (the house
rule): a longer one is several steps that want names, a longer parameter list a typed group (ProfileArgs,
RoiOptions, Server). Read with `ast`, so it fails naming the function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optcli"
ROOMS = ("bench", "cli", "report", "roi", "serve", "util", "schema", "vllm", "config.py")
MAX_LINES, MAX_PARAMS = 80, 12


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
    return len([n for n in names if n.arg not in ("self", "cls")])


def test_no_long_function_and_no_long_parameter_list() -> None:
    bad = []
    for room in ROOMS:
        paths = [PACKAGE / room] if room.endswith(".py") else sorted((PACKAGE / room).rglob("*.py"))
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines, params = node.end_lineno - node.lineno + 1, _parameters(node)
                    if lines > MAX_LINES or params > MAX_PARAMS:
                        bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines, "
                                   f"{params} parameters")
    assert not bad, f"over {MAX_LINES} lines or {MAX_PARAMS} parameters:\n" + "\n".join(bad)
