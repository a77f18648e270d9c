"""engine_cpu.py's model and workload (also contention.py's): the seeded random fp32 Llama with the builtin tokenizer,
the requests, the workload's FLOPs and the measured fp32 matmul rate.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

MODEL_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,  # untied: 8 layers give ~56.4M parameters (tied would be ~40M)
)


# Prompt ids come from the builtin tokenizer's range so every prompt token is a real token there
# (its vocabulary has 1024 entries; ids 0-2 are <unk>, <s>, </s>).
PROMPT_ID_RANGE = (3, 1000)


def build_model_dir(out: Path, layers: int, seed: int) -> tuple[int, int]:
    """Seeded random Llama (fp32 safetensors) plus the builtin tokenizer; returns (params, eos id)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from optcli.checkpoints.resolve import resolve_model

    tok_dir = resolve_model("builtin:tiny-llama").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    eos = json.loads((tok_dir / "config.json").read_text()).get("eos_token_id", 2)
    bos = json.loads((tok_dir / "config.json").read_text()).get("bos_token_id", 1)
    config = LlamaConfig(num_hidden_layers=layers, bos_token_id=bos, eos_token_id=eos, **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out)
    del model
    return params, eos


def make_requests(n: int, prompt_range, output_range, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    prompts = [[rng.randrange(*PROMPT_ID_RANGE) for _ in range(rng.randrange(*prompt_range))] for _ in range(n)]
    outputs = [rng.randrange(*output_range) for _ in range(n)]
    return prompts, outputs


def workload_flops(prompts: list[list[int]], outputs: list[int], layers: int) -> dict[str, float]:
    """FLOPs a perfect engine must spend on this workload.

    Every token that goes through the model (the prompt plus every generated token but the last,
    which is never fed back) costs 2 FLOPs per decoder matmul weight; the LM head runs only where a
    token is sampled (once per generated token); attention costs 4 * ctx * (heads * head_dim) per
    token per layer (QK^T and PV), ctx being the causal context length at that position.
    """
    h, i = MODEL_SHAPE["hidden_size"], MODEL_SHAPE["intermediate_size"]
    heads, kv_heads = MODEL_SHAPE["num_attention_heads"], MODEL_SHAPE["num_key_value_heads"]
    head_dim = h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    layer_params = h * (q + 2 * kv) + q * h + 3 * h * i
    head_params = h * MODEL_SHAPE["vocab_size"]
    fed = sum(len(p) + n - 1 for p, n in zip(prompts, outputs, strict=True))
    generated = sum(outputs)
    attn_ctx = sum((len(p) + n - 1) * (len(p) + n) // 2 for p, n in zip(prompts, outputs, strict=True))
    out = {
        "decoder_matmuls": 2.0 * layers * layer_params * fed,
        "lm_head": 2.0 * head_params * generated,
        "attention": 4.0 * q * layers * attn_ctx,
    }
    out["total"] = sum(out.values())
    # The simpler count (LM head on every prompt and generated token too), for comparison.
    all_tokens = sum(len(p) + n for p, n in zip(prompts, outputs, strict=True))
    out["naive_total"] = 2.0 * (layers * layer_params + head_params) * all_tokens + out["attention"]
    return out


def measure_matmul_flops(n: int, reps: int) -> float:
    """Best-of-`reps` fp32 FLOP/s of an n x n x n matmul (three back-to-back per sample)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2.0 * n**3 / best
