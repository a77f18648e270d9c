"""Every script in `benchmarks/` runs: `python benchmarks/X.py --smoke` (the smallest run that takes its code
paths once: tiny shapes, a few tokens, one repeat) exits 0 and prints its result, so a refactor of the engine
internals they import cannot break them silently. Their figures mean nothing here and are not checked.

A script that needs a tool we do not install (GuideLLM, llama-cpp-python) says it is skipped and exits 0; the
test checks it says so. The scripts run two at a time (one per core here), each in its own process.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import find_cycle

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MAX_LINES = 400  # as in optcli/ (tests/test_layers.py): a script that grows past it moves a concept to a module

# What each script prints when its run got through to the end (a line of its final table or verdict).
DONE = {
    "busy_verdicts": r"same dtype, kernel paths and thread ceiling in all 1 runs",
    "contention": r"\| adaptive \| [\d.]+",
    "cpu_paths": r"every rule's pick|rules to revisit",
    "cpu_step_ops": r"argmax \[64, \d+\] +\d+",
    "cpu_step_paths": r"\| bf16 \| [\d.]+ \| [\d.]+ \| [\d.]+x",
    "decode_ops": r"per-layer launches: [\d.]+x fewer fused",
    "endpoint_vs_guidellm": r"skipped: guidellm is not installed|target: TTFT and ITL p50",
    "engine_cpu": r"ours: batch efficiency [\d.]+",
    "gpu_check": r"gpu_check on .*; model tiny",
    "grammar_mask": r"mask step inside the engine",
    "host_overhead": r"batch +4: +\d+ us/step",
    "kv_cache_dtype": r"(PASS|MISS)  int8: 2x the tokens per byte",
    "mixed_precision": r"auto:5 +[\d.]+",
    "llamacpp_peer": r"skipped: \w+ is not installed|skipped: no checkpoint|## llama\.cpp, batch 1",
    "quant_check": r"result: PASS",
    "quant_cpu": r"## Targets",
    "thread_rule": r"hidden +128 vocab +1024 .*offline 16 +1 thread +[\d,]+ tok/s",
}


def _scripts() -> list[str]:
    """The runnable scripts; the other files are modules they import (bench_model.py, quant_cpu_report.py, ...)."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text("utf-8"))


def _run(name: str, tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TMPDIR": str(tmp)}  # what a script leaves in its temporary directories goes with pytest's tmp_path
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke"], capture_output=True,
                          text=True, cwd=tmp, env=env, timeout=900)
    return done, time.monotonic() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    names = [n for n in _scripts() if n in DONE]
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(_run, n, tmp_path_factory.mktemp(n)) for n in names}
        return {n: f.result() for n, f in futures.items()}


def test_every_script_has_a_smoke_check():
    assert set(_scripts()) == set(DONE), "add the new script to DONE (and give it --smoke)"


@pytest.mark.parametrize("name", sorted(DONE))
def test_smoke_run(name, runs):
    done, seconds = runs[name]
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{name}.py --smoke exited {done.returncode} after {seconds:.0f} s:\n{out[-4000:]}"
    assert re.search(DONE[name], done.stdout), f"{name}.py --smoke did not finish its run:\n{out[-4000:]}"


def test_benchmarks_import_no_circle():
    """A script imports a shared module (`bench_model.py`), never one that imports it back."""
    names = {p.stem for p in BENCHMARKS.glob("*.py")}
    graph: dict[str, list[str]] = {}
    for name in names:
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text(encoding="utf-8"))
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = sorted(found & names)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert "bench_model" in graph["gpu_check"] and "bench_model" in graph["quant_check"]


def test_no_benchmark_file_over_the_size_limit():
    long = {p.name: n for p in BENCHMARKS.glob("*.py") if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert not long, f"benchmark files over {MAX_LINES} lines (split them by concept): {long}"
