"""W8A8 GEMM: int8 x int8 -> int32 tensor-core dots, per-token and per-channel scales fused on the way out.

`torch._int_mm` returns raw int32 (scaling it is another pass over [M, N]) and was measured far
slower than bf16 on Hopper; here the scales are applied in the epilogue while the tile is still in
registers. Weights stay [N, K] (K contiguous, the checkpoint's layout): Hopper's int8 tensor-core
instructions (wgmma) take 8-bit operands K-major only, so a [K, N] copy would have to be transposed
on the way in. Small batches split K across programs like the int4 kernel (`split_k.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import split_k
from ._utils import interpreting
from .split_k import TileConfig, default_splits, program_tile
from .tuning import pick


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_os, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EXACT_DOT: tl.constexpr,
):
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = program_tile(M, N, K, K_PER_SPLIT, BM, BN)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0)
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0)  # [BN, BK], K contiguous
        if EXACT_DOT:  # interpreter: int8 products summed in fp32 are exact below 2^24 per tile
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee").to(tl.int32)
        else:
            acc += tl.dot(a, tl.trans(b))
    x_scale = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    out = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


Int8Config = TileConfig


def int8_config(m: int, n: int, k: int) -> Int8Config:
    if m <= 16:
        bm, bn, bk, warps = 16, 64, 128, 4
    elif m <= 64:
        bm, bn, bk, warps = (32 if m <= 32 else 64), 64, 128, 4
    else:
        bm, bn, bk, warps = (64 if m <= 128 else 128), 128, 128, 8
    return Int8Config(bm, bn, bk, default_splits(m, n, k, bm, bn, bk), warps)


def int8_candidates(m: int, n: int, k: int) -> list[Int8Config]:
    base = int8_config(m, n, k)
    if m <= 16:
        extra = [Int8Config(16, bn, bk, s, 4, 4) for bn in (64, 128) for bk in (128, 256) for s in (1, 4)]
    elif m <= 64:
        extra = [Int8Config(bm, bn, 128, s, 4, 3) for bm in (32, 64) for bn in (64, 128) for s in (1, 4)]
    else:
        extra = [Int8Config(bm, bn, bk, 1, w, st) for bm in (64, 128) for bn in (128, 256) for bk in (64, 128)
                 for w, st in ((4, 3), (8, 4))]
    return [base, *[c for c in extra if c != base]]


def int8_matmul(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                out_dtype: torch.dtype, config: Int8Config | None = None) -> torch.Tensor:
    """(xq [M, K] int8 @ wq [N, K] int8 ^T) * x_scales [M, 1] * w_scales [N] -> [M, N] `out_dtype`.
    Without `config`, the tiling is timed once per shape on CUDA (kernels/tuning.py)."""
    assert xq.stride(1) == 1 and wq.is_contiguous()
    m, k = xq.shape
    n = wq.shape[0]
    if config is None:
        config = pick("int8", m, n, k, lambda: int8_candidates(m, n, k),
                      lambda c: int8_matmul(xq, x_scales, wq, w_scales, out_dtype, c))
    cfg = config
    k_per_split, splits = split_k.plan(k, cfg.bk, cfg.split_k)
    out = split_k.output(m, n, splits, out_dtype, xq.device)
    if m == 0:
        return split_k.finish(out, out_dtype)
    grid = (triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn), splits)
    _int8_matmul_kernel[grid](
        xq, wq, x_scales, w_scales, out, m, n, k, k_per_split,
        xq.stride(0), wq.stride(0), m * n if splits > 1 else 0, n,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, EXACT_DOT=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return split_k.finish(out, out_dtype)
