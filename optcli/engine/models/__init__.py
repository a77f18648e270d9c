"""Model forwards for the engine: one decoder forward for every supported family (llama.py; what each
family differs in is read from its config, config.py), with a mixture-of-experts feed-forward for
Mixtral, Qwen2/3-MoE and OLMoE (moe.py)."""

from optcli.engine.models.config import TEXT_DECODERS
from optcli.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelConfig
from optcli.engine.models.moe import moe_summary

__all__ = ["SUPPORTED_ARCHITECTURES", "TEXT_DECODERS", "LlamaForCausalLM", "ModelConfig", "moe_summary"]
