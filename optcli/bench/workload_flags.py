"""The workload as `profile`'s flags give it (`WorkloadFlags`: each field declared with its flag, help and
limits, from which `cli/flags.py` makes the Typer options), and its one validation into a `Workload`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optcli.bench.dataset import load_dataset
from optcli.bench.rates import RATE_TYPES, parse_exclusion, plan_levels
from optcli.bench.workload import (
    DEFAULT_MIN_TIME_S,
    DEFAULT_REPEATS,
    PROMPT_FORMATS,
    Workload,
    parse_output_len,
    parse_prompt_len,
    parse_synthetic_data,
)
from optcli.config import option
from optcli.errors import UsageError


@dataclass(frozen=True)
class WorkloadFlags:
    requests: int = option(32, "--requests", "--max-requests", "--num-prompts", min=1,
                           help="Requests per phase and per load level (at most, with --max-seconds).")
    prompt_len: str = option("16:64", "--prompt-len",
                             help="Prompt lengths, uniform in [A, B) (N:N+1 for N tokens each).")
    output_len: str = option("32", "--output-len", help=(
        "New tokens per request (EOS ignored): N, A:B drawn uniformly per request, or @FILE: drawn from a "
        "dataset's output_tokens / ShareGPT reply lengths."))
    prefix_len: int = option(0, "--prefix-len", min=0,
                             help="Shared-prefix workload: tokens of system prompt each request starts with.")
    prefix_count: int = option(1, "--prefix-count", min=1,
                               help="With --prefix-len: distinct shared prefixes, round robin.")
    dataset: Path | None = option(None, "--dataset", "--data", "--dataset-path", help=(
        "JSONL/JSON rows with prompt, messages (OpenAI chat) or conversations (ShareGPT), optional "
        "output_tokens: sent instead of synthetic prompts. Or GuideLLM's synthetic spec: "
        "prompt_tokens=N,output_tokens=M[,*_min=,*_max=,prefix_tokens=] (overrides --prompt-len/--output-len/"
        "--prefix-len)."))
    concurrency: str | None = option(None, "--concurrency", "--max-concurrency", help=(
        "Requests in flight at most (online); C1,C2,... runs one level each; with --rate: the cap."))
    rate: str | None = option(None, "--rate", "--request-rate", help=(
        "Requests/s (online): R, R1,R2,... (one level each), inf (all at once), or sweep[:N]: synchronous, "
        "throughput, then N-2 constant rates between (GuideLLM's sweep, N=10)."))
    rate_type: str | None = option(None, "--rate-type", help=(
        f"How --rate is read: {', '.join(RATE_TYPES)} (GuideLLM's names; default poisson arrivals)."))
    warmup: str | None = option(None, "--warmup", help=(
        "Requests at the start of each level sent but left out of its statistics: N, or a fraction (0.1)."))
    cooldown: str | None = option(None, "--cooldown", help="Likewise at the end of each level.")
    max_seconds: float | None = option(None, "--max-seconds", min=0.1, help=(
        "Per level: no request starts after this many seconds (those in flight finish)."))
    duration: float | None = option(None, "--duration", min=0.1, help="With --rate R: send R x duration requests.")
    repeats: int = option(DEFAULT_REPEATS, "--repeats", min=1, help=(
        "Timed repeats of each speed figure, source and artifact interleaved (ABBA), after an untimed warm-up: "
        "medians with 95% intervals; 1: no interval, no verdict."))
    min_time: float = option(DEFAULT_MIN_TIME_S, "--min-time", min=0.0, envvar="OPTCLI_MIN_TIME", help=(
        "Seconds: a timed run shorter than this (offline, batch-1 decode and prompt, a burst level) is repeated "
        "within each repeat until this much time has passed, and its median run kept (pyperf's --min-time)."))
    rampup: float = option(0.0, "--rampup", min=0.0, help=(
        "Seconds over which a level without --rate starts its first requests (up to its concurrency), "
        "evenly spread, as GuideLLM's rampup; 0: all at once. Rate levels pace their own starts."))
    prompt_format: str | None = option(None, "--prompt-format", help=(
        "tokens or text: how prompts are sent (default: text to an --endpoint, token ids in process)."))
    seed: int = option(0, "--seed", help="Seed of the synthetic prompts and lengths.")

    def build(self) -> tuple[Workload, Path | None]:
        """(the validated workload, the --dataset file its rows came from): every check of the flags together,
        each a one-line UsageError, before anything loads."""
        levels, sweep_size, arrivals = plan_levels(self.rate, self.rate_type, self.concurrency, self.requests)
        requests = self.requests
        if self.duration is not None:
            rates = [lv.rate for lv in levels if lv.rate is not None]
            if not rates or sweep_size:
                raise UsageError("--duration needs --rate R (requests = R x duration)")
            requests = max(1, round(max(rates) * self.duration))
        dataset, prefix_len, synthetic = self.dataset, self.prefix_len, None
        if dataset is not None and not dataset.exists() and "=" in str(dataset):
            # GuideLLM's synthetic --data: its lengths replace --prompt-len / --output-len
            synthetic = parse_synthetic_data(str(dataset))
            prefix_len, dataset = synthetic["prefix_len"] or prefix_len, None
        if self.prompt_format not in (None, *PROMPT_FORMATS):
            raise UsageError(f"--prompt-format must be tokens or text (got '{self.prompt_format}')")
        if prefix_len and dataset is not None:
            raise UsageError("--prefix-len shapes synthetic prompts: not with --dataset (put the shared prefix in its rows)")
        workload = Workload(requests=requests,
                            prompt_len=synthetic["prompt_len"] if synthetic else parse_prompt_len(self.prompt_len),
                            output_len=synthetic["output_len"] if synthetic else parse_output_len(self.output_len),
                            prefix_len=prefix_len, prefix_count=self.prefix_count,
                            levels=levels, sweep_size=sweep_size, arrivals=arrivals, seed=self.seed,
                            warmup=parse_exclusion(self.warmup, "--warmup"),
                            cooldown=parse_exclusion(self.cooldown, "--cooldown"),
                            max_seconds=self.max_seconds, prompt_format=self.prompt_format, repeats=self.repeats,
                            min_time_s=self.min_time, rampup_s=self.rampup)
        if self.rampup and all(level.rate for level in workload.load_levels()) and not sweep_size:
            raise UsageError("--rampup spreads the first requests of a level without a rate; every level here "
                             "has --rate, which paces its own starts")
        workload.measured_window(requests)  # warm-up and cool-down leave some requests to measure
        if dataset is not None:
            workload.dataset = tuple(load_dataset(dataset))
        return workload, dataset
