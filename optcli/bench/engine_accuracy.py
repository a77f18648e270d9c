"""What an 8-bit KV cache costs in accuracy against a bf16 one, through the same engine and model on the same
tokens (so only the cache differs; `targets/builtin.py` does the same for an int8 LM head).

A KV cache's rounding shows only where K/V are read back from it, so its cost is scored twice: on decode steps
(one token a step, every earlier position read from the cache) and on chunked prefill (chunks that attend to
earlier chunks through the cache). The engine's attention reads a step's own K/V back from the cache too, so
no position is scored against fresh, unrounded K/V.
"""

from __future__ import annotations

from pathlib import Path

from optcli.bench.accuracy import EngineLM, evaluate
from optcli.config import EngineConfig
from optcli.engine import Engine
from optcli.engine.loading.kv_scales import read_calibrated_kv

KV_REFERENCE = "bfloat16"
PREFILL_CHUNK = 32  # tokens a step in the chunked-prefill score: several chunks per window
DECODE_TOKENS = 256  # positions scored one decode step at a time (a forward each, so kept short)
PREFILL_TOKENS = 1024


def kv_cache_is_quantized(model_path: Path, config: EngineConfig) -> bool:
    """8-bit by request, or by the artifact's calibrated kv_cache_scheme under `auto`."""
    if config.kv_cache_dtype in ("fp8", "fp8_e4m3", "int8"):
        return True
    return config.kv_cache_dtype == "auto" and read_calibrated_kv(model_path) is not None


def measure_kv_accuracy(model_path: Path, eval_text: str, config: EngineConfig, decode_tokens: int = DECODE_TOKENS,
                        prefill_tokens: int = PREFILL_TOKENS, chunk: int = PREFILL_CHUNK) -> dict:
    """KLD / top-1 of the engine with `config`'s 8-bit KV cache against the same engine with a bf16 cache.
    The chunked-prefill score runs first, so dynamic scales are set by a full chunk (as by a real prompt)."""
    quantized = Engine(str(model_path), config)
    reference = Engine(str(model_path), config.with_options(kv_cache_dtype=KV_REFERENCE))
    ids = quantized.tokenizer(eval_text, verbose=False).input_ids
    ctx = min(256, quantized.max_model_len)
    prefill = evaluate(EngineLM(quantized, chunk), ids[:prefill_tokens], EngineLM(reference, chunk), ctx=ctx)
    decode = evaluate(EngineLM(quantized, 1), ids[: min(decode_tokens, ctx)], EngineLM(reference, 1), ctx=ctx)
    cache = quantized.kv.describe(quantized.block_size)
    ref_cache = reference.kv.describe(reference.block_size)
    return {
        "dtype": cache["dtype"], "scale_source": cache["scale_source"], "reference_dtype": KV_REFERENCE,
        "bytes_per_token": cache["bytes_per_token"], "reference_bytes_per_token": ref_cache["bytes_per_token"],
        "decode": decode.as_dict(), "chunked_prefill": {**prefill.as_dict(), "chunk": chunk},
    }
