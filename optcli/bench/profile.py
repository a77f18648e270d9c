"""`optcli profile`: accuracy against a baseline, offline throughput, online latency under load, the
machine it ran on, cost, and KPI gates, in one report (report.json / .md / .html).

All figures are measured in this run; what cannot be measured here is None, never estimated.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from optcli.bench.accuracy import EngineLM, evaluate, evaluate_in_turn
from optcli.bench.comparison import comparison, offline_online_notes, roofline
from optcli.bench.contention import ContentionMonitor
from optcli.bench.endpoint_accuracy import TOP_K
from optcli.bench.export import check_export_path, level_rows, write_export
from optcli.bench.kpi import latency_gates, load_kpi, slo_from_kpi
from optcli.bench.kpi_scope import evaluate_with_scope
from optcli.bench.measure import free_device_memory
from optcli.bench.repeats import measure_models
from optcli.bench.served import endpoint_levels, measure_endpoint_accuracy, measure_vllm
from optcli.bench.sweep import level_point, slo_max_rate
from optcli.bench.tasks import run_tasks, task_manager, task_rows
from optcli.bench.vllm_server import VllmOptions
from optcli.bench.workload import Workload
from optcli.calibration.corpus import heldout_text
from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig
from optcli.engine import Engine
from optcli.engine.loading.placement import resolve_device
from optcli.errors import KpiFailed, UsageError
from optcli.report import check_out as check_report_out
from optcli.report import write_reports
from optcli.roi.cost import cost_per_1k  # the one cost function, shared with `optcli roi`
from optcli.roi.hardware import GpuUtilizationSampler, describe, peak_bandwidth
from optcli.util.env import library_versions
from optcli.util.vllm_argv import vllm_executable


def _manifest(path: Path | None) -> dict | None:
    if path is not None and (path / "optcli.json").is_file():
        return json.loads((path / "optcli.json").read_text())
    return None


ACCURACY_BACKENDS = ("engine", "transformers")


def measure_accuracy(model_path: Path, baseline_path: Path, eval_text: str, config: EngineConfig,
                     backend: str = "engine") -> dict:
    """PPL, KLD and top-1 agreement of the model against its baseline on the same tokens: through our engine,
    each model in the dtype and kernels it is served with (`config`, as `serve` would run it), one model
    resident at a time; or through transformers (the cross-check: its own kernels, the baseline in fp32)."""
    if backend == "transformers":
        return transformers_accuracy(model_path, baseline_path, eval_text, config.device)
    from transformers import AutoConfig, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(baseline_path)(eval_text, verbose=False).input_ids
    positions = getattr(AutoConfig.from_pretrained(baseline_path), "max_position_embeddings", 256)
    ctx = min(256, positions, config.max_model_len or positions)

    def load(path: Path):  # the engine is built when its turn comes, and nothing here keeps it
        return lambda: EngineLM(Engine(str(path), config))

    return evaluate_in_turn(load(model_path), load(baseline_path), ids, ctx=ctx).as_dict()


def transformers_accuracy(model_path: Path, baseline_path: Path, eval_text: str, device: str) -> dict:
    """The artifact as transformers loads it against the baseline in fp32, on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(eval_text, verbose=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_path, device_map=device).eval()
    baseline = AutoModelForCausalLM.from_pretrained(baseline_path, dtype=torch.float32, device_map=device).eval()
    ctx = min(256, getattr(model.config, "max_position_embeddings", 256))
    return evaluate(model, ids, baseline, ctx=ctx).as_dict()


def measure_head_accuracy(model_path: Path, eval_text: str, config: EngineConfig) -> dict:
    """What `config.lm_head` (int8) costs in accuracy: the engine with that head against the same model
    with its dense head, on the same tokens through the same engine (so only the head differs)."""
    rounded = Engine(str(model_path), config)
    ids = rounded.tokenizer(eval_text, verbose=False).input_ids
    ctx = min(256, rounded.max_model_len)
    dense = Engine(str(model_path), config.with_options(lm_head="dense"))
    return {"format": config.lm_head, **evaluate(EngineLM(rounded), ids, EngineLM(dense), ctx=ctx).as_dict()}


def profile(
    model: str,
    baseline: str | None = None,
    eval_text: Path | None = None,
    workload: Workload | None = None,
    kpi_file: Path | None = None,
    gpu_hour_cost: float | None = None,
    out: Path | None = None,
    endpoint: str | None = None,
    config: EngineConfig | None = None,
    progress=None,
    tokenizer: str | None = None,
    accuracy_backend: str = "engine",
    baseline_endpoint: str | None = None,
    tasks: list[str] | None = None,
    tasks_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    dataset_path: Path | None = None,
    export: Path | None = None,
    engine: str = "builtin",
    vllm: VllmOptions | None = None,
    api_key: str | None = None,
    request_timeout: float | None = None,
    **engine_options,
) -> dict:
    """Run the whole profile and write the reports; raises KpiFailed (exit 3) after writing them.
    `config` (plus any EngineConfig field by keyword) is the engine both models run in, as `serve` would;
    `engine="vllm"`: each is served by `vllm serve` (`vllm` options) instead, and measured as an endpoint.
    `api_key` (a bearer token) and `request_timeout` (s, the longest wait for a server's next byte) are for
    `endpoint` and `baseline_endpoint`."""
    workload = workload or Workload()
    if out is not None:  # where the results go, checked now rather than after minutes of measuring
        check_report_out(Path(out))
    check_export_path(export)
    kpi = load_kpi(kpi_file) if kpi_file is not None else None
    if eval_text is not None:
        _eval_text(eval_text)  # an unreadable, binary or empty file: exit 2 now, before any model loads
    if accuracy_backend not in ACCURACY_BACKENDS:
        raise UsageError(f"--accuracy-backend must be one of {', '.join(ACCURACY_BACKENDS)} (got '{accuracy_backend}')")
    if gpu_hour_cost is not None and gpu_hour_cost < 0:
        raise UsageError("--gpu-hour-cost must be >= 0")
    config = (config or EngineConfig()).with_options(**engine_options)
    device = resolve_device(config.device)
    config = config.with_options(device=device)
    step = progress or (lambda message: None)
    served = engine == "vllm"
    if engine not in ("builtin", "vllm"):
        raise UsageError(f"--engine must be builtin or vllm (got '{engine}')")
    if served:
        vllm = vllm or VllmOptions()
        if endpoint or baseline_endpoint:
            raise UsageError("--engine vllm starts its own servers: not with --endpoint / --baseline-endpoint")
        if tasks:
            raise UsageError("--tasks runs the model through our engine: not with --engine vllm")
        if config.lm_head != "dense":
            raise UsageError("--lm-head int8 is a builtin-engine option; vLLM serves the checkpoint's head")
        vllm_executable()  # absent: exit 2 before anything runs

    source = None if endpoint else resolve_model(model)
    manifest = _manifest(source.path) if source else None
    if baseline is None and manifest is not None and manifest.get("source", {}).get("path"):
        baseline = manifest["source"]["path"]
    baseline_source = resolve_model(baseline) if baseline and source else None
    if baseline_endpoint and not endpoint:
        raise UsageError("--baseline-endpoint compares two servers: it needs --endpoint too")
    if (api_key is not None or request_timeout is not None) and not endpoint:
        raise UsageError("--api-key and --request-timeout are for a server load-tested with --endpoint URL")
    if request_timeout is not None and not request_timeout > 0:
        raise UsageError(f"--request-timeout must be > 0 seconds (got {request_timeout:g})")
    if baseline_endpoint and baseline:
        raise UsageError("give the baseline once: --baseline MODEL (local) or --baseline-endpoint URL")
    manager = None
    if tasks:
        if endpoint:
            raise UsageError("--tasks runs the model in process through our engine: not with --endpoint")
        manager = task_manager(tasks, tasks_path)  # unknown or hub-only tasks fail here, before any model runs
    if kpi is not None and kpi.relative_gates() and baseline_source is None:
        why = ("an --endpoint run measures no baseline" if endpoint else
               "pass --baseline MODEL (an artifact's default baseline is its source)")
        raise UsageError(f"KPI gate(s) {', '.join(kpi.relative_gates())} compare with a baseline measured in the "
                         f"same run, and there is none: {why}")

    report: dict = {
        "model": model,
        "baseline": baseline,
        "recipe": manifest["recipe"]["name"] if manifest else None,
        "hardware": None,
        "workload": {
            "requests": workload.requests,
            "prompt_len": list(workload.prompt_len),
            "output_len": (list(workload.output_len) if isinstance(workload.output_len, tuple) else
                           workload.output_len if isinstance(workload.output_len, int) else str(workload.output_len)),
            "dataset": {"path": str(dataset_path), "rows": len(workload.dataset)} if workload.dataset else None,
            "prefix": {"len": workload.prefix_len, "count": workload.prefix_count} if workload.prefix_len else None,
            "concurrency": workload.headline().concurrency,  # the headline level's (the report's latencies)
            "concurrency_sweep": _concurrency_sweep(workload),
            "rate": workload.headline().rate,
            "sweep_size": workload.sweep_size or None,  # `--rate sweep`: GuideLLM's sweep of this many levels
            "arrivals": workload.arrivals,
            "warmup": workload.warmup, "cooldown": workload.cooldown, "max_seconds": workload.max_seconds,
            # how the speed figures were repeated (`repeats.py`): filled in below for the in-process engine
            "repeats": {"repeats": 1, "order": None, "resident": None, "warm_up": None, "prefix_cache": None},
            "levels": None,  # each level's label, in the order run (filled in below)
            "seed": workload.seed,
            "endpoint": endpoint,
            "eval_text": str(eval_text) if eval_text else "builtin corpus heldout.txt",
            "accuracy_backend": accuracy_backend,
            "prompt_format": workload.prompt_format or ("text" if endpoint or served else "tokens"),
            # the engine options both models ran with (what `serve` would run); dtype resolved at load
            "engine": (None if endpoint else {"name": "vllm", **vllm.__dict__, "dtype_requested": config.dtype} if served
                       else {**config.as_dict(), "dtype_requested": config.dtype, "dtype_reason": None,
                             "kernels": None, "baseline_kernels": None}),
        },
        "throughput": {"output_tok_s": None, "total_tok_s": None, "requests_s": None},
        "latency_ms": {m: {"mean": None, "p50": None, "p95": None, "p99": None} for m in ("ttft", "tpot", "itl", "e2e")},
        "memory": {"weights_bytes": None, "peak_bytes": None, "kv_cache_bytes": None},
        "accuracy": {k: None for k in ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")},
        "batch_efficiency": None,
        "gpu_utilization": None,
        "cost": {"usd_per_1k_tokens": None, "usd_per_1k_output_tokens": None, "gpu_hour_cost_usd": gpu_hour_cost},
        "kpi": {"passed": True, "checks": []},
        # the source measured the same way in this run: its figures, rows of both with ratios, and
        # warnings where the artifact is slower; null without a baseline and with --endpoint
        "comparison": None,
        # batch-1 decode's weight-read bandwidth against the machine's peak; null with --endpoint
        "roofline": None,
        "versions": library_versions(),
    }
    report["hardware"] = describe(device)

    if baseline_source is not None and not served:
        step("accuracy against the baseline")
        text = _eval_text(eval_text)
        acc = measure_accuracy(source.path, baseline_source.path, text, config, accuracy_backend)
        report["accuracy"] = {k: acc[k] for k in report["accuracy"]}
    if source is not None and config.lm_head != "dense":
        step(f"accuracy cost of the {config.lm_head} LM head")
        text = _eval_text(eval_text)
        # the rounded head against the dense one, both through the engine (the accuracy above is transformers')
        report["accuracy"]["lm_head"] = measure_head_accuracy(source.path, text, config)

    if endpoint and (baseline or baseline_endpoint):
        step(f"accuracy of {endpoint} against the baseline (top-{TOP_K} log-probs)")
        text = _eval_text(eval_text)
        acc = measure_endpoint_accuracy(endpoint, model, baseline, baseline_endpoint, text, tokenizer, config,
                                        api_key, request_timeout)
        report["accuracy"] = {k: acc[k] for k in report["accuracy"]} | {"top_k": acc["top_k"]}
        report["workload"]["accuracy_backend"] = f"endpoint top-{acc['top_k']} log-probs"
        report["baseline"] = baseline or baseline_endpoint

    if manager is not None:
        step(f"tasks {', '.join(tasks)} (lm-evaluation-harness through the engine)")
        scores = {}
        for side, spec in (("candidate", source), ("baseline", baseline_source)):
            if spec is not None:
                scores[side] = run_tasks(Engine(str(spec.path), config), tasks, manager, limit, num_fewshot)
                free_device_memory(device)
        report["accuracy"]["tasks"] = task_rows(scores["candidate"], scores.get("baseline"))
        report["workload"]["tasks"] = {"names": tasks, "tasks_path": str(tasks_path) if tasks_path else None,
                                       "limit": limit, "num_fewshot": num_fewshot}

    slo = slo_from_kpi(kpi) if kpi is not None else None
    gates = latency_gates(kpi)
    decode_tok_s = prompt_tok_s = None
    cand = base = None
    # other processes' CPU while the speed figures are taken; not with --endpoint, where a server on this
    # machine would count as another process
    monitor = ContentionMonitor(with_baseline=baseline_source is not None) if not endpoint else None
    with GpuUtilizationSampler() as gpu, monitor or _nothing():
        if endpoint:
            levels = endpoint_levels(endpoint, model, workload, slo, tokenizer, report["workload"], step, api_key,
                                     request_timeout)
        elif served:
            text = _eval_text(eval_text)
            levels, base_online, acc = measure_vllm(source, baseline_source, model, workload, slo, text, config, vllm,
                                                    report["workload"], step)
            if acc is not None:
                report["accuracy"] = {k: acc[k] for k in report["accuracy"]} | {"top_k": acc["top_k"]}
                report["workload"]["accuracy_backend"] = f"vLLM endpoint top-{acc['top_k']} log-probs"
        else:
            # both models in interleaved repeats, after an untimed warm-up each (repeats.py)
            cand, base, schedule = measure_models(source, baseline_source, workload, slo, config, step)
            report["workload"]["repeats"] = schedule
            report["workload"]["engine"].update(cand.engine_options)
            report["throughput"].update(cand.throughput)
            report["batch_efficiency"] = cand.batch_efficiency
            report["memory"] = cand.memory
            levels, decode_tok_s, prompt_tok_s = cand.levels, cand.decode_tok_s, cand.prompt_tok_s
            free_device_memory(device)
    report["hardware"]["contention"] = monitor.result() if monitor is not None else None
    # the headline level (the last one, a sweep's throughput run): the median over the repeats where there
    # were repeats (a level list's points are its first repeat's, one curve)
    online = cand.online if cand is not None else levels[-1][1]
    samples = {"candidate": online["samples"]}
    per_request = [row for level, summary in levels for row in level_rows(summary, model, "candidate", level)]
    points = [level_point(level, summary, gates) for level, summary in levels]
    report["workload"]["levels"] = [p["label"] for p in points]
    report["gpu_utilization"] = gpu.mean()
    report["latency_ms"] = online["latency_ms"]
    report["throughput"].update(
        online_output_tok_s=online["throughput"]["output_tok_s"],
        sweep=points,  # one point per load level (latency, rate, SLO), for `optcli roi`'s capacity plan
        # the level with the highest achieved rate whose latencies meet the KPI file's latency gates
        slo_max_rate=slo_max_rate(points),
        failed_requests=online["failures"]["failed"],  # over every repeat of the headline level
        failures=online["failures"],  # how many of the online requests failed, and the distinct errors
        goodput_requests_s=(online["goodput"] or {}).get("requests_s"),
        prefix_cache_hit_rate=online.get("prefix_cache_hit_rate"),  # the online run's; null for an endpoint
        decode_tok_s=decode_tok_s,  # batch 1 (see roofline.method); null with --endpoint
        prompt_tok_s=prompt_tok_s,  # batch 1, a cold 128-token prompt / its TTFT; null with --endpoint
    )
    if cand is not None:  # each speed figure's median and 95% interval over the repeats (stats.py)
        report["throughput"]["intervals"] = cand.intervals()
    if endpoint or served:  # no offline phase: the served figures are the headline level's
        report["throughput"].update({k: online["throughput"][k] for k in ("output_tok_s", "total_tok_s", "requests_s")})
    tp = report["throughput"]
    report["cost"].update(cost_per_1k(gpu_hour_cost, tp["total_tok_s"], tp["output_tok_s"]))
    baseline_report = None
    if served and base_online is not None:  # the source served by vLLM the same way, at the headline level
        baseline_report = {
            "accuracy": {"ppl": report["accuracy"]["baseline_ppl"]},
            "memory": {"weights_bytes": None, "peak_bytes": None, "kv_cache_bytes": None},  # vLLM's own
            "throughput": {k: base_online["throughput"][k] for k in ("output_tok_s", "total_tok_s", "requests_s")}
            | {"online_output_tok_s": base_online["throughput"]["output_tok_s"], "decode_tok_s": None,
               "prompt_tok_s": None},
            "latency_ms": base_online["latency_ms"],
        }
        samples["baseline"] = base_online["samples"]
        per_request += level_rows(base_online, baseline, "baseline", workload.headline())
        report["throughput"].update(baseline_online_output_tok_s=base_online["throughput"]["output_tok_s"])
        report["comparison"] = comparison(report, baseline_report, workload)
    elif base is not None:  # the source measured the same way, interleaved with the artifact (comparison)
        report["workload"]["engine"]["baseline_dtype"] = base.engine_options["dtype"]
        report["workload"]["engine"]["baseline_dtype_reason"] = base.engine_options["dtype_reason"]
        report["workload"]["engine"]["baseline_kernels"] = base.engine_options["kernels"]
        memory = dict(base.memory)
        if not device.startswith("cuda"):
            memory["peak_bytes"] = None  # the process peak would include the candidate's
        throughput, base_online = base.throughput, base.online
        baseline_report = {
            "accuracy": {"ppl": report["accuracy"]["baseline_ppl"]},
            "memory": memory,
            "throughput": {k: throughput[k] for k in ("output_tok_s", "total_tok_s", "requests_s")}
            | {"online_output_tok_s": base_online["throughput"]["output_tok_s"], "decode_tok_s": base.decode_tok_s,
               "prompt_tok_s": base.prompt_tok_s},
            "latency_ms": base_online["latency_ms"],
        }
        samples["baseline"] = base.samples  # overlaid on the candidate's latency CDFs
        per_request += level_rows(base_online, baseline, "baseline", workload.headline())
        report["throughput"].update(
            baseline_output_tok_s=throughput["output_tok_s"],
            baseline_total_tok_s=throughput["total_tok_s"],
            baseline_requests_s=throughput["requests_s"],
            baseline_online_output_tok_s=base_online["throughput"]["output_tok_s"],
            baseline_decode_tok_s=base.decode_tok_s,
            baseline_prompt_tok_s=base.prompt_tok_s,
        )
        report["comparison"] = comparison(report, baseline_report, workload,
                                          runs={"value": cand.runs, "baseline": base.runs})
    if cand is not None:  # offline is every request at once: below online it needs a reason (or is a bug)
        report["throughput"]["notes"] = offline_online_notes(report, cand, base, workload)
    if not endpoint and not served:
        # after both models ran: on a CPU the 1 GiB pass would otherwise sit in their peak RSS
        step("peak memory bandwidth")
        report["roofline"] = roofline(peak_bandwidth(device), report, baseline_report)
    if kpi is not None:
        report["kpi"] = evaluate_with_scope(report, kpi, levels[-1][1])  # + alert_window, production-only keys
    if export is not None:
        write_export(Path(export), per_request)
        report["workload"]["export"] = {"path": str(export), "rows": len(per_request)}
    if out is not None:
        write_reports(report, Path(out), samples=samples, sweep=points if len(points) > 1 else None,
                      baseline_report=baseline_report)
    if not report["kpi"]["passed"]:
        failed = [c["name"] for c in report["kpi"]["checks"] if not c["passed"]]
        raise KpiFailed(f"KPI gate failed: {', '.join(failed)}", report)
    return report


@contextlib.contextmanager
def _nothing():
    yield None


def _eval_text(path: Path | None) -> str:
    """The text accuracy is scored on: `--eval-text`, else the builtin corpus's held-out split. A file
    that cannot be scored is exit 2 naming it (as calibrate names a bad source), not a decoder's error."""
    if path is None:
        return heldout_text()
    if not path.is_file():
        raise UsageError(f"--eval-text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--eval-text {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start})") from None
    except OSError as exc:
        raise UsageError(f"--eval-text {path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise UsageError(f"--eval-text {path}: no text to score (the file is empty or only whitespace)")
    return text


def _concurrency_sweep(workload: Workload) -> list[int] | None:
    levels = () if workload.sweep_size else workload.load_levels()
    if len(levels) > 1 and all(level.mode == "concurrent" for level in levels):
        return [level.concurrency for level in levels]
    return None
