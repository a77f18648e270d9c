"""Where the engine runs and in which dtype: `device="auto"` and `dtype="auto"` resolved, with the reason.

`device="auto"`: the GPU when torch sees one, else the CPU. `dtype="auto"`:

- CUDA: the checkpoint's dtype, bf16 when it is fp32 (`config.cuda_auto_dtype`).
- CPU: a rule on the CPU's flags (`kernels/cpu_caps.py`), never a timing: bf16 where the CPU computes it
  natively (AVX-512 BF16 or AMX), else fp32. Without native support torch emulates bf16 through fp32
  conversions, which is slower than plain fp32 (2.7x slower at 16x1024x1024 on an AVX2-only EPYC). With
  native bf16 every layer still takes its own best kernel per batch size (`quant/cpu_choice.py`): a bf16
  weight's few-row steps run our fp32-math kernel on it, its batched steps bf16 dot products or tiles.
  Until this was a rule, a 5-run GEMM race decided it, and a busy moment flipped a whole run to fp32.
Quantized checkpoints follow the same rule: the result is their activation dtype.
"""

from __future__ import annotations

import torch

from optcli.config import cuda_auto_dtype
from optcli.engine.kernels import cpu_caps
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
    return cpu_auto_dtype(cpu_caps.flags_caps(cpu_caps.cpu_flags()))


def cpu_auto_dtype(caps: cpu_caps.CpuCaps) -> tuple[str, str]:
    """`dtype="auto"` on a CPU with `caps`: (dtype name, reason)."""
    if caps.native_bf16:
        unit = "AMX tiles" if caps.amx else "AVX-512 BF16 dot products"
        return "bfloat16", (f"auto: native CPU bf16 ({unit}); each layer's kernel per batch size by rule "
                            "(few-row steps: fp32 math over bf16 weights)")
    return "float32", "auto: no native CPU bf16 (AVX-512 BF16 or AMX): torch would emulate it, slower than fp32"


def checkpoint_dtype_of(hf_config) -> str | None:
    """The dtype the checkpoint was saved in, as a torch dtype name (None when the config is silent)."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")
