"""int4 weights (our Triton layout) dequantized to a dense [K, N] matrix in one pass.

For large batches a GEMM is compute-bound and cuBLAS's bf16 GEMM beats a Triton GEMM that unpacks
int4 in its inner loop; unpacking once into a transient buffer (a quarter-size read, a full-size
write) and calling cuBLAS can then be faster, as vLLM does for AWQ at >= 256 tokens. The weights
stay int4 in memory; the buffer lives for one call. `int4_matmul` offers this as a candidate for
large M and the tuner keeps it only where it measured faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wk, stride_sg, stride_ok,
                         GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # word rows: input channels 8r .. 8r + 7
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    words = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                    mask=(rows[:, None] < (K + 7) // 8) & n_mask[None, :], other=0)
    dtype = out_ptr.dtype.element_ty
    for i in tl.static_range(8):
        ks = rows * 8 + i
        mask = (ks < K)[:, None] & n_mask[None, :]
        g_off = (ks // GROUP)[:, None] * stride_sg + offs_n[None, :]
        w = (((words >> (4 * i)) & 0xF).to(tl.float32) - 8.0) * tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            w += tl.load(z_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + ks[:, None].to(tl.int64) * stride_ok + offs_n[None, :], round_to(w, dtype).to(dtype), mask=mask)


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    k: int, dtype: torch.dtype, block_rows: int = 8, block_n: int = 128) -> torch.Tensor:
    """int32 [ceil(K/8), N] words + scales/zeros [G, N] -> [K, N] in `dtype` (ops.int4_dequantize, rounded)."""
    n = qweight.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(qweight.shape[0], block_rows), triton.cdiv(n, block_n))
    _int4_dequant_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, out, n, k,
        qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, HAS_ZERO=zeros is not None, BR=block_rows, BN=block_n,
    )  # fmt: skip
    return out
