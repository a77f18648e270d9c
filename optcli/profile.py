"""`optcli profile`: accuracy against a baseline, offline throughput, online latency under load, the
machine it ran on, cost, and KPI gates, in one report (report.json / .md / .html).

All figures are measured in this run; what cannot be measured here is None, never estimated.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from optcli.config import EngineConfig
from optcli.errors import KpiFailed, UsageError


@dataclass
class Workload:
    requests: int = 32
    prompt_len: tuple[int, int] = (16, 64)  # uniform in [a, b)
    output_len: int = 32
    concurrency: int | None = None
    sweep: tuple[int, ...] = ()  # extra concurrency levels measured before `concurrency` (plot only)
    rate: float | None = None  # requests/s, Poisson arrivals
    seed: int = 0
    prompt_format: str | None = None  # "tokens" | "text"; None: text to an endpoint, token ids in process

    def sample(self, vocab: tuple[int, int], seed_offset: int = 0, tokenizer=None) -> list[tuple[list[int] | str, int]]:
        """(prompt, max_tokens) requests: text in `tokenizer`'s tokens when given, else random token ids."""
        from optcli.bench.prompts import text_prompts, token_prompts

        seed = self.seed + seed_offset
        if tokenizer is not None:
            prompts = text_prompts(tokenizer, self.requests, self.prompt_len, seed)
        else:
            prompts = token_prompts(self.requests, self.prompt_len, vocab, seed)
        return [(p, self.output_len) for p in prompts]


def parse_concurrency(text: str | None) -> tuple[int | None, tuple[int, ...]]:
    """`C` or a sweep `C1,C2,...`: the last level is the one the report's latencies come from."""
    if text is None:
        return None, ()
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--concurrency must be an integer or a comma-separated list (got '{text}')") from None
    if any(c < 1 for c in levels):
        raise UsageError(f"--concurrency levels must be >= 1 (got '{text}')")
    return levels[-1], tuple(levels[:-1])


def parse_prompt_len(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--prompt-len must look like A:B with integers (got '{text}')") from None
    if not 1 <= a < b:
        raise UsageError(f"--prompt-len A:B needs 1 <= A < B (got {a}:{b})")
    return a, b


def _versions() -> dict:
    from optcli.quantize import library_versions

    return library_versions()


def _manifest(path: Path | None) -> dict | None:
    if path is not None and (path / "optcli.json").is_file():
        return json.loads((path / "optcli.json").read_text())
    return None


def measure_accuracy(model_path: Path, baseline_path: Path, eval_text: str, device: str) -> dict:
    """PPL, KLD and top-1 agreement of the model against its baseline on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optcli.bench.accuracy import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(eval_text, verbose=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_path, device_map=device).eval()
    baseline = AutoModelForCausalLM.from_pretrained(baseline_path, dtype=torch.float32, device_map=device).eval()
    ctx = min(256, getattr(model.config, "max_position_embeddings", 256))
    return evaluate(model, ids, baseline, ctx=ctx).as_dict()


def measure_head_accuracy(model_path: Path, eval_text: str, config: EngineConfig) -> dict:
    """What `config.lm_head` (int8) costs in accuracy: the engine with that head against the same model
    with its dense head, on the same tokens through the same engine (so only the head differs)."""
    from optcli.bench.accuracy import EngineLM, evaluate
    from optcli.engine import Engine

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
    **engine_options,
) -> dict:
    """Run the whole profile and write the reports; raises KpiFailed (exit 3) after writing them.
    `config` (plus any EngineConfig field by keyword) is the engine both models run in, as `serve` would."""
    from optcli.bench.kpi import evaluate_kpis, load_kpi, slo_from_kpi
    from optcli.calibration import heldout_text
    from optcli.engine.placement import resolve_device
    from optcli.models import resolve_model

    workload = workload or Workload()
    kpi = load_kpi(kpi_file) if kpi_file is not None else None
    if eval_text is not None and not eval_text.is_file():
        raise UsageError(f"--eval-text file not found: {eval_text}")
    if gpu_hour_cost is not None and gpu_hour_cost < 0:
        raise UsageError("--gpu-hour-cost must be >= 0")
    config = (config or EngineConfig()).with_options(**engine_options)
    device = resolve_device(config.device)
    config = config.with_options(device=device)
    step = progress or (lambda message: None)

    source = None if endpoint else resolve_model(model)
    manifest = _manifest(source.path) if source else None
    if baseline is None and manifest is not None and manifest.get("source", {}).get("path"):
        baseline = manifest["source"]["path"]
    baseline_source = resolve_model(baseline) if baseline and source else None

    report: dict = {
        "model": model,
        "baseline": baseline,
        "recipe": manifest["recipe"]["name"] if manifest else None,
        "hardware": None,
        "workload": {
            "requests": workload.requests,
            "prompt_len": list(workload.prompt_len),
            "output_len": workload.output_len,
            "concurrency": workload.concurrency,
            "concurrency_sweep": [*workload.sweep, workload.concurrency] if workload.sweep else None,
            "rate": workload.rate,
            "seed": workload.seed,
            "endpoint": endpoint,
            "eval_text": str(eval_text) if eval_text else "builtin corpus heldout.txt",
            "prompt_format": workload.prompt_format or ("text" if endpoint else "tokens"),
            # the engine options both models ran with (what `serve` would run); dtype resolved at load
            "engine": None if endpoint else {**config.as_dict(), "dtype_requested": config.dtype, "dtype_reason": None},
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
        "versions": _versions(),
    }
    from optcli.hardware import GpuUtilizationSampler, describe

    report["hardware"] = describe(device)

    if baseline_source is not None:
        step("accuracy against the baseline")
        text = eval_text.read_text(encoding="utf-8") if eval_text else heldout_text()
        acc = measure_accuracy(source.path, baseline_source.path, text, device)
        report["accuracy"] = {k: acc[k] for k in report["accuracy"]}
    if source is not None and config.lm_head != "dense":
        step(f"accuracy cost of the {config.lm_head} LM head")
        text = eval_text.read_text(encoding="utf-8") if eval_text else heldout_text()
        # the rounded head against the dense one, both through the engine (the accuracy above is transformers')
        report["accuracy"]["lm_head"] = measure_head_accuracy(source.path, text, config)

    slo = slo_from_kpi(kpi) if kpi is not None else None
    samples = None
    decode_tok_s = None
    sweep_points: list[tuple[int, float]] = []
    with GpuUtilizationSampler() as gpu:
        if endpoint:
            text = report["workload"]["prompt_format"] == "text"
            tok = None
            if text or tokenizer:
                tok, report["workload"]["tokenizer"] = _endpoint_tokenizer(model, tokenizer)
            vocab = (3, min(len(tok), 32000)) if tok is not None else (3, 500)  # ids below every real vocab size
            text_tok = tok if text else None
            for level in workload.sweep:
                step(f"online load against {endpoint} at concurrency {level}")
                swept = _online(None, endpoint, model, replace(workload, concurrency=level), slo, vocab, text_tok)
                sweep_points.append(_sweep_point(level, swept))
            step(f"online load against {endpoint}")
            online = _online(None, endpoint, model, workload, slo, vocab, text_tok)
            samples = {"candidate": online.pop("samples")}
        else:
            online, candidate_samples, sweep_points, decode_tok_s = _local(source, report, workload, slo, config,
                                                                           step)
            samples = {"candidate": candidate_samples}
            _free_device_memory(device)  # the candidate's engine is gone: the baseline's gets the same room
    sweep_points.append(_sweep_point(workload.concurrency or _default_concurrency(workload), online))
    report["gpu_utilization"] = gpu.mean()
    report["latency_ms"] = online["latency_ms"]
    report["throughput"].update(
        online_output_tok_s=online["throughput"]["output_tok_s"],
        sweep=sweep_points,  # latency vs concurrency, for `optcli roi`'s capacity plan
        failed_requests=online["requests"]["failed"],
        failures=online["failures"],  # how many of the online requests failed, and the distinct errors
        goodput_requests_s=(online["goodput"] or {}).get("requests_s"),
        decode_tok_s=decode_tok_s,  # batch 1 (see roofline.method); null with --endpoint
    )
    if endpoint:
        report["throughput"].update({k: online["throughput"][k] for k in ("output_tok_s", "total_tok_s", "requests_s")})
    from optcli.cost import cost_per_1k  # the one cost function, shared with `optcli roi`
    tp = report["throughput"]
    report["cost"].update(cost_per_1k(gpu_hour_cost, tp["total_tok_s"], tp["output_tok_s"]))
    baseline_report = None
    if baseline_source is not None:  # the source measured the same way, side by side (comparison)
        # the same workload and seed through the baseline's own engine (dropped when _local returns);
        # the concurrency sweep is the candidate's capacity plan, not repeated here
        side = {"workload": {"engine": {}}, "throughput": {}, "memory": None, "batch_efficiency": None}
        base_online, base_samples, _, baseline_decode = _local(baseline_source, side, replace(workload, sweep=()),
                                                               slo, config, step)
        _free_device_memory(device)
        report["workload"]["engine"]["baseline_dtype"] = side["workload"]["engine"]["dtype"]
        memory = side["memory"]
        if not device.startswith("cuda"):
            memory["peak_bytes"] = None  # the process peak would include the candidate's
        throughput = side["throughput"]
        baseline_report = {
            "accuracy": {"ppl": report["accuracy"]["baseline_ppl"]},
            "memory": memory,
            "throughput": {k: throughput[k] for k in ("output_tok_s", "total_tok_s", "requests_s")}
            | {"online_output_tok_s": base_online["throughput"]["output_tok_s"], "decode_tok_s": baseline_decode},
            "latency_ms": base_online["latency_ms"],
        }
        samples["baseline"] = base_samples  # overlaid on the candidate's latency CDFs
        report["throughput"].update(
            baseline_output_tok_s=throughput["output_tok_s"],
            baseline_total_tok_s=throughput["total_tok_s"],
            baseline_requests_s=throughput["requests_s"],
            baseline_online_output_tok_s=base_online["throughput"]["output_tok_s"],
            baseline_decode_tok_s=baseline_decode,
        )
        report["comparison"] = _comparison(report, baseline_report, workload)
    if not endpoint:
        from optcli.hardware import peak_bandwidth

        # after both models ran: on a CPU the 1 GiB pass would otherwise sit in their peak RSS
        step("peak memory bandwidth")
        report["roofline"] = _roofline(peak_bandwidth(device), report, baseline_report)
    if kpi is not None:
        report["kpi"] = evaluate_kpis(report, kpi)
    if out is not None:
        from optcli.report import write_reports

        write_reports(report, Path(out), samples=samples, sweep=sweep_points if workload.sweep else None,
                      baseline_report=baseline_report)
    if not report["kpi"]["passed"]:
        failed = [c["name"] for c in report["kpi"]["checks"] if not c["passed"]]
        raise KpiFailed(f"KPI gate failed: {', '.join(failed)}", report)
    return report


def _offline(source, workload: Workload, config: EngineConfig, step):
    """Offline throughput of one model through the engine: (engine, throughput, batch efficiency, memory)."""
    import torch

    from optcli.engine import Engine, SamplingParams
    from optcli.engine.kernels.tuning import chosen as gemm_choices

    step(f"loading {source.spec} into the engine")
    device = config.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(str(source.path), config)
    longest = workload.prompt_len[1] + workload.output_len
    if longest > engine.max_model_len:
        raise UsageError(f"prompts up to {workload.prompt_len[1]} tokens plus {workload.output_len} new exceed "
                         f"the model's {engine.max_model_len}-token context")
    requests = workload.sample(_vocab(engine))
    # warm-up on the same prompts, two tokens each: the batch shapes of the timed run, so one-time costs
    # (allocator growth, the CPU kernel choice timed per batch-size bucket) stay out of the figures
    engine.generate([p for p, _ in requests], SamplingParams(max_tokens=2, ignore_eos=True))
    step(f"offline throughput of {source.spec}: {len(requests)} requests")
    steps_before, scheduled_before = engine.num_steps, engine.num_scheduled_seqs
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests])
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in requests)
    throughput = {
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + in_tokens) / wall,
        "requests_s": len(outs) / wall,
        # which kernel path each quantized layer took, e.g. {"int4/triton": 112}; {} for a dense model
        "quantized_kernels": engine.quantized_layers,
        # on CUDA, the GEMM form and tiling kept per (kernel, M bucket, N, K) after timing; {} elsewhere
        "gemm_choices": gemm_choices(),
    }
    steps = engine.num_steps - steps_before
    scheduled = engine.num_scheduled_seqs - scheduled_before
    efficiency = scheduled / steps / engine.max_num_seqs if steps else None
    head = engine.head_cost()  # the LM head alone: its bytes (a tied embedding shares them), one row's time
    throughput["lm_head"] = {"bytes": head["head_bytes"], "share_of_weights": head["head_share_of_weights"],
                             "ms_per_step_batch1": head["head_ms_per_step_m1"], "tied": head["tied"]}
    memory = {
        "weights_bytes": engine.weights_bytes,  # as the engine holds them: quantized stays quantized
        # GPU: this model's peak; CPU: the process's peak RSS so far (not separable per model)
        "peak_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss(),
        "kv_cache_bytes": engine.kv_cache_bytes,
    }
    return engine, throughput, efficiency, memory


def _free_device_memory(device: str) -> None:
    """Collect a dropped engine now (its KV cache and weights), so the next one sizes its cache the same."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# (label, field in the report and in comparison.baseline, higher is better, where the figure was measured)
COMPARISON_ROWS = (
    ("output tok/s (offline)", "throughput.output_tok_s", True, "offline"),
    ("output tok/s (online)", "throughput.online_output_tok_s", True, "online"),
    ("total tok/s (offline)", "throughput.total_tok_s", True, "offline"),
    ("decode tok/s (batch 1)", "throughput.decode_tok_s", True, "batch1"),
    ("TTFT p50 (ms)", "latency_ms.ttft.p50", False, "online"),
    ("TTFT p95 (ms)", "latency_ms.ttft.p95", False, "online"),
    ("TTFT p99 (ms)", "latency_ms.ttft.p99", False, "online"),
    ("TPOT p50 (ms)", "latency_ms.tpot.p50", False, "online"),
    ("TPOT p95 (ms)", "latency_ms.tpot.p95", False, "online"),
    ("TPOT p99 (ms)", "latency_ms.tpot.p99", False, "online"),
    ("E2E p50 (ms)", "latency_ms.e2e.p50", False, "online"),
    ("E2E p95 (ms)", "latency_ms.e2e.p95", False, "online"),
    ("E2E p99 (ms)", "latency_ms.e2e.p99", False, "online"),
    ("weights (bytes)", "memory.weights_bytes", False, "load"),
)


def _at(node, field: str):
    for key in field.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _ratio(artifact: float | None, baseline: float | None) -> float | None:
    """artifact / baseline; None when either is unmeasured or the baseline is 0."""
    if artifact is None or baseline is None or baseline == 0:
        return None
    return artifact / baseline


def _where(kind: str, workload: Workload) -> str:
    """Which measurement a figure came from, in the words of a warning."""
    if kind == "offline":
        return f"at {workload.requests} requests (offline)"
    if kind == "batch1":
        return "at batch 1"
    if workload.rate:
        return f"at {workload.rate:g} requests/s ({workload.requests} requests, online)"
    level = workload.concurrency or _default_concurrency(workload)
    return f"at concurrency {level} ({workload.requests} requests, online)"


def _comparison(report: dict, baseline: dict, workload: Workload) -> dict:
    """The source's figures (`baseline`), one row per figure of both with artifact/baseline ratios (`field`
    is where the figure sits in the report and in `baseline`), and a warning per throughput figure where
    the artifact is slower than its source."""
    from optcli.report.markdown import fmt_ratio

    rows, warnings = [], []
    name = report.get("recipe") or report["model"]
    for label, field, higher, kind in COMPARISON_ROWS:
        b, a = _at(baseline, field), _at(report, field)
        r = _ratio(a, b)
        rows.append({"metric": label, "field": field, "baseline": b, "artifact": a, "ratio": r,
                     "higher_is_better": higher})
        if higher and r is not None and r < 1:
            what = label.split(" (")[0]
            warnings.append(f"{name}: {fmt_ratio(r)} its source's {what} {_where(kind, workload)}")
    baseline_figures = {k: baseline[k] for k in ("throughput", "latency_ms", "memory")}
    return {"baseline": baseline_figures, "rows": rows, "warnings": warnings}


def _roofline(peak: dict, report: dict, baseline: dict | None) -> dict:
    """Batch-1 decode reads every weight once per token, so weights_bytes x decode tok/s is the weight-read
    bandwidth it achieved; its share of the machine's peak says how far decode is from memory-bound."""
    gbs = peak["gbs"]

    def side(figures: dict) -> dict:
        decode_tok_s, weights_bytes = figures["throughput"]["decode_tok_s"], figures["memory"]["weights_bytes"]
        achieved = decode_tok_s * weights_bytes / 1e9 if decode_tok_s and weights_bytes else None
        return {"decode_tok_s": decode_tok_s, "weights_bytes": weights_bytes, "achieved_gbs": achieved,
                "share_of_peak": achieved / gbs if achieved is not None and gbs else None}

    return {
        "peak_bandwidth_gbs": gbs,
        "peak_source": peak["source"],
        "method": f"batch 1, {DECODE_PROMPT_TOKENS}-token prompt, {DECODE_NEW_TOKENS} new tokens (ignore_eos) after "
                  "a warm-up; decode tok/s = tokens after the first / seconds after the first",
        "artifact": side(report),
        "baseline": side(baseline) if baseline is not None else None,
    }


def _vocab(engine) -> tuple[int, int]:
    return 3, min(len(engine.tokenizer), engine.model.cfg.vocab_size)


def _local(source, report: dict, workload: Workload, slo, config: EngineConfig, step):
    """Offline throughput, batch-1 decode, then online latency, through one in-process engine (dropped on
    return). Fills `report`'s throughput, memory, batch efficiency and engine options; returns
    (online summary, latency samples, sweep points, batch-1 decode tok/s)."""
    engine, throughput, efficiency, memory = _offline(source, workload, config, step)
    report["workload"]["engine"].update(engine.config.as_dict(), dtype_reason=engine.dtype_reason)
    report["throughput"].update(throughput)
    report["batch_efficiency"] = efficiency
    report["memory"] = memory
    decode_tok_s = _decode_tok_s(engine, source, step)
    points = []
    text_tok = engine.tokenizer if workload.prompt_format == "text" else None
    for level in workload.sweep:
        step(f"online latency of {source.spec} at concurrency {level}")
        swept = _online(engine, None, None, replace(workload, concurrency=level), slo, _vocab(engine), text_tok)
        points.append(_sweep_point(level, swept))
    step(f"online latency of {source.spec} under load")
    online = _online(engine, None, None, workload, slo, _vocab(engine), text_tok)
    return online, online.pop("samples"), points, decode_tok_s


DECODE_PROMPT_TOKENS = 8
DECODE_NEW_TOKENS = 32


def _decode_tok_s(engine, source, step, new_tokens: int = DECODE_NEW_TOKENS) -> float | None:
    """Batch-1 decode speed: one request (a short prompt, `new_tokens` with ignore_eos) after a warm-up
    one, through the engine's step loop; tokens after the first / seconds after the first, so prefill
    is left out. The first and last token times are taken when `step` returns them (on CUDA that is
    after the step's sampled ids reached the host, so the GPU work is done)."""
    from optcli.engine import SamplingParams

    lo, hi = _vocab(engine)
    prompt = [lo + (7 * i) % (hi - lo) for i in range(DECODE_PROMPT_TOKENS)]
    new_tokens = min(new_tokens, engine.max_model_len - len(prompt))
    if new_tokens < 2:
        return None
    step(f"batch-1 decode of {source.spec}: {new_tokens} tokens")
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_tokens=min(new_tokens, 8), ignore_eos=True))  # warm-up
    engine.add_request(prompt, params)
    first = last = None
    after_first = 0
    while engine.has_unfinished():
        for out in engine.step():
            if not out.new_token_ids:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                after_first += len(out.new_token_ids)
                last = now
    if first is None or last is None or last <= first:
        return None
    return after_first / (last - first)


def _endpoint_tokenizer(model: str, spec: str | None):
    """(tokenizer, label) that sizes prompts for a server: `--tokenizer`, else MODEL when it is a local
    model, else the builtin one (then lengths are approximate: the server's usage counts are what count)."""
    from transformers import AutoTokenizer

    from optcli.models import resolve_model

    label = spec
    if spec is None:
        local = model.startswith("builtin:") or Path(model).expanduser().is_dir()
        spec = model if local else "builtin:tiny-llama"
        label = spec if local else f"{spec} (not the server's: prompt lengths approximate)"
    return AutoTokenizer.from_pretrained(resolve_model(spec).path), label


def _default_concurrency(workload: Workload) -> int | None:
    return None if workload.rate else min(8, workload.requests)


def _sweep_point(level: int | None, online: dict) -> dict:
    """One online run at one concurrency level: what capacity planning reads (p95 E2E against requests/s)."""
    tp = online["throughput"]
    return {"concurrency": level, "requests_s": tp["requests_s"], "output_tok_s": tp["output_tok_s"],
            "total_tok_s": tp["total_tok_s"], "e2e_p95_ms": online["latency_ms"]["e2e"]["p95"]}


def _online(engine, endpoint: str | None, model: str | None, workload: Workload, slo, vocab, tokenizer=None) -> dict:
    """One online run; `tokenizer` given: text prompts (sized in its tokens), else token ids.
    Every request failing is a failed run (exit 1, with the first error); some failing is reported."""
    from optcli.bench.metrics import summarize
    from optcli.bench.online import api_base_url, engine_sender, failure_summary, openai_sender, run_load

    # seed offset 1: prompts differ from the offline phase's, so they get no prefix-cache hits from it
    requests = workload.sample(vocab, seed_offset=1, tokenizer=tokenizer)
    concurrency = workload.concurrency if (workload.concurrency or workload.rate) else _default_concurrency(workload)

    async def go():
        if engine is None:
            return await run_load(openai_sender(endpoint, model), requests, workload.rate, concurrency, workload.seed)
        from optcli.engine.async_engine import AsyncEngine

        async_engine = AsyncEngine(engine)
        try:
            return await run_load(engine_sender(async_engine), requests, workload.rate, concurrency, workload.seed)
        finally:
            async_engine.shutdown()

    timings, wall = asyncio.run(go())
    failures = failure_summary(timings)
    if failures["failed"] == len(timings):
        where = f"{api_base_url(endpoint)}/completions" if endpoint else "the engine"
        raise RuntimeError(f"all {len(timings)} requests to {where} failed (first error: {timings[0].error})")
    summary = summarize(timings, wall, slo)
    summary["failures"] = failures
    summary["samples"] = _latency_samples(timings)
    return summary


def _latency_samples(timings) -> dict[str, list[float]]:
    """Per-request latencies in ms, for the CDF plots."""
    samples: dict[str, list[float]] = {"ttft": [], "tpot": [], "itl": [], "e2e": []}
    for t in timings:
        if t.error is not None or t.end is None or t.first_token is None:
            continue
        samples["ttft"].append((t.first_token - t.start) * 1000)
        samples["e2e"].append((t.end - t.start) * 1000)
        samples["itl"].extend(gap * 1000 for gap in t.itls())
        if t.output_tokens > 1:
            samples["tpot"].append((t.end - t.first_token) / (t.output_tokens - 1) * 1000)
    return samples


def _peak_rss() -> int:
    from optcli.quantize import peak_memory_bytes

    return peak_memory_bytes("cpu")["host_peak_rss_bytes"]
