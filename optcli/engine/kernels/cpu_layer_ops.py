"""The decoder layer's non-GEMM ops in fp32 on CPU, one foreign call each (`cpu_lowbit_layer_ops.c`, part of the
library `cpu_lowbit` builds): what `layer_ops.CpuOps` runs in place of TorchOps' 4-9 torch ops per call.

Each returns None / False where its kernel does not apply (not fp32 contiguous rows on CPU, a shape it does not
take, no AVX2 build); the caller then runs TorchOps, which computes the same values: RoPE bit for bit, SiLU-mul
to an ulp or two of torch's exp, RMSNorm up to the order of its sum of squares. The checks are few and cheap on
purpose: at batch 1 a call's Python costs about what its kernel does.
"""

from __future__ import annotations

import torch

from optcli.engine.kernels import cpu_lowbit

_F32 = torch.float32


def _rows(t: torch.Tensor) -> bool:
    """fp32, on CPU, contiguous, at least one dim."""
    return t.dtype == _F32 and t.is_contiguous() and t.device.type == "cpu" and t.dim() > 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(RMSNorm(x + residual) * weight, x + residual), or (RMSNorm(x) * weight, x) without a residual; x [..., H]."""
    lib = cpu_lowbit.library()
    if lib is None or not (_rows(x) and _rows(weight)) or weight.shape != x.shape[-1:]:
        return None
    if residual is not None and not (_rows(residual) and residual.shape == x.shape):
        return None
    hidden = x.shape[-1]
    total = x if residual is None else torch.empty_like(x)
    out = torch.empty_like(x)
    if hidden and x.numel():
        lib.lowbit_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), x.numel() // hidden,
                            hidden, weight.data_ptr(), eps, total.data_ptr(), out.data_ptr())
    return out, total


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """RoPE (half-split) on q [T, H, D] and k [T, KV, D] in place, cos / sin [T, D] contiguous; False, touching
    nothing, where the kernel does not take the layout (each row's heads one after another, D even)."""
    lib = cpu_lowbit.library()
    if lib is None or q.dtype != _F32 or k.dtype != _F32 or q.dim() != 3 or k.dim() != 3 or not (_rows(cos) and _rows(sin)):
        return False
    tokens, heads, dim = q.shape
    if (dim % 2 or k.shape[0] != tokens or k.shape[2] != dim or cos.shape != (tokens, dim) or sin.shape != cos.shape
            or q.stride()[1:] != (dim, 1) or k.stride()[1:] != (dim, 1) or q.device.type != "cpu"):
        return False
    if tokens:
        lib.lowbit_rope(q.data_ptr(), q.stride(0), heads, k.data_ptr(), k.stride(0), k.shape[1], tokens, dim,
                        cos.data_ptr(), sin.data_ptr())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up [..., 2I] = (gate | up)."""
    lib = cpu_lowbit.library()
    if lib is None or not _rows(gate_up) or gate_up.shape[-1] % 2:
        return None
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], width))
    if width and gate_up.numel():
        lib.lowbit_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * width), width, out.data_ptr())
    return out
