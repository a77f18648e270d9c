"""The artifact and its source measured in interleaved repeats, so a ratio compares like with like.

1. Both engines are loaded and kept resident when memory allows (the source gets the KV cache bytes the
   artifact got, so neither has more room); otherwise one at a time, reloaded when its turn comes.
2. Each model gets an untimed warm-up pass when (re)loaded: a step at every power-of-two batch size and
   token count any phase can reach, then every phase once. One-time costs (weight packing, kernel
   compilation, the first call of each batch-size bucket, allocator growth) are paid there, not in a timed
   window.
3. `workload.repeats` timed repeats of each phase (offline, batch-1 decode, batch-1 prompt, online at the
   headline level), source and artifact alternating ABBA-style: repeat 1 runs A then B, repeat 2 B then A,
   and so on, phase by phase, so a drift over time (another job starting, a clock ramping) lands on both
   and the paired ratio of repeat i cancels it. Every timed run starts from a cold prefix cache with the
   same prompts, so the repeats measure the same work.
4. Every run steps the engine on a thread of its own, as `serve` does (AsyncEngine's engine thread) and as
   the online phase always did. Offline and batch-1 used to run on the main thread, which is not the
   path a served model takes and, on a busy CPU, a much slower one: the main thread's OpenMP team
   spin-waits at its barriers, so a descheduled thread stalls each step (measured on the 2-core dev box
   with other jobs running, tiny-llama W4A16, 16 requests: the same offline run 30-350 tok/s on the main
   thread, 2,000-2,600 on a thread of its own; about equal, 1,100-1,300, with OMP_WAIT_POLICY=PASSIVE).

Points 2-4 are the causes of issue 32's offline figure below online (34 against 1,844 tok/s): the old
offline phase warmed up on its own prompts, so its timed run found them in the prefix cache, prefilled
only their tails, and met those smaller step sizes for the first time inside the timed window, where a
fresh kernel cache times its candidates (measured: 8 kernel timings, 2.6 s, inside a 6.8 s window:
75 tok/s); and it ran on the main thread (4).

The report's figures are the medians over the repeats; `stats.py` gives their intervals. The candidate's
other load levels (a concurrency list, a sweep) are its capacity plan: they run once, in the first repeat.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optcli.bench.measure import (
    cold,
    decode_tok_s,
    engine_facts,
    engine_memory,
    free_device_memory,
    offline_requests,
    offline_run,
    online_load,
    prompt_tok_s,
    vocab_range,
    within_window,
)
from optcli.bench.rates import THROUGHPUT, LoadLevel
from optcli.bench.stats import median_interval
from optcli.bench.sweep import run_levels
from optcli.bench.workload import DECODE_PROMPT_TOKENS, PREFILL_PROMPT_TOKENS, Workload
from optcli.config import EngineConfig
from optcli.engine import Engine, SamplingParams

PHASES = ("offline", "decode", "prompt", "online")
LATENCY_FIELDS = tuple(f"latency_ms.{m}.{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p95", "p99"))
# every figure measured once per repeat, by its place in the report
FIGURES = ("throughput.output_tok_s", "throughput.total_tok_s", "throughput.requests_s", "throughput.decode_tok_s",
           "throughput.prompt_tok_s", "throughput.online_output_tok_s", *LATENCY_FIELDS)


@dataclass
class ModelRun:
    """Everything the repeats measured for one model (its engine is dropped by then)."""

    engine_options: dict  # the resolved engine options (`EngineConfig.as_dict()`) and dtype_reason
    throughput: dict  # medians of the offline figures, plus the engine's kernel paths and LM head cost
    batch_efficiency: float | None
    memory: dict
    decode_tok_s: float | None  # median of the repeats
    prompt_tok_s: float | None
    online: dict  # the headline level's summary: medians over the repeats, samples of all of them
    samples: dict[str, list[float]]
    levels: list[tuple[LoadLevel, dict]]  # every level's summary, the headline last (its merged summary)
    runs: list[dict[str, float | None]]  # each repeat's figures, by report field (FIGURES)
    offline_preemptions: int = 0  # sequences preempted in the timed offline runs, all repeats

    def figure_runs(self, name: str) -> list[float | None]:
        return [run.get(name) for run in self.runs]

    def intervals(self) -> dict[str, dict]:
        """Each figure's median and 95% interval over the repeats (`stats.median_interval`)."""
        out = {}
        for name in FIGURES:
            interval = median_interval(self.figure_runs(name))
            out[name] = {"median": None if interval is None else interval.median,
                         "ci_low": None if interval is None else interval.low,
                         "ci_high": None if interval is None else interval.high,
                         "repeats": 0 if interval is None else interval.n}
        return out


def on_own_thread(fn: Callable, *args):
    """fn(*args) on a new thread, as AsyncEngine steps a served engine (module docstring, 4); its result, or
    its exception re-raised here."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller, re-raised there
            box["error"] = exc

    thread = threading.Thread(target=target, name="optcli-bench", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _same(value):
    return value


def median(values) -> float | None:
    """The median over repeats as `stats.py` takes it (on the log scale: with an even count, the geometric
    mean of the middle two), so a figure and its interval agree; a figure that can be 0 (a hit rate, a
    goodput fraction) takes the plain median."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if all(v > 0 for v in values):
        return median_interval(values).median
    return statistics.median(values)


@dataclass
class _Side:
    """One model: its engine while loaded, and what its repeats measured."""

    source: object
    config: EngineConfig
    role: str  # "candidate" | "baseline"
    engine: Engine | None = None
    requests: list = field(default_factory=list)
    memory: dict | None = None
    facts: dict | None = None
    options: dict | None = None
    runs: list[dict] = field(default_factory=list)
    online_runs: list[dict] = field(default_factory=list)
    levels: list = field(default_factory=list)
    efficiency: list = field(default_factory=list)
    preemptions: int = 0
    # runs made in each repeat's timed window, per phase (`measure.within_window`)
    window_runs: dict[str, list[int]] = field(default_factory=lambda: {"offline": [], "decode": [], "prompt": [], "online": []})


class _Repeats:
    def __init__(self, workload: Workload, slo, step: Callable[[str], None]) -> None:
        self.workload, self.slo, self.step = workload, slo, step
        self.headline = workload.headline()
        # the headline's place in the levels' running order: its prompts' seed, the same in every repeat
        self.headline_order = 2 if workload.sweep_size else len(workload.load_levels())

    # --- engines ----------------------------------------------------------------------------------
    def load(self, side: _Side) -> None:
        device = side.config.device
        self.step(f"loading {side.source.spec} into the engine")
        allocated = 0
        if device.startswith("cuda"):
            allocated = torch.cuda.memory_allocated(device)  # another resident model's
            torch.cuda.reset_peak_memory_stats(device)
        side.engine = engine = Engine(str(side.source.path), side.config)
        side.requests = offline_requests(engine, self.workload)
        on_own_thread(self.warm_up, side)
        if side.memory is None:  # the first load's: its peak includes the warm-up's offline run
            side.memory = engine_memory(engine, device, allocated)
            side.facts = engine_facts(engine)
            # the dtype and each layer kind's kernel per batch-size bucket, with their reasons (rules, not timings)
            side.options = {**engine.config.as_dict(), "dtype_reason": engine.dtype_reason,
                            "kernels": engine.kernel_paths(), "kv_cache": engine.kv.describe(engine.block_size),
                            "cpu_threads": engine.thread_rule()}

    def release(self, side: _Side) -> None:
        side.engine = None
        free_device_memory(side.config.device)

    def warm_up(self, side: _Side) -> None:
        """Every phase once, untimed, after the first call of every power-of-two bucket a step can fall in:
        a decode batch of each size up to the largest batch, and a step of each token count up to the most
        tokens one step can take (a prefill of that many tokens)."""
        engine = side.engine
        self.step(f"warming up {side.source.spec} (untimed)")
        concurrency = [lv.concurrency for lv in self.workload.load_levels() if lv.concurrency]
        biggest = min(engine.max_num_seqs, max([len(side.requests), *concurrency]))
        lo, hi = vocab_range(engine)

        def prompt(i: int, length: int) -> list[int]:
            return [lo + (i * 31 + j * 7) % (hi - lo) for j in range(length)]

        batch = 1
        while batch <= biggest:
            cold(engine)
            engine.generate([prompt(i, DECODE_PROMPT_TOKENS) for i in range(batch)],
                            SamplingParams(max_tokens=2, ignore_eos=True))
            batch *= 2
        most = min(engine.scheduler.max_num_batched_tokens, engine.max_model_len - 1,
                   max(sum(len(p) for p, _ in side.requests), PREFILL_PROMPT_TOKENS))
        tokens = 1
        while tokens <= most:
            cold(engine)
            engine.generate([prompt(0, tokens)], SamplingParams(max_tokens=1, ignore_eos=True))
            tokens *= 2
        offline_run(engine, side.requests)
        decode_tok_s(engine)
        prompt_tok_s(engine)
        # the headline's batch shapes without its arrival schedule (a rate-limited level would take its full time)
        burst = LoadLevel("concurrent", concurrency=self.headline.concurrency) if self.headline.concurrency else THROUGHPUT
        self.online(side, burst)

    # --- phases -----------------------------------------------------------------------------------
    def online(self, side: _Side, level: LoadLevel, order: int | None = None) -> dict:
        engine = side.engine
        text_tok = engine.tokenizer if self.workload.prompt_format == "text" else None
        cold(engine)
        return online_load(engine, None, self.workload, level, self.slo, vocab_range(engine), text_tok,
                           seed_offset=order or self.headline_order)

    def windowed_online(self, side: _Side, order: int | None = None) -> dict:
        """The headline level's online run, repeated within the timed window (`measure.within_window`): a
        burst of the demo's 16 requests lasts ~0.3 s; a paced level outlasts the window and runs once."""
        summary, runs = within_window(lambda: self.online(side, self.headline, order),
                                      lambda s: s["throughput"]["output_tok_s"], self.workload.min_time_s)
        side.window_runs["online"].append(runs)
        return summary

    def run(self, side: _Side, phase: str, repeat: int) -> None:
        engine, figures = side.engine, side.runs[repeat]
        of = f" (repeat {repeat + 1}/{self.workload.repeats})"
        if phase == "offline":
            self.step(f"offline throughput of {side.source.spec}: {len(side.requests)} requests{of}")
            result, runs = within_window(lambda: offline_run(engine, side.requests), lambda r: r["output_tok_s"],
                                         self.workload.min_time_s)
            side.window_runs["offline"].append(runs)
            for key in ("output_tok_s", "total_tok_s", "requests_s"):
                figures[f"throughput.{key}"] = result[key]
            side.efficiency.append(result["batch_efficiency"])
            side.preemptions += result["preemptions"]
        elif phase == "decode":
            self.step(f"batch-1 decode of {side.source.spec}{of}")
            figures["throughput.decode_tok_s"], runs = within_window(lambda: decode_tok_s(engine), _same,
                                                                        self.workload.min_time_s)
            side.window_runs["decode"].append(runs)
        elif phase == "prompt":
            self.step(f"batch-1 prompt of {side.source.spec}{of}")
            figures["throughput.prompt_tok_s"], runs = within_window(lambda: prompt_tok_s(engine), _same,
                                                                        self.workload.min_time_s)
            side.window_runs["prompt"].append(runs)
        else:
            if side.role == "candidate" and repeat == 0:  # every level once: the capacity plan
                def run_one(level: LoadLevel, order: int) -> dict:
                    self.step(f"online latency of {side.source.spec}: {level.label}{of}")
                    if level == self.headline:
                        return self.windowed_online(side, order)
                    return self.online(side, level, order)

                side.levels = run_levels(self.workload, run_one)
                summary = side.levels[-1][1]
            else:
                self.step(f"online latency of {side.source.spec}: {self.headline.label}{of}")
                summary = self.windowed_online(side)
            side.online_runs.append(summary)
            figures["throughput.online_output_tok_s"] = summary["throughput"]["output_tok_s"]
            for name in LATENCY_FIELDS:
                _, metric, stat = name.split(".")
                figures[name] = summary["latency_ms"][metric][stat]

    def result(self, side: _Side) -> ModelRun:
        n = len(side.runs)
        throughput = {key: median(run.get(f"throughput.{key}") for run in side.runs)
                      for key in ("output_tok_s", "total_tok_s", "requests_s")}
        online = merge_summaries(side.online_runs)
        # Several levels (a sweep, a concurrency list) are one run's capacity curve, all from the first
        # repeat: swapping the headline level's point for the median over repeats would mix runs within one
        # curve (a constant-rate level could then out-achieve the throughput level). The headline figures
        # above are the medians either way.
        levels = list(side.levels) if len(side.levels) > 1 else [(self.headline, online)]
        return ModelRun(
            engine_options=side.options, throughput={**throughput, **side.facts},
            batch_efficiency=median(side.efficiency), memory=side.memory,
            decode_tok_s=median(side.runs[i].get("throughput.decode_tok_s") for i in range(n)),
            prompt_tok_s=median(side.runs[i].get("throughput.prompt_tok_s") for i in range(n)),
            online=online, samples=online["samples"], levels=levels, runs=side.runs,
            offline_preemptions=side.preemptions)


def measure_models(candidate, baseline, workload: Workload, slo, config: EngineConfig,
                   step: Callable[[str], None],
                   baseline_config: EngineConfig | None = None) -> tuple[ModelRun, ModelRun | None, dict]:
    """The candidate's (and, given, the baseline's) speed in `workload.repeats` interleaved repeats (module
    docstring). Returns both runs and how they were scheduled (`workload.repeats` in the report).
    `baseline_config`: the baseline's engine options when they differ from the candidate's (`compare
    --optimizations`: the same model with one optimization switched off); the KV-cache size is still shared."""
    device = config.device
    repeats = max(1, workload.repeats)
    explicit_kv = config.kv_cache_bytes is not None or config.num_kv_blocks is not None
    baseline_config = baseline_config or config
    if baseline is not None and device.startswith("cuda") and not explicit_kv:
        # the engine sizes its cache to a share of the whole GPU: half of it each, so the second model fits
        config = config.with_options(gpu_memory_utilization=config.gpu_memory_utilization / 2)
        baseline_config = baseline_config.with_options(gpu_memory_utilization=config.gpu_memory_utilization)
    r = _Repeats(workload, slo, step)
    a = _Side(candidate, config, "candidate")
    r.load(a)
    sides = [a]
    resident = True
    if baseline is not None:
        base_config = (baseline_config if explicit_kv else
                       baseline_config.with_options(kv_cache_bytes=a.engine.kv_cache_bytes))
        b = _Side(baseline, base_config, "baseline")
        resident = fits_beside(baseline.path, a.engine.kv_cache_bytes, device)
        if resident:
            r.load(b)
        sides.append(b)  # else loaded at its first turn, once the candidate is released
    for side in sides:
        side.runs = [{} for _ in range(repeats)]
    for i in range(repeats):
        order = sides if i % 2 == 0 else sides[::-1]
        if resident:  # phase by phase: the two runs of a pair are seconds apart
            for phase in PHASES:
                for side in order:
                    on_own_thread(r.run, side, phase, i)
        else:  # model by model: ABBA keeps the reloads to one per repeat
            for side in order:
                if side.engine is None:
                    for other in sides:
                        if other.engine is not None:
                            r.release(other)
                    r.load(side)
                for phase in PHASES:
                    on_own_thread(r.run, side, phase, i)
    runs = [r.result(side) for side in sides]
    for side in sides:
        r.release(side)
    schedule = {"repeats": repeats, "order": "ABBA" if len(sides) == 2 else "A",
                "resident": "both" if resident and len(sides) == 2 else "one at a time" if len(sides) == 2 else "one",
                "warm_up": "untimed, per load: each power-of-two batch size and step token count, then every phase once",
                "prefix_cache": "reset before every run",
                # each phase's repeat is the median run of as many as fill the window (the headline level online)
                "window": {"min_s": workload.min_time_s,
                           "runs": {side.role: side.window_runs for side in sides}}}
    return runs[0], (runs[1] if len(runs) > 1 else None), schedule


def fits_beside(path: Path, kv_cache_bytes: int, device: str) -> bool:
    """Whether a second model fits beside the first: its checkpoint at up to twice its size (a 16-bit
    checkpoint run in fp32), its KV cache, and a fifth to spare, within the free host or GPU memory."""
    weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) or sum(
        p.stat().st_size for p in Path(path).glob("*.bin"))
    need = (2 * weights + kv_cache_bytes) * 1.2
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need <= free


def merge_summaries(summaries: list[dict]) -> dict:
    """One online summary from several repeats of a level: each figure the median over the repeats, the
    latency samples of all of them (the CDF plots), the failures of all of them (`failures`: failed of total
    over the repeats); the request counts of one run (`requests`, `sent`, `excluded`: each repeat sends the
    same requests) and the first repeat's requests themselves (`timings`, `measured`: what --export writes)."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    merged = dict(first)
    merged["latency_ms"] = {m: {s: median(x["latency_ms"][m][s] for x in summaries) for s in stats}
                            for m, stats in first["latency_ms"].items()}
    merged["throughput"] = {k: median(x["throughput"][k] for x in summaries) for k in first["throughput"]}
    if first.get("goodput") is not None:
        merged["goodput"] = {k: median((x.get("goodput") or {}).get(k) for x in summaries) for k in first["goodput"]}
    for key in ("achieved_rate_requests_s", "prefix_cache_hit_rate"):
        merged[key] = median(x.get(key) for x in summaries)
    reasons: dict[str, int] = {}
    for x in summaries:
        for reason in x["failures"]["reasons"]:
            reasons[reason["error"]] = reasons.get(reason["error"], 0) + reason["count"]
    merged["failures"] = {"failed": sum(x["failures"]["failed"] for x in summaries),
                          "total": sum(x["failures"]["total"] for x in summaries),
                          "reasons": [{"error": e, "count": c} for e, c in sorted(reasons.items(), key=lambda i: -i[1])]}
    merged["samples"] = {k: [v for x in summaries for v in x["samples"][k]] for k in first["samples"]}
    merged["repeats"] = len(summaries)
    return merged
