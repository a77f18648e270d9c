"""What `profile` sends: `Workload` (how many requests, prompt and output lengths or a dataset's rows,
concurrency or a Poisson rate, the seed) and the parsers for the CLI's `--concurrency`, `--prompt-len`
and `--output-len`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from optcli.bench.dataset import DatasetRow
from optcli.bench.prompts import text_prompts, token_prompts
from optcli.errors import UsageError

# The batch-1 decode measurement (`measure.decode_tok_s`), stated in the roofline's method line.
DECODE_PROMPT_TOKENS = 8
DECODE_NEW_TOKENS = 32


@dataclass
class Workload:
    requests: int = 32
    prompt_len: tuple[int, int] = (16, 64)  # uniform in [a, b)
    output_len: int | tuple[int, int] = 32  # fixed, or uniform in [a, b]
    concurrency: int | None = None
    sweep: tuple[int, ...] = ()  # extra concurrency levels measured before `concurrency` (plot only)
    rate: float | None = None  # requests/s, Poisson arrivals
    seed: int = 0
    prompt_format: str | None = None  # "tokens" | "text"; None: text to an endpoint, token ids in process
    dataset: tuple[DatasetRow, ...] = ()  # `--dataset` rows, taken in order (cycled) instead of synthetic prompts
    prefix_len: int = 0  # shared-prefix workload: each prompt starts with one of `prefix_count` prefixes
    prefix_count: int = 1

    @property
    def max_output_len(self) -> int:
        return self.output_len if isinstance(self.output_len, int) else self.output_len[1]

    def sample(self, vocab: tuple[int, int], seed_offset: int = 0, tokenizer=None,
               encoder=None) -> list[tuple[list[int] | str, int]]:
        """(prompt, max_tokens) requests: text in `tokenizer`'s tokens when given, else random token ids; with
        a dataset its rows (text, or token ids through `encoder`, the in-process model's tokenizer)."""
        seed = self.seed + seed_offset
        rng = random.Random(seed)
        if self.dataset:
            rows = [self.dataset[i % len(self.dataset)] for i in range(self.requests)]
            tok = tokenizer or encoder
            texts = [r.text(tok) for r in rows]
            prompts = [encoder(t, add_special_tokens=False).input_ids for t in texts] if encoder else texts
            return [(p, r.max_tokens(tok, self._output_len(rng))) for p, r in zip(prompts, rows, strict=True)]
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
        return [(p, self._output_len(rng)) for p in prompts]

    def _output_len(self, rng: random.Random) -> int:
        return self.output_len if isinstance(self.output_len, int) else rng.randint(*self.output_len)


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


def parse_output_len(text: str) -> int | tuple[int, int]:
    """`N` new tokens per request, or `A:B` drawn uniformly in [A, B] per request."""
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        raise UsageError(f"--output-len must be N or A:B with integers (got '{text}')") from None
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise UsageError(f"--output-len needs N >= 1 or A:B with 1 <= A <= B (got '{text}')")


def default_concurrency(workload: Workload) -> int | None:
    return None if workload.rate else min(8, workload.requests)
