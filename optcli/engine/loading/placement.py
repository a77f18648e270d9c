"""Where the engine runs and in which dtype: `device="auto"` and `dtype="auto"` resolved, with the reason.

`device="auto"`: the GPU when torch sees one, else the CPU. `dtype="auto"`:

- CUDA: the checkpoint's dtype, bf16 when it is fp32 (`config.cuda_auto_dtype`).
- CPU: bf16 only where the CPU computes it natively (AVX-512 BF16 or AMX) *and* a bf16 GEMM is
  measured faster than fp32 here; else fp32. Without native support torch emulates bf16 through
  fp32 conversions, which is slower than plain fp32 (2.7x slower at 16x1024x1024 on an AVX2-only
  EPYC), so the flags alone are not trusted in either direction: the measurement decides.
Quantized checkpoints follow the same rule: the result is their activation dtype.
"""

from __future__ import annotations

import functools
import time

import torch

from optcli.config import cuda_auto_dtype
from optcli.errors import UsageError


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested}: no CUDA device is available on this machine")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UsageError(f"device must be auto, cpu or cuda[:N] (got '{requested}')")
    return requested


def resolve_dtype(requested: str, device: str, checkpoint_dtype: str | None) -> tuple[str, str]:
    """(dtype name, reason) for `requested` in auto|bfloat16|float16|float32."""
    if requested != "auto":
        return requested, "requested"
    if device.startswith("cuda"):
        dtype = cuda_auto_dtype(checkpoint_dtype)
        return dtype, f"auto: checkpoint dtype {checkpoint_dtype or 'unstated'} on CUDA"
    native, speedup = cpu_bf16_probe()
    if native and speedup > 1.0:
        return "bfloat16", f"auto: native CPU bf16, measured {speedup:.1f}x fp32's GEMM rate"
    why = "no native CPU bf16 (AVX-512 BF16/AMX)" if not native else f"bf16 GEMM measured at {speedup:.2f}x fp32"
    return "float32", f"auto: {why}"


def checkpoint_dtype_of(hf_config) -> str | None:
    """The dtype the checkpoint was saved in, as a torch dtype name (None when the config is silent)."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


@functools.cache
def cpu_bf16_probe() -> tuple[bool, float]:
    """(native bf16 flags present, bf16 GEMM speed / fp32 GEMM speed) on this CPU, measured once a process
    on a 16x2048 @ 2048x2048 linear (a decode batch on a 1B-class layer)."""
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if not native:
        return False, 0.0
    return True, _time_linear(torch.float32) / _time_linear(torch.bfloat16)


def _time_linear(dtype: torch.dtype, rows: int = 16, width: int = 2048, reps: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    w = torch.randn(width, width, generator=gen).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: first calls pay for kernel selection
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best
