"""Serving metrics in the style of `vllm bench serve`: TTFT, TPOT, ITL, E2E percentiles, throughput, goodput."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def percentiles(values) -> dict:
    """mean, p50, p95, p99 (numpy's default linear interpolation); all None when empty."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"mean": float(np.mean(values)), "p50": float(p50), "p95": float(p95), "p99": float(p99)}


@dataclass
class RequestTiming:
    start: float  # time.perf_counter() when the request was sent
    first_token: float | None = None
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def itls(self) -> list[float]:
        """Gaps between consecutive chunk arrivals; a chunk of k tokens counts as k gaps of gap/k."""
        gaps = []
        entries = [(t, 1) if isinstance(t, int | float) else t for t in self.token_times]
        for (prev, _), (t, k) in zip(entries, entries[1:], strict=False):
            k = max(int(k), 1)
            gaps.extend([(t - prev) / k] * k)
        return gaps


def summarize(timings: list[RequestTiming], wall_s: float, slo: dict | None = None) -> dict:
    """Latency percentiles (ms), throughput and, with `slo` ({"ttft_ms", "tpot_ms", "e2e_ms"}), goodput."""
    done = [t for t in timings if t.ok]
    ms = 1000.0
    tpots = [t.tpot for t in done if t.tpot is not None]
    out_tokens = sum(t.output_tokens for t in done)
    in_tokens = sum(t.prompt_tokens for t in done)
    wall = wall_s if wall_s > 0 else float("nan")
    summary = {
        "latency_ms": {
            "ttft": percentiles(t.ttft * ms for t in done),
            "tpot": percentiles(v * ms for v in tpots),
            "itl": percentiles(g * ms for t in done for g in t.itls()),
            "e2e": percentiles(t.e2e * ms for t in done),
        },
        "throughput": {
            "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + in_tokens) / wall,
            "requests_s": len(done) / wall,
        },
        "requests": {"completed": len(done), "failed": len(timings) - len(done)},
        "goodput": None,
    }
    if slo:
        unknown = set(slo) - {"ttft_ms", "tpot_ms", "e2e_ms"}
        if unknown:
            raise ValueError(f"unknown SLO keys {sorted(unknown)}; use ttft_ms, tpot_ms, e2e_ms")

        def meets(t: RequestTiming) -> bool:
            values = {"ttft_ms": t.ttft, "tpot_ms": t.tpot, "e2e_ms": t.e2e}
            # a request with one token has no TPOT: that threshold cannot be missed
            return all(values[k] is None or values[k] * ms <= limit for k, limit in slo.items())

        good = sum(meets(t) for t in done)
        summary["goodput"] = {"requests_s": good / wall, "fraction": good / len(timings) if timings else None}
    return summary
