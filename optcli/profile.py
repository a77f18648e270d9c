"""`optcli profile`: accuracy against a baseline, offline throughput, online latency under load, the
machine it ran on, cost, and KPI gates, in one report (report.json / .md / .html).

All figures are measured in this run; what cannot be measured here is None, never estimated.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from optcli.errors import KpiFailed, UsageError


@dataclass
class Workload:
    requests: int = 32
    prompt_len: tuple[int, int] = (16, 64)  # uniform in [a, b)
    output_len: int = 32
    concurrency: int | None = None
    rate: float | None = None  # requests/s, Poisson arrivals
    seed: int = 0

    def sample(self, vocab: tuple[int, int], seed_offset: int = 0) -> list[tuple[list[int], int]]:
        """Synthetic requests: random token ids (EOS is ignored, so content does not matter)."""
        rng = random.Random(self.seed + seed_offset)
        a, b = self.prompt_len
        return [
            ([rng.randrange(*vocab) for _ in range(rng.randrange(a, b))], self.output_len) for _ in range(self.requests)
        ]


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
    with GpuUtilizationSampler() as gpu:
        if endpoint:
            step(f"online load against {endpoint}")
            online = _online(None, endpoint, model, workload, slo, vocab=(3, 500))
        else:
            online, samples = _local(source, report, workload, slo, device, max_num_seqs, step)
    report["gpu_utilization"] = gpu.mean()
    report["latency_ms"] = online["latency_ms"]
    report["throughput"].update(
        online_output_tok_s=online["throughput"]["output_tok_s"],
        failed_requests=online["requests"]["failed"],
        goodput_requests_s=(online["goodput"] or {}).get("requests_s"),
    )
    if endpoint:
        report["throughput"].update({k: online["throughput"][k] for k in ("output_tok_s", "total_tok_s", "requests_s")})
    tok_s = report["throughput"]["output_tok_s"]
    if gpu_hour_cost is not None and tok_s:
        report["cost"]["usd_per_1k_tokens"] = gpu_hour_cost / 3600 / tok_s * 1000
    if kpi is not None:
        report["kpi"] = evaluate_kpis(report, kpi)
    if out is not None:
        from optcli.report import write_reports

        write_reports(report, Path(out), samples=samples)
    if not report["kpi"]["passed"]:
        failed = [c["name"] for c in report["kpi"]["checks"] if not c["passed"]]
        raise KpiFailed(f"KPI gate failed: {', '.join(failed)}", report)
    return report


def _local(source, report: dict, workload: Workload, slo, device: str, max_num_seqs: int, step):
    """Offline throughput, then online latency, through one in-process engine."""
    import torch

    from optcli.engine import Engine, SamplingParams
    from optcli.quantize.artifact import directory_weight_bytes

    step("loading the engine")
    engine = Engine(str(source.path), device=device, max_num_seqs=max_num_seqs)
    vocab = (3, min(len(engine.tokenizer), engine.model.cfg.vocab_size))
    longest = workload.prompt_len[1] + workload.output_len
    if longest > engine.max_model_len:
        raise UsageError(f"prompts up to {workload.prompt_len[1]} tokens plus {workload.output_len} new exceed "
                         f"the model's {engine.max_model_len}-token context")
    engine.generate([[5] * 4], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    requests = workload.sample(vocab)
    step(f"offline throughput: {len(requests)} requests")
    steps_before, scheduled_before = engine.num_steps, engine.num_scheduled_seqs
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests])
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in requests)
    report["throughput"].update(
        output_tok_s=out_tokens / wall, total_tok_s=(out_tokens + in_tokens) / wall, requests_s=len(outs) / wall
    )
    steps = engine.num_steps - steps_before
    scheduled = engine.num_scheduled_seqs - scheduled_before
    report["batch_efficiency"] = scheduled / steps / engine.max_num_seqs if steps else None
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    report["memory"] = {
        "weights_bytes": directory_weight_bytes(source.path),
        "peak_bytes": peak,
        "kv_cache_bytes": engine.kv_cache_bytes,
    }
    step("online latency under load")
    online = _online(engine, None, None, workload, slo, vocab)
    return online, {"candidate": online.pop("samples")}


def _online(engine, endpoint: str | None, model: str | None, workload: Workload, slo, vocab) -> dict:
    from optcli.bench.metrics import summarize
    from optcli.bench.online import engine_sender, openai_sender, run_load

    requests = workload.sample(vocab, seed_offset=1)  # different prompts: no prefix-cache hits from offline
    concurrency = workload.concurrency if (workload.concurrency or workload.rate) else min(8, workload.requests)

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
    samples: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}
    for t in timings:
        if t.error is not None or t.end is None or t.first_token is None:
            continue
        samples["ttft"].append((t.first_token - t.start) * 1000)
        samples["e2e"].append((t.end - t.start) * 1000)
        if t.output_tokens > 1:
            samples["tpot"].append((t.end - t.first_token) / (t.output_tokens - 1) * 1000)
    return samples


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
