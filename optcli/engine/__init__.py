"""The built-in inference engine: continuous batching over a paged KV cache (nano-vLLM-sized rooms).

The core here: `engine.py` (the Python API), `async_engine.py`, `scheduler.py`, `kv_cache.py`
(block manager, prefix caching), `sequence.py`, `runner.py`, `cuda_graphs.py`, `sampler.py`,
`sampling_params.py`, `structured.py` (JSON-schema token masks), `detokenizer.py` (incremental text
and stop strings). Below it, imports go one way: core → `loading/` (spec → model, state dicts, device and dtype) → `models/` (our forward) →
`quant/` (quantized layers) → `attention/` (step layout, CPU and Triton paths) → `kernels/` (Triton
and the CPU C kernels, each with a PyTorch reference). tests/test_layers.py enforces it.
"""

from optcli.engine.engine import Engine, RequestOutput
from optcli.engine.sampling_params import SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
