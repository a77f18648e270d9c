"""llama2.c conversion: the converted stories260K must behave like the real trained model."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from helpers import shared_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from optcli.bench.accuracy import evaluate
from optcli.checkpoints.llama2c import (
    build_llama2c_tokenizer,
    convert_llama2c,
    read_llama2c_checkpoint,
)
from optcli.errors import UsageError

EXPECTED_START = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("l2c") / "stories260K"
    return convert_llama2c(shared_data("stories260K.bin"), shared_data("tok512.bin"), out)


@pytest.fixture(scope="module")
def model(converted: Path):
    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def tokenizer(converted: Path):
    return AutoTokenizer.from_pretrained(converted)


def runc_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """Reference: llama2.c run.c `encode` (BOS, dummy " " prefix, byte fallback, greedy merges)."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[b" "]] if text else []
    for ch in text:  # run.c groups UTF-8 bytes into code points, as Python iteration does
        b = ch.encode("utf-8")
        tokens.extend([lookup[b]] if b in lookup else [x + 3 for x in b])

    def pair(i: int) -> tuple[float, int]:
        merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
        return (scores[merged], merged) if merged >= 0 else (float("-inf"), -1)

    pairs = [pair(i) for i in range(len(tokens) - 1)]
    while pairs:
        # leftmost pair with the highest score (run.c uses a strict ">" scan)
        best = max(range(len(pairs)), key=lambda i: pairs[i][0])
        if pairs[best][1] < 0:
            break
        tokens[best : best + 2] = [pairs[best][1]]
        del pairs[best]
        for i in (best - 1, best):
            if 0 <= i < len(pairs):
                pairs[i] = pair(i)
    return [1, *tokens]


def read_raw_tokenizer(path: Path) -> tuple[list[bytes], list[float]]:
    data, pos, pieces, scores = path.read_bytes(), 4, [], []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8 : pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def test_config_and_files(converted: Path, model) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".tmp-")]
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_greedy_generation_from_bos(model, tokenizer) -> None:
    out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith(EXPECTED_START), text


def test_loss_on_tinystories(model, tokenizer) -> None:
    """≈1.3 nats/token, as the model card says, scored the standard way (sliding windows, half context).

    The sample separates paragraphs with blank lines; TinyStories' training text uses single
    newlines, so blank lines are folded first (the model predicts a second newline poorly).
    """
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:20_000]
    ids = tokenizer(text.replace("\n\n", "\n"), verbose=False).input_ids
    nats = math.log(evaluate(model, ids, ctx=256).ppl)
    assert 1.2 < nats < 1.4, nats


def test_tokenizer_matches_runc(tokenizer) -> None:
    pieces, scores = read_raw_tokenizer(shared_data("tok512.bin"))
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()][:400]
    lines += ["", " ", "  two leading", "tab\there\nnewline", "naïve café – “quoted” 😀 日本語 ™",
              "Lily's mom said, \"Yes!\"", "\x00\x7f"]
    assert any(any(ord(c) > 127 for c in ln) for ln in lines[:400])
    for line in lines:
        expected = runc_encode(line, pieces, scores)
        assert tokenizer(line).input_ids == expected, line
        assert tokenizer.decode(expected, skip_special_tokens=True) == line
    # Deliberate difference, as in HF's own Llama tokenizers: "<s>" typed in text is BOS.
    assert tokenizer("a <s>").input_ids[-1] == 1


def test_build_tokenizer_api() -> None:
    tok = build_llama2c_tokenizer(shared_data("tok512.bin"), max_len=128)
    assert tok.model_max_length == 128 and len(tok) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_untied_classifier(tmp_path: Path) -> None:
    raw = shared_data("stories260K.bin").read_bytes()
    header = list(struct.unpack_from("<7i", raw))
    header[5] = -header[5]
    emb = raw[28 : 28 + 512 * 64 * 4]
    path = tmp_path / "untied.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:] + emb)
    config, sd = read_llama2c_checkpoint(path)
    assert not config.tie_word_embeddings and config.vocab_size == 512
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def test_bad_inputs_raise_usage_error(tmp_path: Path, converted: Path) -> None:
    ckpt, tok = shared_data("stories260K.bin"), shared_data("tok512.bin")
    raw = ckpt.read_bytes()
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(UsageError, match="trunc.bin"):
        convert_llama2c(truncated, tok, tmp_path / "out")
    negative = tmp_path / "neg.bin"
    negative.write_bytes(struct.pack("<7i", 64, -172, 5, 8, 4, 512, 512) + raw[28:])
    with pytest.raises(UsageError, match="hidden_dim"):
        read_llama2c_checkpoint(negative)
    with pytest.raises(UsageError, match="missing.bin"):
        convert_llama2c(tmp_path / "missing.bin", tok, tmp_path / "out")
    bad_tok = tmp_path / "tok.bin"
    bad_tok.write_bytes(tok.read_bytes()[:-3])
    with pytest.raises(UsageError, match="tok.bin"):
        convert_llama2c(ckpt, bad_tok, tmp_path / "out")
    with pytest.raises(UsageError, match="already exists"):
        convert_llama2c(ckpt, tok, converted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neg.bin", "tok.bin", "trunc.bin"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optcli.checkpoints.llama2c as mod

    def boom(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_llama2c(shared_data("stories260K.bin"), shared_data("tok512.bin"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
