"""Scatter new K/V rows into the paged cache.

One Triton program per token writes all of its KV heads: a token's row is a few KB, so per-token
programs keep the launch tiny and need no host-side compaction. Slots < 0 are skipped, which lets
CUDA-graph replays pad the batch with dummy tokens (as vLLM does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_vcs,
    stride_vch,
    stride_vcd,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # Padded tokens (slot < 0) mask every head. (`tile_mask & scalar_bool` would be simpler, but the
    # interpreter turns it into an int32 mask that tl.load rejects.)
    live_heads = tl.where(slot >= 0, NUM_HEADS, 0)
    mask = (heads < live_heads) & (dims < HEAD_DIM)
    t = token.to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    tl.store(
        k_cache_ptr + slot * stride_cs + heads * stride_ch + dims * stride_cd,
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr + slot * stride_vcs + heads * stride_vch + dims * stride_vcd,
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v [T, KV, D] into k_cache/v_cache [slots, KV, D] at slot_mapping [T]; slots < 0 are skipped.

    k/v may be strided views (e.g. slices of a fused QKV projection); no copy is made.
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape[1:] == (num_heads, head_dim) and v_cache.shape == k_cache.shape
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain-PyTorch equivalent of store_kv (same skipping of negative slots)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v[keep].to(v_cache.dtype))
