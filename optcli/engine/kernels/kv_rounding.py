"""How an 8-bit KV cache rounds, in plain PyTorch: the statement the Triton store kernel matches exactly and the
CPU path's store (engine/attention/kv_quant.py) runs. x ≈ q * scale, with a scale per KV head and channel:
[KV, D] (a per-tensor or per-head scale is that, repeated)."""

from __future__ import annotations

import torch

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Rounding the Triton store kernel can match exactly (its float->int cast truncates)."""
    return torch.trunc(y + 0.5 * torch.sign(y))


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, KV, D] -> dtype: x / scale, scale [KV, D] or [KV]; a 0 scale (not set) divides by 1."""
    qmax = QMAX[dtype]
    if scale.dim() == 1:
        scale = scale[:, None]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (x.float() / safe).clamp(-qmax, qmax)  # E4M3 has no inf: out of range would become NaN
    if dtype == torch.int8:
        y = round_half_away(y)
    return y.to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., KV, D] back to dtype with scale [KV, D] or [KV]."""
    return (q.float() * (scale[:, None] if scale.dim() == 1 else scale)).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An 8-bit tensor as int8, for the CPU copy and gather ops torch lacks for float8."""
    return t.view(torch.int8) if t.dtype == torch.float8_e4m3fn else t
