"""What `profile` sends: `Workload` (how many requests, prompt and output lengths or a dataset's rows,
the load levels, warm-up and cool-down, the seed) and the parsers for the CLI's `--prompt-len` and
`--output-len` (the load levels are `rates.py`'s)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from optcli.bench.dataset import DatasetRow, LengthsFrom, output_lengths
from optcli.bench.prompts import text_prompts, token_prompts
from optcli.bench.rates import THROUGHPUT, LoadLevel, excluded_count
from optcli.errors import UsageError

# The batch-1 decode measurement (`measure.decode_tok_s`), stated in the roofline's method line.
DECODE_PROMPT_TOKENS = 8
DECODE_NEW_TOKENS = 32
# The batch-1 prompt (prefill) measurement (`measure.prompt_tok_s`): one prompt this long (or the context less 1).
PREFILL_PROMPT_TOKENS = 128
# Each speed figure of `profile` is measured this many times (source and artifact interleaved): `--repeats`.
# 5, not 3: the interval's t factor is 4.30 at 3 repeats and 2.78 at 5, and at 3 the README main job's batch-1
# decode (a 4-7% gain) read [1.00, 1.09] "no measurable difference" in one of three runs beside a busy loop and
# "faster" in the other four (benchmarks/busy_verdicts.py, 2026-12-06 21:48 UTC): a verdict a CI gate cannot trust.
DEFAULT_REPEATS = 5
PROMPT_FORMATS = ("tokens", "text")  # how prompts are sent: token ids, or text
# A timed figure shorter than this is noise: the demo model's batch-1 decode of 32 tokens takes ~60 ms and its
# 128-token prefill ~8 ms, so one descheduled slice (4 ms on Linux's CFS) moved a repeat by 5-50%, and with 3
# repeats the ratio's interval spanned 0.53-1.90x on a quiet machine (README, 2026-12-06). Each repeat of a
# shorter run is the median of as many runs as fill this window (`measure.within_window`; pyperf's
# `--min-time` does the same for its loops): `--min-time`.
DEFAULT_MIN_TIME_S = 0.5


@dataclass
class Workload:
    requests: int = 32
    prompt_len: tuple[int, int] = (16, 64)  # uniform in [a, b)
    output_len: int | tuple[int, int] | LengthsFrom = 32  # fixed, uniform in [a, b], or a dataset's
    concurrency: int | None = None
    sweep: tuple[int, ...] = ()  # extra concurrency levels measured before `concurrency` (plot only)
    rate: float | None = None  # requests/s, Poisson arrivals
    seed: int = 0
    prompt_format: str | None = None  # "tokens" | "text"; None: text to an endpoint, token ids in process
    dataset: tuple[DatasetRow, ...] = ()  # `--dataset` rows, taken in order (cycled) instead of synthetic prompts
    prefix_len: int = 0  # shared-prefix workload: each prompt starts with one of `prefix_count` prefixes
    prefix_count: int = 1
    # the online levels (`rates.plan_levels`); empty: from `concurrency`/`sweep`/`rate` above
    levels: tuple[LoadLevel, ...] = ()
    sweep_size: int = 0  # > 0: GuideLLM's sweep of this many levels, decided as it runs
    arrivals: str = "poisson"  # a sweep's constant levels, or `rate`'s: poisson | constant
    warmup: float = 0.0  # requests left out of each level's statistics at its start: a count, or a fraction
    cooldown: float = 0.0  # ... and at its end
    max_seconds: float | None = None  # no request of a level starts after this many seconds
    repeats: int = DEFAULT_REPEATS  # timed repeats of each speed figure, per model (`repeats.py`)
    min_time_s: float = DEFAULT_MIN_TIME_S  # each repeat's timed window (`measure.within_window`)
    rampup_s: float = 0.0  # a level without a rate starts its first requests spread over this (`run_load`)

    def load_levels(self) -> tuple[LoadLevel, ...]:
        """The levels to run in order (a sweep's are decided as it runs: see `measure.run_levels`)."""
        if self.levels:
            return self.levels
        if self.rate:
            return (LoadLevel(self.arrivals, rate=self.rate, concurrency=self.concurrency),)
        return tuple(LoadLevel("concurrent", concurrency=c)
                     for c in (*self.sweep, self.concurrency or min(8, self.requests)))

    def headline(self) -> LoadLevel:
        """The level whose latencies are the report's (and the one the baseline is measured at): the last
        one, and a sweep's throughput run (the one level of a sweep that does not depend on the model)."""
        return THROUGHPUT if self.sweep_size else self.load_levels()[-1]

    def measured_window(self, sent: int, where: str = "") -> tuple[int, int]:
        """(warm, cool): how many of a level's `sent` requests `--warmup` and `--cooldown` leave out of its
        statistics. None left to measure is a UsageError: checked on `requests` before the run, and on what
        a level really sent (fewer under --max-seconds) after it."""
        warm, cool = excluded_count(self.warmup, sent), excluded_count(self.cooldown, sent)
        fractions = self.warmup < 1 and self.cooldown < 1 and self.warmup + self.cooldown >= 1
        if warm + cool >= sent or fractions:
            raise UsageError(f"--warmup and --cooldown leave none of the {sent} requests{where} measured")
        return warm, cool

    def only(self, level: LoadLevel) -> Workload:
        return replace(self, levels=(level,), sweep=(), sweep_size=0)

    def sample(self, vocab: tuple[int, int], seed_offset: int = 0, tokenizer=None, encoder=None,
               chat: bool = False) -> list[tuple[list[int] | str, int]]:
        """(prompt, max_tokens) requests: text in `tokenizer`'s tokens when given, else random token ids; with
        a dataset its rows (text, token ids through `encoder`, the in-process model's tokenizer, or with
        `chat` the chat rows' messages, for an endpoint)."""
        seed = self.seed + seed_offset
        rng = random.Random(seed)
        tok = tokenizer or encoder
        if self.dataset:
            rows = [self.dataset[i % len(self.dataset)] for i in range(self.requests)]
            if chat:
                prompts = [r.chat() for r in rows]
            else:
                texts = [r.text(tok) for r in rows]
                prompts = [encoder(t, add_special_tokens=False).input_ids for t in texts] if encoder else texts
            return [(p, r.max_tokens(tok, self._output_len(rng, tok))) for p, r in zip(prompts, rows, strict=True)]
        if tokenizer is not None:
            prompts = text_prompts(tokenizer, self.requests, self.prompt_len, seed)
        else:
            prompts = token_prompts(self.requests, self.prompt_len, vocab, seed)
        if self.prefix_len:
            # the prefixes come from the base seed, so every phase of a run shares the same system prompts
            span = (self.prefix_len, self.prefix_len + 1)
            if tokenizer is not None:
                prefixes = text_prompts(tokenizer, self.prefix_count, span, self.seed + 7919)
                prompts = [prefixes[i % self.prefix_count] + "\n" + p for i, p in enumerate(prompts)]
            else:
                prefixes = token_prompts(self.prefix_count, span, vocab, self.seed + 7919)
                prompts = [prefixes[i % self.prefix_count] + p for i, p in enumerate(prompts)]
        return [(p, self._output_len(rng, tok)) for p in prompts]

    def _output_len(self, rng: random.Random, tokenizer=None) -> int:
        if isinstance(self.output_len, LengthsFrom):
            return self.output_len.draw(rng, tokenizer)
        return self.output_len if isinstance(self.output_len, int) else rng.randint(*self.output_len)


def parse_prompt_len(text: str) -> tuple[int, int]:
    """`A:B`: prompt lengths uniform in [A, B) (a fixed length N is `N:N+1`; the contract keeps `N` alone an
    error, since it reads as either bound)."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--prompt-len must look like A:B with integers (got '{text}')") from None
    if not 1 <= a < b:
        raise UsageError(f"--prompt-len A:B needs 1 <= A < B (got {a}:{b})")
    return a, b


def parse_output_len(text: str) -> int | tuple[int, int] | LengthsFrom:
    """`N` new tokens per request, `A:B` drawn uniformly in [A, B] per request, or `@FILE`: drawn from the
    lengths of a dataset's rows."""
    if text.startswith("@"):
        return output_lengths(text[1:])
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        raise UsageError(f"--output-len must be N, A:B with integers, or @FILE (got '{text}')") from None
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise UsageError(f"--output-len needs N >= 1, A:B with 1 <= A <= B, or @FILE (got '{text}')")


SYNTHETIC_KEYS = ("prompt_tokens", "prompt_tokens_min", "prompt_tokens_max", "output_tokens", "output_tokens_min",
                  "output_tokens_max", "prefix_tokens")


def parse_synthetic_data(text: str) -> dict:
    """GuideLLM's synthetic `--data "prompt_tokens=256,output_tokens=128"` as our options: {prompt_len,
    output_len, prefix_len}. `_min`/`_max` give a uniform range (GuideLLM draws a normal around the mean
    with `_stdev`, clipped to them; we take the range itself, so a `_stdev` is refused rather than ignored)."""
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SYNTHETIC_KEYS:
            hint = "; give _min/_max for a range" if key.endswith("_stdev") else ""
            raise UsageError(f"--data {text}: unknown key '{key}' (known: {', '.join(SYNTHETIC_KEYS)}){hint}")
        try:
            values[key] = int(value)
        except ValueError:
            raise UsageError(f"--data {text}: {key} needs an integer (got '{value}')") from None
        if values[key] < (0 if key == "prefix_tokens" else 1):
            raise UsageError(f"--data {text}: {key} must be >= 1")
    spec = {}
    for name, option in (("prompt", "prompt_len"), ("output", "output_len")):
        mean = values.get(f"{name}_tokens")
        lo, hi = values.get(f"{name}_tokens_min", mean), values.get(f"{name}_tokens_max", mean)
        if lo is None or hi is None:
            raise UsageError(f"--data {text}: needs {name}_tokens (or {name}_tokens_min and _max)")
        if lo > hi:
            raise UsageError(f"--data {text}: {name}_tokens_min > {name}_tokens_max")
        spec[option] = (lo, hi + 1) if option == "prompt_len" else (hi if lo == hi else (lo, hi))
    spec["prefix_len"] = values.get("prefix_tokens", 0)
    return spec
