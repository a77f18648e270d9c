"""W4A16 GEMM: int4 weights dequantized in registers, never in memory (the Marlin idea, in Triton).

Weights are int32 words [ceil(K/8), N], eight 4-bit input channels per word (`kernels.quant_reference.
pack_int4_for_triton`), with per-group scales (and float zero offsets for asymmetric schemes)
[G, N]: w = (nibble - 8) * scale + zero. Each program loads a [BK/8, BN] tile of packed words
once per word, fans its eight nibbles out in registers, scales them and feeds tl.dot, so HBM
traffic is a quarter of bf16's.

Small batches (decode) are memory-bound with few output tiles, so K is split across programs to
keep every SM streaming weights; their fp32 partials are summed after (`split_k.py`). For 1-8 rows
there is also a GEMV form: no tl.dot (whose tiles pad M to 16), either reducing each tile as it is
read with the group scale applied once to the sum of x * nibble (one int->float convert and one FMA
per weight), or accumulating per-row products and reducing once at the end. For M > 16 the GEMM can
also read each word once per input channel instead of reshaping (BY_ROW), or the weight can be
dequantized into a transient bf16 buffer for a cuBLAS GEMM (`int4_dequant.py`). `int4_candidates`
lists them; on CUDA the tuner times them per shape (in a CUDA graph with a cold L2, as the engine
runs them) and keeps the fastest; `benchmarks/gpu_check.py --quant` measures the result against
torch's int4 kernel and bf16 cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import split_k
from ._utils import dot_args
from .int4_dequant import int4_dequantize
from .split_k import TileConfig, default_splits, program_tile
from .tuning import pick


@triton.jit
def _int4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wk, stride_sg, stride_os, stride_om,
    GROUP: tl.constexpr, GROUP_ALIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BY_ROW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = program_tile(M, N, K, K_PER_SPLIT, BM, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        if BY_ROW:
            # One load per input channel of the word holding it: each word is read 8 times, from
            # L1/L2 after the first (HBM traffic unchanged), and the tile needs no reshape.
            words = tl.load(w_ptr + (offs_k[:, None] // 8) * stride_wk + offs_n[None, :], mask=wk_mask, other=0)
            nibbles = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
        else:
            # Each word once ([BK/8, BN]), then its eight nibbles fanned out in registers to [BK, BN]:
            # row 8*w + i of the tile is nibble i of word row w, the packing order.
            offs_w = k0 // 8 + tl.arange(0, BK // 8)
            words = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :],
                            mask=(offs_w[:, None] < (K + 7) // 8) & n_mask[None, :], other=0)
            shifts = (tl.arange(0, 8) * 4)[None, :, None]
            nibbles = tl.reshape((words[:, None, :] >> shifts) & 0xF, [BK, BN])
        nibbles = tl.where(wk_mask, nibbles, 8)  # masked rows dequantize to 0 (no stray weights past K)
        if GROUP_ALIGNED:  # the whole tile lies in one group: one row of scales
            group = k0 // GROUP
            scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g_off = (offs_k[:, None] // GROUP) * stride_sg + offs_n[None, :]
            scale = tl.load(s_ptr + g_off, mask=wk_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + g_off, mask=wk_mask, other=0.0).to(tl.float32)
        w = (nibbles.to(tl.float32) - 8.0) * scale
        if HAS_ZERO:
            w = w + zero
        if UPCAST_DOT:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    out = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wk, stride_sg, stride_os, stride_om,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DEFERRED: tl.constexpr,
):
    """x [M <= BM, K] @ W: every K tile lies in one group (BK divides GROUP, or one group spans K).
    DEFERRED keeps per-word-row products in a [BM, BK/8, BN] accumulator and reduces it once at the
    end (no cross-thread reduction inside the loop); otherwise each tile is reduced as it is read and
    the group scale is applied to the sums."""
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = program_tile(M, N, K, K_PER_SPLIT, BM, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc3 = tl.zeros([BM, BK // 8, BN], dtype=tl.float32)  # DEFERRED only
    for k0 in range(k_start, k_end, BK):
        rows = k0 // 8 + tl.arange(0, BK // 8)
        words = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                        mask=(rows[:, None] < (K + 7) // 8) & n_mask[None, :], other=0)
        group = k0 // GROUP
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = scale  # unused without zero points
        if HAS_ZERO:
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        dot = tl.zeros([BM, BN], dtype=tl.float32)  # sum over the tile of x * nibble
        x_sum = tl.zeros([BM], dtype=tl.float32)
        for i in tl.static_range(8):  # nibble i of word row r is input channel 8r + i
            ks = rows * 8 + i
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                        mask=m_mask[:, None] & (ks < k_end)[None, :], other=0.0).to(tl.float32)
            nib = ((words >> (4 * i)) & 0xF).to(tl.float32)
            if DEFERRED:
                w = (nib - 8.0) * scale[None, :]
                if HAS_ZERO:
                    w += zero[None, :]
                acc3 += x[:, :, None] * w[None, :, :]
            else:
                dot += tl.sum(x[:, :, None] * nib[None, :, :], axis=1)
                x_sum += tl.sum(x, axis=1)
        if not DEFERRED:
            # sum x * ((q - 8) * scale + zero) = scale * (sum x*q - 8 sum x) + zero * sum x
            acc += (dot - 8.0 * x_sum[:, None]) * scale[None, :]
            if HAS_ZERO:
                acc += x_sum[:, None] * zero[None, :]
    if DEFERRED:
        acc = tl.sum(acc3, axis=1)
    out = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Int4 launch forms (TileConfig.kernel): "dot" (in-register dequant + tl.dot), "dot-rows" (the same, words
# read per input channel, no reshape), "gemv" / "gemv-deferred" (tl.dot-free; bm = rows padded to a power
# of two, at most 8; reduced per tile or once at the end), "dequant" (int4_dequant.py's [K, N] buffer in
# bk/8 x bn tiles, then a cuBLAS GEMM).
Int4Config = TileConfig


GEMV_MAX_M = 8


def gemv_fits(m: int, k: int, group_size: int, bk: int) -> bool:
    return m <= GEMV_MAX_M and (group_size % bk == 0 or group_size >= k)


def int4_config(m: int, n: int, k: int, group_size: int) -> Int4Config:
    """Tiles by batch size: thin M tiles and split K for decode, square tiles for prefill."""
    bk = 128 if group_size % 128 == 0 or group_size >= k else 64 if group_size % 64 == 0 else 32
    if m <= 16:
        bm, bn, warps = 16, 64, 4
    elif m <= 64:
        bm, bn, warps = (32 if m <= 32 else 64), 64, 4
        bk = min(bk, 64)
    else:
        bm, bn, bk, warps = (64 if m <= 128 else 128), 128, min(bk, 64), 8
    return Int4Config(bm, bn, bk, default_splits(m, n, k, bm, bn, bk), warps)


def int4_candidates(m: int, n: int, k: int, group_size: int) -> list[Int4Config]:
    """The heuristic first, then tilings worth timing for this batch size (kernels/tuning.py)."""
    base = int4_config(m, n, k, group_size)
    bk = base.bk
    if m <= 16:
        extra = [Int4Config(16, bn, bk, s, 4, 4) for bn in (64, 128) for s in (1, 2, 4, 8)]
        if gemv_fits(m, k, group_size, bk):
            bm = triton.next_power_of_2(m)
            extra += [Int4Config(bm, bn, bk, s, 4, 2, "gemv") for bn in (64, 128, 256) for s in (1, 2, 4, 8)]
            extra += [Int4Config(bm, bn, bk, s, 4, 2, "gemv-deferred") for bn in (64, 128) for s in (1, 4)]
    elif m <= 64:
        extra = [Int4Config(bm, bn, min(bk, 64), s, 4, 3) for bm in (32, 64) for bn in (64, 128) for s in (1, 2, 4)]
    else:
        extra = [Int4Config(bm, bn, 64, 1, w, st) for bm in (64, 128) for bn in (64, 128, 256)
                 for w, st in ((4, 3), (8, 4))]
    if m > 16:
        # the same GEMM reading each word per input channel (no reshape), and, since a cuBLAS GEMM
        # may repay unpacking the weight once per call, dequantize + cuBLAS
        extra += [Int4Config(bm, bn, 64, 1, w, st, "dot-rows") for bm in ((64,) if m <= 64 else (64, 128))
                  for bn in (128, 256) for w, st in ((4, 3), (8, 4))]
        extra += [Int4Config(0, 128, 64, 1, 4, 1, "dequant")]
    return [base, *[c for c in extra if c != base]]


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, config: Int4Config | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight)^T -> [M, N] in x's dtype. qweight int32 [ceil(K/8), N].
    Without `config`, the tiling is timed once per shape on CUDA (kernels/tuning.py)."""
    assert x.dim() == 2 and x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    if config is None:
        kernel = f"int4/g{group_size}{'/zero' if zeros is not None else ''}"  # candidates depend on the group
        config = pick(kernel, m, n, k, lambda: int4_candidates(m, n, k, group_size),
                      lambda c: int4_matmul(x, qweight, scales, zeros, group_size, c))
    cfg = config
    if cfg.kernel == "dequant":
        w = int4_dequantize(qweight, scales, zeros, group_size, k, x.dtype, cfg.bk // 8, cfg.bn)
        return torch.mm(x, w)  # M = 0 included
    k_per_split, splits = split_k.plan(k, cfg.bk, cfg.split_k)
    out = split_k.output(m, n, splits, x.dtype, x.device)
    if m == 0:
        return split_k.finish(out, x.dtype)
    common = (x, qweight, scales, zeros if zeros is not None else scales, out, m, n, k, k_per_split,
              x.stride(0), qweight.stride(0), scales.stride(0), m * n if splits > 1 else 0, n)
    grid = (triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn), splits)
    if cfg.kernel.startswith("gemv"):
        assert m <= cfg.bm and gemv_fits(m, k, group_size, cfg.bk)
        _int4_gemv_kernel[grid](*common, GROUP=group_size, HAS_ZERO=zeros is not None, BM=cfg.bm, BN=cfg.bn,
                                BK=cfg.bk, DEFERRED=cfg.kernel == "gemv-deferred", num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
    else:
        _int4_matmul_kernel[grid](
            *common, GROUP=group_size, GROUP_ALIGNED=group_size % cfg.bk == 0 or group_size >= k,
            HAS_ZERO=zeros is not None, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, BY_ROW=cfg.kernel == "dot-rows",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_args(x.dtype),
        )
    return split_k.finish(out, x.dtype)
