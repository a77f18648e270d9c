"""Model forwards for the engine: the Llama family and its close relatives (llama.py), with a
mixture-of-experts feed-forward for Mixtral, Qwen3-MoE and OLMoE (moe.py)."""

from optcli.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelConfig
from optcli.engine.models.moe import moe_summary

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaForCausalLM", "ModelConfig", "moe_summary"]
