"""Memory planner and roofline: hand-computed figures, and the KV figure against what the engine allocates."""

from __future__ import annotations

import pytest

from optcli.errors import UsageError
from optcli.roi import planner
from optcli.roi.hardware import GpuSpec

LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
TINY = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
GPU = GpuSpec("TEST", memory_gb=1, bandwidth_gbs=100, bf16_tflops=10, fp8_tflops=None, int8_tops=20,
              compute_capability="8.0", hourly_usd=1.0)


def test_kv_bytes_per_token_is_layers_heads_dim_two_dtype() -> None:
    shape = planner.model_shape(LLAMA3_8B)
    assert planner.kv_bytes_per_token(shape) == 32 * 8 * 128 * 2 * 2 == 131_072  # 128 KiB/token in bf16
    assert planner.kv_bytes_per_token(shape, dtype_bytes=1) == 65_536
    assert planner.paged_tokens(100) == 112 and planner.paged_tokens(16) == 16


def test_weight_bytes_by_recipe() -> None:
    shape = planner.model_shape(LLAMA3_8B)
    # bf16: 8,030,261,248 parameters (Llama 3 8B's published count) x 2 bytes
    assert planner.weight_bytes(shape, planner.scheme_for("bf16")[1])["total"] == 2 * 8_030_261_248
    w4 = planner.scheme_for("w4a16-gptq")[1]
    # 4096 x 4096 at 4 bits + one bf16 scale per 128 inputs per row: 8 MiB + 4096 x 32 x 2 B
    assert planner.linear_bytes(4096, 4096, w4) == 4096 * 4096 / 2 + 4096 * 32 * 2
    assert planner.linear_bytes(172, 64, w4) == 172 * 64 * 2  # ragged last group: stays bf16 (indivisible: skip)
    fp8 = planner.scheme_for("fp8-dynamic")[1]
    assert planner.linear_bytes(4096, 1024, fp8) == 4096 * 1024 + 1024 * 2  # 1 B each + bf16 scale per channel
    sparse = planner.scheme_for("2of4-w4a16")[1]
    assert planner.linear_bytes(256, 8, sparse) == 256 * 8 * 0.5 * 6 / 8 + 8 * 2 * 2  # half kept, 4+2 bits each
    sizes = {r: planner.weight_bytes(shape, planner.scheme_for(r)[1])["total"]
             for r in ("bf16", "w8a8-int8", "w4a16-rtn", "nf4-bnb", "2of4-w4a16")}
    assert sizes["bf16"] > sizes["w8a8-int8"] > sizes["nf4-bnb"] > sizes["w4a16-rtn"] > sizes["2of4-w4a16"]
    # embeddings and lm_head stay 16-bit: 2 x 128256 x 4096 x 2 bytes of the 4-bit model
    assert planner.weight_bytes(shape, planner.scheme_for("w4a16-rtn")[1])["lm_head"] == 128256 * 4096 * 2


def test_fits_and_max_concurrent_sequences_by_hand() -> None:
    shape = planner.model_shape(TINY)
    bf16 = planner.scheme_for("bf16")[1]
    weights = planner.weight_bytes(shape, bf16)["total"]
    # params: embed 256,000 + 2 x (4 x 256 x 256 [q,o full; k,v half each → 3 x 65,536] + 3 x 256 x 512) + norms
    assert weights == 2 * (256_000 + 2 * (256 * 256 * 3 + 3 * 256 * 512 + 2 * 256) + 256)
    per_token = 2 * 2 * 64 * 2 * 2  # layers x kv heads x head dim x (K, V) x bf16
    overhead = planner.overhead_bytes(shape)
    memory = weights + overhead + 10 * 112 * per_token + 100  # room for 10 sequences of 100 (112 paged) tokens
    plan = planner.plan_memory(shape, bf16, memory, context_len=100, num_seqs=10, utilization=1.0)
    assert plan["kv_bytes_per_token"] == per_token and plan["kv_bytes_per_sequence"] == 112 * per_token
    assert plan["max_concurrent_seqs"] == 10 and plan["fits"] is True
    assert planner.plan_memory(shape, bf16, memory, 100, num_seqs=11, utilization=1.0)["fits"] is False
    assert planner.plan_memory(shape, bf16, 1000, 100)["max_concurrent_seqs"] == 0


def test_roofline_by_hand() -> None:
    """Decode at batch 2 is memory-bound on a 100 GB/s, 10 TFLOP/s card; FLOPs and bytes by hand."""
    shape = planner.model_shape(TINY)
    bf16 = planner.scheme_for("bf16")[1]
    params = 2 * (256 * 256 * 3 + 3 * 256 * 512) + 1000 * 256  # decoder Linears + (tied) lm_head
    assert planner.matmul_params(shape) == params
    est = planner.roofline(shape, bf16, GPU, batch_size=2, prompt_len=10, output_len=4)
    prefill = 2 * 10 * 2 * params / 10e12
    read = planner.weight_bytes(shape, bf16)["read_per_token"] + 2 * planner.kv_bytes_per_token(shape) * 12
    step = max(read / 100e9, 2 * (2 * params + 4 * 2 * 4 * 64 * 12) / 10e12)
    total = prefill + 4 * step
    assert est["e2e_ms"] == pytest.approx(total * 1000)
    assert est["total_tok_s"] == pytest.approx(2 * 14 / total) and est["output_tok_s"] == pytest.approx(8 / total)
    assert est["decode_bound"] == "memory" and est["estimate"] is True
    fp8 = planner.roofline(shape, planner.scheme_for("fp8-dynamic")[1], GPU, 2, 10, 4)
    assert fp8["compute"] == "bf16"  # no FP8 on this card: emulated at bf16 speed
    assert planner.roofline(shape, planner.scheme_for("w8a8-int8")[1], GPU, 2, 10, 4)["compute"] == "int8"


def test_bad_configs_and_recipes(tmp_path) -> None:
    with pytest.raises(UsageError, match="hidden_size"):
        planner.model_shape({"num_hidden_layers": 2})
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(UsageError, match="config.json"):
        planner.model_shape(tmp_path)
    with pytest.raises(UsageError, match="unknown recipe"):
        planner.scheme_for("w3a16")


def test_planner_kv_matches_the_engine_allocation_within_5_percent() -> None:
    """The planner's KV bytes per token x paged tokens against the engine's real KV tensor on CPU."""
    from optcli.engine import Engine

    shape = planner.model_shape("builtin:tiny-llama")
    budget = 3 * 2**20
    engine = Engine("builtin:tiny-llama", device="cpu", dtype="float32", max_model_len=256, max_num_seqs=64,
                    kv_cache_bytes=budget)
    allocated = engine.kv_cache.numel() * engine.kv_cache.element_size()
    stats = engine.stats()
    tokens = stats["kv_blocks_total"] * stats["kv_block_size"]
    predicted = planner.kv_bytes_per_token(shape, dtype_bytes=4) * tokens
    print(f"planner {predicted} B vs engine {allocated} B for {tokens} tokens")
    assert allocated == stats["kv_cache_bytes"]
    assert abs(predicted - allocated) / allocated <= 0.05
    # and the number of 200-token sequences the planner says fit in that budget is what the engine's blocks hold
    per_seq = planner.kv_bytes_per_token(shape, 4) * planner.paged_tokens(200, engine.block_size)
    assert budget // per_seq == stats["kv_blocks_total"] // -(-200 // engine.block_size)


def test_moe_counts_every_expert_for_memory_and_the_active_ones_for_flops() -> None:
    """Mixtral-8x7B's published sizes: 46.7B parameters in all, 12.9B active per token (2 of 8 experts)."""
    from optcli.roi.planner import SCHEMES, experts_read_per_step, matmul_params, model_shape, weight_bytes

    mixtral = model_shape({"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
                           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert mixtral.moe_layers == 32 and mixtral.experts == 8
    assert matmul_params(mixtral) == pytest.approx(12.9e9, rel=0.02)
    bf16 = weight_bytes(mixtral, SCHEMES["BF16"])
    assert bf16["total"] / 2 == pytest.approx(46.7e9, rel=0.02)
    # one token streams 2 experts a layer; a large batch streams all 8
    assert experts_read_per_step(mixtral, 1) == pytest.approx(2)
    assert weight_bytes(mixtral, SCHEMES["BF16"], 1)["read_per_token"] < 0.4 * bf16["read_per_token"]
    assert weight_bytes(mixtral, SCHEMES["BF16"], 256)["read_per_token"] == pytest.approx(bf16["read_per_token"], rel=1e-3)
    # Qwen3-MoE's dense layers (mlp_only_layers) keep their own MLP width
    qwen = model_shape({"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                        "num_attention_heads": 4, "vocab_size": 1000, "num_experts": 8, "num_experts_per_tok": 2,
                        "mlp_only_layers": [1]})
    assert qwen.moe_layers == 3 and qwen.expert_intermediate == 64
    # a shared expert every token runs (Qwen1.5-MoE-A2.7B: 14.3B in all, 2.7B active counting the embedding)
    shared = model_shape({"architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 24, "hidden_size": 2048,
                          "intermediate_size": 5632, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4})
    assert shared.shared_intermediate == 5632 and shared.moe_layers == 24
    assert weight_bytes(shared, SCHEMES["BF16"])["total"] / 2 == pytest.approx(14.3e9, rel=0.02)
    assert matmul_params(shared) + shared.vocab * shared.hidden == pytest.approx(2.7e9, rel=0.02)
