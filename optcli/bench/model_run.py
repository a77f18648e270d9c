"""What the interleaved repeats measured for one model (`ModelRun`): each repeat's figures by their place in the
report, their medians, and the online summaries of several repeats merged into one."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from optcli.bench.rates import LoadLevel
from optcli.bench.stats import median_interval

LATENCY_FIELDS = tuple(f"latency_ms.{m}.{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p95", "p99"))
# every figure measured once per repeat, by its place in the report
FIGURES = ("throughput.output_tok_s", "throughput.total_tok_s", "throughput.requests_s", "throughput.decode_tok_s",
           "throughput.prompt_tok_s", "throughput.online_output_tok_s", *LATENCY_FIELDS)


@dataclass
class ModelRun:
    """Everything the repeats measured for one model (its engine is dropped by then)."""

    engine_options: dict  # the resolved engine options (`EngineConfig.as_dict()`) and dtype_reason
    throughput: dict  # medians of the offline figures, plus the engine's kernel paths and LM head cost
    batch_efficiency: float | None
    memory: dict
    decode_tok_s: float | None  # median of the repeats
    prompt_tok_s: float | None
    online: dict  # the headline level's summary: medians over the repeats, samples of all of them
    samples: dict[str, list[float]]
    levels: list[tuple[LoadLevel, dict]]  # every level's summary, the headline last (its merged summary)
    runs: list[dict[str, float | None]]  # each repeat's figures, by report field (FIGURES)
    offline_preemptions: int = 0  # sequences preempted in the timed offline runs, all repeats

    def figure_runs(self, name: str) -> list[float | None]:
        return [run.get(name) for run in self.runs]

    def intervals(self) -> dict[str, dict]:
        """Each figure's median and 95% interval over the repeats (`stats.median_interval`)."""
        out = {}
        for name in FIGURES:
            interval = median_interval(self.figure_runs(name))
            out[name] = {"median": None if interval is None else interval.median,
                         "ci_low": None if interval is None else interval.low,
                         "ci_high": None if interval is None else interval.high,
                         "repeats": 0 if interval is None else interval.n}
        return out


def median(values) -> float | None:
    """The median over repeats as `stats.py` takes it (on the log scale: with an even count, the geometric
    mean of the middle two), so a figure and its interval agree; a figure that can be 0 (a hit rate, a
    goodput fraction) takes the plain median."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if all(v > 0 for v in values):
        return median_interval(values).median
    return statistics.median(values)


def merge_summaries(summaries: list[dict]) -> dict:
    """One online summary from several repeats of a level: each figure the median over the repeats, the
    latency samples of all of them (the CDF plots), the failures of all of them (`failures`: failed of total
    over the repeats); the request counts of one run (`requests`, `sent`, `excluded`: each repeat sends the
    same requests) and the first repeat's requests themselves (`timings`, `measured`: what --export writes)."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    merged = dict(first)
    merged["latency_ms"] = {m: {s: median(x["latency_ms"][m][s] for x in summaries) for s in stats}
                            for m, stats in first["latency_ms"].items()}
    merged["throughput"] = {k: median(x["throughput"][k] for x in summaries) for k in first["throughput"]}
    if first.get("goodput") is not None:
        merged["goodput"] = {k: median((x.get("goodput") or {}).get(k) for x in summaries) for k in first["goodput"]}
    for key in ("achieved_rate_requests_s", "prefix_cache_hit_rate"):
        merged[key] = median(x.get(key) for x in summaries)
    reasons: dict[str, int] = {}
    for x in summaries:
        for reason in x["failures"]["reasons"]:
            reasons[reason["error"]] = reasons.get(reason["error"], 0) + reason["count"]
    merged["failures"] = {"failed": sum(x["failures"]["failed"] for x in summaries),
                          "total": sum(x["failures"]["total"] for x in summaries),
                          "reasons": [{"error": e, "count": c} for e, c in sorted(reasons.items(), key=lambda i: -i[1])]}
    merged["samples"] = {k: [v for x in summaries for v in x["samples"][k]] for k in first["samples"]}
    merged["repeats"] = len(summaries)
    return merged
