"""MODEL specs: builtin demo model, local directories, hub ids offline, and unsafe or broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optcli.checkpoints.resolve import load_model, resolve_model, tokenizer_fingerprint
from optcli.errors import UsageError


def test_builtin_tiny_llama_is_the_trained_model_it_says_it_is() -> None:
    """The shipped weights score the held-out perplexity training.json states, far below a random model's,
    and the shipped tokenizer is the one the training script's trainer makes from the corpus."""
    from optcli.builtin.train_tiny_llama import perplexity, train_builtin_tokenizer
    from optcli.calibration.corpus import heldout_text, split_documents

    path = resolve_model("builtin:tiny-llama").path
    record = json.loads((path / "training.json").read_text())
    model, tok = load_model(resolve_model("builtin:tiny-llama"))
    assert model.dtype == torch.float32 and json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    ppl, _ = perplexity(model, tok, split_documents(heldout_text()))
    assert ppl == pytest.approx(record["heldout_ppl"], rel=1e-3)
    assert ppl < 0.2 * record["random_init_heldout_ppl"]  # a language model, not noise
    assert tokenizer_fingerprint(train_builtin_tokenizer()) == tokenizer_fingerprint(tok)


def test_builtin_tiny_llama_loads_with_a_real_tokenizer() -> None:
    model, tok = load_model(resolve_model("builtin:tiny-llama"))
    text = "Once upon a time, Lily's café sold 3 croissants for €4.50."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode()) * 0.6  # merges learned, not bytes
    assert model.config.architectures == ["LlamaForCausalLM"] and model.config.num_key_value_heads == 4
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_unknown_builtin() -> None:
    with pytest.raises(UsageError, match="tiny-llama"):
        resolve_model("builtin:huge-llama")


def test_missing_directory() -> None:
    with pytest.raises(UsageError, match="not found"):
        resolve_model("./no/such/model")


def test_hub_id_offline_says_hub_and_local_directory(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-optcli-test")
    with pytest.raises(UsageError) as info:
        resolve_model("someone/some-model")
    msg = str(info.value)
    assert "hub" in msg and "local directory" in msg


def _copy_model(tmp_path: Path) -> Path:
    src = resolve_model("builtin:tiny-llama").path
    dst = tmp_path / "m"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors_is_named(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(UsageError, match="truncated safetensors"):
        resolve_model(str(d))


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match="corrupt safetensors"):
        resolve_model(str(d))


def test_pickled_checkpoints_are_refused(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="pickled"):
        resolve_model(str(d))


def test_remote_code_needs_consent(tmp_path: Path) -> None:
    d = _copy_model(tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["architectures"] = ["EvilForCausalLM"]
    config["model_type"] = "evil-llama"
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UsageError, match="trust-remote-code"):
        load_model(resolve_model(str(d)))


def test_tokenizer_fingerprint_tells_tokenizers_apart(stories_dir: Path) -> None:
    from transformers import AutoTokenizer

    _, tiny = load_model(resolve_model("builtin:tiny-llama"))
    stories = AutoTokenizer.from_pretrained(stories_dir)
    assert tokenizer_fingerprint(tiny) != tokenizer_fingerprint(stories)
    assert tokenizer_fingerprint(stories) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(stories_dir))
