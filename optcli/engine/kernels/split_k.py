"""Split-K bookkeeping and the launch configuration shared by the quantized GEMMs.

Decode batches have few output tiles, so the K loop is split across programs to keep every SM
streaming weights. Each split writes fp32 partials [split, M, N]; one small kernel sums them and
casts to the output dtype (torch's sum-then-cast would be two launches and an extra pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM H100/H200: enough to saturate HBM with weight streams


@dataclass(frozen=True)
class TileConfig:
    """One launch of a quantized GEMM: tiles, K splits, warps, pipeline stages, and the kernel form.
    `kernel` is "dot" except for int4's other forms (see int4_matmul.int4_candidates)."""

    bm: int
    bn: int
    bk: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "dot"


def default_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int) -> int:
    """K splits for a thin batch (decode): doubled while the grid stays under TARGET_PROGRAMS and each
    split keeps two K tiles. Large batches are compute-bound: a split would only add a reduction pass."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while m <= 64 and tiles * split * 2 <= TARGET_PROGRAMS and k // (split * 2) >= 2 * bk:
        split *= 2
    return split


def plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per split, rounded up to whole K tiles; the number of splits that leaves non-empty)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def output(m: int, n: int, splits: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Where the GEMM kernel writes: the result itself, or fp32 partials of every split."""
    if splits == 1:
        return torch.empty((m, n), dtype=dtype, device=device)
    return torch.empty((splits, m, n), dtype=torch.float32, device=device)


@triton.jit
def program_tile(M, N, K, K_PER_SPLIT, BM: tl.constexpr, BN: tl.constexpr):
    """A GEMM program's rows and columns (with masks) and its K range, for a grid (M tiles, N tiles, splits)."""
    offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    k_start = tl.program_id(2) * K_PER_SPLIT
    return offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + K_PER_SPLIT, K)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, MN, SPLITS, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def finish(out: torch.Tensor, dtype: torch.dtype, block: int = 1024) -> torch.Tensor:
    """The [M, N] result in `dtype`: `out` itself, or its partials summed in one launch."""
    if out.dim() == 2:
        return out
    splits, m, n = out.shape
    result = torch.empty((m, n), dtype=dtype, device=out.device)
    if m * n:
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, result, m * n, splits, BLOCK=block)
    return result
