"""Shared configuration: `EngineConfig` (every engine option, its default, and, for the ones users set, its
CLI flag, help and limits, in one place) and the cache location. It imports nothing but `optcli.errors`, on purpose: the CLI, serve, profile and the memory planner all build
or read an `EngineConfig`, so what `profile` measures is what `serve` runs and what `roi` plans for.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from optcli.errors import UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LM_HEADS = ("dense", "int8")
SCHEDULER_POLICIES = ("continuous", "static")
# vLLM's names for the KV cache's storage: `auto` keeps the model dtype (or follows an artifact's calibrated
# kv_cache_scheme), fp8 and fp8_e4m3 are the same E4M3 format, int8 is symmetric; both 8-bit kinds carry scales
# per layer, KV head and channel (engine/attention/kv_quant.py).
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


DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def option(default: Any, *flags: str, help: str, vllm: str | None = None, **extra: Any) -> Any:
    """A dataclass field declared with its CLI flag(s), help and limits (`min`, `max`; `cli_default` where the
    flag's default differs from the field's, e.g. None for "not given"), and the `vllm serve` flag it maps
    onto: `cli/flags.py` makes the Typer options from these and `optcli/vllm` the vLLM argv, so a new option
    is one field here."""
    return field(default=default, metadata={"flags": flags, "help": help, "vllm": vllm, **extra})


def cache_dir() -> Path:
    """Where optcli keeps what it can rebuild (GEMM tuning choices, hub downloads are the hub's own)."""
    return Path(os.environ.get("OPTCLI_CACHE", Path.home() / ".cache" / "optcli"))


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the built-in engine. `device` and `dtype` may say "auto"; the engine resolves
    them at load (see `engine/loading/placement.py`) and keeps the resolved copy as `Engine.config`."""

    device: str = option("auto", "--device", help="auto, cpu or cuda.")  # auto takes the GPU when there is one
    dtype: str = option("auto", "--dtype", vllm="--dtype", help=(
        "auto (CUDA: the checkpoint's, bf16 for fp32; CPU: bf16 where it is native and measured faster, else fp32), "
        "bfloat16, float16 or float32."))  # the activation (and dense weight) dtype
    max_num_seqs: int = option(64, "--max-num-seqs", min=1, vllm="--max-num-seqs",
                               help="Sequences in one batch at most.")
    # capped at the model's context; None: the model's context. The flag's None means "not given": vLLM then
    # uses its own (the model's context), the built-in engine this default
    max_model_len: int | None = option(2048, "--max-model-len", min=2, cli_default=None,
                                       help="Context per sequence (default 2048, capped at the model's).")
    max_num_batched_tokens: int | None = None  # per step; None: max(2048, max_num_seqs)
    block_size: int = 16  # tokens per KV-cache page
    kv_cache_bytes: int | None = None  # None: sized from free memory (GPU: after a profiling forward)
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes (tests)
    gpu_memory_utilization: float = option(0.9, "--gpu-memory-utilization", min=0.05, max=1.0,
                                           vllm="--gpu-memory-utilization",
                                           help="Share of the GPU the engine may use.")  # weights included
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # False: a prompt is never cut across steps (scheduler.py)
    # continuous: iteration-level (a finished sequence's slot refills at the next step); static: request-level
    # batches run to completion, the article's DynamicBatcher (scheduler.py)
    scheduler_policy: str = option("continuous", "--scheduler-policy", help=(
        "continuous (iteration-level) or static: batches of up to --max-num-seqs requests, closed after "
        "--max-wait-ms, run to completion (request-level \"dynamic batching\")."))
    max_wait_ms: float = option(50.0, "--max-wait-ms", min=0.0, help=(
        "--scheduler-policy static: close a batch when its oldest request has waited this long."))
    attention_backend: str = "auto"  # auto | gather (CPU) | triton (GPU)
    enforce_eager: bool = option(False, "--enforce-eager", vllm="--enforce-eager", help="No CUDA graphs.")
    trust_remote_code: bool = False
    dequantize: bool = False  # load a quantized checkpoint as dense weights
    quantization: str | None = None  # w4a16 | w8a8 | w8a16 | fp8: round a dense checkpoint at load
    lm_head: str = option("dense", "--lm-head", help=(
        "dense | int8: round the LM head (and a tied embedding) to int8 per row at load."))
    kv_cache_dtype: str = option("auto", "--kv-cache-dtype", vllm="--kv-cache-dtype", help=(
        "auto | bfloat16 | float16 | fp8 | fp8_e4m3 | int8: the KV cache's storage. auto: the model dtype, or the "
        "artifact's calibrated kv_cache_scheme; fp8 (= fp8_e4m3) and int8 hold twice the tokens of a 16-bit cache, "
        "with scales per layer, KV head and channel (the artifact's, else set by the first K/V written)."))

    def __post_init__(self) -> None:
        """Each option's check, in one place: flag names where a flag sets the option (exit 2, one line)."""
        check_dtype(self.dtype, "--dtype")
        check_kv_cache_dtype(self.kv_cache_dtype, "--kv-cache-dtype")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda (got '{self.device}')")
        if self.max_num_seqs < 1 or self.block_size < 1:
            raise UsageError("max_num_seqs and block_size must be >= 1")
        if self.lm_head not in LM_HEADS:
            raise UsageError(f"--lm-head must be one of {', '.join(LM_HEADS)} (got '{self.lm_head}')")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise UsageError(f"--scheduler-policy must be one of {', '.join(SCHEDULER_POLICIES)} "
                             f"(got '{self.scheduler_policy}')")
        if not self.max_wait_ms >= 0:
            raise UsageError(f"--max-wait-ms must be >= 0 (got {self.max_wait_ms})")
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

    @classmethod
    def cli_fields(cls) -> list:
        """The options users set by flag (the fields declared with `option`), in declaration order."""
        return [f for f in fields(cls) if "flags" in f.metadata]


def cuda_auto_dtype(checkpoint_dtype: str | None) -> str:
    """On a GPU, `auto` serves the checkpoint's dtype, bf16 when the checkpoint is fp32 (or unstated),
    as vLLM does: fp32 doubles the memory and forgoes the tensor cores' 16-bit rate."""
    return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"
