"""The artifact and its source measured in interleaved repeats, so a ratio compares like with like.

1. Both engines are loaded and kept resident when memory allows (the source gets the KV cache bytes the
   artifact got, so neither has more room); otherwise one at a time, reloaded when its turn comes.
2. Each model gets an untimed warm-up pass when (re)loaded: a step at every power-of-two batch size and
   token count any phase can reach, then every phase once. One-time costs (weight packing, kernel
   compilation, the first call of each batch-size bucket, allocator growth) are paid there, not in a timed
   window.
3. `workload.repeats` timed repeats of each phase (offline, batch-1 decode, batch-1 prompt, online at the
   headline level), source and artifact alternating ABBA-style: repeat 1 starts with A, repeat 2 with B,
   and so on, phase by phase, so a drift over time (another job starting, a clock ramping) lands on both
   and the paired ratio of repeat i cancels it. Resident together, the two models share each phase's timed
   window, alternating run by run inside it (A B B A A B ..., `measure.within_shared_window`), and each
   keeps its median run: a disturbance that lasts a second hits both sides of the pair. Every timed run
   starts from a cold prefix cache with the same prompts, so the repeats measure the same work.
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
    within_shared_window,
    within_window,
)
from optcli.bench.model_run import LATENCY_FIELDS, ModelRun, median, merge_summaries
from optcli.bench.rates import THROUGHPUT, LoadLevel
from optcli.bench.sweep import run_levels
from optcli.bench.workload import DECODE_PROMPT_TOKENS, PREFILL_PROMPT_TOKENS, Workload
from optcli.config import EngineConfig
from optcli.engine import Engine, SamplingParams

PHASES = ("offline", "decode", "prompt", "online")


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

    def timed(self, side: _Side, phase: str, repeat: int) -> tuple[Callable[[], object], Callable, Callable]:
        """One phase of one model as three parts: a timed run, the figure its window's median is taken by, and
        what records the kept run as repeat `repeat`'s figures."""
        engine, figures = side.engine, side.runs[repeat]
        if phase == "offline":
            def keep_offline(result: dict) -> None:
                for key in ("output_tok_s", "total_tok_s", "requests_s"):
                    figures[f"throughput.{key}"] = result[key]
                side.efficiency.append(result["batch_efficiency"])
                side.preemptions += result["preemptions"]
            return lambda: offline_run(engine, side.requests), lambda r: r["output_tok_s"], keep_offline
        if phase in ("decode", "prompt"):
            measure = decode_tok_s if phase == "decode" else prompt_tok_s

            def keep_rate(value: float | None) -> None:
                figures[f"throughput.{phase}_tok_s"] = value
            return lambda: measure(engine), _same, keep_rate

        def keep_online(summary: dict) -> None:
            side.online_runs.append(summary)
            figures["throughput.online_output_tok_s"] = summary["throughput"]["output_tok_s"]
            for name in LATENCY_FIELDS:
                _, metric, stat = name.split(".")
                figures[name] = summary["latency_ms"][metric][stat]
        return (lambda: self.online(side, self.headline), lambda s: s["throughput"]["output_tok_s"], keep_online)

    def describe(self, phase: str, names: str, repeat: int) -> str:
        of = f" (repeat {repeat + 1}/{self.workload.repeats})"
        if phase == "offline":
            return f"offline throughput of {names}: {self.workload.requests} requests{of}"
        if phase in ("decode", "prompt"):
            return f"batch-1 {phase} of {names}{of}"
        return f"online latency of {names}: {self.headline.label}{of}"

    def run(self, side: _Side, phase: str, repeat: int) -> None:
        """One model's phase alone in its timed window (`measure.within_window`): a model measured without a
        peer, or one of two not resident together."""
        if phase == "online" and side.role == "candidate" and repeat == 0 and self.plan_levels():
            runs = self.plan(side, headline_in_window=True)
            side.window_runs["online"].append(runs)
            self.timed(side, phase, repeat)[2](side.levels[-1][1])
            return
        self.step(self.describe(phase, side.source.spec, repeat))
        run, figure, keep = self.timed(side, phase, repeat)
        result, runs = within_window(run, figure, self.workload.min_time_s)
        side.window_runs[phase].append(runs)
        keep(result)

    def run_together(self, sides: list[_Side], phase: str, repeat: int) -> None:
        """Both models' phase in one timed window, interleaved run by run (`measure.within_shared_window`), so
        the pair that makes this repeat's ratio ran under the same second of the machine's load. Before the
        first repeat's online phase the candidate runs its other load levels once (`plan`)."""
        if phase == "online" and repeat == 0 and self.plan_levels():
            for side in sides:
                if side.role == "candidate":
                    self.plan(side, headline_in_window=False)
        self.step(self.describe(phase, " and ".join(s.source.spec for s in sides) + ", interleaved", repeat))
        parts = [self.timed(side, phase, repeat) for side in sides]
        kept, runs = within_shared_window([run for run, _, _ in parts], parts[0][1], self.workload.min_time_s)
        for side, (_, _, keep), result in zip(sides, parts, kept, strict=True):
            side.window_runs[phase].append(runs)
            keep(result)

    # --- the candidate's capacity plan -------------------------------------------------------------
    def plan_levels(self) -> bool:
        """Whether the workload has load levels beyond the headline (a concurrency list, a sweep)."""
        return bool(self.workload.sweep_size) or len(self.workload.load_levels()) > 1

    def plan(self, side: _Side, headline_in_window: bool) -> int:
        """Every load level once, in rising load (`sweep.run_levels`), the headline last: the candidate's
        capacity plan. Its headline level runs in a timed window when it is also this repeat's headline figure
        (a model measured alone); otherwise once, as a point of the curve, and the headline figure comes from
        the shared window. Returns the headline's runs."""
        headline_runs = 1

        def run_one(level: LoadLevel, order: int) -> dict:
            nonlocal headline_runs
            self.step(f"online latency of {side.source.spec}: {level.label} (capacity plan)")
            if level == self.headline and headline_in_window:
                summary, headline_runs = within_window(lambda: self.online(side, level, order),
                                                       lambda s: s["throughput"]["output_tok_s"],
                                                       self.workload.min_time_s)
                return summary
            return self.online(side, level, order)

        side.levels = run_levels(self.workload, run_one)
        return headline_runs

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
        if resident and len(sides) == 2:  # phase by phase, both models' runs interleaved in one window
            for phase in PHASES:
                on_own_thread(r.run_together, order, phase, i)
        elif resident:
            for phase in PHASES:
                on_own_thread(r.run, sides[0], phase, i)
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
                # each phase's repeat is the median run of as many as fill the window (the headline level online);
                # two resident models share it, alternating run by run
                "window": {"min_s": workload.min_time_s,
                           "shared": resident and len(sides) == 2,
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
