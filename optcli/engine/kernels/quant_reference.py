"""Plain-PyTorch quantized math: the CPU paths, and the references the Triton kernels are tested against.

Lives in kernels (not quant) so the kernels that share its constants never import upward; quant
imports it from here."""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_MAX = 448.0  # float8_e4m3fn; the one definition, quant imports it from here
INT8_DIVISOR = 127.5  # compressed-tensors' symmetric int8 scale: absmax / ((127 - (-128)) / 2)
MIN_SCALE = 1e-12  # an all-zero row (a padded token) must not divide by zero


class QuantizedInput(NamedTuple):
    """Activations already quantized per token by the op that produced them (a fused RMSNorm or
    SiLU-mul), for a layer whose `input_quant` asks for exactly this format."""

    q: torch.Tensor  # [T, K] int8 or float8_e4m3fn
    scales: torch.Tensor  # [T, 1] float32
    dtype: torch.dtype  # the activations' own dtype: the layer's output dtype


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 or float8_e4m3fn [M, K], float32 scales [M, 1]), compressed-tensors' rules."""
    is_int = dtype == torch.int8
    xf = x.float()
    scales = (xf.abs().amax(-1, keepdim=True) / (INT8_DIVISOR if is_int else FP8_MAX)).clamp_min(MIN_SCALE)
    y = xf / scales
    y = y.round().clamp(-128, 127) if is_int else y.clamp(-FP8_MAX, FP8_MAX)
    return y.to(dtype), scales


def int8_scaled_mm(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] int8 @ wq [N, K]^T) in exact int32 on CPU, then * x_scales [M, 1] * w_scales [N]."""
    acc = torch._int_mm(xq, wq.t())
    return (acc.float() * x_scales * w_scales[None, :]).to(out_dtype)


def int4_dequantize(qweight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, k: int) -> torch.Tensor:
    """Triton layout (int32 [K/8, N], 8 nibbles per word along K; scales/zeros [G, N]) -> float32 [K, N]."""
    shifts = torch.arange(0, 32, 4, device=qweight_t.device, dtype=torch.int32)
    nibbles = (qweight_t[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    q = nibbles.reshape(-1, qweight_t.shape[1])[:k].float()
    w = (q - 8.0) * scales.float().repeat_interleave(group_size, 0)[:k]
    if zeros is not None:
        w = w + zeros.float().repeat_interleave(group_size, 0)[:k]
    return w


def pack_int4_for_triton(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] nibbles (0..15) -> int32 [ceil(K/8), N], nibble i of a word = input channel 8w + i."""
    n, k = q.shape
    padded = torch.zeros((n, -(-k // 8) * 8), dtype=torch.int32, device=q.device)
    padded[:, :k] = q.to(torch.int32)
    words = padded.reshape(n, -1, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int32)
    packed = (words << shifts).sum(-1, dtype=torch.int64)  # < 2^32: no carries between nibbles
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous()
