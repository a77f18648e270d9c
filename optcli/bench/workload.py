"""What `profile` sends: `Workload` (how many requests, prompt and output lengths, concurrency or a
Poisson rate, the seed) and the parsers for the CLI's `--concurrency` and `--prompt-len`."""

from __future__ import annotations

from dataclasses import dataclass

from optcli.bench.prompts import text_prompts, token_prompts
from optcli.errors import UsageError

# The batch-1 decode measurement (`measure.decode_tok_s`), stated in the roofline's method line.
DECODE_PROMPT_TOKENS = 8
DECODE_NEW_TOKENS = 32


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


def default_concurrency(workload: Workload) -> int | None:
    return None if workload.rate else min(8, workload.requests)
