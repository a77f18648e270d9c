"""Memory planner and roofline estimate from a model's config alone (no weights are loaded).

Weight bytes count every Linear of a Llama-family decoder at the recipe's storage cost (values,
scales, sparsity metadata); embeddings, norms and the ignored lm_head stay 16-bit. KV bytes per
token = layers x kv heads x head dim x 2 (K and V) x dtype bytes, allocated in pages of
`block_size` tokens the way optcli's engine (and vLLM) does. The roofline is an upper bound: ideal
bandwidth and dense peak FLOP/s, no kernel inefficiency; it is labelled an estimate wherever shown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig, cuda_auto_dtype, kv_cache_element_bytes
from optcli.errors import UsageError
from optcli.quantize.recipes import load_recipe
from optcli.roi.hardware import GpuSpec

BLOCK_SIZE = EngineConfig().block_size  # the engine's KV page, in tokens
RUNTIME_OVERHEAD_BYTES = 512 * 2**20  # CUDA context, cuBLAS workspace, allocator slack (rough)
MAX_BATCHED_TOKENS = 2048  # the engine's default prefill budget (max(2048, max_num_seqs)): the activation peak it profiles


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str | None = None  # the checkpoint's (config.json `dtype`/`torch_dtype`), None when unstated
    experts: int = 0  # mixture-of-experts: experts per MoE layer (0: a dense model)
    active_experts: int = 0  # experts each token runs through (top-k)
    expert_intermediate: int = 0
    moe_layers: int = 0  # layers with experts; the others have a dense MLP of `intermediate`
    shared_intermediate: int = 0  # a shared expert every token runs in each MoE layer (Qwen2-MoE), 0: none
    max_positions: int | None = None  # the model's context (config `max_position_embeddings`), None when unstated


@dataclass(frozen=True)
class Scheme:
    """How a recipe stores one quantized Linear weight, and which tensor cores its matmuls use."""

    bits: float
    group: int | None  # inputs per scale; None = one scale per output channel
    scale_bits: float
    compute: str  # "bf16" | "fp8" | "int8": the peak the roofline divides FLOPs by
    density: float = 1.0  # fraction of weights stored (2:4 sparsity keeps half)
    meta_bits: float = 0.0  # per stored weight (2:4 position indices)
    quantized: bool = True


# Keyed by the recipe's `scheme` label (recipes/*.yaml). Scales are bf16 unless noted.
SCHEMES = {
    "BF16": Scheme(16, None, 0, "bf16", quantized=False),
    "W4A16": Scheme(4, 128, 16, "bf16"),  # symmetric int4, bf16 scale per 128 inputs
    "2:4+W4A16": Scheme(4, 128, 16, "bf16", density=0.5, meta_bits=2),  # 2 of 4 kept, 2-bit index each
    "W8A8": Scheme(8, None, 16, "int8"),  # int8 per output channel
    "FP8_DYNAMIC": Scheme(8, None, 16, "fp8"),  # e4m3 per output channel
    "NF4": Scheme(4, 64, 8 + 32 / 256, "bf16"),  # double quant: 8-bit absmax per 64, fp32 per 256 absmax
    "INT8": Scheme(8, None, 32, "bf16"),  # LLM.int8(): fp32 row scale; outlier matmul in bf16
}


def model_shape(model: str | Path | dict) -> ModelShape:
    """From a config dict, a config.json path, or a MODEL spec (HF dir, artifact, builtin:tiny-llama)."""
    if isinstance(model, dict):
        config, where = model, "config"
    else:
        path = Path(model)
        if path.is_file():
            file = path
        elif (path / "config.json").is_file():
            file = path / "config.json"
        else:
            file = resolve_model(str(model)).path / "config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{file}: not a readable config.json ({exc})") from None
        where = str(file)
    config = config.get("text_config") or config
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
               if not isinstance(config.get(k), int)]
    if missing:
        raise UsageError(f"{where}: model config lacks '{missing[0]}' (need a Llama-family config)")
    heads = config["num_attention_heads"]
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    moe_layers = 0
    if experts:
        step = config.get("decoder_sparse_step") or 1
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(config["num_hidden_layers"]) if i not in dense_only and (i + 1) % step == 0)
    return ModelShape(
        experts=experts, active_experts=config.get("num_experts_per_tok") or 0, moe_layers=moe_layers,
        shared_intermediate=(config.get("shared_expert_intermediate_size") or 0) if experts else 0,
        expert_intermediate=config.get("moe_intermediate_size") or config["intermediate_size"],
        layers=config["num_hidden_layers"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
        heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)) or "Qwen2" in str(config.get("architectures")),
        dtype=config.get("dtype") or config.get("torch_dtype"),
        max_positions=config["max_position_embeddings"] if isinstance(config.get("max_position_embeddings"), int)
        and config["max_position_embeddings"] > 0 else None,
    )


def scheme_for(recipe: str) -> tuple[str, Scheme]:
    """(recipe name, storage scheme) for a built-in recipe name or a recipe YAML path."""
    loaded = load_recipe(recipe)
    scheme = SCHEMES.get(loaded.scheme)
    if scheme is None:
        raise UsageError(f"recipe '{loaded.name}': scheme '{loaded.scheme}' is unknown to the planner "
                         f"(known: {', '.join(SCHEMES)})")
    if scheme.group and loaded.indivisible == "channel":  # ragged layers go per channel instead of bf16
        scheme = Scheme(**{**scheme.__dict__, "group": -scheme.group})
    return loaded.name, scheme


def linear_bytes(n_in: int, n_out: int, scheme: Scheme) -> float:
    """Storage of one Linear. A group-quantized layer whose width leaves a ragged last group stays
    bf16 (the recipes' `indivisible: skip`), or goes per channel (a negative group: `channel`)."""
    if not scheme.quantized:
        return n_in * n_out * 2
    group = abs(scheme.group) if scheme.group else None
    if group and n_in > group and n_in % group:
        if scheme.group > 0:
            return n_in * n_out * 2
        group = None
    scales = n_out * (math.ceil(n_in / group) if group else 1)
    return n_in * n_out * scheme.density * (scheme.bits + scheme.meta_bits) / 8 + scales * scheme.scale_bits / 8


def _attention(s: ModelShape) -> list[tuple[int, int]]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [(s.hidden, q), (s.hidden, kv), (s.hidden, kv), (q, s.hidden)]


def _mlp(s: ModelShape, width: int) -> list[tuple[int, int]]:
    return [(s.hidden, width), (s.hidden, width), (width, s.hidden)]


def matmul_params(s: ModelShape) -> int:
    """Parameters every token multiplies through: decoder Linears and lm_head (not the embedding lookup).
    A MoE layer counts its router and the `active_experts` a token runs, not all of its experts, plus its
    shared expert and that expert's one-output gate where the family has them."""
    dense = s.layers - s.moe_layers
    expert = sum(i * o for i, o in _mlp(s, s.expert_intermediate))
    shared = sum(i * o for i, o in _mlp(s, s.shared_intermediate)) + s.hidden if s.shared_intermediate else 0
    return (s.layers * sum(i * o for i, o in _attention(s)) + dense * sum(i * o for i, o in _mlp(s, s.intermediate))
            + s.moe_layers * (s.active_experts * expert + s.experts * s.hidden + shared) + s.vocab * s.hidden)


def experts_read_per_step(s: ModelShape, batch_size: int) -> float:
    """Experts a decode step streams per MoE layer: each token picks `active_experts` of `experts`, so a
    batch touches E x (1 - (1 - k/E)^B) distinct ones on average (uniform routing), all of them when large."""
    if not s.experts:
        return 0.0
    return s.experts * (1 - (1 - s.active_experts / s.experts) ** batch_size)


def weight_bytes(s: ModelShape, scheme: Scheme, batch_size: int | None = None) -> dict:
    """Bytes by part (every expert counted); `read_per_token` is what one decode step streams from memory
    (for a MoE model with `batch_size`, only the experts that batch is expected to touch)."""
    attention = s.layers * sum(linear_bytes(i, o, scheme) for i, o in _attention(s))
    mlp = (s.layers - s.moe_layers) * sum(linear_bytes(i, o, scheme) for i, o in _mlp(s, s.intermediate))
    if s.shared_intermediate:  # read every step, like a dense MLP
        mlp += s.moe_layers * sum(linear_bytes(i, o, scheme) for i, o in _mlp(s, s.shared_intermediate))
    expert = sum(linear_bytes(i, o, scheme) for i, o in _mlp(s, s.expert_intermediate))
    experts = s.moe_layers * s.experts * expert
    read_experts = experts if batch_size is None else s.moe_layers * experts_read_per_step(s, batch_size) * expert
    # never quantized (the recipes say why); a shared expert's gate is one more output row
    router = s.moe_layers * (s.experts + (1 if s.shared_intermediate else 0)) * s.hidden * 2
    linear = attention + mlp + experts
    other = (s.layers * (2 * s.hidden + ((s.heads + 2 * s.kv_heads) * s.head_dim if s.attention_bias else 0))
             + s.hidden) * 2 + router
    embed = s.vocab * s.hidden * 2
    lm_head = 0 if s.tie_word_embeddings else embed  # lm_head is ignored by every recipe: 16-bit
    total = int(linear + other + embed + lm_head)
    return {"total": total, "linear": int(linear), "experts": int(experts), "embeddings": embed, "lm_head": lm_head,
            "read_per_token": int(attention + mlp + read_experts + other + embed)}


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int = 2) -> int:
    return s.layers * s.kv_heads * s.head_dim * 2 * dtype_bytes


def serving_dtype(s: ModelShape, config: EngineConfig) -> str:
    """The dtype `optcli serve` with `config` would run this model in on a GPU (its KV cache's too):
    what is planned for is what gets allocated."""
    return cuda_auto_dtype(s.dtype) if config.dtype == "auto" else config.dtype


def plan_for_engine(s: ModelShape, scheme: Scheme, memory_bytes: int, context_len: int, num_seqs: int,
                    config: EngineConfig) -> dict:
    """`plan_memory` with the KV dtype, page size and GPU share that `config` gives the engine."""
    dtype = serving_dtype(s, config)
    plan = plan_memory(s, scheme, memory_bytes, context_len, num_seqs, utilization=config.gpu_memory_utilization,
                       kv_dtype_bytes=kv_element_bytes(s, config), block_size=config.block_size)
    return {**plan, "dtype": dtype, "kv_cache_dtype": config.kv_cache_dtype}


def kv_element_bytes(s: ModelShape, config: EngineConfig) -> int:
    """Bytes of one cached K or V element as `serve` with `config` would store it (auto: the serving dtype)."""
    return kv_cache_element_bytes(config.kv_cache_dtype, serving_dtype(s, config))


def paged_tokens(context_len: int, block_size: int = BLOCK_SIZE) -> int:
    """Tokens a sequence of `context_len` occupies in a paged cache: whole blocks."""
    return -(-context_len // block_size) * block_size


def overhead_bytes(s: ModelShape, max_num_seqs: int = 64) -> int:
    """Activation peak of a forward at the engine's prefill budget plus a fixed runtime share (rough):
    residual, normed input, qkv, gate/up and the activated MLP in bf16, and fp32 logits per sequence."""
    per_token = 2 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate
    return MAX_BATCHED_TOKENS * per_token * 2 + max_num_seqs * s.vocab * 4 + RUNTIME_OVERHEAD_BYTES


def plan_memory(s: ModelShape, scheme: Scheme, memory_bytes: int, context_len: int, num_seqs: int = 1,
                utilization: float = 0.9, kv_dtype_bytes: int = 2, block_size: int = BLOCK_SIZE) -> dict:
    """Does the model fit, with `num_seqs` sequences of `context_len` tokens, and how many fit at most."""
    if context_len < 1 or num_seqs < 1 or not 0 < utilization <= 1:
        raise UsageError("context length and sequences must be >= 1, utilization in (0, 1]")
    weights = weight_bytes(s, scheme)["total"]
    overhead = overhead_bytes(s)
    per_token = kv_bytes_per_token(s, kv_dtype_bytes)
    per_seq = per_token * paged_tokens(context_len, block_size)
    usable = int(memory_bytes * utilization)
    free_for_kv = usable - weights - overhead
    return {
        "weights_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_sequence": per_seq,
        "overhead_bytes": overhead,
        "usable_bytes": usable,
        "context_len": context_len,
        "num_seqs": num_seqs,
        "fits": free_for_kv >= num_seqs * per_seq,
        "max_concurrent_seqs": max(0, free_for_kv // per_seq),
    }


def roofline(s: ModelShape, scheme: Scheme, gpu: GpuSpec, batch_size: int, prompt_len: int, output_len: int,
             kv_dtype_bytes: int = 2) -> dict:
    """Upper-bound throughput of `batch_size` requests served together: prefill compute-bound at
    2 x params FLOPs per token; each decode step max(bytes / bandwidth, FLOPs / peak)."""
    if batch_size < 1 or prompt_len < 1 or output_len < 1:
        raise UsageError("batch size, prompt and output lengths must be >= 1 for an estimate")
    peak_tflops = {"bf16": gpu.bf16_tflops, "fp8": gpu.fp8_tflops, "int8": gpu.int8_tops}[scheme.compute]
    compute = scheme.compute if peak_tflops else "bf16"  # no native FP8/INT8: emulated at bf16 speed
    peak = (peak_tflops or gpu.bf16_tflops) * 1e12
    bandwidth = gpu.bandwidth_gbs * 1e9
    params = matmul_params(s)
    prefill_s = batch_size * prompt_len * 2 * params / peak
    context = prompt_len + output_len / 2  # mean context over the decode
    kv_read = batch_size * kv_bytes_per_token(s, kv_dtype_bytes) * context
    step_bytes = weight_bytes(s, scheme, batch_size)["read_per_token"] + kv_read
    step_flops = batch_size * (2 * params + 4 * s.layers * s.heads * s.head_dim * context)
    memory_s, compute_s = step_bytes / bandwidth, step_flops / peak
    total_s = prefill_s + output_len * max(memory_s, compute_s)
    return {
        "estimate": True,
        "total_tok_s": batch_size * (prompt_len + output_len) / total_s,
        "output_tok_s": batch_size * output_len / total_s,
        "requests_s": batch_size / total_s,
        "e2e_ms": total_s * 1000,
        "decode_bound": "memory" if memory_s >= compute_s else "compute",
        "compute": compute,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "output_len": output_len,
    }
