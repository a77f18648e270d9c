"""The tile step both paged attention kernels share: load one K/V tile through the block table,
then fold its scores into a running (max, sum, acc) softmax state.

Scores are in log2 units (the caller scales q·k by softmax_scale * LOG2E), so exp2 does the
exponentials; soft-capped scores (Gemma 2) are capped in natural units first (`capped_log2`). Rows that have seen no visible key keep m = -inf; they are shifted by 0 instead, so
no inf - inf NaN appears and their acc and sum stay zero.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def load_kv_tile(
    k_cache_ptr, v_cache_ptr, table, kv_head, n, n_ok, d, d_ok,
    stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """K as [BLOCK_D, BLOCK_N] (ready for q @ k) and V as [BLOCK_N, BLOCK_D] for key positions n."""
    block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + n % BLOCK_SIZE
    k = tl.load(
        k_cache_ptr + slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None] * stride_kd,
        mask=d_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :] * stride_vd,
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    return k, v


@triton.jit
def centre_coeffs(centre_ptr, k_scale_ptr, kv_head, d, d_ok, HEAD_DIM: tl.constexpr):
    """An 8-bit cache's K centre (attention/kv_centre.py) in code units as (a, b) [BLOCK_D] fp32, so that
    rope_p(c)_d / s_d = a_d cos_p,d + b_d sin_p,d: RoPE's half-split rotate_half pairs channel d with d + D/2
    (negated in the first half). A 0 (unset) scale reads as 1, as the store's."""
    half = HEAD_DIM // 2
    partner = tl.where(d < half, d + half, d - half)
    s = tl.load(k_scale_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=1.0)
    s = tl.where(s > 0, s, 1.0)
    c = tl.load(centre_ptr + kv_head * HEAD_DIM + d, mask=d_ok, other=0.0)
    c_partner = tl.load(centre_ptr + kv_head * HEAD_DIM + partner, mask=d_ok, other=0.0)
    return c / s, tl.where(d < half, -c_partner, c_partner) / s


@triton.jit
def add_centre(k, rope_ptr, stride_rope, n, n_ok, d, d_ok, a, b, HEAD_DIM: tl.constexpr):
    """K tile [BLOCK_D, BLOCK_N] of codes plus rope_p(c) / s at key positions n, in fp32; the layer's cos|sin
    table rows [max_len, 2 * HEAD_DIM] are the ones its RoPE rotated with."""
    at = rope_ptr + n[None, :].to(tl.int64) * stride_rope + d[:, None]
    ok = d_ok[:, None] & n_ok[None, :]
    cos = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(at + HEAD_DIM, mask=ok, other=0.0).to(tl.float32)
    return k.to(tl.float32) + a[:, None] * cos + b[:, None] * sin


@triton.jit
def online_softmax_step(s, v, acc, m_i, l_i, PRECISION: tl.constexpr):
    """Fold masked log2-unit scores s [M, N] and values v [N, D] into the state; returns (acc, m, l)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def capped_log2(s, softcap):
    """softcap * tanh(s / softcap) for scaled scores s, in log2 units; tanh(t) = 2 * sigmoid(2t) - 1."""
    t2 = tl.minimum(tl.maximum(2.0 * s / softcap, -80.0), 80.0)  # exp stays finite; tanh(40) is 1 in fp32
    return softcap * (2.0 * tl.sigmoid(t2) - 1.0) * 1.4426950408889634
