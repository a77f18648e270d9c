"""Per-token dynamic activation quantization (int8 or FP8) in one pass over the activations.

W8A8 and FP8_DYNAMIC layers quantize their input per token at run time. Done with torch ops that
is an absmax, a division, a clamp and a cast: several launches and trips through memory, which at
decode batch sizes cost more than the quantized GEMM saves. One program per token here reads its
row twice (absmax, then quantize; the second read hits cache) and writes int8/fp8 plus one fp32
scale.

Scale conventions follow compressed-tensors, so results match the checkpoint's reference forward:
int8 scale = absmax / 127.5, values rounded half to even and clamped to [-128, 127]; FP8 scale =
absmax / 448. `kernels.quant_reference.quantize_per_token` is the same in torch ops (the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optcli.engine.kernels.quant_reference import FP8_MAX, INT8_DIVISOR


@triton.jit
def _round_half_even(y):
    """As torch.round (ties to even), from floor: libdevice's rint is CUDA-only."""
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def quantize_values(x, scale, QMIN: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """x / scale on the target grid (as fp32 values the final cast keeps exactly)."""
    y = tl.minimum(tl.maximum(x / scale, QMIN), QMAX)
    if IS_INT:
        y = _round_half_even(y)
    else:
        # Round to E4M3's grid ourselves (3 mantissa bits; subnormal step 2^-9), so the final
        # cast is exact whatever rounding the converter uses: triton's CPU interpreter
        # truncates when rounding carries into the exponent (124.3 -> 64, not 128).
        bits = y.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        y = _round_half_even(y / step) * step
    return y


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, DIVISOR: tl.constexpr,
                       QMIN: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.maximum(tl.max(absmax, axis=0) / DIVISOR, 1e-12)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK):
        mask = k + cols < K
        x = tl.load(x_ptr + row * stride_xm + k + cols, mask=mask, other=0.0).to(tl.float32)
        y = quantize_values(x, scale, QMIN, QMAX, IS_INT)
        tl.store(q_ptr + row * stride_qm + k + cols, y.to(q_ptr.dtype.element_ty), mask=mask)


def quant_constants(dtype: torch.dtype) -> dict:
    """The constexprs that select int8 or FP8 quantization in these kernels."""
    is_int = dtype == torch.int8
    return dict(DIVISOR=INT8_DIVISOR if is_int else FP8_MAX, QMIN=-128.0 if is_int else -FP8_MAX,
                QMAX=127.0 if is_int else FP8_MAX, IS_INT=is_int)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] of `dtype` (int8 or float8_e4m3fn), scales [M, 1] float32)."""
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](x, q, scales, k, x.stride(0), q.stride(0), BLOCK=min(block, triton.next_power_of_2(k)),
                                 **quant_constants(dtype))
    return q, scales
