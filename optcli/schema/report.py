"""`ProfileReport`: report.json as types. `optcli profile` builds it; `report/`, `bench/kpi.py`, `roi` and
`compare` read it by attribute instead of by string keys.

The field names and nesting are report.json's contract (DESIGN.md: scripts read them), so every section here
mirrors the file exactly; `tests/report/test_report_schema.py` checks reports written before this model
existed still load and save to the same JSON, and that profile still writes the same field paths.

Every section allows fields it does not declare (`extra="allow"`) and keeps them, in order, on a round trip:
a report from an older or newer optcli (or one a script added a field to) still loads, and saving it loses
nothing. The declared fields are what the readers use, and those are type-checked on load: a report whose
`throughput.total_tok_s` is a string is refused with the field named, not read as garbage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from optcli.errors import UsageError
from optcli.schema.section import Num, Section, first_error
from optcli.util.fs import atomic_write_text

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


class Percentiles(Section):
    mean: Num | None = None
    p50: Num | None = None
    p95: Num | None = None
    p99: Num | None = None


class Latency(Section):
    ttft: Percentiles | None = None
    tpot: Percentiles | None = None
    itl: Percentiles | None = None
    e2e: Percentiles | None = None

    @classmethod
    def empty(cls) -> Latency:
        return cls(**{m: Percentiles(mean=None, p50=None, p95=None, p99=None) for m in LATENCY_METRICS})


class Contention(Section):
    busy_share: Num | None = None
    steal_share: Num | None = None
    warning: str | None = None
    usable_cores: Num | None = None
    load_per_core: Num | None = None
    window_s: Num | None = None


class Hardware(Section):
    device: str | None = None
    name: str | None = None
    memory_bytes: int | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    contention: Contention | None = None


class Repeats(Section):
    repeats: int | None = None
    order: str | None = None
    resident: str | None = None
    warm_up: str | None = None
    prefix_cache: str | None = None
    window: dict[str, Any] | None = None  # each repeat's timed window and the runs it took (`Workload.min_time_s`)


class WorkloadEngine(Section):
    """The engine options both models ran with (every `EngineConfig` field, kept as extras so a new engine
    option needs no change here), or `name: vllm` and the vLLM options for `--engine vllm`."""

    name: str | None = None
    device: str | None = None
    dtype: str | None = None
    dtype_requested: str | None = None
    dtype_reason: str | None = None
    kernels: dict[str, Any] | None = None
    baseline_kernels: dict[str, Any] | None = None
    baseline_dtype: str | None = None
    baseline_dtype_reason: str | None = None


class Workload(Section):
    requests: int | None = None
    prompt_len: list[int] | None = None
    output_len: int | list[int] | str | None = None
    dataset: dict[str, Any] | None = None
    prefix: dict[str, Any] | None = None
    concurrency: int | None = None
    concurrency_sweep: list[int] | None = None
    rate: Num | None = None
    sweep_size: int | None = None
    arrivals: str | None = None
    warmup: Num | None = None
    cooldown: Num | None = None
    max_seconds: Num | None = None
    repeats: Repeats | None = None
    levels: list[str] | None = None
    seed: int | None = None
    endpoint: str | None = None
    eval_text: str | None = None
    accuracy_backend: str | None = None
    prompt_format: str | None = None
    engine: WorkloadEngine | None = None
    request_timeout_s: Num | None = None
    tokenizer: str | None = None
    tasks: dict[str, Any] | None = None
    export: dict[str, Any] | None = None


class LevelRequests(Section):
    completed: int | None = None
    failed: int | None = None
    sent: int | None = None
    excluded: dict[str, int] | None = None


class Slo(Section):
    met: bool | None = None
    attainment: Num | None = None
    goodput_requests_s: Num | None = None


class LoadPoint(Section):
    """One load level of `throughput.sweep` (`bench/sweep.py:level_point`)."""

    mode: str | None = None
    rate: Num | None = None
    concurrency: int | None = None
    label: str | None = None
    achieved_rate_requests_s: Num | None = None
    requests_s: Num | None = None
    output_tok_s: Num | None = None
    total_tok_s: Num | None = None
    latency_ms: Latency | None = None
    e2e_p95_ms: Num | None = None
    requests: LevelRequests | None = None
    failures: list[dict[str, Any]] | None = None
    slo: Slo | None = None


class SloMaxRate(Section):
    requests_s: Num | None = None
    level: str | None = None
    e2e_p95_ms: Num | None = None
    concurrency: Num | None = None  # requests in the server at that rate (Little's law): `roi --autoscale`'s target


class Failures(Section):
    failed: int | None = None
    total: int | None = None
    reasons: list[dict[str, Any]] | None = None


class LmHeadCost(Section):
    bytes: int | None = None
    share_of_weights: Num | None = None
    ms_per_step_batch1: Num | None = None
    tied: bool | None = None


class Throughput(Section):
    output_tok_s: Num | None = None
    total_tok_s: Num | None = None
    requests_s: Num | None = None
    lm_head: LmHeadCost | None = None
    quantized_kernels: Any = None
    gemm_choices: Any = None
    online_output_tok_s: Num | None = None
    sweep: list[LoadPoint] | None = None
    slo_max_rate: SloMaxRate | None = None
    failed_requests: int | None = None
    failures: Failures | None = None
    goodput_requests_s: Num | None = None
    prefix_cache_hit_rate: Num | None = None
    decode_tok_s: Num | None = None
    prompt_tok_s: Num | None = None
    # each speed figure's median and 95% interval over the repeats, by its field name
    intervals: dict[str, Any] | None = None
    baseline_output_tok_s: Num | None = None
    baseline_total_tok_s: Num | None = None
    baseline_requests_s: Num | None = None
    baseline_online_output_tok_s: Num | None = None
    baseline_decode_tok_s: Num | None = None
    baseline_prompt_tok_s: Num | None = None
    notes: list[str] | None = None


class Memory(Section):
    weights_bytes: int | None = None
    peak_bytes: int | None = None
    kv_cache_bytes: int | None = None


class TaskRow(Section):
    task: str | None = None
    metric: str | None = None
    candidate: Num | None = None
    baseline: Num | None = None
    recovery: Num | None = None


class Accuracy(Section):
    ppl: Num | None = None
    baseline_ppl: Num | None = None
    ppl_ratio: Num | None = None
    kld_mean: Num | None = None
    kld_p99: Num | None = None
    top1_agreement: Num | None = None
    top_k: int | None = None
    lm_head: dict[str, Any] | None = None
    tasks: list[TaskRow] | None = None


class Cost(Section):
    usd_per_1k_tokens: Num | None = None
    usd_per_1k_output_tokens: Num | None = None
    gpu_hour_cost_usd: Num | None = None


class KpiCheck(Section):
    name: str | None = None
    threshold: Num | None = None
    value: Num | None = None
    baseline: Num | None = None
    passed: bool | None = None
    ci_low: Num | None = None
    ci_high: Num | None = None


class Kpi(Section):
    passed: bool | None = None
    checks: list[KpiCheck] | None = None
    applied: list[str] | None = None  # the KPI file's keys this run applied
    production_only: list[dict[str, Any]] | None = None  # {key, why}: recorded, watched by `serve --kpi`
    windows: dict[str, Any] | None = None  # latency.alert_window's per-window p95/p99 (bench/kpi_scope.py)


class Figures(Section):
    """One model's headline figures: the source's in `comparison.baseline` (and the HTML's bars)."""

    throughput: Throughput | None = None
    latency_ms: Latency | None = None
    memory: Memory | None = None
    accuracy: Accuracy | None = None


class ComparisonRow(Section):
    metric: str | None = None
    field: str | None = None
    baseline: Num | None = None
    value: Num | None = None
    artifact: Num | None = None
    ratio: Num | None = None
    ci_low: Num | None = None
    ci_high: Num | None = None
    repeats: int | None = None
    verdict: str | None = None
    higher_is_better: bool | None = None
    value_ci_low: Num | None = None
    value_ci_high: Num | None = None
    baseline_ci_low: Num | None = None
    baseline_ci_high: Num | None = None
    runs: dict[str, list[Num | None]] | None = None


class Comparison(Section):
    baseline: Figures | None = None
    rows: list[ComparisonRow] | None = None
    warnings: list[str] | None = None
    method: str | None = None


class RooflineSide(Section):
    decode_tok_s: Num | None = None
    weights_bytes: int | None = None
    achieved_gbs: Num | None = None
    share_of_peak: Num | None = None


class Roofline(Section):
    peak_bandwidth_gbs: Num | None = None
    peak_source: str | None = None
    method: str | None = None
    artifact: RooflineSide | None = None
    baseline: RooflineSide | None = None


class ProfileReport(Section):
    """report.json of `optcli profile` (DESIGN.md's report.json contract), top-level keys in file order."""

    model: str | None = None
    baseline: str | None = None
    recipe: str | None = None
    hardware: Hardware | None = None
    workload: Workload | None = None
    throughput: Throughput | None = None
    latency_ms: Latency | None = None
    memory: Memory | None = None
    accuracy: Accuracy | None = None
    batch_efficiency: Num | None = None
    gpu_utilization: Num | None = None
    cost: Cost | None = None
    kpi: Kpi | None = None
    comparison: Comparison | None = None
    roofline: Roofline | None = None
    versions: dict[str, str | None] | None = None

    @classmethod
    def coerce(cls, report: ProfileReport | dict[str, Any]) -> ProfileReport:
        """The report as the model: readers take either (tests and scripts pass dicts)."""
        return report if isinstance(report, ProfileReport) else cls.model_validate(report)

    def to_json(self) -> str:
        """report.json's text: indented, the fields in the order they were set or loaded."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write report.json atomically (a temporary sibling renamed over it): never half a report."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path, flag: str = "--report") -> ProfileReport:
        """A report.json validated as a whole; any problem is one UsageError line naming `flag`, the file
        and, for a bad field, its path in the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise UsageError(f"{flag} {path}: not valid JSON") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise UsageError(f"{flag} {path}: not valid JSON") from None
        if not isinstance(data, dict):
            raise UsageError(f"{flag} {path}: not a profile report (expected a JSON object, got "
                             f"{type(data).__name__})")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UsageError(f"{flag} {path}: {first_error(exc)}") from None
