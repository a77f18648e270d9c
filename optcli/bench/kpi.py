"""KPI gates: thresholds from a YAML file, checked against a profile report.

A gate must never pass on missing data, so a figure the report could not measure (null) fails its
check. The file is validated strictly (extra="forbid") because a typo'd gate silently gating nothing
is worse than an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

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


class Kpi(BaseModel):
    """Service-level gates; every field is optional and only set fields are checked."""

    model_config = ConfigDict(extra="forbid")
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

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic would read `true` as 1.0: a threshold of "yes" is a mistake, not a number.
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value


def _allowed() -> str:
    return ", ".join(Kpi.model_fields)


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


def _lookup(report: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    node: Any = report
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return node


def evaluate_kpis(report: dict[str, Any], kpi: Kpi) -> dict[str, Any]:
    """One check per set gate; a value the report could not measure (null) fails its check."""
    checks = []
    for field, threshold in kpi.model_dump(exclude_none=True).items():
        keys, op, metric = _GATES[field]
        value = _lookup(report, keys)
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        # The YAML field rides along in the name so a failure message says which line to edit.
        checks.append({"name": f"{metric} {op} {threshold:g} ({field})", "threshold": threshold, "value": value,
                       "passed": bool(ok)})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def slo_from_kpi(kpi: Kpi) -> dict[str, float]:
    """Per-request latency thresholds for goodput: the p95 gate, else the p99 gate, per metric."""
    slo: dict[str, float] = {}
    for metric in ("ttft", "tpot", "e2e"):
        value = getattr(kpi, f"p95_{metric}_ms_max")
        if value is None:
            value = getattr(kpi, f"p99_{metric}_ms_max")
        if value is not None:
            slo[f"{metric}_ms"] = value
    return slo
