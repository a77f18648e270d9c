"""Paged attention for a ragged batch of new query tokens (prefill chunks), flash-attention style.

One program owns a tile of BLOCK_Q consecutive query tokens of one sequence times all `group` query
heads of one kv head (GQA: the tile's BLOCK_M = BLOCK_Q * group rows share every K/V tile they
read). Keys stream in BLOCK_N tiles with an online fp32 softmax, and only the tiles the causal /
sliding-window mask can reach are visited. The grid is sized from T and B alone (no host sync,
CUDA-graph friendly): tiles are numbered query_start_loc[b] // BLOCK_Q + b onward for sequence b,
found by binary search, and surplus programs exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import dot_args
from .online_softmax import LOG2E, add_centre, capped_log2, centre_coeffs, load_kv_tile, online_softmax_step

NO_WINDOW = 1 << 30


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Last sequence b whose first tile index query_start_loc[b] // BLOCK_Q + b is <= tile."""
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, centre_ptr, rope_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    qk_scale, softcap, window, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_bt, stride_rope, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    KV_SCALED: tl.constexpr, CENTRED: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local = tile - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    first_pos = ctx - q_len  # position of the sequence's first new token

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = local * BLOCK_Q + r // GROUP  # index among the sequence's new tokens
    heads = kv_head * GROUP + r % GROUP
    row_ok = (r // GROUP < BLOCK_Q) & (tok < q_len)
    d_ok = d < HEAD_DIM
    pos = first_pos + tok
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys any row of this tile can see: (first row's pos - window, last row's pos].
    hi = first_pos + tl.minimum((local + 1) * BLOCK_Q, q_len)
    lo = tl.maximum(first_pos + local * BLOCK_Q - window + 1, 0)
    if KV_SCALED:  # an 8-bit cache: K's scale [KV, D] folds into the queries, V's into the output (kv_quant.py)
        q = (q.to(tl.float32) * tl.load(k_scale_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]).to(q.dtype)
        v_scale = tl.load(v_scale_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=0.0)
    if CENTRED:  # K stored as rope_p(k - c): rope_p(c) added back to each key tile (attention/kv_centre.py)
        centre_a, centre_b = centre_coeffs(centre_ptr, k_scale_ptr, kv_head, d, d_ok, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, table, kv_head, n, n_ok, d, d_ok,
            stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd, BLOCK_SIZE,
        )  # fmt: skip
        if CENTRED:
            k = add_centre(k, rope_ptr, stride_rope, n, n_ok, d, d_ok, centre_a, centre_b, HEAD_DIM)
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * qk_scale
        if SOFTCAP:  # qk_scale is then in natural units
            s = capped_log2(s, softcap)
        visible = (n[None, :] <= pos[:, None]) & (n[None, :] > pos[:, None] - window) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v.to(q.dtype), acc, m_i, l_i, PRECISION)

    if KV_SCALED:
        acc = acc * v_scale[None, :]
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    *,
    softcap: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_centre: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of ragged new tokens q [T, H, D] over their sequences' paged K/V.

    query_start_loc [B+1] int32: cumulative query offsets; context_lens [B] int32: tokens of each
    sequence after this step, so sequence b's queries sit at positions context_lens[b] - q_len_b
    .. context_lens[b] - 1 and all their K/V are already cached. block_m (rows = query tokens x
    group heads) and block_n (keys) are tile sizes, powers of two >= 16. softcap: scores ->
    softcap * tanh(scores / softcap) before the softmax (Gemma 2). kv_scales: (k_scale, v_scale) [KV, D] fp32,
    contiguous, of an 8-bit cache (K/V = stored values * scale). kv_centre: (c [KV, D] fp32, cos|sin table
    [positions, 2 * D]) where K was stored centred before RoPE: key p = (stored + rope_p(c) / scale) * scale.
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    assert num_heads % kv_heads == 0 and k_cache.shape[2] == head_dim
    num_seqs = query_start_loc.shape[0] - 1
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // kv_heads
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    block_q = block_m // group
    k_scale, v_scale = kv_scales if kv_scales is not None else (context_lens, context_lens)  # unused then
    centre, rope = kv_centre if kv_centre is not None else (context_lens, context_lens)  # unused then
    assert kv_centre is None or (kv_scales is not None and rope.stride(1) == 1 and rope.shape[1] == 2 * head_dim)
    _prefill_kernel[(num_tokens // block_q + num_seqs, kv_heads)](
        q, k_cache, v_cache, k_scale, v_scale, centre, rope, block_tables, query_start_loc, context_lens, out,
        scale if softcap else scale * LOG2E, softcap or 0.0, sliding_window or NO_WINDOW, num_seqs,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), rope.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=max(block_n, 16),
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16), SOFTCAP=bool(softcap),
        KV_SCALED=kv_scales is not None, CENTRED=kv_centre is not None, **dot_args(q.dtype),
    )  # fmt: skip
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain-PyTorch equivalent, one sequence at a time: gather its context, mask, softmax in fp32."""
    if kv_scales is not None:  # an 8-bit cache, read in fp32
        k_cache, v_cache = k_cache.float() * kv_scales[0], v_cache.float() * kv_scales[1]
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[1]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        q_lo, q_hi = starts[b], starts[b + 1]
        if q_hi == q_lo:
            continue
        keys_pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b].long()[keys_pos // block_size] * block_size + keys_pos % block_size
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, H, D]
        values = v_cache[slots].float().repeat_interleave(group, dim=1)
        query_pos = torch.arange(ctx - (q_hi - q_lo), ctx, device=q.device)
        visible = keys_pos[None, :] <= query_pos[:, None]
        if sliding_window is not None:
            visible &= keys_pos[None, :] > query_pos[:, None] - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[q_lo:q_hi].float(), keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
