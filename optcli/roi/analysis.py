"""`optcli roi`: from a profile report (or a roofline estimate) to dollars, payback and replicas.

cost per 1K tokens = hourly price / (tokens/s x 3600) x 1000, on `throughput.total_tok_s` (prompt +
generated); daily = requests/day x tokens/request / 1000 x cost per 1K; annual = daily x 365.
Savings are against a baseline report (priced at its own recorded --gpu-hour-cost, else the same
hourly price) or an API price per 1K tokens. Every input is returned with where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from optcli.config import EngineConfig, check_dtype, check_kv_cache_dtype, option
from optcli.errors import UsageError
from optcli.roi import capacity, planner
from optcli.roi.cost import cost_per_1k, usd_per_1k
from optcli.roi.hardware import (
    GpuChoice,
    GpuSpec,
    detect_gpu,
    load_catalog,
    match_catalog,
    recommend_recipes,
    resolve_gpu,
)
from optcli.schema.report import Hardware, ProfileReport

DEFAULT_REQUESTS_PER_DAY = 10_000  # the seed article's case
DEFAULT_TOKENS_PER_REQUEST = 1_000
DEFAULT_BATCH_SIZE = 16  # concurrent sequences assumed by --estimate
DEFAULT_CONTEXT_LEN = 2048  # tokens per sequence for the memory plan (the model's context where that is shorter)
DEFAULT_OUTPUT_LEN = 256  # generated tokens per request assumed by --estimate (the rest is prompt)
BANDS = ((6, "Strongly recommended"), (12, "Recommended"), (24, "Consider if scaling"))


def daily_cost(requests_per_day: float, tokens_per_request: float, usd_per_1k_tokens: float) -> float:
    return requests_per_day * tokens_per_request / 1000 * usd_per_1k_tokens


def payback_months(implementation_usd: float, annual_savings_usd: float) -> float | None:
    return implementation_usd / annual_savings_usd * 12 if annual_savings_usd > 0 else None


def recommendation(annual_savings_usd: float | None, months: float | None) -> str | None:
    if annual_savings_usd is None:
        return None  # no baseline: nothing to compare
    if annual_savings_usd <= 0 or months is None:
        return "Not worth it"
    return next((label for limit, label in BANDS if months < limit), "Defer until scale justifies")


@dataclass
class RoiOptions:
    """What `optcli roi` is asked; each field declared with its flag and help (`cli/flags.py` makes the options)."""

    report: Path | None = option(None, "--report", help="report.json from optcli profile (measured).")
    estimate: str | None = option(None, "--estimate", help="MODEL (or config.json): roofline estimate instead of a report.")
    baseline_report: Path | None = option(None, "--baseline-report", help="report.json of what you run today.")
    baseline_usd_per_1k_tokens: float | None = option(None, "--baseline-usd-per-1k-tokens",
                                                      help="Or today's API price per 1K tokens.")
    gpu: str | None = option(None, "--gpu", help="GPU from the catalog (price, memory, bandwidth, FLOP/s).")
    gpu_hour_cost: float | None = option(None, "--gpu-hour-cost",
                                         help="USD per GPU hour (overrides report and catalog).")
    gpu_catalog: Path | None = option(None, "--gpu-catalog", help="YAML merged over the packaged GPU catalog.")
    requests_per_day: float | None = option(None, "--requests-per-day", help="Default 10,000.")
    tokens_per_request: float | None = option(None, "--tokens-per-request", help=(
        "Prompt + generated (default: the report's workload, else 1,000)."))
    implementation_cost: float | None = option(None, "--implementation-cost",
                                               help="One-off USD, for the payback period (default 0).")
    target_rps: float | None = option(None, "--target-rps", help="Requests/s to plan replicas for.")
    p95_slo_ms: float | None = option(None, "--p95-slo-ms", help="p95 end-to-end latency SLO.")
    load_trace: Path | None = option(None, "--load-trace", help="CSV time,requests_per_s: replay autoscaling.")
    min_replicas: int = option(1, "--min-replicas", help="Fewest replicas the autoscaling replay keeps.")
    max_replicas: int = option(10, "--max-replicas", help="Most replicas the autoscaling replay starts.")
    recipe: str | None = option(None, "--recipe", help=(
        "Recipe for the memory plan/estimate (default: the report's, else bf16)."))
    batch_size: int | None = option(None, "--batch-size", help="Concurrent sequences (estimate default 16).")
    context_len: int | None = option(None, "--context-len", help=(
        "Tokens per sequence for the memory plan (default 2048)."))
    output_len: int | None = option(None, "--output-len", help=(
        "Generated tokens per request for --estimate (default 256)."))
    # what `serve --dtype` would be given; default the report's, else auto
    dtype: str | None = option(None, "--dtype", help=(
        "The dtype `serve --dtype` would get, for the KV cache in the plan (default: the report's, else auto)."))
    # what `serve --kv-cache-dtype` would be given; default the report's, else auto
    kv_cache_dtype: str | None = option(None, "--kv-cache-dtype", help=(
        "auto | bfloat16 | float16 | fp8 | fp8_e4m3 | int8: the KV cache `serve --kv-cache-dtype` would keep, "
        "for the plan (default: the report's, else auto: the serving dtype)."))


def _check(o: RoiOptions) -> None:
    if (o.report is None) == (o.estimate is None):
        raise UsageError("give exactly one of --report FILE (measured) or --estimate MODEL (roofline estimate)")
    if o.dtype is not None:
        check_dtype(o.dtype, "--dtype")
    if o.kv_cache_dtype is not None:
        check_kv_cache_dtype(o.kv_cache_dtype, "--kv-cache-dtype")
    if o.baseline_report is not None and o.baseline_usd_per_1k_tokens is not None:
        raise UsageError("give at most one of --baseline-report and --baseline-usd-per-1k-tokens")
    positive = {"--gpu-hour-cost": o.gpu_hour_cost, "--baseline-usd-per-1k-tokens": o.baseline_usd_per_1k_tokens,
                "--requests-per-day": o.requests_per_day, "--tokens-per-request": o.tokens_per_request,
                "--target-rps": o.target_rps, "--p95-slo-ms": o.p95_slo_ms, "--batch-size": o.batch_size,
                "--context-len": o.context_len, "--output-len": o.output_len, "--min-replicas": o.min_replicas}
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number (got {value:g})")
    if o.implementation_cost is not None and not (math.isfinite(o.implementation_cost) and o.implementation_cost >= 0):
        raise UsageError(f"--implementation-cost must be >= 0 (got {o.implementation_cost:g})")
    if o.max_replicas < o.min_replicas:
        raise UsageError(f"--max-replicas ({o.max_replicas}) is below --min-replicas ({o.min_replicas})")
    if o.load_trace is not None and o.p95_slo_ms is None:
        raise UsageError("--load-trace needs --p95-slo-ms (the policy scales up when p95 exceeds it)")


def load_report(path: Path, flag: str = "--report") -> ProfileReport:
    """A profile report.json, validated whole (`ProfileReport.load`: a bad field is one line naming it), with
    the one figure every cost needs: a positive `throughput.total_tok_s`."""
    report = ProfileReport.load(Path(path), flag)
    tok_s = report.throughput.total_tok_s if report.throughput is not None else None
    if not isinstance(tok_s, int | float) or not tok_s > 0:
        raise UsageError(f"{flag} {path}: missing or non-positive field 'throughput.total_tok_s'")
    return report


def _pick(inputs: dict, name: str, *candidates: tuple[object, str]):
    """The first candidate (value, source) that is not None, recorded in `inputs`."""
    value, source = next(((v, s) for v, s in candidates if v is not None), (None, None))
    inputs[name] = {"value": value, "source": source}
    return value


def _gpu(choice: GpuChoice | None, report: ProfileReport | None,
         catalog: dict[str, GpuSpec]) -> tuple[GpuSpec | None, dict | None]:
    """(catalog entry, detected device): the --gpu flag, else the report's CUDA device, else this machine's."""
    if choice is not None:
        return choice.spec, None
    if report is not None:
        hw = report.hardware or Hardware()
        if str(hw.device or "").startswith("cuda"):
            return match_catalog(str(hw.name or ""), hw.memory_bytes, catalog), None
        return None, None
    detected = detect_gpu(catalog)
    return (catalog[detected["catalog"]] if detected and detected["catalog"] else None), detected


def _workload_tokens(report: ProfileReport | None) -> float | None:
    w = report.workload if report is not None else None
    if w is None or w.prompt_len is None or len(w.prompt_len) != 2 or not isinstance(w.output_len, int):
        return None  # a dataset's or a range's lengths: no one figure per request
    a, b = w.prompt_len
    return (a + b - 1) / 2 + w.output_len  # prompts uniform in [a, b)


def compute_roi(o: RoiOptions) -> dict:
    _check(o)
    catalog = load_catalog(o.gpu_catalog)
    report = load_report(o.report) if o.report is not None else None
    choice = resolve_gpu(o.gpu, catalog) if o.gpu is not None else None
    gpu, detected = _gpu(choice, report, catalog)
    if report is None and gpu is None:
        raise UsageError(f"--estimate needs a GPU from the catalog: pass --gpu NAME (known: {', '.join(catalog)})")
    inputs: dict = {}
    _pick(inputs, "gpu", (choice and gpu.name, "flag"), (gpu and gpu.name, "report" if report else "detected"))
    if choice is not None:  # what was typed and, where it was not an exact name, how it was resolved
        inputs["gpu"].update(requested=o.gpu, resolution=choice.note)
    hourly = _pick(inputs, "gpu_hour_cost_usd", (o.gpu_hour_cost, "flag"),
                   (report.at("cost.gpu_hour_cost_usd") if report else None, "report"),
                   (gpu and gpu.hourly_usd, "catalog"))
    if hourly is None or not hourly > 0:
        raise UsageError(f"no GPU price: pass --gpu-hour-cost USD or --gpu NAME (known: {', '.join(catalog)})")
    rpd = _pick(inputs, "requests_per_day", (o.requests_per_day, "flag"), (DEFAULT_REQUESTS_PER_DAY, "default"))
    tpr = _pick(inputs, "tokens_per_request", (o.tokens_per_request, "flag"), (_workload_tokens(report), "report"),
                (DEFAULT_TOKENS_PER_REQUEST, "default"))
    impl = _pick(inputs, "implementation_cost_usd", (o.implementation_cost, "flag"), (0.0, "default"))

    plan, points = None, None
    if report is not None:
        tp = report.throughput
        total_tok_s = _pick(inputs, "total_tok_s", (tp.total_tok_s, "report"))
        output_tok_s = _pick(inputs, "output_tok_s", (tp.output_tok_s, "report"))
    else:
        recipe, scheme = planner.scheme_for(_pick(inputs, "recipe", (o.recipe, "flag"), ("bf16", "default")))
        shape = planner.model_shape(o.estimate)
        batch = _pick(inputs, "batch_size", (o.batch_size, "flag"), (DEFAULT_BATCH_SIZE, "default"))
        out_len = _pick(inputs, "output_len", (o.output_len, "flag"),
                        (min(DEFAULT_OUTPUT_LEN, max(1, int(tpr) - 1)), "default"))
        prompt_len = max(1, int(tpr) - out_len)
        engine = _serving_config(o, None, inputs)
        kv_bytes = planner.kv_element_bytes(shape, engine)
        est = planner.roofline(shape, scheme, gpu, batch, prompt_len, out_len, kv_dtype_bytes=kv_bytes)
        total_tok_s = _pick(inputs, "total_tok_s", (est["total_tok_s"], "estimate"))
        output_tok_s = _pick(inputs, "output_tok_s", (est["output_tok_s"], "estimate"))
        points = [capacity.Point(batch, est["requests_s"], est["e2e_ms"])]
        plan = {"roofline": est}

    costs = cost_per_1k(hourly, total_tok_s, output_tok_s)
    cost_1k = costs["usd_per_1k_tokens"]
    daily = daily_cost(rpd, tpr, cost_1k)
    annual = daily * 365
    baseline_annual = _baseline_annual(o, inputs, hourly, rpd, tpr)
    savings = baseline_annual - annual if baseline_annual is not None else None
    months = payback_months(impl, savings) if savings is not None else None
    plan = _plan(o, report, gpu, detected, inputs, plan)
    cap = _capacity(o, report, points, hourly, inputs)
    return {
        "warnings": _warnings(report, gpu if choice is not None else None, catalog),
        **costs,
        "daily_cost_usd": daily,
        "annual_cost_usd": annual,
        "baseline_annual_cost_usd": baseline_annual,
        "annual_savings_usd": savings,
        "payback_months": months,
        "recommendation": recommendation(savings, months),
        "replicas": cap["replicas"] if cap else None,
        "estimate": report is None,
        "inputs": inputs,
        "plan": plan,
        "capacity": cap,
    }


def _warnings(report: ProfileReport | None, priced: GpuSpec | None, catalog: dict[str, GpuSpec]) -> list[str]:
    """What a reader of the figures must know: a `--gpu` priced from throughput measured on another device (a
    CPU, or another GPU), and the report's own contention warning (measured on a busy machine)."""
    warnings = []
    hw = (report.hardware if report is not None else None) or Hardware()
    if report is not None and priced is not None:
        device, name = str(hw.device or ""), str(hw.name or "an unrecorded device")
        if not device.startswith("cuda"):
            where = f"a CPU ({name})" if device == "cpu" else f"{device or 'an unrecorded device'} ({name})"
            warnings.append(f"--gpu {priced.name} is priced from throughput measured on {where}: the costs assume a "
                            f"{priced.name} serves no faster than that; profile on a {priced.name} (or see "
                            f"--estimate's roofline) for its own figures")
        elif match_catalog(name, hw.memory_bytes, catalog) is not priced:
            warnings.append(f"--gpu {priced.name} is priced from throughput measured on {name}: the costs assume a "
                            f"{priced.name} serves as fast as that GPU did; profile on a {priced.name} for its own "
                            "figures")
    if hw.contention is not None and hw.contention.warning:
        warnings.append(f"the report was measured on a busy machine: {hw.contention.warning}")
    return warnings


def _baseline_annual(o: RoiOptions, inputs: dict, hourly: float, rpd: float, tpr: float) -> float | None:
    if o.baseline_usd_per_1k_tokens is not None:
        per_1k = _pick(inputs, "baseline_usd_per_1k_tokens", (o.baseline_usd_per_1k_tokens, "flag"))
    elif o.baseline_report is not None:
        base = load_report(o.baseline_report, "--baseline-report")
        tok_s = _pick(inputs, "baseline_total_tok_s", (base.throughput.total_tok_s, "report"))
        price = _pick(inputs, "baseline_gpu_hour_cost_usd",
                      (base.at("cost.gpu_hour_cost_usd"), "report"), (hourly, "same as candidate"))
        per_1k = _pick(inputs, "baseline_usd_per_1k_tokens", (usd_per_1k(price, tok_s), "report"))
    else:
        return None
    return daily_cost(rpd, tpr, per_1k) * 365


def _plan(o: RoiOptions, report: ProfileReport | None, gpu: GpuSpec | None, detected: dict | None, inputs: dict,
          plan: dict | None) -> dict | None:
    """Memory plan and recipe advice where a model config and a GPU are known."""
    if gpu is None and detected is None:
        return plan
    model = o.estimate or (report.model if report else None)
    batch = o.batch_size or (report.at("workload.concurrency") if report else None)
    cc = gpu.compute_capability if gpu else detected["compute_capability"]
    has_fp8 = bool(gpu.fp8_tflops) if gpu else True
    plan = {**(plan or {}), "gpu": gpu.name if gpu else detected["name"],
            "recommendations": recommend_recipes(cc, has_fp8, batch)}
    recipe = _pick(inputs, "recipe", (o.recipe, "flag"), (report.recipe if report else None, "report"),
                   ("bf16", "default"))
    local = o.estimate or str(model).startswith("builtin:") or Path(str(model)).exists()
    if not local:  # a report from another machine: its model is not here (and the hub is not asked)
        plan["memory"] = {"error": f"model config not available here: {model}"}
        return plan
    name, scheme = planner.scheme_for(recipe)
    shape = planner.model_shape(model)
    memory = gpu.memory_bytes if gpu else detected["memory_bytes"]
    limit = shape.max_positions  # no sequence is longer than the model's context, whatever the default says
    if o.context_len is not None and limit is not None and o.context_len > limit:
        raise UsageError(f"--context-len {o.context_len} is over the model's context of {limit} tokens "
                         f"(max_position_embeddings of {model})")
    default = ((limit, "the model's context (max_position_embeddings)") if limit is not None and
               limit < DEFAULT_CONTEXT_LEN else (DEFAULT_CONTEXT_LEN, "default"))
    context = _pick(inputs, "context_len", (o.context_len, "flag"), default)
    engine = _serving_config(o, report, inputs)
    plan["memory"] = {"recipe": name, **planner.plan_for_engine(shape, scheme, memory, context, batch or 1, engine)}
    return plan


def _serving_config(o: RoiOptions, report: ProfileReport | None, inputs: dict) -> EngineConfig:
    """The engine `serve` would run on the GPU: the dtype asked for (flag, else the one the report's
    profile was asked to run in), with the engine's defaults for the rest, as `serve` has them."""
    profiled = report.at("workload.engine.dtype_requested") if report else None
    dtype = _pick(inputs, "dtype", (o.dtype, "flag"), (profiled, "report"), ("auto", "default"))
    profiled_kv = report.at("workload.engine.kv_cache_dtype") if report else None
    kv_dtype = _pick(inputs, "kv_cache_dtype", (o.kv_cache_dtype, "flag"), (profiled_kv, "report"),
                     ("auto", "default"))
    return EngineConfig(device="cuda", dtype=dtype, kv_cache_dtype=kv_dtype)


def _capacity(o: RoiOptions, report: ProfileReport | None, points, hourly: float, inputs: dict) -> dict | None:
    if o.target_rps is None and o.load_trace is None:
        return None
    points = points or capacity.sweep_points(report)
    measured = report.at("throughput.slo_max_rate") if report else None
    if o.p95_slo_ms is None and measured is not None and measured.requests_s:
        # the profile found the highest rate whose latencies met its KPI file's gates: plan from that
        best = capacity.Point(None, measured.requests_s, measured.e2e_p95_ms)
        source = f"report: profile's SLO-max-rate (its KPI latency gates met at {measured.level})"
    else:
        best = capacity.per_replica(points, o.p95_slo_ms)
        source = (f"report sweep: the highest-throughput level with p95 E2E <= {o.p95_slo_ms:g} ms"
                  if o.p95_slo_ms is not None else "report sweep: the highest-throughput level (no SLO given)")
    _pick(inputs, "p95_slo_ms", (o.p95_slo_ms, "flag"))
    result = {"per_replica_rps": best.requests_s, "concurrency": best.concurrency, "p95_ms": best.p95_ms,
              "source": source, "points": [p.__dict__ for p in points], "replicas": None, "autoscaling": None}
    if o.target_rps is not None:
        _pick(inputs, "target_rps", (o.target_rps, "flag"))
        result["replicas"] = capacity.replicas_for(o.target_rps, best.requests_s)
        result["fleet_daily_cost_usd"] = result["replicas"] * hourly * 24
    if o.load_trace is not None:
        trace = capacity.load_trace(o.load_trace)
        _pick(inputs, "load_trace", (str(o.load_trace), "flag"))
        result["autoscaling"] = capacity.replay(trace, points, o.p95_slo_ms, best.requests_s, hourly,
                                                o.min_replicas, o.max_replicas)
    return result
