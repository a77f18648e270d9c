"""A KPI file as live gates: what `serve --kpi` watches over its sliding window, and what `optcli kpi rules`
turns into Prometheus alerts. One list of gates for both, so the server's `/kpi` and the rules agree on
names, thresholds and units.

Each gate is a figure, a threshold and the condition that must hold (`op`); a figure with no data in the
window (no traffic) is no breach, unlike a benchmark gate, where a missing figure fails: an idle server
is not a slow one. Keys that only make sense against a baseline model measured in the same benchmark
run (KL divergence, top-1 agreement, task recovery, peak memory) are listed as not watched, with why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_WINDOW_S = 300.0  # the article's alert_window, when the file gives none
LIVE_METRICS = ("e2e", "ttft", "tpot", "itl")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}

# flat gate -> (metric, percentile) watched live
_FLAT_LATENCY = {f"{p}_{m}_ms_max": (m, p) for m in LIVE_METRICS for p in ("p95", "p99")}
NOT_WATCHED = {
    "max_ppl_ratio": "a ratio to a baseline model scored in the same benchmark run (profile gates it)",
    "max_kld_mean": "needs the baseline model's logits (profile gates it)",
    "min_top1_agreement": "needs the baseline model's logits (profile gates it)",
    "min_task_recovery": "lm-evaluation-harness tasks: a benchmark (profile --tasks gates it)",
    "accuracy.min_task_recovery": "lm-evaluation-harness tasks: a benchmark (profile --tasks gates it)",
    "max_peak_memory_bytes": "the process peak over a benchmark (profile gates it)",
    "min_requests_s": "offline request throughput (profile gates it; serve watches output tok/s)",
}


@dataclass(frozen=True)
class LiveGate:
    name: str  # the `kpi` label of the gauges and the alert's name
    key: str  # where the threshold came from in the KPI file
    threshold: float
    op: str  # the condition that must hold: value <op> threshold
    unit: str
    metric: str | None = None  # latency gates: e2e | ttft | tpot | itl
    quantile: float | None = None  # latency gates: 0.95, 0.99

    def breached(self, value: float | None) -> bool:
        return value is not None and not _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class LiveKpi:
    window_s: float
    window_source: str
    gates: tuple[LiveGate, ...]
    eval_frequency: int | None = None
    not_watched: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def gate(self, name: str) -> LiveGate | None:
        return next((g for g in self.gates if g.name == name), None)

    def needs(self) -> dict[str, list[str]]:
        """Inputs a gate needs beyond the file: {"baseline_report": [keys], "gpu_hour_cost": [...], ...}."""
        need: dict[str, list[str]] = {"baseline_report": [], "gpu_hour_cost": [], "monthly_budget": []}
        for g in self.gates:
            if g.name in ("throughput_vs_baseline", "cost_vs_baseline"):
                need["baseline_report"].append(g.key)
            if g.name in ("cost_usd_per_1k_tokens", "cost_budget_share"):
                need["gpu_hour_cost"].append(g.key)
            if g.name == "cost_budget_share":
                need["monthly_budget"].append(g.key)
        return need

    def as_dict(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "window_source": self.window_source,
                "gates": [g.__dict__ for g in self.gates], "eval_frequency": self.eval_frequency,
                "not_watched": [{"key": k, "why": w} for k, w in self.not_watched]}


def _latency_gates(kpi: Any) -> list[LiveGate]:
    gates = []
    for key, (metric, pct) in _FLAT_LATENCY.items():
        threshold = getattr(kpi, key, None)
        if threshold is not None:
            gates.append(LiveGate(f"latency_{metric}_{pct}_ms", key, threshold, "<=", "ms", metric, int(pct[1:]) / 100))
    section = kpi.latency
    if section is not None:
        for pct in ("p50", "p95", "p99"):
            threshold = getattr(section, f"{pct}_threshold")
            if threshold is not None:
                gates.append(LiveGate(f"latency_{section.metric}_{pct}_ms", f"latency.{pct}_threshold", threshold,
                                      "<=", "ms", section.metric, int(pct[1:]) / 100))
    return gates


def from_kpi(kpi: Any) -> LiveKpi:
    """The live gates of a validated KPI file (`optcli.bench.kpi.Kpi`, read here by attribute)."""
    gates = _latency_gates(kpi)
    tp, cost, acc = kpi.throughput, kpi.cost, kpi.accuracy
    minimum = tp.minimum if tp is not None and tp.minimum is not None else kpi.min_output_tok_s
    if minimum is not None:
        key = "throughput.minimum" if tp is not None and tp.minimum is not None else "min_output_tok_s"
        gates.append(LiveGate("throughput_output_tok_s", key, minimum, ">=", "tok/s"))
    if tp is not None and tp.degradation_threshold is not None:
        gates.append(LiveGate("throughput_vs_baseline", "throughput.degradation_threshold", tp.degradation_threshold,
                              ">=", "ratio"))
    maximum = cost.maximum if cost is not None and cost.maximum is not None else kpi.max_usd_per_1k_tokens
    if maximum is not None:
        key = "cost.maximum" if cost is not None and cost.maximum is not None else "max_usd_per_1k_tokens"
        gates.append(LiveGate("cost_usd_per_1k_tokens", key, maximum, "<=", "USD/1K tokens"))
    if cost is not None and cost.increase_threshold is not None:
        gates.append(LiveGate("cost_vs_baseline", "cost.increase_threshold", cost.increase_threshold, "<=", "ratio"))
    if cost is not None and cost.budget_alert is not None:
        gates.append(LiveGate("cost_budget_share", "cost.budget_alert", cost.budget_alert, "<", "share"))
    eval_frequency = acc.eval_frequency if acc is not None else None
    if acc is not None and acc.acceptable_drop is not None and eval_frequency is not None:
        gates.append(LiveGate("accuracy_ppl_increase", "accuracy.acceptable_drop", acc.acceptable_drop, "<=", "ratio"))
    window = kpi.latency.alert_window if kpi.latency is not None else None
    not_watched = tuple((k, NOT_WATCHED[k]) for k in _set_keys(kpi) if k in NOT_WATCHED)
    if acc is not None and acc.acceptable_drop is not None and eval_frequency is None:
        not_watched += (("accuracy.acceptable_drop", "no accuracy.eval_frequency: no live accuracy probe runs"),)
    return LiveKpi(window_s=window or DEFAULT_WINDOW_S,
                   window_source="latency.alert_window" if window else f"default {DEFAULT_WINDOW_S:g} s (no "
                   "latency.alert_window in the file)", gates=tuple(gates), eval_frequency=eval_frequency,
                   not_watched=not_watched)


def _set_keys(kpi: Any) -> list[str]:
    keys = []
    for name in kpi.model_fields_set:
        section = getattr(kpi, name)
        if hasattr(section, "model_fields_set"):
            keys += [f"{name}.{f}" for f in section.model_fields_set]
        else:
            keys.append(name)
    return sorted(keys)
