"""`optcli profile`: accuracy against a baseline, offline throughput, online latency under load, the
machine it ran on, cost, and KPI gates, in one report (report.json / .md / .html).

All figures are measured in this run; what cannot be measured here is None, never estimated.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

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

    def sample(self, vocab: tuple[int, int], seed_offset: int = 0) -> list[tuple[list[int], int]]:
        """Synthetic requests: random token ids (EOS is ignored, so content does not matter)."""
        rng = random.Random(self.seed + seed_offset)
        a, b = self.prompt_len
        return [
            ([rng.randrange(*vocab) for _ in range(rng.randrange(a, b))], self.output_len) for _ in range(self.requests)
        ]


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


def profile(
    model: str,
    baseline: str | None = None,
    eval_text: Path | None = None,
    workload: Workload | None = None,
    kpi_file: Path | None = None,
    gpu_hour_cost: float | None = None,
    out: Path | None = None,
    endpoint: str | None = None,
    device: str = "auto",
    max_num_seqs: int = 64,
    progress=None,
) -> dict:
    """Run the whole profile and write the reports; raises KpiFailed (exit 3) after writing them."""
    from optcli.bench.kpi import evaluate_kpis, load_kpi, slo_from_kpi
    from optcli.calibration import heldout_text
    from optcli.models import resolve_model
    from optcli.quantize import pick_device

    workload = workload or Workload()
    kpi = load_kpi(kpi_file) if kpi_file is not None else None
    if eval_text is not None and not eval_text.is_file():
        raise UsageError(f"--eval-text file not found: {eval_text}")
    if gpu_hour_cost is not None and gpu_hour_cost < 0:
        raise UsageError("--gpu-hour-cost must be >= 0")
    device = pick_device(device)
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
            "eval_text": str(eval_text) if eval_text else "calibration_data/heldout.txt",
        },
        "throughput": {"output_tok_s": None, "total_tok_s": None, "requests_s": None},
        "latency_ms": {m: {"mean": None, "p50": None, "p95": None, "p99": None} for m in ("ttft", "tpot", "itl", "e2e")},
        "memory": {"weights_bytes": None, "peak_bytes": None, "kv_cache_bytes": None},
        "accuracy": {k: None for k in ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")},
        "batch_efficiency": None,
        "gpu_utilization": None,
        "cost": {"usd_per_1k_tokens": None, "gpu_hour_cost_usd": gpu_hour_cost},
        "kpi": {"passed": True, "checks": []},
        "versions": _versions(),
    }
    from optcli.hardware import GpuUtilizationSampler, describe

    report["hardware"] = describe(device)

    if baseline_source is not None:
        step("accuracy against the baseline")
        text = eval_text.read_text(encoding="utf-8") if eval_text else heldout_text()
        acc = measure_accuracy(source.path, baseline_source.path, text, device)
        report["accuracy"] = {k: acc[k] for k in report["accuracy"]}

    slo = slo_from_kpi(kpi) if kpi is not None else None
    samples = None
    sweep_points: list[tuple[int, float]] = []
    with GpuUtilizationSampler() as gpu:
        if endpoint:
            for level in workload.sweep:
                step(f"online load against {endpoint} at concurrency {level}")
                swept = _online(None, endpoint, model, replace(workload, concurrency=level), slo, vocab=(3, 500))
                sweep_points.append(_sweep_point(level, swept))
            step(f"online load against {endpoint}")
            online = _online(None, endpoint, model, workload, slo, vocab=(3, 500))
            samples = {"candidate": online.pop("samples")}
        else:
            online, samples, sweep_points = _local(source, report, workload, slo, device, max_num_seqs, step)
    sweep_points.append(_sweep_point(workload.concurrency or _default_concurrency(workload), online))
    report["gpu_utilization"] = gpu.mean()
    report["latency_ms"] = online["latency_ms"]
    report["throughput"].update(
        online_output_tok_s=online["throughput"]["output_tok_s"],
        sweep=sweep_points,  # latency vs concurrency, for `optcli roi`'s capacity plan
        failed_requests=online["requests"]["failed"],
        goodput_requests_s=(online["goodput"] or {}).get("requests_s"),
    )
    if endpoint:
        report["throughput"].update({k: online["throughput"][k] for k in ("output_tok_s", "total_tok_s", "requests_s")})
    tok_s = report["throughput"]["output_tok_s"]
    if gpu_hour_cost is not None and tok_s:
        report["cost"]["usd_per_1k_tokens"] = gpu_hour_cost / 3600 / tok_s * 1000
    baseline_report = None
    if baseline_source is not None:  # the same offline workload on the baseline, for side-by-side bars
        _, throughput, _, memory = _offline(baseline_source, workload, device, max_num_seqs, step)
        if not device.startswith("cuda"):
            memory["peak_bytes"] = None  # the process peak would include the candidate's
        baseline_report = {"accuracy": {"ppl": report["accuracy"]["baseline_ppl"]}, "memory": memory,
                           "throughput": throughput}
        report["throughput"]["baseline_output_tok_s"] = throughput["output_tok_s"]
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


def _offline(source, workload: Workload, device: str, max_num_seqs: int, step):
    """Offline throughput of one model through the engine: (engine, throughput, batch efficiency, memory)."""
    import torch

    from optcli.engine import Engine, SamplingParams
    from optcli.engine.kernels.tuning import chosen as gemm_choices

    step(f"loading {source.spec} into the engine")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(str(source.path), device=device, max_num_seqs=max_num_seqs)
    longest = workload.prompt_len[1] + workload.output_len
    if longest > engine.max_model_len:
        raise UsageError(f"prompts up to {workload.prompt_len[1]} tokens plus {workload.output_len} new exceed "
                         f"the model's {engine.max_model_len}-token context")
    engine.generate([[5] * 4], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    requests = workload.sample(_vocab(engine))
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
    memory = {
        "weights_bytes": engine.weights_bytes,  # as the engine holds them: quantized stays quantized
        # GPU: this model's peak; CPU: the process's peak RSS so far (not separable per model)
        "peak_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss(),
        "kv_cache_bytes": engine.kv_cache_bytes,
    }
    return engine, throughput, efficiency, memory


def _vocab(engine) -> tuple[int, int]:
    return 3, min(len(engine.tokenizer), engine.model.cfg.vocab_size)


def _local(source, report: dict, workload: Workload, slo, device: str, max_num_seqs: int, step):
    """Offline throughput, then online latency, through one in-process engine."""
    engine, throughput, efficiency, memory = _offline(source, workload, device, max_num_seqs, step)
    report["throughput"].update(throughput)
    report["batch_efficiency"] = efficiency
    report["memory"] = memory
    points = []
    for level in workload.sweep:
        step(f"online latency at concurrency {level}")
        swept = _online(engine, None, None, replace(workload, concurrency=level), slo, _vocab(engine))
        points.append(_sweep_point(level, swept))
    step("online latency under load")
    online = _online(engine, None, None, workload, slo, _vocab(engine))
    return online, {"candidate": online.pop("samples")}, points


def _default_concurrency(workload: Workload) -> int | None:
    return None if workload.rate else min(8, workload.requests)


def _sweep_point(level: int | None, online: dict) -> dict:
    """One online run at one concurrency level: what capacity planning reads (p95 E2E against requests/s)."""
    tp = online["throughput"]
    return {"concurrency": level, "requests_s": tp["requests_s"], "output_tok_s": tp["output_tok_s"],
            "total_tok_s": tp["total_tok_s"], "e2e_p95_ms": online["latency_ms"]["e2e"]["p95"]}


def _online(engine, endpoint: str | None, model: str | None, workload: Workload, slo, vocab) -> dict:
    from optcli.bench.metrics import summarize
    from optcli.bench.online import engine_sender, openai_sender, run_load

    requests = workload.sample(vocab, seed_offset=1)  # different prompts: no prefix-cache hits from offline
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
    summary = summarize(timings, wall, slo)
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
