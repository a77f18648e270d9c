"""One model's speed, measured: offline throughput and memory through the engine, batch-1 decode
tok/s, and online latency under load (in process through `AsyncEngine`, or against an OpenAI
endpoint). `profile.py` runs these for the artifact and for its source, the same way."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field

import torch

from optcli.bench.load_generator import Chat, api_base_url, engine_sender, failure_summary, openai_sender, run_load
from optcli.bench.metrics import summarize
from optcli.bench.rates import LoadLevel, excluded_count
from optcli.bench.sweep import run_levels
from optcli.bench.workload import DECODE_NEW_TOKENS, DECODE_PROMPT_TOKENS, Workload
from optcli.config import EngineConfig
from optcli.engine import Engine, SamplingParams
from optcli.engine.async_engine import AsyncEngine
from optcli.engine.kernels.tuning import chosen as gemm_choices
from optcli.errors import UsageError
from optcli.util.env import peak_memory_bytes


def offline_throughput(source, workload: Workload, config: EngineConfig, step):
    """Offline throughput of one model through the engine: (engine, throughput, batch efficiency, memory)."""
    step(f"loading {source.spec} into the engine")
    device = config.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(str(source.path), config)
    requests = workload.sample(vocab_range(engine), encoder=engine.tokenizer)
    longest = max(len(p) + n for p, n in requests)
    if longest > engine.max_model_len:
        raise UsageError(f"a prompt plus its new tokens reaches {longest} tokens, over the model's "
                         f"{engine.max_model_len}-token context")
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
        "peak_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss(),
        "kv_cache_bytes": engine.kv_cache_bytes,
    }
    return engine, throughput, efficiency, memory

def free_device_memory(device: str) -> None:
    """Collect a dropped engine now (its KV cache and weights), so the next one sizes its cache the same."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

def vocab_range(engine) -> tuple[int, int]:
    return 3, min(len(engine.tokenizer), engine.model.cfg.vocab_size)

@dataclass
class LocalRun:
    """Everything one in-process engine measured for one model (the engine itself is dropped)."""

    engine_options: dict  # the resolved engine options (`EngineConfig.as_dict()`) and dtype_reason
    throughput: dict
    batch_efficiency: float | None
    memory: dict
    decode_tok_s: float | None
    online: dict  # the headline level's online summary
    samples: dict[str, list[float]]
    levels: list[tuple[LoadLevel, dict]] = field(default_factory=list)  # every level's summary, the headline last


def measure_local(source, workload: Workload, slo, config: EngineConfig, step) -> LocalRun:
    """Offline throughput, batch-1 decode, then online latency at each load level, through one in-process
    engine (dropped on return)."""
    engine, throughput, efficiency, memory = offline_throughput(source, workload, config, step)
    # the dtype and each layer kind's kernel per batch-size bucket, with their reasons (rules, not timings)
    options = {**engine.config.as_dict(), "dtype_reason": engine.dtype_reason, "kernels": engine.kernel_paths()}
    decode = decode_tok_s(engine, source, step)
    text_tok = engine.tokenizer if workload.prompt_format == "text" else None

    def run_one(level: LoadLevel, order: int) -> dict:
        step(f"online latency of {source.spec}: {level.label}")
        return online_load(engine, None, None, workload, level, slo, vocab_range(engine), text_tok, seed_offset=order)

    levels = run_levels(workload, run_one)
    online = levels[-1][1]
    return LocalRun(options, throughput, efficiency, memory, decode, online, online["samples"], levels)

def decode_tok_s(engine, source, step, new_tokens: int = DECODE_NEW_TOKENS) -> float | None:
    """Batch-1 decode speed: one request (a short prompt, `new_tokens` with ignore_eos) after a warm-up
    one, through the engine's step loop; tokens after the first / seconds after the first, so prefill
    is left out. The first and last token times are taken when `step` returns them (on CUDA that is
    after the step's sampled ids reached the host, so the GPU work is done)."""
    lo, hi = vocab_range(engine)
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

def online_load(engine, endpoint: str | None, model: str | None, workload: Workload, level: LoadLevel, slo, vocab,
                tokenizer=None, chat: bool = False, seed_offset: int = 1) -> dict:
    """One online run at `level`; `tokenizer` given: text prompts (sized in its tokens), else token ids; `chat`:
    a dataset's chat rows go to the endpoint as chat completions. The first `--warmup` and last `--cooldown`
    requests are sent but left out of the statistics. Every measured request failing is a failed run (exit 1,
    with the first error); some failing is reported. `seed_offset` >= 1: the prompts differ from the offline
    phase's (offset 0) and from other levels', so they get no prefix-cache hits from those."""
    encoder = engine.tokenizer if engine is not None and tokenizer is None else None
    requests = workload.sample(vocab, seed_offset=seed_offset, tokenizer=tokenizer, encoder=encoder, chat=chat)

    blocks = engine.blocks if engine is not None else None
    hits_before, queries_before = (blocks.prefix_hits, blocks.prefix_queries) if blocks else (0, 0)

    async def go():
        args = (requests, level.rate, level.concurrency, workload.seed, _arrivals(level), workload.max_seconds)
        if engine is None:
            return await run_load(openai_sender(endpoint, model), *args)
        async_engine = AsyncEngine(engine)
        try:
            return await run_load(engine_sender(async_engine), *args)
        finally:
            async_engine.shutdown()

    timings, wall = asyncio.run(go())
    sent = len(timings)
    warm, cool = excluded_count(workload.warmup, sent), excluded_count(workload.cooldown, sent)
    if warm + cool >= sent:
        raise UsageError(f"--warmup and --cooldown leave none of the {sent} requests sent at {level.label} measured")
    measured = timings[warm:sent - cool]
    if warm or cool:  # the statistics' window: from the first measured send to the last measured end
        wall = max(t.end for t in measured) - min(t.start for t in measured)
    failures = failure_summary(measured)
    if failures["failed"] == len(measured):
        route = "/chat/completions" if isinstance(requests[0][0], Chat) else "/completions"
        where = f"{api_base_url(endpoint)}{route}" if endpoint else "the engine"
        raise RuntimeError(f"all {len(measured)} requests to {where} failed (first error: {measured[0].error})")
    summary = summarize(measured, wall, slo)
    summary["failures"] = failures
    summary["sent"] = sent
    summary["excluded"] = {"warmup": warm, "cooldown": cool}
    summary["achieved_rate_requests_s"] = achieved_rate(measured, level, summary["throughput"]["requests_s"])
    summary["samples"] = latency_samples(measured)
    summary["timings"] = timings  # each request's own, for --export (not part of the report)
    summary["measured"] = (warm, sent - cool)
    # prompt tokens this run found in the engine's prefix cache (null for an endpoint: not observable)
    queries = blocks.prefix_queries - queries_before if blocks else 0
    summary["prefix_cache_hit_rate"] = (blocks.prefix_hits - hits_before) / queries if queries else None
    return summary


def _arrivals(level: LoadLevel) -> str:
    return "constant" if level.mode == "constant" else "poisson"


def achieved_rate(timings, level: LoadLevel, requests_s: float) -> float | None:
    """Requests sent per second across the measured sends: what the load generator achieved against its
    target. A throughput run sends everything at once, so its rate is the one it completed them at."""
    starts = sorted(t.start for t in timings)
    if level.mode == "throughput" or len(starts) < 2 or starts[-1] <= starts[0]:
        return requests_s if level.mode == "throughput" else None
    return (len(starts) - 1) / (starts[-1] - starts[0])

def latency_samples(timings) -> dict[str, list[float]]:
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

def peak_rss() -> int:
    return peak_memory_bytes("cpu")["host_peak_rss_bytes"]
