"""Shared configuration: `EngineConfig` (every engine option and its default, in one place) and the
cache location. It imports nothing but `optcli.errors`, on purpose: the CLI, serve, profile and the memory planner all build
or read an `EngineConfig`, so what `profile` measures is what `serve` runs and what `roi` plans for.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from optcli.errors import UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LM_HEADS = ("dense", "int8")
# vLLM's names for the KV cache's storage: `auto` keeps the model dtype (or follows an artifact's calibrated
# kv_cache_scheme), fp8 and fp8_e4m3 are the same E4M3 format, int8 is symmetric; both 8-bit kinds carry a scale
# per layer and KV head (engine/attention/kv_quant.py).
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "int8")
KV_CACHE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "fp8_e4m3": 1, "int8": 1}
# How long `profile --endpoint` waits for a server's next byte (its response, or the next streamed chunk) before
# a request fails: the openai SDK's default (600 s), so no request that a production client would have waited for
# is counted as failed, while a server that never answers becomes one clear error instead of a hang.
REQUEST_TIMEOUT_S = 600.0


def check_dtype(value: str, name: str = "dtype") -> None:
    """The one dtype check, for the engine option and for every CLI flag that carries it (`name`)."""
    if value not in DTYPES:
        raise UsageError(f"{name} must be one of {', '.join(DTYPES)} (got '{value}')")


def check_kv_cache_dtype(value: str, name: str = "kv_cache_dtype") -> None:
    if value not in KV_CACHE_DTYPES:
        raise UsageError(f"{name} must be one of {', '.join(KV_CACHE_DTYPES)} (got '{value}')")


def kv_cache_element_bytes(kv_cache_dtype: str, model_dtype: str) -> int:
    """Bytes one K or V element takes in the cache: `auto` stores the model dtype."""
    return KV_CACHE_BYTES[model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype]


def cache_dir() -> Path:
    """Where optcli keeps what it can rebuild (GEMM tuning choices, hub downloads are the hub's own)."""
    return Path(os.environ.get("OPTCLI_CACHE", Path.home() / ".cache" / "optcli"))


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the built-in engine. `device` and `dtype` may say "auto"; the engine resolves
    them at load (see `engine/loading/placement.py`) and keeps the resolved copy as `Engine.config`."""

    device: str = "auto"  # auto | cpu | cuda[:N]: auto takes the GPU when there is one
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32: the activation (and dense weight) dtype
    max_num_seqs: int = 64  # sequences in one batch at most
    max_model_len: int | None = 2048  # capped at the model's context; None: the model's context
    max_num_batched_tokens: int | None = None  # per step; None: max(2048, max_num_seqs)
    block_size: int = 16  # tokens per KV-cache page
    kv_cache_bytes: int | None = None  # None: sized from free memory (GPU: after a profiling forward)
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes (tests)
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may take, weights included
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | gather (CPU) | triton (GPU)
    enforce_eager: bool = False  # no CUDA graphs
    trust_remote_code: bool = False
    dequantize: bool = False  # load a quantized checkpoint as dense weights
    quantization: str | None = None  # w4a16 | w8a8 | w8a16 | fp8: round a dense checkpoint at load
    lm_head: str = "dense"  # dense | int8: round the LM head (and a tied embedding) to int8 per row at load
    # auto (the model dtype, or an artifact's calibrated kv_cache_scheme) | bfloat16 | float16 | fp8 | fp8_e4m3 | int8:
    # the 8-bit kinds hold twice the tokens of a 16-bit cache in the same bytes, with a scale per layer and KV head
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.max_num_seqs < 1 or self.block_size < 1:
            raise UsageError("max_num_seqs and block_size must be >= 1")
        if self.lm_head not in LM_HEADS:
            raise UsageError(f"lm_head must be one of {', '.join(LM_HEADS)} (got '{self.lm_head}')")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UsageError(f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")

    def with_options(self, **changes) -> EngineConfig:
        """A copy with `changes`; an unknown option is a TypeError naming it (no silent typos)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_auto_dtype(checkpoint_dtype: str | None) -> str:
    """On a GPU, `auto` serves the checkpoint's dtype, bf16 when the checkpoint is fp32 (or unstated),
    as vLLM does: fp32 doubles the memory and forgoes the tensor cores' 16-bit rate."""
    return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"
