"""Pick a GEMM tiling by timing a few candidates on the device, once per (kernel, M bucket, N, K).

Hand-set tiles are a guess about a chip; a few timed candidates are a measurement. The first call
of a shape (outside CUDA-graph capture: the engine warms every graph up before capturing it) runs
each candidate on the real inputs and keeps the fastest; later calls, and any call while capturing
or off CUDA, use the cached choice or the heuristic default (the first candidate).

Candidates are timed inside a CUDA graph, as the engine runs decode steps: timed eagerly, a few-
microsecond decode GEMM measures mostly its host launch cost, which favours whichever candidate
launches fewer kernels rather than the one the GPU runs fastest. Between calls the graph overwrites
a buffer twice the size of L2, so every call reads its weights from HBM as in a real forward (an int4
layer's weights would otherwise stay in the H100's 50 MB L2); that write is timed alone and subtracted.

Choices persist in `$OPTCLI_CACHE/gemm-tuning/` per GPU model and torch/triton version, so only the
first process on a machine pays for tuning (minutes on a fresh machine, mostly Triton compiles).
A saved choice is used only if it is still among the current candidates.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from optcli.config import cache_dir

_CHOSEN: dict[tuple, object] = {}
GRAPH_CALLS = 20  # launches per captured graph: the replay time / this is one call's GPU time


def m_bucket(m: int) -> int:
    """Batch rows rounded up to a power of two: decode and prefill sizes share few buckets."""
    return 1 << max(0, (m - 1).bit_length())


def pick(kernel: str, m: int, n: int, k: int, candidates: Callable[[], list], run: Callable[[object], object]):
    """The fastest of `candidates()` (a heuristic default first) for this shape; `run(c)` launches with c.
    The list is only built on a cache miss: eager prefill steps call this once per layer."""
    key = (kernel, m_bucket(m), n, k)
    if key in _CHOSEN:
        return _CHOSEN[key]
    candidates = candidates()
    if len(candidates) == 1 or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    saved = _STORE.get(_name(key))
    for config in candidates:
        if repr(config) == saved:
            _CHOSEN[key] = config
            return config
    timings = []
    for config in candidates:
        try:
            timings.append((time_in_graph(lambda c=config: run(c)), config))
        except Exception:  # noqa: BLE001 - a tiling the compiler rejects (shared memory) is skipped
            torch.cuda.synchronize()
            continue
    _CHOSEN[key] = min(timings, key=lambda t: t[0])[1] if timings else candidates[0]
    if timings:
        _STORE.put(_name(key), repr(_CHOSEN[key]))
    return _CHOSEN[key]


def _name(key: tuple) -> str:
    kernel, m, n, k = key
    return f"{kernel} M<={m} N={n} K={k}"


class SavedChoices:
    """Choices kept in one JSON file (name -> choice), read once per process and rewritten whole
    through a temporary file on each new choice, so the file is never half-written."""

    def __init__(self, path: Callable[[], Path]) -> None:
        self.path = path
        self.saved: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        if self.saved is None:
            try:
                self.saved = json.loads(self.path().read_text())
            except (OSError, ValueError):
                self.saved = {}
        return self.saved.get(name)

    def put(self, name: str, choice: str) -> None:
        self.get(name)
        self.saved[name] = choice
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.saved, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the next process a re-tune


def _cache_file() -> Path:
    import triton  # optional: only GPU runs tune, and the CPU build of torch has no triton

    device = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return cache_dir() / "gemm-tuning" / f"{device}-torch{torch.__version__}-triton{triton.__version__}.json"


_STORE = SavedChoices(lambda: _cache_file())


def time_in_graph(fn: Callable[[], object], replays: int = 5) -> float:
    """GPU milliseconds of one `fn()` with a cold L2: best of `replays` replays of a CUDA graph of
    GRAPH_CALLS (flush, fn) pairs, minus the same number of flushes alone (timed once per device)."""
    flush, flush_ms = _flush()
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    return max(_graph_ms(lambda: (flush.zero_(), fn()), replays) - flush_ms, 0.0) / GRAPH_CALLS


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _graph_ms(body: Callable[[], object], replays: int) -> float:
    # capture_begin/end directly: torch.cuda.graph() also runs gc.collect() and empty_cache() per
    # capture, which would dominate a tuning pass of a few hundred captures. One side stream per
    # device, warmed up before capturing (cuBLAS sets up its per-stream workspace on first use).
    device = torch.cuda.current_device()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream()
    stream = _STREAMS[device]
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        body()
        graph.capture_begin()
        try:
            for _ in range(GRAPH_CALLS):
                body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


_FLUSH: dict[int, tuple[torch.Tensor, float]] = {}


def _flush() -> tuple[torch.Tensor, float]:
    """A buffer twice L2's size, and the ms GRAPH_CALLS overwrites of it take."""
    device = torch.cuda.current_device()
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        buffer = torch.empty(2 * l2, dtype=torch.int8, device="cuda")
        _FLUSH[device] = buffer, _graph_ms(buffer.zero_, replays=10)
    return _FLUSH[device]


def chosen() -> dict[str, str]:
    """What was picked so far, for reports and benchmarks."""
    return {_name(key): str(c) for key, c in _CHOSEN.items()}
