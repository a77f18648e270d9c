"""Text is exact, incrementally and cheaply: for SentencePiece-style (Metaspace, llama2.c), byte-level BPE
(GPT-2 style) and byte-fallback tokenizers, the incremental detokenizer's text of an output after a
prompt equals transformers' decode(prompt + output) minus decode(prompt) on random id sequences (random
prompt/output split, special tokens and multi-byte UTF-8 split over tokens included), text it commits
never changes, stop strings are cut where a full-text search cuts them, and the decoding work grows
linearly with the output length, not with the prompt."""

from __future__ import annotations

import random

import pytest
from helpers import shared_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from optcli.engine.detokenizer import (
    IncrementalDetokenizer,
    _bytes_to_unicode,
    completion_text,
    token_texts,
    tokenizer_traits,
)

MULTILINGUAL = "Once upon a time, naïve café — 東京 😀 «quote» ünïcödé. Привет, мир! 日本語のテキスト 🎉🚀 ελληνικά\n"
KINDS = ["byte_fallback", "sentencepiece", "metaspace", "byte_level"]


def _train(tok: Tokenizer, trainer) -> None:
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:60_000]
    tok.train_from_iterator([text, MULTILINGUAL * 20], trainer)


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, so merges make tokens holding part of a multi-byte character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                    special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece style without byte fallback: Metaspace pre-tokenizer and decoder (the decoder drops
    the first token's "▁")."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    _train(tok, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_byte_fallback() -> PreTrainedTokenizerFast:
    """Llama-2 style: BPE with "<0xNN>" byte fallback (Replace ▁, ByteFallback, Fuse, Strip decoder), as
    the builtin tiny-llama ships it: its byte tokens are ordinary vocabulary, as Llama 2 has them."""
    from optcli.checkpoints.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama").path)


def test_builtin_tokenizer_keeps_characters_spelled_in_bytes():
    """The trainer can only reserve the byte tokens as special tokens; shipped as such, decoding with
    skip_special_tokens (transformers' and the engine's) dropped every character spelled in bytes."""
    tok = llama_byte_fallback()
    text = "Once upon a time 🙂 ∑ 漢字"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def tokenizers_by_kind(stories_dir) -> dict:
    return {
        "byte_fallback": llama_byte_fallback(),
        # llama2.c's SentencePiece tok512 as `optcli convert llama2c` writes it (byte fallback too)
        "sentencepiece": AutoTokenizer.from_pretrained(stories_dir),
        "metaspace": metaspace_bpe(),
        "byte_level": byte_level_bpe(),
    }


@pytest.fixture(scope="module")
def tokenizer(tokenizers_by_kind):
    return tokenizers_by_kind["byte_fallback"]


def reference(tok, prompt: list[int], output: list[int]) -> str:
    """transformers' decode(prompt + output) minus decode(prompt), from their common prefix (which is all of
    decode(prompt) unless the output completes or invalidates a character the prompt left partial)."""
    p = tok.decode(prompt, skip_special_tokens=True)
    f = tok.decode(prompt + output, skip_special_tokens=True)
    k = 0
    while k < min(len(p), len(f)) and p[k] == f[k]:
        k += 1
    return f[k:]


def _pools(tok) -> list[list[int]]:
    """Ids worth drawing often: special tokens, byte tokens, tokens that start inside a character, and
    the tokens of real multilingual text."""
    traits = tokenizer_traits(tok)
    text_ids = tok(MULTILINGUAL, add_special_tokens=False).input_ids
    pools = [sorted(traits.special), sorted(traits.byte_fallback), sorted(traits.continuation), text_ids]
    return [p for p in pools if p]


def _check(tok, prompt: list[int], output: list[int]) -> None:
    detok = IncrementalDetokenizer(tok, prompt, skip=len(prompt))  # fed the whole sequence, as the engine does
    committed = []
    for k in range(1, len(output) + 1):
        emitted = detok.update(prompt + output[:k])
        committed.append(detok.text)
        assert detok.text.endswith(emitted)
        assert detok.full_text == reference(tok, prompt, output[:k]), (prompt, output[:k])
    final = reference(tok, prompt, output)
    assert all(final.startswith(c) for c in committed), (prompt, output)  # committed text never changes
    assert completion_text(tok, prompt, output) == final
    assert "".join(token_texts(tok, prompt, output)) == final
    whole, prompt_text = tok.decode(prompt + output, skip_special_tokens=True), tok.decode(prompt, skip_special_tokens=True)
    if whole.startswith(prompt_text):
        assert prompt_text + final == whole


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", KINDS)
@_settings
@given(data=st.data())
def test_random_ids_match_transformers(tokenizers_by_kind, kind: str, data) -> None:
    tok = tokenizers_by_kind[kind]
    token = st.one_of(st.integers(0, len(tok) - 1), *(st.sampled_from(p) for p in _pools(tok)))
    prompt = data.draw(st.lists(token, max_size=12), label="prompt")
    output = data.draw(st.lists(token, min_size=1, max_size=16), label="output")
    _check(tok, prompt, output)


@pytest.mark.parametrize("kind", KINDS)
@_settings
@given(data=st.data())
def test_real_text_split_anywhere_matches_transformers(tokenizers_by_kind, kind: str, data) -> None:
    """Real text cut at any token, also between the byte tokens of one character."""
    tok = tokenizers_by_kind[kind]
    ids = tok(MULTILINGUAL * 2).input_ids  # with BOS where the tokenizer adds one
    end = data.draw(st.integers(1, len(ids)), label="end")
    split = data.draw(st.integers(0, end - 1), label="split")
    _check(tok, ids[:split], ids[split:end])


def test_first_token_keeps_its_leading_space(tokenizers_by_kind) -> None:
    tok = tokenizers_by_kind["sentencepiece"]
    prompt = tok("Once upon").input_ids
    assert prompt == [1, 403, 407]
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.add([t]) for t in (261, 378, 432)] == [" a", " time", ","]
    assert completion_text(tok, prompt, [261, 378, 432]) == " a time,"
    assert tok.decode(prompt + [261, 378, 432], skip_special_tokens=True) == "Once upon a time,"


def test_character_split_between_prompt_and_output(tokenizers_by_kind) -> None:
    tok = tokenizers_by_kind["byte_fallback"]
    b = [tok.convert_tokens_to_ids(f"<0x{x:02X}>") for x in "東".encode()]
    x, y = tok("x", add_special_tokens=False).input_ids, tok("y", add_special_tokens=False).input_ids
    # the prompt ends inside a character: the completion carries the whole character
    detok = IncrementalDetokenizer(tok, x + b[:2])
    assert detok.add([b[2]]) == ""  # the byte run may still go on
    assert detok.add(y) == "東 y" == reference(tok, x + b[:2], [b[2], *y])
    # a stray byte after a complete character turns the whole run into U+FFFD, as transformers decodes it
    assert completion_text(tok, x + b, [b[1], *y]) == "\ufffd" * 4 + " y" == reference(tok, x + b, [b[1], *y])


def test_byte_level_window_never_starts_inside_a_character(tokenizers_by_kind) -> None:
    """The prompt's last five tokens are the second byte of an emoji and special tokens: the first window
    must start before the emoji's first byte, or its bytes would decode as U+FFFD."""
    tok = tokenizers_by_kind["byte_level"]
    byte = {b: tok.convert_tokens_to_ids(c) for b, c in _bytes_to_unicode().items()}  # one token per byte
    emoji = [byte[b] for b in "😀".encode()]
    prompt = tok("x", add_special_tokens=False).input_ids + emoji[:2] + [tok.eos_token_id] * 4
    assert completion_text(tok, prompt, emoji[2:]) == "😀" == reference(tok, prompt, emoji[2:])


class _Counting:
    """A tokenizer that counts the ids it decodes."""

    def __init__(self, tok) -> None:
        self.tok, self.tokens = tok, 0

    def decode(self, ids, **kw):
        self.tokens += len(ids)
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _ids(tokenizer, n: int) -> list[int]:
    text = "Once upon a time, naïve café — 東京 😀 «quote» ünïcödé. " * 200
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rng = random.Random(0)
    out = list(ids)
    while len(out) < n:
        out += ids[rng.randrange(len(ids)) :][:50]
    return out[:n]


def test_incremental_text_equals_full_decode_and_is_linear(tokenizer) -> None:
    prompt = _ids(tokenizer, 2000)
    ids = _ids(tokenizer, 4000)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    counting = _Counting(tokenizer)
    detok = IncrementalDetokenizer(counting, prompt)
    emitted = detok.add(ids[:1])
    assert counting.tokens < 40  # the prompt's last tokens, not the prompt
    for k in range(2, len(ids) + 1):
        emitted += detok.update(ids[:k])
    assert emitted == detok.text and detok.full_text == reference(tokenizer, prompt, ids)
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
