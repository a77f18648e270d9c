"""What a KPI file's keys mean in a benchmark: which ones `profile` applies, which it only records
because they mean something in production alone, and `latency.alert_window` as the window over which
the worst p95/p99 of a long run is taken.

A benchmark cannot watch a monthly budget or probe accuracy every N requests, but refusing the article's
KPI file for holding those keys would make users keep two files; so they are validated (kpi.py),
recorded under `kpi.production_only` with the reason, and `serve --kpi` watches them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from optcli.bench.kpi import Kpi, evaluate_kpis
from optcli.bench.metrics import percentiles

# key -> why a benchmark does not apply it (and what does)
PRODUCTION_ONLY = {
    "cost.budget_alert": "a share of a monthly budget: only a running server spends one "
                         "(serve --kpi FILE --gpu-hour-cost USD --monthly-budget USD watches it)",
    "accuracy.eval_frequency": "a probe every N served requests: serve --kpi FILE runs it live",
}


def set_keys(kpi: Kpi) -> list[str]:
    """The keys the file set, as written (`latency.p95_threshold`, `p95_ttft_ms_max`), in model order."""
    keys = []
    for name in Kpi.model_fields:
        if name not in kpi.model_fields_set:
            continue
        section = getattr(kpi, name)
        if isinstance(section, BaseModel):  # a nested section: its own set keys
            keys += [f"{name}.{field}" for field in type(section).model_fields if field in section.model_fields_set]
        else:
            keys.append(name)
    return keys


def profile_scope(kpi: Kpi) -> dict[str, Any]:
    """{applied: [key], production_only: [{key, why}]}: every key the file set, in one list or the other."""
    applied, production = [], []
    for key in set_keys(kpi):
        if key in PRODUCTION_ONLY:
            production.append({"key": key, "why": PRODUCTION_ONLY[key]})
        else:
            applied.append(key)
    return {"applied": applied, "production_only": production}


def latency_windows(online: dict, metric: str, window_s: float) -> dict[str, Any]:
    """The headline level's measured requests in consecutive `window_s` windows by completion time (from
    the first measured send), each window's p95/p99 of `metric` (ms), and the worst window's. A run
    shorter than the window is one window (the whole run), and says so."""
    timings = online.get("timings") or []
    lo, hi = online.get("measured") or (0, len(timings))
    done = [t for t in timings[lo:hi] if t.ok]
    values = [(t.end, v * 1e3) for t in done if (v := _request_latency(t, metric)) is not None]
    t0 = min((t.start for t in done), default=0.0)
    buckets: dict[int, list[float]] = {}
    for end, ms in values:
        buckets.setdefault(int((end - t0) // window_s), []).append(ms)
    windows = [{"start_s": i * window_s, "end_s": (i + 1) * window_s, "requests": len(v),
                **{k: percentiles(v)[k] for k in ("p95", "p99")}} for i, v in sorted(buckets.items())]
    span = max((end for end, _ in values), default=t0) - t0
    worst = {p: max((w[p] for w in windows), default=None) for p in ("p95", "p99")}
    return {"metric": metric, "window_s": window_s, "run_s": span, "windows": windows, "worst": worst,
            "note": (f"the run ({span:.1f} s) is shorter than one window: its one window is the whole run"
                     if span < window_s else None)}


def _request_latency(t, metric: str) -> float | None:
    """One request's figure in s (ITL: its mean gap, as the per-request export gives it)."""
    if metric == "itl":
        gaps = t.itls()
        return sum(gaps) / len(gaps) if gaps else None
    return {"e2e": t.e2e, "ttft": t.ttft, "tpot": t.tpot}[metric]


def window_checks(kpi: Kpi, windows: dict[str, Any]) -> list[dict]:
    """The latency section's p95/p99 gates against the worst window's (the article's alert_window)."""
    latency = kpi.latency
    checks = []
    for pct in ("p95", "p99"):
        threshold = getattr(latency, f"{pct}_threshold")
        if threshold is None:
            continue
        value = windows["worst"][pct]
        checks.append({"name": f"worst {windows['window_s']:g} s window {pct}_{windows['metric']}_ms <= "
                               f"{threshold:g} (latency.alert_window)",
                       "threshold": threshold, "value": value, "baseline": None,
                       "passed": value is not None and value <= threshold})
    return checks


def apply_to_report(report: dict, kpi: Kpi, online: dict) -> None:
    """Add the alert_window checks, the per-window latencies and the applied/production-only split to
    `report["kpi"]` (after `evaluate_kpis` filled it)."""
    section = report["kpi"]
    section.update(profile_scope(kpi))
    latency = kpi.latency
    if latency is None or latency.alert_window is None:
        return
    windows = latency_windows(online, latency.metric, latency.alert_window)
    section["windows"] = windows
    section["checks"] += window_checks(kpi, windows)
    section["passed"] = all(c["passed"] for c in section["checks"])


def evaluate_with_scope(report: dict, kpi: Kpi, online: dict) -> dict:
    """`evaluate_kpis`, then the alert_window gates and the applied/production-only split: the report's `kpi`."""
    report["kpi"] = evaluate_kpis(report, kpi)
    apply_to_report(report, kpi, online)
    return report["kpi"]
