"""Grouped GEMM over a mixture-of-experts layer's experts: every expert's rows in one launch.

Looping over experts costs a GEMM launch (and a gather of the expert's rows) per chosen expert per
layer per step: with 8-128 experts, a decode step of a MoE model risks being mostly launch overhead
and tiny under-filled GEMMs. Here the (token, slot) pairs are sorted by expert once (`moe_align`) and each
expert's run is padded to a multiple of BLOCK_M, so every BLOCK_M block of rows belongs to one expert;
one launch then covers all experts, each program reading its block's expert from the plan
(the idea of vLLM's fused_moe, written here from scratch).

The kernel gathers its A rows by index (token = pair // top_k for the gate_up GEMM, which reads the
layer input directly with no h[rows] copy; pair for the down GEMM, which reads the intermediate) and
writes each output row at its pair index, so the intermediates are [num_pairs, N] in pair order with
no padding rows, and summing a token's top_k slots is a reshape and top_k - 1 adds. The plan is built on
the device without reading anything back to the host: the grid is sized by an upper bound on the
padded length, and blocks past the used ones (expert -1) return at once.

Numerics follow the per-expert loop it replaces (`models/moe.py`): fp32 accumulation, the product
rounded to the activation dtype (the expert Dense's output), then the optional per-row scale (the
routing weight) applied in fp32 and rounded again, as torch's `y * weight` rounds. Rounding is done
by hand (`rounding.round_to`) so the interpreter tests check the GPU's numerics.

Checked so far only on the CPU interpreter (tests/engine/kernels/test_moe_kernel.py); the tile
candidates are a starting point for the tuner, not yet measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import dot_args
from .rounding import round_to
from .split_k import TileConfig
from .tuning import pick


@dataclass(frozen=True)
class MoEPlan:
    """Where each (token, slot) pair's row goes. Pair p = token * top_k + slot (ids.reshape(-1) order)."""

    sorted_rows: torch.Tensor  # int32 [num_blocks * block_m]: pair ids grouped by expert; padding = num_pairs
    block_expert: torch.Tensor  # int32 [num_blocks]: each block's expert, -1 for blocks past the used ones
    num_pairs: int
    top_k: int
    block_m: int


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> MoEPlan:
    """The plan for expert ids [T, top_k]: pairs sorted by expert (stably, so in token order within an
    expert), each expert's run padded to a multiple of `block_m`. Device-side only (no host sync): the
    buffers have room for the worst case, every used expert wasting block_m - 1 rows."""
    t, top_k = ids.shape
    pairs = t * top_k
    flat = ids.reshape(-1).long()
    # not bincount: on CUDA it reads the largest id back to size its output, a sync every layer
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    position = padded_start[expert] + torch.arange(pairs, device=ids.device) - start[expert]
    num_blocks = triton.cdiv(pairs + min(pairs, num_experts) * (block_m - 1), block_m)
    sorted_rows = torch.full((num_blocks * block_m,), pairs, dtype=torch.int32, device=ids.device)
    sorted_rows[position] = order.to(torch.int32)
    # block b belongs to the expert whose padded run covers it; past the last run searchsorted gives E
    block_end = torch.cumsum(padded // block_m, 0)
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=ids.device), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return MoEPlan(sorted_rows, block_expert, pairs, top_k, block_m)


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """BLOCK_M by the rows an expert gets on average: each used expert pads to a multiple of it, so a
    decode step (a few rows per expert) wants the smallest tile tl.dot takes, prefill a square one."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, rows_ptr, block_expert_ptr, scale_ptr,
    N, K, NUM_PAIRS,
    stride_xm, stride_we, stride_wn, stride_om,
    A_DIV: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # past the used blocks: the grid is sized by the worst case, not read back
        return
    pairs = tl.load(rows_ptr + block * BM + tl.arange(0, BM)).to(tl.int64)
    m_mask = pairs < NUM_PAIRS  # padding rows (sentinel NUM_PAIRS) read nothing and write nothing
    a_rows = pairs // A_DIV
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        a = tl.load(x_ptr + a_rows[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        # w is [N, K] per expert (HF's [out, in]); read as its [BK, BN] transpose
        b = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if UPCAST_DOT:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    y = round_to(acc, dtype)  # the expert's output in the activation dtype, as its Dense returns it
    if HAS_SCALE:
        scale = tl.load(scale_ptr + pairs, mask=m_mask, other=0.0).to(tl.float32)
        y = round_to(y * scale[:, None], dtype)
    tl.store(out_ptr + pairs[:, None] * stride_om + offs_n[None, :], y.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def moe_candidates(bm: int) -> list[TileConfig]:
    """The heuristic first, then tilings worth timing (kernels/tuning.py). BLOCK_M is fixed by the plan."""
    base = TileConfig(bm, 64 if bm <= 16 else 128, 64, 1, 4, 3)
    extra = [TileConfig(bm, bn, bk, 1, warps, stages) for bn in (64, 128) for bk in (64, 128)
             for warps, stages in ((4, 3), (4, 4), (8, 3)) if not (bn == 128 and bk == 128 and warps == 4)]
    return [base, *[c for c in extra if c != base]]


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, plan: MoEPlan, row_scale: torch.Tensor | None = None,
                 config: TileConfig | None = None) -> torch.Tensor:
    """out[p] = x[row(p)] @ w[expert(p)]^T (* row_scale[p]) for every pair p -> [num_pairs, N] in x's dtype.

    x [T, K] holds one row per token (row(p) = p // top_k: the layer input) or [num_pairs, K] one per
    pair (row(p) = p: the intermediate); with top_k 1 both are the same. w [E, N, K]. row_scale
    [num_pairs] (any float dtype) scales each output row in fp32. Without `config` the N/K tiling is
    timed once per shape on CUDA (kernels/tuning.py)."""
    assert x.dim() == 2 and x.stride(1) == 1 and w.dim() == 3 and w.stride(2) == 1 and w.shape[2] == x.shape[1]
    a_div = 1 if x.shape[0] == plan.num_pairs else plan.top_k
    assert x.shape[0] * a_div == plan.num_pairs, "x must have one row per token or one per pair"
    n, k = w.shape[1], w.shape[2]
    if row_scale is not None:
        assert row_scale.shape == (plan.num_pairs,) and row_scale.is_contiguous()
    if config is None:
        kernel = f"moe/bm{plan.block_m}/e{w.shape[0]}{'/scaled' if row_scale is not None else ''}"
        config = pick(kernel, plan.num_pairs, n, k, lambda: moe_candidates(plan.block_m),
                      lambda c: grouped_gemm(x, w, plan, row_scale, c))
    assert config.bm == plan.block_m, "the plan's padding fixes BLOCK_M"
    out = torch.empty((plan.num_pairs, n), dtype=x.dtype, device=x.device)
    if plan.num_pairs == 0:
        return out
    grid = (plan.block_expert.numel(), triton.cdiv(n, config.bn))
    _grouped_gemm_kernel[grid](
        x, w, out, plan.sorted_rows, plan.block_expert, row_scale if row_scale is not None else out,
        n, k, plan.num_pairs, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_DIV=a_div, HAS_SCALE=row_scale is not None, BM=config.bm, BN=config.bn, BK=config.bk,
        num_warps=config.num_warps, num_stages=config.num_stages, **dot_args(x.dtype),
    )  # fmt: skip
    return out


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, plan: MoEPlan,
                           row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What grouped_gemm computes, in plain torch over the plan's blocks (one bmm, fp32)."""
    a_div = 1 if x.shape[0] == plan.num_pairs else plan.top_k
    out = torch.empty((plan.num_pairs, w.shape[1]), dtype=x.dtype, device=x.device)
    live = plan.block_expert >= 0
    rows = plan.sorted_rows.long().view(-1, plan.block_m)[live]
    valid = rows < plan.num_pairs
    safe = torch.where(valid, rows, 0)
    a = x[safe // a_div].float()  # [blocks, BM, K]
    y = torch.bmm(a, w[plan.block_expert[live].long()].float().transpose(1, 2)).to(x.dtype)
    if row_scale is not None:
        y = (y.float() * row_scale.float()[safe][..., None]).to(x.dtype)
    out[rows[valid]] = y[valid]
    return out
