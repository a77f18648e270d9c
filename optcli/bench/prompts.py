"""Synthetic prompts: token ids for the in-process engine, text for servers.

Servers are sent text by default, as `vllm bench serve` and GuideLLM send it: several
OpenAI-compatible servers accept only text prompts, and token ids mean nothing to a server whose
tokenizer differs. The text is real prose, code and dialogue (windows of the builtin corpus, cut to
the wanted length in the given tokenizer's tokens and decoded), so the server's tokenizer sees
ordinary text; its own `usage.prompt_tokens` is what the report counts.
"""

from __future__ import annotations

import random
from functools import cache

from optcli.calibration.corpus import calibration_documents


def sample_lengths(n: int, prompt_len: tuple[int, int], rng: random.Random) -> list[int]:
    a, b = prompt_len
    return [rng.randrange(a, b) for _ in range(n)]


def token_prompts(n: int, prompt_len: tuple[int, int], vocab: tuple[int, int], seed: int) -> list[list[int]]:
    """Random token ids (EOS is ignored by the load, so their content does not matter)."""
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(length)] for length in sample_lengths(n, prompt_len, rng)]


def text_prompts(tokenizer, n: int, prompt_len: tuple[int, int], seed: int) -> list[str]:
    """`n` texts of about `prompt_len` tokens in `tokenizer` (uniform in [a, b)), cut from the corpus."""
    rng = random.Random(seed)
    stream = _corpus_tokens(tokenizer)  # cached per tokenizer: sweeps call this once per level
    texts = []
    for length in sample_lengths(n, prompt_len, rng):
        if length >= len(stream):
            raise ValueError(f"prompt of {length} tokens is longer than the corpus ({len(stream)} tokens)")
        start = rng.randrange(0, len(stream) - length)
        texts.append(tokenizer.decode(list(stream[start : start + length]), skip_special_tokens=True))
    return texts


@cache
def _corpus_tokens(tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for doc in calibration_documents(include_heldout=True):
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids)
    return tuple(ids)
