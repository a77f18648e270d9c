"""Scatter new K/V rows into the paged cache.

One Triton program per token writes all of its KV heads: a token's row is a few KB, so per-token
programs keep the launch tiny and need no host-side compaction. Slots < 0 are skipped, which lets
CUDA-graph replays pad the batch with dummy tokens (as vLLM does). With per-head scales (an 8-bit cache,
engine/attention/kv_quant.py) each row is divided by its head's scale and saturated to the format's range
(int8: rounded half away from zero, as `kv_quant.quantize` does) before the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QUANT_KIND = {torch.float8_e4m3fn: 1, torch.int8: 2}


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
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
    QUANT: tl.constexpr,  # 0: store as is; 1: fp8 (E4M3); 2: int8
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
    if QUANT:
        at = heads * HEAD_DIM + dims  # scales: [KV, D], contiguous
        lanes = (heads < NUM_HEADS) & (dims < HEAD_DIM)
        k = _quantize(k.to(tl.float32), tl.load(k_scale_ptr + at, mask=lanes, other=1.0), QUANT)
        v = _quantize(v.to(tl.float32), tl.load(v_scale_ptr + at, mask=lanes, other=1.0), QUANT)
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


@triton.jit
def _quantize(x, s, QUANT: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] fp32 / its scale s, saturated (E4M3 has no inf); a 0 scale (not set) as 1."""
    s = tl.where(s > 0, s, 1.0)
    qmax = 448.0 if QUANT == 1 else 127.0
    y = tl.minimum(tl.maximum(x / s, -qmax), qmax)
    if QUANT == 2:
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int32).to(tl.float32)  # the cast truncates toward zero
    return y


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Write k/v [T, KV, D] into k_cache/v_cache [slots, KV, D] at slot_mapping [T]; slots < 0 are skipped.
    An 8-bit cache (float8_e4m3fn or int8) needs k_scale/v_scale [KV, D] fp32 (contiguous): stored as k / k_scale.

    k/v may be strided views (e.g. slices of a fused QKV projection); no copy is made.
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape[1:] == (num_heads, head_dim) and v_cache.shape == k_cache.shape
    quant = QUANT_KIND.get(k_cache.dtype, 0)
    assert (k_scale is not None) == bool(quant), "an 8-bit cache needs scales (and only it)"
    if quant:
        assert k_scale.shape == v_scale.shape == (num_heads, head_dim) and k_scale.is_contiguous() and v_scale.is_contiguous()
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if quant else slot_mapping,  # unused without QUANT
        v_scale if quant else slot_mapping,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=quant,
    )


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Plain-PyTorch equivalent of store_kv (same skipping of negative slots, same rounding)."""
    from .kv_rounding import as_bytes, quantize

    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if k_scale is None:
        k_cache.index_copy_(0, slots, k[keep].to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v[keep].to(v_cache.dtype))
        return
    as_bytes(k_cache).index_copy_(0, slots, as_bytes(quantize(k[keep], k_scale, k_cache.dtype)))
    as_bytes(v_cache).index_copy_(0, slots, as_bytes(quantize(v[keep], v_scale, v_cache.dtype)))
