"""`optcli kpi rules`: a KPI file as Prometheus recording and alerting rules, over optcli's metric names
(`optcli serve`) or vLLM's (`vllm serve`), so a team serving with vLLM gets the same alerts.

One recording rule per figure (a latency percentile from the engine's histogram over `alert_window`,
output tok/s per replica, the projected monthly cost of the replicas up), one alert per gate with
`for:` = `alert_window`: the figure must stay over its threshold for the whole window, as the article's
alert window means. A gate Prometheus cannot compute from the engine's metrics is left out, and the file
says so in a comment (the rules file keeps no secret omissions).
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from optcli.kpi.live import LiveKpi

HEADER = "# optcli kpi rules"


@dataclass(frozen=True)
class EngineMetrics:
    histograms: dict[str, str]  # metric -> histogram base name
    generation_tokens: str  # counter (with _total)
    running: str  # gauge: requests in the running batch
    kpi_breached: str | None  # the server's own KPI gauges (serve --kpi), where it has them


ENGINES = {
    "builtin": EngineMetrics(
        histograms={"e2e": "optcli:e2e_request_latency_seconds", "ttft": "optcli:time_to_first_token_seconds",
                    "tpot": "optcli:inter_token_latency_seconds", "itl": "optcli:inter_token_latency_seconds"},
        generation_tokens="optcli:generation_tokens_total", running="optcli:num_requests_running",
        kpi_breached="optcli:kpi_breached"),
    "vllm": EngineMetrics(
        histograms={"e2e": "vllm:e2e_request_latency_seconds", "ttft": "vllm:time_to_first_token_seconds",
                    "tpot": "vllm:time_per_output_token_seconds", "itl": "vllm:inter_token_latency_seconds"},
        generation_tokens="vllm:generation_tokens_total", running="vllm:num_requests_running", kpi_breached=None),
}
HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class RulesInputs:
    engine: str = "builtin"
    baseline_tok_s: float | None = None  # a profile report's served output tok/s (degradation, cost increase)
    gpu_hour_cost: float | None = None
    monthly_budget: float | None = None


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _alert(name: str, expr: str, window: str, summary: str, key: str) -> dict:
    return {"alert": f"OptcliKpi{_camel(name)}", "expr": expr, "for": window,
            "labels": {"severity": "warning", "kpi": name},
            "annotations": {"summary": summary, "kpi_file_key": key, "value": "{{ $value }}"}}


def build_rules(live: LiveKpi, inputs: RulesInputs) -> tuple[dict, list[str]]:
    """(the rules document, the gates left out with why)."""
    m = ENGINES[inputs.engine]
    w = f"{live.window_s:g}s"
    records, alerts, skipped = [], [], []
    tok_s = f"optcli_kpi:output_tok_s:rate{w}"
    records.append({"record": tok_s,  # per replica; only while it serves (an idle replica is not slow)
                    "expr": f"sum by (instance, model_name) (rate({m.generation_tokens}[{w}])) "
                            f"and on (instance, model_name) ({m.running} > 0)"})
    for g in live.gates:
        if g.metric is not None:
            record = f"optcli_kpi:{g.metric}_seconds:p{round(g.quantile * 100)}_{w}"
            records.append({"record": record, "expr": f"histogram_quantile({g.quantile:g}, sum by (le, model_name) "
                                                      f"(rate({m.histograms[g.metric]}_bucket[{w}])))"})
            alerts.append(_alert(g.name, f"{record} > {g.threshold / 1000:g}", w,
                                 f"{g.metric.upper()} p{round(g.quantile * 100)} over {g.threshold:g} ms for {w}",
                                 g.key))
        elif g.name == "throughput_output_tok_s":
            alerts.append(_alert(g.name, f"{tok_s} < {g.threshold:g}", w,
                                 f"output tok/s per serving replica under {g.threshold:g} for {w}", g.key))
        elif g.name in ("throughput_vs_baseline", "cost_vs_baseline"):
            if inputs.baseline_tok_s is None:
                skipped.append(f"{g.key}: needs --baseline-report (the profile's throughput to compare with)")
                continue
            # cost per token on the same GPU is 1 / throughput: both are floors on tok/s
            floor = (g.threshold * inputs.baseline_tok_s if g.name == "throughput_vs_baseline"
                     else inputs.baseline_tok_s / g.threshold)
            alerts.append(_alert(g.name, f"{tok_s} < {floor:g}", w, f"output tok/s per serving replica under "
                                 f"{floor:g} ({g.key} {g.threshold:g} x the profile's {inputs.baseline_tok_s:g})",
                                 g.key))
        elif g.name == "cost_usd_per_1k_tokens":
            if inputs.gpu_hour_cost is None:
                skipped.append(f"{g.key}: needs --gpu-hour-cost")
                continue
            floor = inputs.gpu_hour_cost / (3.6 * g.threshold)
            alerts.append(_alert(g.name, f"{tok_s} < {floor:g}", w, f"over {g.threshold:g} USD per 1K output "
                                 f"tokens (under {floor:g} tok/s at {inputs.gpu_hour_cost:g} USD/h)", g.key))
        elif g.name == "cost_budget_share":
            if inputs.gpu_hour_cost is None or inputs.monthly_budget is None:
                skipped.append(f"{g.key}: needs --gpu-hour-cost and --monthly-budget")
                continue
            spend = "optcli_kpi:projected_monthly_cost_usd"
            records.append({"record": spend, "expr": f"count by (model_name) ({m.running}) * "
                                                     f"{inputs.gpu_hour_cost:g} * {HOURS_PER_MONTH}"})
            alerts.append(_alert(g.name, f"{spend} >= {g.threshold * inputs.monthly_budget:g}", w,
                                 f"replicas up cost {g.threshold:g} of the monthly budget "
                                 f"({inputs.monthly_budget:g} USD) at this size", g.key))
        elif g.name == "accuracy_ppl_increase":
            if m.kpi_breached is None:
                skipped.append(f"{g.key}: vLLM exports no accuracy figure (optcli serve --kpi runs the probe)")
                continue
            alerts.append(_alert(g.name, f'{m.kpi_breached}{{kpi="{g.name}"}} == 1', w,
                                 f"probe perplexity up over {g.threshold:g} from start-up (serve --kpi)", g.key))
    doc = {"groups": [{"name": "optcli-kpi-records", "rules": records},
                      {"name": "optcli-kpi-alerts", "rules": alerts}]}
    skipped += [f"{key}: {why}" for key, why in live.not_watched]
    return doc, skipped


def render_rules(live: LiveKpi, inputs: RulesInputs, source: str) -> str:
    doc, skipped = build_rules(live, inputs)
    lines = [f"{HEADER} from {source} (engine {inputs.engine}; alert_window {live.window_s:g} s from "
             f"{live.window_source})"]
    lines += [f"# not expressed: {s}" for s in skipped]
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False, width=200)
