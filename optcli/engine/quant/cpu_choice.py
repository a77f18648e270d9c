"""Pick a quantized layer's CPU matmul path by timing, once per (path family, M bucket, N, K).

Which of torch's CPU kernels is fastest depends on the CPU's instruction set and on the batch size,
by large factors. Measured on this project's 2-core AVX2 EPYC (no VNNI, no AVX-512 BF16), one
2048 -> 16384 GEMM, ms at M = 1 / 16 / 64:

| path | M=1 | M=16 | M=64 |
|---|---|---|---|
| fp32 oneDNN packed (a dense fp32 layer) | 6.8 | 14.5 | 32.7 |
| int8 x int8 `torch._int_mm` (reference loops without VNNI) | 241 | 241 | 880 |
| int8 weight-only `_weight_int8pack_mm`, bf16 activations | 3.0 | 14.6 | 57 |
| int8 weight-only `_weight_int8pack_mm`, fp32 activations | 16.5 | 266 | 1059 |
| int4 `_weight_int4pack_mm_for_cpu`, bf16 activations | 2.6 | 15.9 | 63 |
| int4 `_weight_int4pack_mm_for_cpu`, fp32 activations | 78 | 1254 | 4989 |
| int4 x int8, our AVX2 kernel (`kernels/cpu_lowbit.c`) | 0.46 | 5.9 | 22.3 |
| int8 x int8, our AVX2 kernel (exact int32) | 1.1 | 8.0 | 30.2 |
| fp8 (E4M3 bytes widened in registers, fp32 math), our AVX2 kernels | 1.9 | 11.5 | 28.9 |
| bf16 weight widened in registers, fp32 math, our AVX2 kernels | 2.3 | 9.5 | 26.7 |

(M=1 of the int8 and fp8 rows, and the bf16 row: 16 different weights in turn, so from memory, not
from the L3 cache a single repeated GEMM partly runs from.)

while on an AVX-512 VNNI CPU `_int_mm` beats bf16 at every M. So a layer lists every exact path
it can take (`candidates`), and the first call in each power-of-two M bucket times them on its real
inputs and keeps the fastest; later calls reuse the choice. Choices persist per CPU model, thread
count and torch version in `$OPTCLI_CACHE/cpu-kernels/`, so only a machine's first process pays.

`OPTCLI_CPU_KERNEL=<name>` forces a path wherever a layer offers it (debugging, tests).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optcli.config import cache_dir
from optcli.engine.kernels import cpu_lowbit
from optcli.engine.kernels.tuning import SavedChoices, m_bucket

_CHOSEN: dict[tuple, str] = {}
MIN_TIMED_S = 0.02  # time each candidate for at least this long (or MAX_RUNS runs), best run counts
MAX_RUNS = 5


def choose(family: str, x: torch.Tensor, n: int, k: int, candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> str:
    """The name of the fastest of `candidates` (name -> fn(x) -> y) for x's row count; the first listed
    is the default. Timed on `x` itself at the first call of a bucket."""
    forced = os.environ.get("OPTCLI_CPU_KERNEL")
    if forced in candidates:
        return forced
    if len(candidates) == 1:
        return next(iter(candidates))
    names = tuple(candidates)
    key = (family, names, m_bucket(x.shape[0]), n, k)
    if key in _CHOSEN:
        return _CHOSEN[key]
    name = _name(key)
    saved = _STORE.get(name)
    if saved not in candidates:
        timings: dict[str, float] = {}
        for c, fn in candidates.items():
            timings[c] = _best_seconds(fn, x, bound=min(timings.values(), default=float("inf")))
        saved = min(timings, key=timings.get)
        _STORE.put(name, saved)
    _CHOSEN[key] = saved
    return saved


def _best_seconds(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bound: float = float("inf")) -> float:
    """Best of a few timed runs after a warm-up; a candidate whose warm-up alone took over twice the best
    so far (`bound`) is out without more runs (at a prefill's M a reference-loop kernel takes seconds)."""
    start = time.perf_counter()
    fn(x)  # warm-up: first calls pack or allocate
    warm = time.perf_counter() - start
    if warm > 2 * bound:
        return warm
    best, spent, runs = float("inf"), 0.0, 0
    while runs < MAX_RUNS and (spent < MIN_TIMED_S or runs < 2):
        start = time.perf_counter()
        fn(x)
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def _name(key: tuple) -> str:
    family, names, m, n, k = key
    return f"{family}[{'|'.join(names)}] M<={m} N={n} K={k}"


def chosen() -> dict[str, str]:
    """What was picked so far in this process, for reports and benchmarks."""
    return {_name(key): c for key, c in _CHOSEN.items()}


@functools.cache
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        return name.group(1).strip() if name else "cpu"
    except OSError:
        return platform.processor() or "cpu"


def _cache_file() -> Path:
    """Per CPU model, thread count, torch version and version of our own kernels' source (a choice
    timed against an older build of them says nothing about the new one)."""
    name = re.sub(r"[^A-Za-z0-9.]+", "_", cpu_model())
    kernels = cpu_lowbit.source_key()
    return cache_dir() / "cpu-kernels" / f"{name}-{torch.get_num_threads()}t-torch{torch.__version__}-k{kernels}.json"


_STORE = SavedChoices(lambda: _cache_file())
