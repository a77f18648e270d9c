"""The profile report, section by section: a skeleton with every contract field null (`new_report`), then
each measurement's figures filled in as it finishes. Nothing is measured here, and nothing is invented: a
figure the target does not measure stays null."""

from __future__ import annotations

from optcli.bench.args import ProfileArgs
from optcli.bench.comparison import comparison
from optcli.bench.sweep import level_point, slo_max_rate
from optcli.bench.targets import Measured, Target
from optcli.bench.workload import Workload
from optcli.roi.cost import cost_per_1k  # the one cost function, shared with `optcli roi`
from optcli.schema.report import LATENCY_METRICS, LoadPoint, ProfileReport
from optcli.util.env import library_versions

ACCURACY_KEYS = ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")
SPEED_KEYS = ("output_tok_s", "total_tok_s", "requests_s")


def new_report(args: ProfileArgs, target: Target, baseline: str | None, manifest: dict | None,
               hardware: dict) -> ProfileReport:
    return ProfileReport.model_validate({
        "model": args.model,
        "baseline": baseline,
        "recipe": manifest["recipe"]["name"] if manifest else None,
        "hardware": hardware,
        "workload": _workload(args, target),
        "throughput": dict.fromkeys(SPEED_KEYS),
        "latency_ms": {m: dict.fromkeys(("mean", "p50", "p95", "p99")) for m in LATENCY_METRICS},
        "memory": dict.fromkeys(("weights_bytes", "peak_bytes", "kv_cache_bytes")),
        "accuracy": dict.fromkeys(ACCURACY_KEYS),
        "batch_efficiency": None,
        "gpu_utilization": None,
        "cost": {"usd_per_1k_tokens": None, "usd_per_1k_output_tokens": None,
                 "gpu_hour_cost_usd": args.outputs.gpu_hour_cost},
        "kpi": {"passed": True, "checks": []},
        # the source measured the same way in this run: its figures, rows of both with ratios, and
        # warnings where the artifact is slower; null without a baseline and with --endpoint
        "comparison": None,
        # batch-1 decode's weight-read bandwidth against the machine's peak; null with --endpoint
        "roofline": None,
        "versions": library_versions(),
    })


def _workload(args: ProfileArgs, target: Target) -> dict:
    w, endpoint = args.workload, args.target.endpoint
    return {
        "requests": w.requests,
        "prompt_len": list(w.prompt_len),
        "output_len": (list(w.output_len) if isinstance(w.output_len, tuple) else
                       w.output_len if isinstance(w.output_len, int) else str(w.output_len)),
        "dataset": {"path": str(args.dataset_path), "rows": len(w.dataset)} if w.dataset else None,
        "prefix": {"len": w.prefix_len, "count": w.prefix_count} if w.prefix_len else None,
        "concurrency": w.headline().concurrency,  # the headline level's (the report's latencies)
        "concurrency_sweep": _concurrency_sweep(w),
        "rate": w.headline().rate,
        "sweep_size": w.sweep_size or None,  # `--rate sweep`: GuideLLM's sweep of this many levels
        "arrivals": w.arrivals,
        "warmup": w.warmup, "cooldown": w.cooldown, "max_seconds": w.max_seconds,
        "rampup_s": w.rampup_s,  # a level without a rate started its first requests over this many seconds
        # how the speed figures were repeated (`repeats.py`): the in-process engine's schedule, once run
        "repeats": {"repeats": 1, "order": None, "resident": None, "warm_up": None, "prefix_cache": None},
        "levels": None,  # each level's label, in the order run
        "seed": w.seed,
        "endpoint": endpoint,
        "eval_text": str(args.accuracy.eval_text) if args.accuracy.eval_text else "builtin corpus heldout.txt",
        "accuracy_backend": args.accuracy.backend,
        "prompt_format": w.prompt_format or ("tokens" if target.in_process else "text"),
        "engine": target.engine_info(),
    }


def _concurrency_sweep(workload: Workload) -> list[int] | None:
    levels = () if workload.sweep_size else workload.load_levels()
    if len(levels) > 1 and all(level.mode == "concurrent" for level in levels):
        return [level.concurrency for level in levels]
    return None


def add_accuracy(report: ProfileReport, acc: dict | None, backend: str | None = None) -> None:
    """The accuracy figures (and `top_k` / `lm_head` where measured); `backend` names a served run's method."""
    if acc is None:
        return
    report.accuracy = {k: acc.get(k) for k in ACCURACY_KEYS} | {k: acc[k] for k in ("top_k", "lm_head", "kv_cache") if k in acc}
    if backend is not None:
        report.workload.accuracy_backend = backend.format(top_k=acc.get("top_k"))


def add_speed(report: ProfileReport, measured: Measured, gates: list, in_process: bool) -> list[LoadPoint]:
    """The candidate's speed: offline and batch-1 figures in process, the online levels for every target, the
    headline level's latencies; returns the levels' points (`throughput.sweep`)."""
    cand = measured.candidate
    report.workload.update(measured.workload)
    if cand is not None:
        report.workload.engine.update(cand.engine_options)
        report.throughput.update(cand.throughput)
        report.update(batch_efficiency=cand.batch_efficiency, memory=cand.memory)
    # the headline level (the last one, a sweep's throughput run): the median over the repeats where there
    # were repeats (a level list's points are its first repeat's, one curve)
    online = measured.online
    points = [level_point(level, summary, gates) for level, summary in measured.levels]
    report.workload.levels = [p.label for p in points]
    report.latency_ms = online["latency_ms"]
    report.throughput.update(
        online_output_tok_s=online["throughput"]["output_tok_s"],
        sweep=points,  # one point per load level (latency, rate, SLO), for `optcli roi`'s capacity plan
        # the level with the highest achieved rate whose latencies meet the KPI file's latency gates
        slo_max_rate=slo_max_rate(points),
        failed_requests=online["failures"]["failed"],  # over every repeat of the headline level
        failures=online["failures"],  # how many of the online requests failed, and the distinct errors
        goodput_requests_s=(online["goodput"] or {}).get("requests_s"),
        prefix_cache_hit_rate=online.get("prefix_cache_hit_rate"),  # the online run's; null for an endpoint
        decode_tok_s=cand.decode_tok_s if cand else None,  # batch 1 (see roofline.method); null for a server
        prompt_tok_s=cand.prompt_tok_s if cand else None,  # batch 1, a cold 128-token prompt / its TTFT
    )
    if cand is not None:  # each speed figure's median and 95% interval over the repeats (stats.py)
        report.throughput.intervals = cand.intervals()
    if not in_process:  # no offline phase: the served figures are the headline level's
        report.throughput.update({k: online["throughput"][k] for k in SPEED_KEYS})
    tp = report.throughput
    report.cost.update(cost_per_1k(report.cost.gpu_hour_cost_usd, tp.total_tok_s, tp.output_tok_s))
    return points


def add_baseline(report: ProfileReport, measured: Measured, workload: Workload, device: str) -> dict | None:
    """The source measured the same way in this run, side by side with the artifact (`comparison`);
    returns its figures (the HTML's bars), None without one."""
    base, base_online = measured.baseline, measured.baseline_online
    if base_online is None:
        return None
    throughput = {k: base_online["throughput"][k] for k in SPEED_KEYS}  # a server's: the headline level's
    memory = dict.fromkeys(("weights_bytes", "peak_bytes", "kv_cache_bytes"))  # a server's own
    if base is not None:  # interleaved with the artifact in process
        engine = report.workload.engine
        engine.update(baseline_dtype=base.engine_options["dtype"],
                      baseline_dtype_reason=base.engine_options["dtype_reason"],
                      baseline_kernels=base.engine_options["kernels"])
        throughput, memory = dict(base.throughput), dict(base.memory)
        if not device.startswith("cuda"):
            memory["peak_bytes"] = None  # the process peak would include the candidate's
    figures = {
        "accuracy": {"ppl": report.accuracy.baseline_ppl},
        "memory": memory,
        "throughput": {k: throughput[k] for k in SPEED_KEYS}
        | {"online_output_tok_s": base_online["throughput"]["output_tok_s"],
           "decode_tok_s": base.decode_tok_s if base else None, "prompt_tok_s": base.prompt_tok_s if base else None},
        "latency_ms": base_online["latency_ms"],
    }
    if base is not None:
        report.throughput.update({f"baseline_{k}": throughput[k] for k in SPEED_KEYS})
    report.throughput.baseline_online_output_tok_s = base_online["throughput"]["output_tok_s"]
    if base is not None:
        report.throughput.update(baseline_decode_tok_s=base.decode_tok_s, baseline_prompt_tok_s=base.prompt_tok_s)
    runs = {"value": measured.candidate.runs, "baseline": base.runs} if base is not None else None
    report.comparison = comparison(report, figures, workload, runs=runs)
    return figures
