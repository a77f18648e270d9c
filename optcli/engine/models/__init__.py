"""Model forwards for the engine. One family today: Llama and its close relatives."""

from optcli.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaForCausalLM", "ModelConfig"]
