"""`roi --autoscale keda|hpa`: the profile's sweep as an autoscaler setting, instead of a guessed threshold.

The scaler tracks the serving metric that tracks load: requests running + waiting, per replica. Its target is
the per-replica concurrency the profile measured at its SLO-max-rate (the highest rate whose latencies met the
KPI file's gates): by Little's law, achieved requests/s x mean E2E latency (s) is the mean number of requests
in the server at that rate, which is what running + waiting counts. Above it a replica is past the rate at
which it still met the SLO, so the autoscaler adds replicas; below it, it removes them.

Replica bounds come from the load-trace replay (`roi --load-trace`): the fewest and the most replicas the
article's policy needed over the trace; without a trace, the --min-replicas/--max-replicas flags. Scale-down
follows the article's rule (one replica at a time, once the load has stayed low): one pod per period, after
a stabilization window of the article's alert window (300 s); scale-up is not slowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from optcli.errors import UsageError

HEADER = "# optcli roi --autoscale"
SCALE_DOWN_WINDOW_S = 300  # the article's alert_window: how long the load must stay low before a replica goes
METRICS = {  # (running, waiting) gauges per engine
    "builtin": ("optcli:num_requests_running", "optcli:num_requests_waiting"),
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
}
ADAPTER_METRIC = "optcli_requests_in_flight"  # the HPA's pods metric, as prometheus-adapter would expose it


@dataclass
class ScalerPlan:
    kind: str
    name: str
    model_name: str
    engine: str
    threshold: float
    min_replicas: int
    max_replicas: int
    prometheus_url: str
    why: dict[str, str] = field(default_factory=dict)

    @property
    def query(self) -> str:
        running, waiting = METRICS[self.engine]
        sel = f'{{model_name="{self.model_name}"}}'
        return f"sum({running}{sel} + {waiting}{sel})"


def slo_concurrency(report: dict, p95_slo_ms: float | None) -> tuple[float, str]:
    """(requests in flight per replica at the SLO-max-rate, why): the report's figure, else from its sweep."""
    tp = report.get("throughput") or {}
    points = [p for p in tp.get("sweep") or [] if isinstance(p, dict)]
    best = tp.get("slo_max_rate")
    if p95_slo_ms is not None:
        ok = [p for p in points if p.get("e2e_p95_ms") is not None and p["e2e_p95_ms"] <= p95_slo_ms
              and p.get("achieved_rate_requests_s")]
        if not ok:
            raise UsageError(f"--autoscale: no sweep level of the report meets p95 E2E <= {p95_slo_ms:g} ms")
        point = max(ok, key=lambda p: p["achieved_rate_requests_s"])
        source = f"the highest-rate sweep level with p95 E2E <= {p95_slo_ms:g} ms (--p95-slo-ms)"
    elif isinstance(best, dict):
        point = next((p for p in points if p.get("label") == best.get("level")), None)
        if best.get("concurrency") is not None:
            return best["concurrency"], (f"the report's per-replica concurrency at its SLO-max-rate ({best['level']}, "
                                         f"{best['requests_s']:.3g} requests/s: achieved rate x mean E2E latency)")
        source = f"the report's SLO-max-rate level ({best.get('level')})"
    else:
        raise UsageError("--autoscale needs the report's SLO-max-rate (profile --rate sweep --kpi FILE with latency "
                         "gates) or --p95-slo-ms to pick a sweep level")
    e2e_mean = (((point or {}).get("latency_ms") or {}).get("e2e") or {}).get("mean")
    if point is None or e2e_mean is None:
        raise UsageError("--autoscale: the report's sweep level has no mean E2E latency to size the threshold with")
    rate = point["achieved_rate_requests_s"]
    return rate * e2e_mean / 1000, (f"{source}: {rate:.3g} requests/s x {e2e_mean:.4g} ms mean E2E latency "
                                    "(Little's law: requests in flight)")


def replica_bounds(capacity: dict | None, min_flag: int, max_flag: int) -> tuple[int, int, str, str]:
    replay = (capacity or {}).get("autoscaling")
    if not replay:
        return (min_flag, max_flag, "--min-replicas (no --load-trace to replay)",
                "--max-replicas (no --load-trace to replay)")
    rows = replay["rows"]
    low = min(rows, key=lambda r: r["replicas"])
    high = max(rows, key=lambda r: r["replicas"])
    lo_why = f"the fewest replicas the load-trace replay ran ({low['replicas']} at {low['time']})"
    hi_why = f"the most the replay needed ({high['replicas']} at {high['time']})"
    if high["replicas"] >= max_flag:
        hi_why += f"; it hit --max-replicas {max_flag}: the trace may need more"
    return low["replicas"], high["replicas"], lo_why, hi_why


def dns_name(text: str) -> str:
    """A Kubernetes object name (DNS-1123 label) from a model name or path."""
    name = re.sub(r"[^a-z0-9-]+", "-", Path(str(text)).name.lower()).strip("-")[:50].strip("-")
    return name or "optcli-model"


def _behavior() -> dict:
    return {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                          "policies": [{"type": "Pods", "value": 1, "periodSeconds": SCALE_DOWN_WINDOW_S}],
                          "selectPolicy": "Min"},
            "scaleUp": {"stabilizationWindowSeconds": 0,
                        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}], "selectPolicy": "Max"}}


def manifest(plan: ScalerPlan) -> dict:
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name}
    if plan.kind == "keda":
        return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": plan.name},
                "spec": {"scaleTargetRef": target, "minReplicaCount": plan.min_replicas,
                         "maxReplicaCount": plan.max_replicas, "pollingInterval": 15,
                         "cooldownPeriod": SCALE_DOWN_WINDOW_S,
                         "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior()}},
                         "triggers": [{"type": "prometheus", "metricType": "AverageValue",
                                       "metadata": {"serverAddress": plan.prometheus_url, "query": plan.query,
                                                    "threshold": f"{plan.threshold:.3f}"}}]}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": plan.name},
            "spec": {"scaleTargetRef": target, "minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas,
                     "metrics": [{"type": "Pods", "pods": {
                         "metric": {"name": ADAPTER_METRIC},
                         "target": {"type": "AverageValue", "averageValue": f"{round(plan.threshold * 1000)}m"}}}],
                     "behavior": _behavior()}}


def render(plan: ScalerPlan) -> str:
    lines = [f"{HEADER} {plan.kind}: requests running + waiting per replica, from a profile sweep"]
    lines += [f"# {key}: {why}" for key, why in plan.why.items()]
    if plan.kind == "hpa":
        running, waiting = METRICS[plan.engine]
        lines += ["# the pods metric comes from prometheus-adapter; its rule:",
                  f"#   seriesQuery: '{running}'",
                  f"#   name: {{as: {ADAPTER_METRIC}}}",
                  f"#   metricsQuery: sum({running}{{<<.LabelMatchers>>}} + {waiting}{{<<.LabelMatchers>>}}) "
                  "by (<<.GroupBy>>)"]
    return "\n".join(lines) + "\n" + yaml.safe_dump(manifest(plan), sort_keys=False, width=200)


def plan_scaler(kind: str, report: dict, capacity: dict | None, p95_slo_ms: float | None, min_flag: int,
                max_flag: int, engine: str | None, prometheus_url: str) -> ScalerPlan:
    threshold, threshold_why = slo_concurrency(report, p95_slo_ms)
    threshold = round(threshold, 3)  # to the milli-request: what an HPA quantity ("9966m") can say
    low, high, low_why, high_why = replica_bounds(capacity, min_flag, max_flag)
    served = ((report.get("workload") or {}).get("engine") or {}).get("name")
    engine_why = "--serving-engine" if engine else ("the report's engine (vllm)" if served == "vllm"
                                                    else "the report's engine (builtin optcli serve)")
    engine = engine or ("vllm" if served == "vllm" else "builtin")
    model = str(report.get("model") or "model")
    why = {"threshold": f"{threshold:.4g} requests in flight per replica = {threshold_why}",
           "min replicas": f"{low} = {low_why}", "max replicas": f"{high} = {high_why}",
           "metric": f"{' + '.join(METRICS[engine])} per replica, from {engine_why}; model_name "
                     f"{model!r} is the report's model: serve it under that name (--served-model-name) or edit the query",
           "scale-down": f"one replica per {SCALE_DOWN_WINDOW_S} s after {SCALE_DOWN_WINDOW_S} s of lower load "
                         "(the article's rule: down one at a time when utilization stays low)"}
    return ScalerPlan(kind, dns_name(model), model, engine, threshold, low, high, prometheus_url, why)
