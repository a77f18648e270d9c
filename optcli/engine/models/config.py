"""What the forward needs from an HF config, normalized across the supported families.

Every family detail the forward branches on is read here, from the config itself (never from the model
name alone where the config says it): Gemma's embedding scale, (1 + w) norms, sandwich norms, soft-capping,
query pre-attention scale and per-layer-type RoPE; Phi-3's fused checkpoint; MoE routing (moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from optcli.engine.models.moe import MOE_ARCHITECTURES, MoESpec
from optcli.errors import UsageError

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                       "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Multimodal checkpoints whose text decoder the engine runs (text in, text out), by the text architecture
TEXT_DECODERS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES + tuple(TEXT_DECODERS)
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# transformers' names for the MLP activations the engine computes (layer_ops.act_mul)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: str | None  # "head": RMSNorm per head (Qwen3, Gemma 3); "full": over the whole projection (OLMoE)
    clip_qkv: float | None  # OLMoE clamps q, k, v to +-clip_qkv
    max_position_embeddings: int
    sliding_windows: list[int | None]  # per layer: None = full attention
    moe: MoESpec | None
    fused_checkpoint: bool  # Phi-3 stores qkv_proj and gate_up_proj fused already
    hf_config: object  # kept for RoPE initialisation (transformers' own functions)
    hidden_act: str = "silu"  # "silu" or "gelu_tanh" (Gemma)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size), in the activation dtype
    gemma_norms: bool = False  # (1 + w) RMSNorm applied in fp32, and norms after attention and around the MLP
    rope_kinds: list[str] | None = None  # per layer, its RoPE parameters' key (Gemma 3: local and global theta)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @classmethod
    def from_hf(cls, config) -> ModelConfig:
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        if arch in TEXT_DECODERS:  # the decoder's own config; the vision tower is not run
            config, arch = config.text_config, TEXT_DECODERS[arch]
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None)
        rope = getattr(config, "rope_parameters", None) or {}
        layer_types = getattr(config, "layer_types", None)
        per_kind = bool(layer_types) and all(t in rope for t in set(layer_types))  # Gemma 3: one per layer type
        partial = {(rope[t] if per_kind else rope).get("partial_rotary_factor", 1.0) for t in (layer_types or [None])}
        if partial != {1.0}:
            raise UsageError(f"{arch}: partial rotary embeddings (partial_rotary_factor {max(partial)}) are not "
                             "supported by the built-in engine; run it with `optcli serve --engine vllm`")
        if getattr(config, "use_bidirectional_attention", False):
            raise UsageError(f"{arch}: bidirectional attention (an embedding model) is not supported by the built-in "
                             "engine, which generates causally")
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise UsageError(f"{arch}: MLP activation {act!r} is not supported by the built-in engine "
                             f"(supported: {', '.join(ACTIVATIONS)}); run it with `optcli serve --engine vllm`")
        if layer_types:
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        else:  # Mistral, Mixtral, Qwen3-MoE: one window (or none) for every layer, as their attention reads it
            windows = [window] * config.num_hidden_layers
        gemma = arch in GEMMA_ARCHITECTURES
        pre_attn = getattr(config, "query_pre_attn_scalar", None)
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False))
            or bool(getattr(config, "qkv_bias", False)),  # Qwen2-MoE names it so
            qk_norm={"Qwen3ForCausalLM": "head", "Qwen3MoeForCausalLM": "head", "OlmoeForCausalLM": "full",
                     "Gemma3ForCausalLM": "head"}.get(arch),
            clip_qkv=getattr(config, "clip_qkv", None),
            max_position_embeddings=config.max_position_embeddings,
            sliding_windows=windows,
            moe=MoESpec.from_hf(config, arch),
            fused_checkpoint=arch == "Phi3ForCausalLM",
            hf_config=config,
            hidden_act=ACTIVATIONS[act],
            attn_scale=pre_attn ** -0.5 if pre_attn else None,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            embed_scale=config.hidden_size ** 0.5 if gemma else None,
            gemma_norms=gemma,
            rope_kinds=list(layer_types) if per_kind else None,
        )
