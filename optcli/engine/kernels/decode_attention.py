"""Paged attention for decode steps (one query token per sequence), flash-decoding style.

A program owns one (sequence, kv head, split): it reads that split's K/V once for all `group`
query heads sharing the kv head (GQA), so cache traffic is independent of the group size. Long
contexts are cut into `num_splits` partitions run in parallel, since a decode batch alone has too
few (sequence, head) pairs to fill the GPU; a second tiny kernel merges the partial softmax
states (max, sum, unnormalized acc) with log-sum-exp rescaling. Softmax math runs in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import dot_args
from .online_softmax import LOG2E, add_centre, capped_log2, centre_coeffs, load_kv_tile, online_softmax_step


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, centre_ptr, rope_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, mid_m_ptr, mid_l_ptr, mid_acc_ptr,
    qk_scale, softcap, window, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_bt, stride_rope, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    KV_SCALED: tl.constexpr, CENTRED: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    # Keys visible to the query at position ctx-1: (ctx-1-window, ctx-1]; window <= 0 means none.
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    # Splits cover whole cache blocks of the visible range, so each reads its own blocks.
    per_split = tl.cdiv(tl.cdiv(tl.maximum(ctx - lo, 0), num_splits), BLOCK_SIZE) * BLOCK_SIZE
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    if KV_SCALED:  # an 8-bit cache: K's scale [KV, D] folds into the queries, V's into the output (kv_quant.py)
        q = (q.to(tl.float32) * tl.load(k_scale_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]).to(q.dtype)
        v_scale = tl.load(v_scale_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=0.0)
    if CENTRED:  # K stored as rope_p(k - c): rope_p(c) added back to each key tile (attention/kv_centre.py)
        centre_a, centre_b = centre_coeffs(centre_ptr, k_scale_ptr, kv_head, d, d_ok, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, table, kv_head, n, n_ok, d, d_ok,
            stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd, BLOCK_SIZE,
        )  # fmt: skip
        if CENTRED:
            k = add_centre(k, rope_ptr, stride_rope, n, n_ok, d, d_ok, centre_a, centre_b, HEAD_DIM)
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * qk_scale
        if SOFTCAP:  # qk_scale is then in natural units
            s = capped_log2(s, softcap)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v.to(q.dtype), acc, m_i, l_i, PRECISION)

    if KV_SCALED:
        acc = acc * v_scale[None, :]
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context -> zeros
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )
    else:
        # Scratch layout: [B, H, num_splits] for m and l, [B, H, num_splits, BLOCK_D] for acc.
        row = (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        tl.store(mid_m_ptr + row, m_i, mask=g_ok)
        tl.store(mid_l_ptr + row, l_i, mask=g_ok)
        tl.store(mid_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    mid_m_ptr, mid_l_ptr, mid_acc_ptr, out_ptr, num_splits,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = sp < num_splits
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + sp
    m = tl.load(mid_m_ptr + row, mask=s_ok, other=float("-inf"))
    l_s = tl.load(mid_l_ptr + row, mask=s_ok, other=0.0)
    acc = tl.load(mid_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)  # empty splits (m = -inf) weigh 0
    total = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def default_num_splits(max_context: int, batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits so that (sequences x kv heads x splits) roughly fills the GPU; 1 for short contexts."""
    if max_context <= 256:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    wanted = triton.cdiv(2 * sms, max(batch * kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_context, 256), 16))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    *,
    softcap: float | None = None,
    block_n: int = 64,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_centre: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, D] (position context_lens[b]-1) over each sequence's paged K/V.
    kv_scales: (k_scale, v_scale) [KV, D] fp32, contiguous, of an 8-bit cache (K/V = stored values * scale; a K
    shift needs no correction: the softmax ignores it). kv_centre: (c [KV, D] fp32, cos|sin table [positions,
    2 * D]) where K was stored centred before RoPE: key p = (stored + rope_p(c) / scale) * scale.

    k_cache/v_cache: [slots, KV, D]; block_tables [B, max_blocks] int32; context_lens [B] int32
    (0 = padded row, output zeros). num_splits=None picks it from the longest context the block
    table can hold (its width x block_size). softcap: scores -> softcap * tanh(scores / softcap)
    before the softmax (Gemma 2). block_n: keys per tile (power of two >= 16).
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    assert num_heads % kv_heads == 0 and k_cache.shape[2] == head_dim
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        # The table width bounds the longest context without reading context_lens on the host (no
        # device sync, so CUDA-graph capture works); each sequence then splits only its own length.
        num_splits = default_num_splits(block_tables.shape[1] * block_size, batch, kv_heads, q.device)
    group = num_heads // kv_heads
    block_d = max(triton.next_power_of_2(head_dim), 16)
    direct = num_splits == 1
    if direct:
        mid_m = mid_l = mid_acc = out  # unused
    else:
        mid_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        mid_l = torch.empty_like(mid_m)
        mid_acc = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    k_scale, v_scale = kv_scales if kv_scales is not None else (context_lens, context_lens)  # unused then
    centre, rope = kv_centre if kv_centre is not None else (context_lens, context_lens)  # unused then
    assert kv_centre is None or (kv_scales is not None and rope.stride(1) == 1 and rope.shape[1] == 2 * head_dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, centre, rope, block_tables, context_lens,
        out, mid_m, mid_l, mid_acc,
        scale if softcap else scale * LOG2E, softcap or 0.0, sliding_window or 0, num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), rope.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_N=max(block_n, 16),
        BLOCK_D=block_d, DIRECT=direct, SOFTCAP=bool(softcap), KV_SCALED=kv_scales is not None, CENTRED=kv_centre is not None, **dot_args(q.dtype),
    )  # fmt: skip
    if not direct:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_m, mid_l, mid_acc, out, num_splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain-PyTorch equivalent: gather each sequence's whole blocks, mask, softmax in fp32."""
    k_cache, v_cache = _dequantized(k_cache, v_cache, kv_scales)
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    n_pos = block_tables.shape[1] * block_size
    pos = torch.arange(n_pos, device=q.device)
    ctx = context_lens.long()[:, None]
    visible = pos[None, :] < ctx  # query at ctx-1: causal == within the context
    if sliding_window is not None:
        visible &= pos[None, :] > ctx - 1 - sliding_window
    blocks = block_tables.long().clamp(0, k_cache.shape[0] // block_size - 1)  # entries past ctx are arbitrary
    slots = (blocks[:, :, None] * block_size + torch.arange(block_size, device=q.device)).view(batch, n_pos)
    keys = k_cache[slots].float().repeat_interleave(num_heads // kv_heads, dim=2)  # [B, N, H, D]
    values = v_cache[slots].float().repeat_interleave(num_heads // kv_heads, dim=2)
    values = values.masked_fill(~visible[:, :, None, None], 0.0)  # stale slots may hold NaN
    scores = torch.einsum("bhd,bnhd->bhn", q.float(), keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zeros
    return torch.einsum("bhn,bnhd->bhd", probs, values).to(q.dtype)


def _dequantized(k_cache, v_cache, kv_scales):
    """An 8-bit cache in fp32 (the references' view of it), or the cache as it is."""
    if kv_scales is None:
        return k_cache, v_cache
    return k_cache.float() * kv_scales[0], v_cache.float() * kv_scales[1]
