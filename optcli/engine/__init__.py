"""The built-in inference engine: continuous batching over a paged KV cache (nano-vLLM-sized rooms)."""

from optcli.engine.engine import Engine, RequestOutput
from optcli.engine.sampling_params import SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
