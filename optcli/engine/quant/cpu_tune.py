"""Opt-in timing of a layer's CPU kernels (`OPTCLI_CPU_TUNE=1`), for a CPU the rules in `cpu_choice.py`
were not measured on. Never on by default: a timing race decided by one busy moment is what the rules
replaced.

At the first call of each batch-size bucket, every kernel of the layer's layout runs once to warm up, then
in `ROUNDS` interleaved rounds (each round times every kernel once, so a burst of other work hits them
alike). A kernel replaces the rule's only if its median is at least `MARGIN` faster and its upper quartile
is below the rule's lower quartile. While timing, /proc/stat is watched (`kernels/cpu_threads.CpuShare`):
if other processes (or the hypervisor) took more than `BUSY_CORES` cores, the measurement is thrown
away and the rule's kernel kept. Kept results persist in `$OPTCLI_CACHE/cpu-kernels/tuned-*.json` (per CPU
model, thread count, torch and kernel source version) and are read only under `OPTCLI_CPU_TUNE=1`.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

from optcli.config import cache_dir
from optcli.engine.kernels import cpu_amx, cpu_lowbit
from optcli.engine.kernels.cpu_threads import CpuShare
from optcli.engine.kernels.tuning import SavedChoices
from optcli.engine.quant.cpu_choice import LABELS, bucket

ROUNDS = 7
MARGIN = 0.05
BUSY_CORES = 0.2
SLOW = 20.0  # a candidate whose warm-up took this many times the rule kernel's is not timed further


def _cpu_model() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return found.group(1).strip() if found else "cpu"
    except OSError:
        return "cpu"


def _cache_file() -> Path:
    name = re.sub(r"[^A-Za-z0-9.]+", "_", _cpu_model())
    return (cache_dir() / "cpu-kernels" / f"tuned-{name}-{torch.get_num_threads()}t-torch{torch.__version__}"
            f"-k{cpu_lowbit.source_key()}{cpu_amx.source_key()}.json")


STORE = SavedChoices(_cache_file)


def _seconds(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def measure(paths: dict, x: torch.Tensor, rule: str) -> tuple[str, str, bool]:
    """(kernel, reason, keep): the rule's kernel unless another is robustly faster; keep is False when the
    machine was busy (the result must not be saved)."""
    share = CpuShare()
    warm = {name: _seconds(fn, x) for name, fn in paths.items()}
    timed = {name: [] for name in paths if warm[name] <= SLOW * warm[rule] or name == rule}
    for _ in range(ROUNDS):
        for name in timed:
            timed[name].append(_seconds(paths[name], x))
    load = share.sample()
    others = None if load is None else load["others_cores"]
    if others is not None and others > BUSY_CORES:
        return rule, (f"tuning refused: other processes used {others:.2f} cores while the kernels were timed; "
                      "the rule's kernel kept, nothing saved"), False
    quart = {name: statistics.quantiles(t, n=4) for name, t in timed.items()}
    best = min(timed, key=lambda name: quart[name][1])
    summary = ", ".join(f"{name} {quart[name][1] * 1e6:.0f} us" for name in timed)
    if best != rule and quart[best][1] < (1 - MARGIN) * quart[rule][1] and quart[best][2] < quart[rule][0]:
        return best, f"tuned (OPTCLI_CPU_TUNE=1), medians of {ROUNDS} interleaved rounds: {summary}", True
    return rule, f"tuned (OPTCLI_CPU_TUNE=1): the rule's kernel confirmed ({summary})", True


def tuned_kernel(layer, x: torch.Tensor) -> str:
    """The kernel for x's bucket on `layer` (a `CpuPaths`): saved, or measured now."""
    index = bucket(x.shape[0])
    if layer.tuned and index in layer.tuned:
        return layer.tuned[index][0]
    spec, rule = layer.cpu_spec, layer.plan.kernels[index].name
    key = f"{spec.fmt}/{layer.plan.layout}[{'|'.join(layer.paths)}] M {LABELS[index]} N={spec.n} K={spec.k}"
    saved = STORE.get(key)
    if saved in layer.paths:
        choice, reason = saved, f"tuned earlier on a quiet machine (OPTCLI_CPU_TUNE=1, {_cache_file().name})"
    elif len(layer.paths) == 1:
        choice, reason = rule, "the layout's only kernel"
    else:
        choice, reason, keep = measure(layer.paths, x, rule)
        if keep:
            STORE.put(key, choice)
    layer.tuned = {**(layer.tuned or {}), index: (choice, reason)}
    return choice
