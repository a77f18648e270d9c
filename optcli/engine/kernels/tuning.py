"""Pick a GEMM tiling by timing a few candidates on the device, once per (kernel, M bucket, N, K).

Hand-set tiles are a guess about a chip; a few timed candidates are a measurement. The first call
of a shape (outside CUDA-graph capture: the engine warms every graph up before capturing it) runs
each candidate on the real inputs and keeps the fastest; later calls, and any call while capturing
or off CUDA, use the cached choice or the heuristic default (the first candidate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CHOSEN: dict[tuple, object] = {}


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
    import triton.testing

    timings = []
    for config in candidates:
        try:
            timings.append((triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=20), config))
        except Exception:  # noqa: BLE001 - a tiling the compiler rejects (shared memory) is skipped
            continue
    _CHOSEN[key] = min(timings, key=lambda t: t[0])[1] if timings else candidates[0]
    return _CHOSEN[key]


def chosen() -> dict[str, str]:
    """What was picked so far, for reports and benchmarks."""
    return {f"{kernel} M<={m} N={n} K={k}": str(c) for (kernel, m, n, k), c in _CHOSEN.items()}
