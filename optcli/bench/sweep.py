"""An online run over several load levels: running them (a sweep decides its constant rates from its
synchronous and throughput runs, as GuideLLM's does), one report point per level, and the highest rate
whose level still meets the SLO (the KPI file's latency gates), which `optcli roi` plans capacity from."""

from __future__ import annotations

from collections.abc import Callable

from optcli.bench.rates import SYNCHRONOUS, THROUGHPUT, LoadLevel, sweep_rates
from optcli.bench.workload import Workload

# (metric, percentile, threshold ms) a level's latencies must meet
LatencyGate = tuple[str, str, float]


def run_levels(workload: Workload, run_one: Callable[[LoadLevel, int], dict]) -> list[tuple[LoadLevel, dict]]:
    """Each level's online summary, in rising load: a sweep's synchronous run, its constant rates, then its
    throughput run (run second, since the rates lie between the two); otherwise the levels as given.
    `run_one(level, n)` gets the level's place in the running order (1, 2, ...): its prompts' seed, so no
    level finds the previous levels' prompts in the prefix cache (each model of a run sees the same order)."""
    if not workload.sweep_size:
        return [(level, run_one(level, n)) for n, level in enumerate(workload.load_levels(), 1)]
    sync = run_one(SYNCHRONOUS, 1)
    peak = run_one(THROUGHPUT, 2)
    rates = sweep_rates(sync["throughput"]["requests_s"], peak["throughput"]["requests_s"], workload.sweep_size)
    between = [LoadLevel(workload.arrivals, rate=r) for r in rates]
    return [(SYNCHRONOUS, sync), *((level, run_one(level, n)) for n, level in enumerate(between, 3)),
            (THROUGHPUT, peak)]


def level_point(level: LoadLevel, online: dict, gates: list[LatencyGate]) -> dict:
    """One level as the report gives it: target and achieved rate, throughput, latency percentiles,
    failures, and against the SLO: whether its percentiles meet every latency gate (null without gates),
    the share of requests within the per-request thresholds (attainment) and their rate (goodput)."""
    tp, latency = online["throughput"], online["latency_ms"]
    met = None
    if gates:
        met = online["requests"]["failed"] == 0 and all(
            latency[metric][pct] is not None and latency[metric][pct] <= limit for metric, pct, limit in gates)
    goodput = online.get("goodput") or {}
    return {
        **level.as_dict(),
        "achieved_rate_requests_s": online["achieved_rate_requests_s"],
        "requests_s": tp["requests_s"], "output_tok_s": tp["output_tok_s"], "total_tok_s": tp["total_tok_s"],
        "latency_ms": latency,
        "e2e_p95_ms": latency["e2e"]["p95"],  # what `roi --p95-slo-ms` reads
        "requests": {**online["requests"], "sent": online["sent"], "excluded": online["excluded"]},
        "failures": online["failures"]["reasons"],
        "slo": {"met": met, "attainment": goodput.get("fraction"), "goodput_requests_s": goodput.get("requests_s")},
    }


def slo_max_rate(points: list[dict]) -> dict | None:
    """The level with the highest achieved rate that meets the SLO: {requests_s, level, e2e_p95_ms,
    concurrency}; null when no gates were set or no level meets them."""
    ok = [p for p in points if p["slo"]["met"] and p["achieved_rate_requests_s"] is not None]
    if not ok:
        return None
    best = max(ok, key=lambda p: p["achieved_rate_requests_s"])
    e2e_mean = best["latency_ms"]["e2e"]["mean"]
    # requests in the server at that rate (Little's law: rate x mean time in it): `roi --autoscale`'s target
    concurrency = best["achieved_rate_requests_s"] * e2e_mean / 1000 if e2e_mean is not None else None
    return {"requests_s": best["achieved_rate_requests_s"], "level": best["label"], "e2e_p95_ms": best["e2e_p95_ms"],
            "concurrency": concurrency}
