"""Convert karpathy llama2.c checkpoints (format v0) and tokenizers to Hugging Face directories.

Tests and benchmarks need a real trained model without network access; llama2.c's tiny
TinyStories models are small enough to ship, so this module turns them into an ordinary
``AutoModelForCausalLM``/``AutoTokenizer`` directory (safetensors, never pickle).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from optcli.errors import UsageError
from optcli.util.fs import atomic_directory, check_out_dir

_HEADER = struct.Struct("<7i")
_SPECIALS = ("<unk>", "<s>", "</s>")  # llama2.c ids 0, 1, 2 (it spells 1/2 as "\n<s>\n"/"\n</s>\n")
_SPACE = "\u2581"  # sentencepiece's "▁"


def _read_bytes(path: Path, what: str) -> bytes:
    """Read a whole input file, turning OS errors into a one-line UsageError."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Parse a llama2.c v0 checkpoint into a LlamaConfig and an HF-named float32 state dict.

    The file size is checked exactly against the header so truncation or a wrong format is
    reported as a UsageError instead of producing a silently garbled model.
    """
    path = Path(path)
    data = _read_bytes(path, "llama2.c checkpoint")
    if len(data) < _HEADER.size:
        raise UsageError(f"{path}: truncated llama2.c checkpoint ({len(data)} bytes, header needs 28)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(data)
    tied = vocab > 0
    vocab = abs(vocab)
    dims = {"dim": dim, "hidden_dim": hidden, "n_layers": n_layers, "n_heads": n_heads,
            "n_kv_heads": n_kv, "vocab_size": vocab, "seq_len": seq_len}
    bad = [f"{k}={v}" for k, v in dims.items() if v <= 0]
    if bad:
        raise UsageError(f"{path}: not a llama2.c v0 checkpoint (non-positive {', '.join(bad)})")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise UsageError(f"{path}: inconsistent header (dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv})")
    hd = dim // n_heads
    kv_dim = n_kv * hd
    L = n_layers
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("tok_emb", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)), ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not tied:
        shapes.append(("wcls", (vocab, dim)))
    expected = _HEADER.size + 4 * sum(_numel(s) for _, s in shapes)
    if len(data) != expected:
        raise UsageError(f"{path}: size {len(data)} bytes does not match its header "
                         f"(expected {expected}; truncated or not llama2.c v0)")
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    arrays: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in shapes:
        n = _numel(shape)
        arrays[name] = flat[pos:pos + n].view(shape)
        pos += n

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, hidden_act="silu", architectures=["LlamaForCausalLM"],
    )
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": arrays["tok_emb"],
                                   "model.norm.weight": arrays["rms_final"]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute(arrays["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute(arrays["wk"][i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    if not tied:
        sd["lm_head.weight"] = arrays["wcls"]
    # Own, contiguous storage per tensor: safetensors refuses tensors that share memory.
    return config, {k: v.clone().contiguous() for k, v in sd.items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c stores RoPE pairs interleaved; HF rotates halves, so reorder q/k rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_llama2c_tokenizer(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """Read (piece, score) pairs; ids 0-2 are renamed to <unk>/<s>/</s>, spaces become "▁"."""
    path = Path(path)
    data = _read_bytes(path, "llama2.c tokenizer")
    if len(data) < 4:
        raise UsageError(f"{path}: truncated llama2.c tokenizer ({len(data)} bytes)")
    pos, pieces = 4, []
    while pos < len(data):
        if pos + 8 > len(data):
            raise UsageError(f"{path}: truncated llama2.c tokenizer (token {len(pieces)} cut off)")
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        if length <= 0 or pos + length > len(data):
            raise UsageError(f"{path}: token {len(pieces)} has bad length {length} (truncated or corrupt)")
        try:
            text = data[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}: token {len(pieces)} is not valid UTF-8") from None
        pos += length
        pieces.append((text.replace(" ", _SPACE), score))
    if len(pieces) < 259:
        raise UsageError(f"{path}: only {len(pieces)} tokens; expected <unk>, <s>, </s> and 256 byte tokens")
    for i, name in enumerate(_SPECIALS):
        pieces[i] = (name, pieces[i][1])
    vocab = {p for p, _ in pieces}
    if len(vocab) != len(pieces):
        raise UsageError(f"{path}: duplicate pieces in tokenizer")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise UsageError(f"{path}: byte-fallback tokens missing (e.g. {missing[0]})")
    return pieces


def build_llama2c_tokenizer(tok_path: str | os.PathLike[str], max_len: int) -> PreTrainedTokenizerFast:
    """Build a byte-fallback BPE fast tokenizer that encodes exactly like llama2.c's run.c.

    Merges come from scores as transformers' SentencePiece BPE conversion derives them, so
    lowest merge rank == highest merged-piece score, which is run.c's greedy rule.
    """
    pieces = read_llama2c_tokenizer(tok_path)
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    scored: list[tuple[float, int, int, int, str, str]] = []
    for pid, (piece, score) in enumerate(pieces):
        if pid < 3:
            continue  # specials are never the result of a merge
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                scored.append((-score, pid, vocab[left], vocab[right], left, right))
    scored.sort()  # highest score first; ties keep id order for determinism
    merges = [(left, right) for *_, left, right in scored]

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                            special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=max_len, padding_side="left", clean_up_tokenization_spaces=False,
    )


def convert_llama2c(checkpoint: str | os.PathLike[str], tokenizer: str | os.PathLike[str],
                    out_dir: str | os.PathLike[str]) -> Path:
    """Write an HF model directory atomically (optcli.util.fs: a temp sibling renamed into place)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, inputs={"checkpoint": checkpoint, "tokenizer": tokenizer})  # before reading anything
    config, state = read_llama2c_checkpoint(checkpoint)
    tok = build_llama2c_tokenizer(tokenizer, config.max_position_embeddings)
    if len(tok) != config.vocab_size:
        raise UsageError(f"{tokenizer}: has {len(tok)} tokens but {checkpoint} expects {config.vocab_size}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir.parent}: {exc.strerror or exc}") from None
    with atomic_directory(out_dir) as tmp:
        config.dtype = "float32"
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    return out_dir
