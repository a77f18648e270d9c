"""KPI gates: thresholds from a YAML file, checked against a profile report.

Two shapes, which may be mixed in one file:

- flat gate names (`p95_ttft_ms_max: 500`, `min_output_tok_s: 100`, `max_kld_mean: 0.05`, ...);
- the seed's nested KPIS structure, absolute and relative to the baseline measured in the same run:

      latency:    {p95_threshold: 500, p99_threshold: 800, metric: e2e}   # ms; metric e2e|ttft|tpot|itl
      throughput: {minimum: 100, degradation_threshold: 0.8}            # output tok/s; >= 0.8 x baseline's
      cost:       {maximum: 0.01, increase_threshold: 1.2}              # USD/1K tokens; <= 1.2 x baseline's
      accuracy:   {acceptable_drop: 0.02, min_task_recovery: 0.95}      # fractions

and the article's production keys (`latency.alert_window` s, `cost.budget_alert` share of a monthly
budget, `accuracy.eval_frequency` requests): validated here, applied or recorded as production-only
by `kpi_scope.py` (profile) and watched live by `optcli.serve.kpi_watch` (serve).

A gate must never pass on missing data, so a figure the report could not measure (null) fails its
check. The file is validated strictly (extra="forbid") because a typo'd gate silently gating nothing
is worse than an error. Every check names its threshold, its value and the baseline's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optcli.errors import UsageError

# field -> (path into report.json, comparison, short metric name used in check names)
_GATES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "p95_ttft_ms_max": (("latency_ms", "ttft", "p95"), "<=", "p95_ttft_ms"),
    "p99_ttft_ms_max": (("latency_ms", "ttft", "p99"), "<=", "p99_ttft_ms"),
    "p95_tpot_ms_max": (("latency_ms", "tpot", "p95"), "<=", "p95_tpot_ms"),
    "p99_tpot_ms_max": (("latency_ms", "tpot", "p99"), "<=", "p99_tpot_ms"),
    "p95_itl_ms_max": (("latency_ms", "itl", "p95"), "<=", "p95_itl_ms"),
    "p99_itl_ms_max": (("latency_ms", "itl", "p99"), "<=", "p99_itl_ms"),
    "p95_e2e_ms_max": (("latency_ms", "e2e", "p95"), "<=", "p95_e2e_ms"),
    "p99_e2e_ms_max": (("latency_ms", "e2e", "p99"), "<=", "p99_e2e_ms"),
    "min_output_tok_s": (("throughput", "output_tok_s"), ">=", "output_tok_s"),
    "min_requests_s": (("throughput", "requests_s"), ">=", "requests_s"),
    "max_ppl_ratio": (("accuracy", "ppl_ratio"), "<=", "ppl_ratio"),
    "max_kld_mean": (("accuracy", "kld_mean"), "<=", "kld_mean"),
    "min_top1_agreement": (("accuracy", "top1_agreement"), ">=", "top1_agreement"),
    "max_usd_per_1k_tokens": (("cost", "usd_per_1k_tokens"), "<=", "usd_per_1k_tokens"),
    "max_peak_memory_bytes": (("memory", "peak_bytes"), "<=", "peak_bytes"),
}


class _Gates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic would read `true` as 1.0: a threshold of "yes" is a mistake, not a number.
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value


class LatencyGates(_Gates):
    """Percentiles of one latency metric, in ms (E2E unless `metric` says otherwise)."""

    metric: Literal["e2e", "ttft", "tpot", "itl"] = "e2e"
    p50_threshold: float | None = None
    p95_threshold: float | None = None
    p99_threshold: float | None = None
    alert_window: float | None = Field(None, gt=0)  # s: the window p95/p99 are taken over (production key)


class ThroughputGates(_Gates):
    minimum: float | None = None  # output tok/s (offline)
    degradation_threshold: float | None = None  # output tok/s / the baseline's, at least this


class CostGates(_Gates):
    maximum: float | None = None  # USD per 1K tokens (needs --gpu-hour-cost)
    increase_threshold: float | None = None  # cost per token / the baseline's, at most this
    budget_alert: float | None = Field(None, gt=0, le=1)  # share of the monthly budget spent: alert (production)


class AccuracyGates(_Gates):
    acceptable_drop: float | None = None  # per task metric: baseline - candidate; without tasks: ppl increase
    min_task_recovery: float | None = None  # per task metric: candidate / baseline
    eval_frequency: int | None = Field(None, ge=1)  # requests between live accuracy probes (production)


class Kpi(_Gates):
    """Service-level gates; every field is optional and only set fields are checked."""

    p95_ttft_ms_max: float | None = None
    p99_ttft_ms_max: float | None = None
    p95_tpot_ms_max: float | None = None
    p99_tpot_ms_max: float | None = None
    p95_itl_ms_max: float | None = None
    p99_itl_ms_max: float | None = None
    p95_e2e_ms_max: float | None = None
    p99_e2e_ms_max: float | None = None
    min_output_tok_s: float | None = None
    min_requests_s: float | None = None
    max_ppl_ratio: float | None = None
    max_kld_mean: float | None = None
    min_top1_agreement: float | None = None
    max_usd_per_1k_tokens: float | None = None
    max_peak_memory_bytes: float | None = None  # float so YAML like 8e9 works
    min_task_recovery: float | None = None
    latency: LatencyGates | None = None
    throughput: ThroughputGates | None = None
    cost: CostGates | None = None
    accuracy: AccuracyGates | None = None

    def relative_gates(self) -> list[str]:
        """The set gates that compare with a baseline measured in the same run, as written in the file."""
        gates = [f"{section}.{name}" for section, names in
                 (("throughput", ("degradation_threshold",)), ("cost", ("increase_threshold",)),
                  ("accuracy", ("acceptable_drop", "min_task_recovery")))
                 for name in names if getattr(getattr(self, section) or _EMPTY[section], name) is not None]
        return gates + (["min_task_recovery"] if self.min_task_recovery is not None else [])


_EMPTY = {"throughput": ThroughputGates(), "cost": CostGates(), "accuracy": AccuracyGates()}
_FLAT = tuple(_GATES)
_NESTED = {"latency": LatencyGates, "throughput": ThroughputGates, "cost": CostGates, "accuracy": AccuracyGates}


def _allowed() -> str:
    nested = "; ".join(f"{k}.{{{', '.join(f for f in m.model_fields)}}}" for k, m in _NESTED.items())
    return f"{', '.join(_FLAT)}, min_task_recovery; {nested}"


def load_kpi(path: str | Path) -> Kpi:
    """Read and validate a KPI file; every problem becomes a one-line UsageError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read KPI file ({e.strerror or e}); allowed fields: {_allowed()}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise UsageError(f"{path}: invalid YAML ({msg}); allowed fields: {_allowed()}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of KPI fields, got {type(data).__name__}; "
                         f"allowed fields: {_allowed()}")
    try:
        return Kpi.model_validate(data)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        first = errors[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        if first["type"] == "extra_forbidden":
            raise UsageError(f"{path}: unknown field '{field}'; allowed fields: {_allowed()}") from None
        raise UsageError(f"{path}: field '{field}': {first['msg']} (got {first.get('input')!r}); "
                         f"allowed fields: {_allowed()}") from None


def _lookup(report: Any, keys: tuple[str, ...]) -> float | None:
    node: Any = report
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return node


def _baseline(report: dict, keys: tuple[str, ...]) -> float | None:
    """The baseline's figure at `keys` (the source measured in the same run: report.comparison.baseline)."""
    if keys[0] == "accuracy":
        return _lookup(report, ("accuracy", "baseline_ppl")) if keys[-1] == "ppl" else None
    return _lookup(report, ("comparison", "baseline", *keys))


def _check(name: str, threshold: float, value: float | None, baseline: float | None, op: str,
           ci_low: float | None = None, ci_high: float | None = None) -> dict:
    ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
    check = {"name": name, "threshold": threshold, "value": value, "baseline": baseline, "passed": bool(ok)}
    if ci_low is not None and ci_high is not None:  # a relative gate over repeats: its ratio's 95% interval
        check.update(ci_low=ci_low, ci_high=ci_high)
    return check


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _inverse(x: float | None) -> float | None:
    return 1 / x if x else None


def _measured_ratio(report: dict, field: str, fallback: float | None) -> tuple[float | None, float | None, float | None]:
    """(ratio, ci_low, ci_high) of the artifact against its baseline at `field`: the comparison row's median
    of paired repeats and its interval (the gate compares the median), else `fallback` with no interval."""
    rows = (report.get("comparison") or {}).get("rows") or []
    row = next((r for r in rows if isinstance(r, dict) and r.get("field") == field), None)
    if row is None or row.get("ratio") is None:
        return fallback, None, None
    return row["ratio"], row.get("ci_low"), row.get("ci_high")


def _task_rows(report: dict) -> list[dict]:
    tasks = (report.get("accuracy") or {}).get("tasks") or []
    return [t for t in tasks if isinstance(t, dict)]


def evaluate_kpis(report: dict[str, Any], kpi: Kpi) -> dict[str, Any]:
    """One check per set gate (per task metric for task gates); a value the report could not measure
    (null) fails its check."""
    checks = []
    for field in _FLAT:
        threshold = getattr(kpi, field)
        if threshold is None:
            continue
        keys, op, metric = _GATES[field]
        # The YAML field rides along in the name so a failure message says which line to edit.
        checks.append(_check(f"{metric} {op} {threshold:g} ({field})", threshold, _lookup(report, keys),
                             _baseline(report, keys), op))
    if kpi.latency is not None:
        m = kpi.latency.metric
        for pct in ("p50", "p95", "p99"):
            threshold = getattr(kpi.latency, f"{pct}_threshold")
            if threshold is not None:
                keys = ("latency_ms", m, pct)
                checks.append(_check(f"{pct}_{m}_ms <= {threshold:g} (latency.{pct}_threshold)", threshold,
                                     _lookup(report, keys), _baseline(report, keys), "<="))
    out_keys, total_keys = ("throughput", "output_tok_s"), ("throughput", "total_tok_s")
    tp = kpi.throughput or _EMPTY["throughput"]
    if tp.minimum is not None:
        checks.append(_check(f"output_tok_s >= {tp.minimum:g} (throughput.minimum)", tp.minimum,
                             _lookup(report, out_keys), _baseline(report, out_keys), ">="))
    if tp.degradation_threshold is not None:
        value, base = _lookup(report, out_keys), _baseline(report, out_keys)
        ratio, low, high = _measured_ratio(report, "throughput.output_tok_s", _ratio(value, base))
        checks.append(_check(f"output_tok_s / baseline's >= {tp.degradation_threshold:g} "
                             "(throughput.degradation_threshold)", tp.degradation_threshold,
                             ratio, base, ">=", low, high))
    cost = kpi.cost or _EMPTY["cost"]
    if cost.maximum is not None:
        checks.append(_check(f"usd_per_1k_tokens <= {cost.maximum:g} (cost.maximum)", cost.maximum,
                             _lookup(report, ("cost", "usd_per_1k_tokens")), None, "<="))
    if cost.increase_threshold is not None:
        # Same machine, same hourly price: cost per token scales as 1 / total tok/s, so the ratio needs no price.
        value, base = _lookup(report, total_keys), _baseline(report, total_keys)
        ratio, low, high = _measured_ratio(report, "throughput.total_tok_s", _ratio(value, base))
        # the cost ratio is the throughput ratio's inverse, and so is its interval (its ends swapped)
        checks.append(_check(f"cost per token / baseline's <= {cost.increase_threshold:g} (cost.increase_threshold)",
                             cost.increase_threshold, _inverse(ratio), base, "<=", _inverse(high), _inverse(low)))
    checks += _accuracy_checks(report, kpi)
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _accuracy_checks(report: dict, kpi: Kpi) -> list[dict]:
    acc = kpi.accuracy or _EMPTY["accuracy"]
    recovery = acc.min_task_recovery if acc.min_task_recovery is not None else kpi.min_task_recovery
    source = "accuracy.min_task_recovery" if acc.min_task_recovery is not None else "min_task_recovery"
    tasks = _task_rows(report)
    checks = []
    if acc.acceptable_drop is not None:
        drop = acc.acceptable_drop
        if tasks:
            for t in tasks:
                value = None if t.get("candidate") is None or t.get("baseline") is None else t["baseline"] - t["candidate"]
                checks.append(_check(f"{t['task']} {t['metric']} drop <= {drop:g} (accuracy.acceptable_drop)", drop,
                                     value, t.get("baseline"), "<="))
        else:  # no tasks run: the drop is perplexity's relative increase over the baseline's
            ratio = _lookup(report, ("accuracy", "ppl_ratio"))
            checks.append(_check(f"ppl increase (ppl / baseline's - 1) <= {drop:g} (accuracy.acceptable_drop)", drop,
                                 None if ratio is None else ratio - 1, _baseline(report, ("accuracy", "ppl")), "<="))
    if recovery is not None:
        if not tasks:  # a recovery gate with no task measured gates nothing: fail rather than pass
            checks.append(_check(f"task recovery >= {recovery:g} ({source}; no --tasks run)", recovery, None, None, ">="))
        for t in tasks:
            checks.append(_check(f"{t['task']} {t['metric']} recovery >= {recovery:g} ({source})", recovery,
                                 t.get("recovery"), t.get("baseline"), ">="))
    return checks


def slo_from_kpi(kpi: Kpi) -> dict[str, float]:
    """Per-request latency thresholds for goodput: the p95 gate, else the p99 gate, per metric (flat names
    first, then the nested latency section for its metric)."""
    slo: dict[str, float] = {}
    for metric in ("ttft", "tpot", "e2e"):
        value = getattr(kpi, f"p95_{metric}_ms_max")
        if value is None:
            value = getattr(kpi, f"p99_{metric}_ms_max")
        if value is None and kpi.latency is not None and kpi.latency.metric == metric:
            value = kpi.latency.p95_threshold if kpi.latency.p95_threshold is not None else kpi.latency.p99_threshold
        if value is not None:
            slo[f"{metric}_ms"] = value
    return slo


def latency_gates(kpi: Kpi | None) -> list[tuple[str, str, float]]:
    """The file's latency gates as (metric, percentile, ms): what each level of a sweep must meet to count
    as within the SLO (flat `p95_ttft_ms_max`-style gates and the nested latency section)."""
    if kpi is None:
        return []
    gates = []
    for field in _FLAT:
        keys, _, _ = _GATES[field]
        if keys[0] == "latency_ms" and getattr(kpi, field) is not None:
            gates.append((keys[1], keys[2], getattr(kpi, field)))
    if kpi.latency is not None:
        for pct in ("p50", "p95", "p99"):
            threshold = getattr(kpi.latency, f"{pct}_threshold")
            if threshold is not None:
                gates.append((kpi.latency.metric, pct, threshold))
    return gates
