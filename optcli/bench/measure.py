"""One model's speed, one measurement at a time: offline throughput, batch-1 decode and prompt (prefill)
tok/s, and online latency under load (in process through `AsyncEngine`, or against an OpenAI endpoint),
each from a cold prefix cache. `repeats.py` runs them for the artifact and its source in interleaved
repeats after an untimed warm-up; nothing here warms up or repeats."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from optcli.bench.load_generator import (
    Chat,
    Server,
    api_base_url,
    engine_sender,
    failure_summary,
    openai_sender,
    run_load,
)
from optcli.bench.metrics import summarize
from optcli.bench.rates import LoadLevel
from optcli.bench.workload import DECODE_NEW_TOKENS, DECODE_PROMPT_TOKENS, PREFILL_PROMPT_TOKENS, Workload
from optcli.engine import SamplingParams
from optcli.engine.async_engine import AsyncEngine
from optcli.engine.kernels.tuning import chosen as gemm_choices
from optcli.errors import UsageError
from optcli.util.env import peak_memory_bytes

T = TypeVar("T")
MOST_RUNS_PER_WINDOW = 101
ONE_RUN_FROM = 3  # a first round that lasts this many windows is the window's only one (`within_shared_window`)


def cold(engine) -> None:
    """Forget the prefix cache, so a timed run computes every prompt token: a repeat (or the warm-up) that
    sent the same prompts before would otherwise make the next one skip most of its prefill."""
    engine.blocks.reset_prefix_cache()


def offline_requests(engine, workload: Workload) -> list[tuple[list[int], int]]:
    """The offline phase's (prompt ids, new tokens), checked against the model's context."""
    requests = workload.sample(vocab_range(engine), encoder=engine.tokenizer)
    longest = max(len(p) + n for p, n in requests)
    if longest > engine.max_model_len:
        raise UsageError(f"a prompt plus its new tokens reaches {longest} tokens, over the model's "
                         f"{engine.max_model_len}-token context")
    return requests


def offline_run(engine, requests: list[tuple[list[int], int]]) -> dict:
    """Every request at once through `generate`, from a cold prefix cache: output/total tok/s, requests/s,
    batch efficiency and the sequences preempted (a KV cache too small for all at once)."""
    cold(engine)
    steps_before, scheduled_before = engine.num_steps, engine.num_scheduled_seqs
    preempted_before = engine.scheduler.num_preemptions
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests])
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in requests)
    steps = engine.num_steps - steps_before
    scheduled = engine.num_scheduled_seqs - scheduled_before
    return {"output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + in_tokens) / wall,
            "requests_s": len(outs) / wall,
            "batch_efficiency": scheduled / steps / engine.max_num_seqs if steps else None,
            "preemptions": engine.scheduler.num_preemptions - preempted_before}


def within_window(run: Callable[[], T], figure: Callable[[T], float | None],
                  window_s: float) -> tuple[T | None, int]:
    """`run()` repeated until `window_s` seconds have passed (`Workload.min_time_s`: why), an odd number of times (at least
    3 unless the first run alone lasts 3 windows), and the run whose `figure` is the median: (that run, runs made).
    A run whose figure is None (not measurable) ends the window: the median of the runs before it is kept, or
    that run as it is when none came before."""
    (result,), runs = within_shared_window([run], figure, window_s)
    return result, runs


def within_shared_window(runs: Sequence[Callable[[], T]], figure: Callable[[T], float | None],
                         window_s: float) -> tuple[list[T | None], int]:
    """Several models' runs of one phase interleaved run by run within one timed window of `window_s` seconds
    each: A B, B A, A B, ... (the order reversed every round, so neither model always runs first). Each model's
    kept run is its median by `figure`: ([one per model], rounds).

    Interleaved this finely, a disturbance of the host (another job's burst, a neighbour on the same memory
    bus) that lasts a second lands on both models' runs, where two back-to-back windows put it on one: on a
    noisy 2-core Zen 3 the README main job's ratios read [0.88, 1.56] that way on a quiet machine
    (benchmarks/busy_verdicts.py, 2026-12-07).

    Rounds go on until each model has had its share of the window and an odd number of runs: at least 3
    unless the first round alone lasts `ONE_RUN_FROM` windows (a real model's run, seconds or minutes long,
    runs once). Runs about a window long get a median of 3: the demo model's online burst (~0.5 s a run)
    used to take 1 run a window, and its ratio's interval read [0.88, 1.46] in such runs and [1.11, 1.16]
    in one whose windows held 3 (busy_verdicts.py, 2026-12-07). A run whose figure is None (not
    measurable) ends the window with its round; a model with no measured run keeps that run as it is."""
    results: list[list[T]] = [[] for _ in runs]
    unmeasurable: dict[int, T] = {}  # by model: its unmeasurable run
    window = window_s * len(runs)
    start = time.perf_counter()
    rounds = 0
    while True:
        for i in (range(len(runs)) if rounds % 2 == 0 else reversed(range(len(runs)))):
            result = runs[i]()
            if figure(result) is None:
                unmeasurable[i] = result
            else:
                results[i].append(result)
        rounds += 1
        elapsed = time.perf_counter() - start
        if unmeasurable or (rounds == 1 and elapsed >= ONE_RUN_FROM * window):
            break
        if rounds >= MOST_RUNS_PER_WINDOW or (elapsed >= window and rounds >= 3 and rounds % 2):
            break
    return [_median_run(r, figure) if r else unmeasurable.get(i) for i, r in enumerate(results)], rounds


def _median_run(results: list[T], figure: Callable[[T], float | None]) -> T:
    return sorted(results, key=figure)[len(results) // 2]


def engine_facts(engine) -> dict:
    """What the engine ran, for the throughput section: kernel paths, GEMM choices, the LM head's cost."""
    head = engine.head_cost()  # the LM head alone: its bytes (a tied embedding shares them), one row's time
    return {
        # which kernel path each quantized layer took, e.g. {"int4/triton": 112}; {} for a dense model
        "quantized_kernels": engine.quantized_layers,
        # on CUDA, the GEMM form and tiling kept per (kernel, M bucket, N, K) after timing; {} elsewhere
        "gemm_choices": gemm_choices(),
        "lm_head": {"bytes": head["head_bytes"], "share_of_weights": head["head_share_of_weights"],
                    "ms_per_step_batch1": head["head_ms_per_step_m1"], "tied": head["tied"]},
    }


def engine_memory(engine, device: str, allocated_before: int = 0) -> dict:
    """Weights and KV cache as the engine holds them, and the peak: on a GPU this model's (the peak since the
    stats were reset, less what was allocated then: another resident model); on a CPU the process's peak
    RSS so far (not separable per model)."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
    else:
        peak = peak_rss()
    return {"weights_bytes": engine.weights_bytes, "peak_bytes": peak, "kv_cache_bytes": engine.kv_cache_bytes}


def free_device_memory(device: str) -> None:
    """Collect a dropped engine now (its KV cache and weights), so the next one sizes its cache the same."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

def vocab_range(engine) -> tuple[int, int]:
    return 3, min(len(engine.tokenizer), engine.model.cfg.vocab_size)


def _batch1_prompt(engine, length: int) -> list[int]:
    lo, hi = vocab_range(engine)
    return [lo + (7 * i) % (hi - lo) for i in range(length)]


def decode_tok_s(engine, new_tokens: int = DECODE_NEW_TOKENS) -> float | None:
    """Batch-1 decode speed: one request (a short prompt, `new_tokens` with ignore_eos) through the engine's
    step loop; tokens after the first / seconds after the first, so prefill is left out. The first and
    last token times are taken when `step` returns them (on CUDA that is after the step's sampled ids
    reached the host, so the GPU work is done)."""
    prompt = _batch1_prompt(engine, DECODE_PROMPT_TOKENS)
    new_tokens = min(new_tokens, engine.max_model_len - len(prompt))
    if new_tokens < 2:
        return None
    cold(engine)
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
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


def prompt_tok_s(engine, length: int = PREFILL_PROMPT_TOKENS) -> float | None:
    """Batch-1 prompt (prefill) speed: one `length`-token prompt from a cold prefix cache, its tokens / the
    seconds until its first new token (TTFT at batch 1); null when the context is too short for it."""
    length = min(length, engine.max_model_len - 1)
    if length < 2:
        return None
    prompt = _batch1_prompt(engine, length)
    cold(engine)
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and first is None:
                first = time.perf_counter()
    return None if first is None or first <= start else length / (first - start)

def online_load(engine, server: Server | None, workload: Workload, level: LoadLevel, slo, vocab, tokenizer=None,
                chat: bool = False, seed_offset: int = 1, progress=None) -> dict:
    """One online run at `level` against the in-process `engine`, or else `server`; `tokenizer` given: text prompts (sized in its tokens), else token ids; `chat`:
    a dataset's chat rows go to the endpoint as chat completions. The first `--warmup` and last `--cooldown`
    requests are sent but left out of the statistics. Every measured request failing is a failed run (exit 1,
    with the first error); some failing is reported. `seed_offset` >= 1: the prompts differ from the offline
    phase's (offset 0) and from other levels', so they get no prefix-cache hits from those. A server gets its
    `api_key` as a bearer token and `request_timeout` s for each next byte; `progress(state)` gets
    `run_load`'s progress state (with `timeout_s`) twice a second."""
    encoder = engine.tokenizer if engine is not None and tokenizer is None else None
    requests = workload.sample(vocab, seed_offset=seed_offset, tokenizer=tokenizer, encoder=encoder, chat=chat)

    blocks = engine.blocks if engine is not None else None
    hits_before, queries_before = (blocks.prefix_hits, blocks.prefix_queries) if blocks else (0, 0)

    async def go():
        args = (requests, level.rate, level.concurrency, workload.seed, _arrivals(level), workload.max_seconds)
        if engine is None:
            on_progress = (lambda state: progress({**state, "timeout_s": server.timeout_s})) if progress else None
            sender = openai_sender(server.url, server.model, server.api_key, server.timeout_s)
            return await run_load(sender, *args, on_progress=on_progress, rampup_s=workload.rampup_s)
        async_engine = AsyncEngine(engine)
        try:
            return await run_load(engine_sender(async_engine), *args, rampup_s=workload.rampup_s)
        finally:
            async_engine.shutdown()

    timings, wall = asyncio.run(go())
    sent = len(timings)
    warm, cool = workload.measured_window(sent, f" sent at {level.label}")
    measured = timings[warm:sent - cool]
    if warm or cool:  # the statistics' window: from the first measured send to the last measured end
        wall = max(t.end for t in measured) - min(t.start for t in measured)
    failures = failure_summary(measured)
    if failures["failed"] == len(measured):
        route = "/chat/completions" if isinstance(requests[0][0], Chat) else "/completions"
        where = f"{api_base_url(server.url)}{route}" if server else "the engine"
        hint = ""
        if server and "HTTP 401" in (measured[0].error or ""):
            hint = ": the server wants an API key (--api-key KEY, or OPENAI_API_KEY)" if not server.api_key else \
                ": it refused the API key given (--api-key / OPENAI_API_KEY)"
        raise RuntimeError(f"all {len(measured)} requests to {where} failed (first error: {measured[0].error}){hint}")
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
