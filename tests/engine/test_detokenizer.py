"""Streaming and stop strings stay correct and cheap on long outputs: the incremental detokenizer's text
equals a full decode (multi-byte UTF-8 split across byte-fallback tokens included), stop strings are cut
where a full-text search cuts them, and the decoding work grows linearly with the output length."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from optcli.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from optcli.checkpoints.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama").path)


class _Counting:
    def __init__(self, tok) -> None:
        self.tok, self.tokens = tok, 0

    def decode(self, ids, **kw):
        self.tokens += len(ids)
        return self.tok.decode(ids, **kw)


def _ids(tokenizer, n: int) -> list[int]:
    text = "Once upon a time, naïve café — 東京 😀 «quote» ünïcödé. " * 200
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rng = random.Random(0)
    out = list(ids)
    while len(out) < n:
        out += ids[rng.randrange(len(ids)) :][:50]
    return out[:n]


def test_incremental_text_equals_full_decode_and_is_linear(tokenizer) -> None:
    ids = _ids(tokenizer, 4000)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    counting = _Counting(tokenizer)
    detok = IncrementalDetokenizer(counting)
    emitted = ""
    for k in range(1, len(ids) + 1):
        emitted += detok.update(ids[:k])
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert emitted == detok.text and detok.full_text == full
    assert counting.tokens < 20 * len(ids)  # a full re-decode each step would be ~len(ids)**2 / 2


def test_stop_strings_cut_where_full_text_search_does(tokenizer) -> None:
    ids = _ids(tokenizer, 4000)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in (["東京 😀"], ["café —", "«q"], ["never there"], ["ü"]):
        detok = IncrementalDetokenizer(tokenizer)
        got = -1
        for k in range(1, len(ids) + 1):
            detok.update(ids[:k])
            got = detok.find_stop(stop)
            if got >= 0:
                ref_text = tokenizer.decode(ids[:k], skip_special_tokens=True)
                assert got == min(i for i in (ref_text.find(s) for s in stop) if i >= 0)
                # the full-text method would not have found it one step earlier
                prev = tokenizer.decode(ids[: k - 1], skip_special_tokens=True)
                assert all(prev.find(s) < 0 for s in stop)
                break
        if got < 0:
            assert all(full.find(s) < 0 for s in stop)
