"""Attention over the paged KV cache, CPU path: scatter new K/V into their slots, gather each
sequence's context by whole blocks, and run SDPA; decode steps over an 8-bit cache instead read the codes where
they lie (`cpu_kv8.decode_attention`), with no widened copy of the context.

Sequences are attended in groups padded to the group's longest context: decodes (one query token)
are split into up to three groups of similar length, prefill chunks form their own group,
so a long prompt chunk never pads the decodes. Gathering whole blocks moves KB-sized rows instead of
single tokens; masks are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from optcli.engine.attention.kv_centre import centre_read
from optcli.engine.attention.kv_quant import KVScales, as_bytes, head_scale, quant_scales, store_quantized
from optcli.engine.attention.layout import StepLayout, block_table_tensor
from optcli.engine.kernels import cpu_kv8


@dataclass
class AttentionGroup:
    """Sequences attended together, padded to the group's longest query and context."""

    rows: torch.Tensor  # [B, Q] indices into the flat token batch
    valid: torch.Tensor  # [B, Q] which query slots are real tokens
    query_pos: torch.Tensor  # [B, Q] absolute positions of the queries
    block_table: torch.Tensor  # [B, N] cache blocks holding positions 0..N*block_size-1
    ctx_len: torch.Tensor  # [B]
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    # rows are 0..B*Q-1 in order with no padding (every decode step of same-length sequences): the
    # queries are a view of q and the output needs no scatter (4 fewer ops a layer at batch 1)
    dense: bool = False
    first_pos: torch.Tensor = field(init=False)  # [B] query_pos[:, 0], taken once a step (decode reads it every layer)

    def __post_init__(self) -> None:
        self.first_pos = self.query_pos[:, 0].contiguous()

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        """[B, 1, Q, N*block_size] boolean: causal, within the context, within the window."""
        if window not in self.masks:
            ctx_pos = torch.arange(self.block_table.shape[1] * block_size, device=self.block_table.device)
            q = self.query_pos[:, :, None]
            allowed = (ctx_pos[None, None, :] <= q) & (ctx_pos[None, None, :] < self.ctx_len[:, None, None])
            if window is not None:
                allowed &= ctx_pos[None, None, :] > q - window
            allowed[..., 0] |= ~self.valid  # padded queries attend somewhere: no NaN rows
            self.masks[window] = allowed[:, None]
        return self.masks[window]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]
    block_size: int

    def attend(self, q, k, v, kv_cache, window: int | None, scale: float | None = None,
               softcap: float | None = None) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache, self, window, scale, softcap)


def build_gather_metadata(layout: StepLayout, device) -> AttentionMetadata:
    """Decode rows in up to three length groups, prefill chunks in one more."""
    decode = [i for i, r in enumerate(layout.rows) if len(r) == 1]
    prefill = [i for i, r in enumerate(layout.rows) if len(r) > 1]
    parts = [[decode[j] for j in part] for part in split_by_length([layout.ctx_lens[i] for i in decode])] if decode else []
    if prefill:
        parts.append(prefill)
    groups = [
        build_group(
            [layout.rows[i] for i in part],
            [layout.query_pos[i] for i in part],
            [layout.ctx_lens[i] for i in part],
            [layout.block_tables[i] for i in part],
            layout.block_size,
            device,
        )
        for part in parts
    ]
    return AttentionMetadata(torch.tensor(layout.slots, dtype=torch.long, device=device), groups, layout.block_size)


def build_group(rows, query_pos, ctx_lens, block_tables, block_size, device) -> AttentionGroup:
    """Pad per-sequence rows/positions/block tables into one group's tensors."""
    batch = len(rows)
    q_max = max(len(r) for r in rows)
    row_t = torch.zeros(batch, q_max, dtype=torch.long)
    pos_t = torch.zeros(batch, q_max, dtype=torch.long)
    valid = torch.zeros(batch, q_max, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, query_pos, strict=True)):
        row_t[i, : len(r)] = torch.as_tensor(r)
        pos_t[i, : len(p)] = torch.as_tensor(p)
        valid[i, : len(r)] = True
    ctx_len = torch.as_tensor(ctx_lens, dtype=torch.long)
    n_blocks = (int(ctx_len.max()) + block_size - 1) // block_size
    table = block_table_tensor(block_tables, n_blocks)
    flat = [i for r in rows for i in r]
    dense = all(len(r) == q_max for r in rows) and flat == list(range(len(flat)))
    return AttentionGroup(row_t.to(device), valid.to(device), pos_t.to(device), table.to(device), ctx_len.to(device),
                          dense=dense)


def split_by_length(ctx_lens: list[int], max_groups: int = 3) -> list[list[int]]:
    """Indices in at most `max_groups` groups of similar context length, chosen so that padding each
    group to its longest member wastes the least (decode attention costs grow with padded length)."""
    order = sorted(range(len(ctx_lens)), key=ctx_lens.__getitem__)
    lens = [ctx_lens[i] for i in order]
    n = len(lens)
    # cost[g][j]: least padded size of the first j sequences in g groups; cuts remember the splits.
    cost = [[0.0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(max_groups)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + (j - i) * lens[j - 1]
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    groups = min(range(1, max_groups + 1), key=lambda g: (cost[g][n], g))
    bounds, j = [], n
    for g in range(groups, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    return [order[a:b] for a, b in reversed(bounds) if b > a]


# Decode attention on CPU (one query a sequence) takes the query heads that share a KV head as the rows of
# one query block, rather than SDPA's `enable_gqa`: the same kernel, dtype and sums, 4.8-5.5x faster in bf16
# (`benchmarks/cpu_step_ops.py`, 1 thread, CPU time, 2-core Zen 5, 32 heads / 8 KV heads over 80 keys: B=1
# 195 us against 35, B=64 12.1 ms against 2.5 a layer; a 1B model has 16). Not bit for bit: the kernel's row
# blocking moves about 20 of B=64's 65,536 outputs by one bf16 ulp. Widening to fp32 is as fast but drifts
# from transformers' bf16 greedy tokens (tests/engine/test_dtype.py).


def _attend(q, k_cache, v_cache, group: AttentionGroup, window: int | None, block_size: int, scale: float | None,
            softcap: float | None, scales: KVScales | None = None) -> torch.Tensor:
    batch, n_blocks = group.block_table.shape
    kv_heads, dim = k_cache.shape[-2:]
    rows = q[: group.rows.numel()].view(*group.rows.shape, *q.shape[1:]) if group.dense else q[group.rows]
    queries = rows.transpose(1, 2)  # [B, H, Q, D]
    # K stored centred: rope_p(c) added back per key position, in code units (kv_centre.py)
    centre = centre_read(scales, n_blocks * block_size, q.dtype) if scales is not None else None
    if scales is not None and softcap is None and queries.shape[2] == 1:
        out = _decode_8bit(queries[:, :, 0], k_cache, v_cache, group, window, block_size, scale, scales, centre)
        if out is not None:
            return out
    if scales is None and softcap is None and queries.shape[2] == 1 and k_cache.dtype == q.dtype:
        out = _decode_in_place(queries[:, :, 0], k_cache, v_cache, group, window, block_size, scale)
        if out is not None:
            return out[:, None]
    keys = _gather(k_cache, group.block_table, block_size, q.dtype, centre).view(batch, -1, kv_heads, dim)
    values = _gather(v_cache, group.block_table, block_size, q.dtype).view(batch, -1, kv_heads, dim)
    if scales is not None:  # K's scale folds into the queries (q.(k*s) = (q*s).k), V's into the output (kv_quant.py)
        queries = queries * head_scale(scales.k, q.shape[1]).to(q.dtype)[None, :, None, :]
    mask = group.mask(window, block_size)
    if softcap is not None:
        out = _capped_attention(queries, keys.transpose(1, 2), values.transpose(1, 2), mask, scale, softcap)
    elif queries.shape[2] == 1 and queries.shape[1] % kv_heads == 0 and queries.device.type == "cpu":
        # One query a sequence: the query heads that share a KV head become rows of one query block.
        b, heads = queries.shape[:2]
        rows = queries.reshape(b, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(rows, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                                             scale=scale).reshape(b, heads, 1, dim)
    else:
        out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=True, scale=scale)
    if scales is not None:
        out = out * head_scale(scales.v, q.shape[1]).to(q.dtype)[None, :, None, :]
    return out.transpose(1, 2)  # [B, Q, H, D]


def _decode_8bit(queries, k_cache, v_cache, group: AttentionGroup, window: int | None, block_size: int,
                 scale: float | None, scales: KVScales, centre) -> torch.Tensor | None:
    """One query a sequence over an 8-bit cache: our kernel reads the codes where they lie, in fp32, rather than
    gathering a widened bf16 copy of the whole context for SDPA to read back (at 2,048 tokens that copy moved more
    bytes than the 8-bit cache saved: benchmarks/kv_cache_dtype.py). [B, 1, H, D] in q's dtype, or None where the
    kernel does not apply."""
    heads, dim = queries.shape[1], queries.shape[2]
    q = queries * head_scale(scales.k, heads).to(queries.dtype)[None]  # K's scale folded in, rounded as the SDPA path
    out = cpu_kv8.decode_attention(q, k_cache, v_cache, group.block_table, block_size, group.first_pos,
                                   group.ctx_len, window, scale if scale is not None else dim ** -0.5, centre,
                                   round_bf16=queries.dtype == torch.bfloat16)
    if out is None:
        return None
    return out.to(queries.dtype)[:, None] * head_scale(scales.v, heads).to(queries.dtype)[None, None]


def _decode_in_place(queries, k_cache, v_cache, group: AttentionGroup, window: int | None, block_size: int,
                     scale: float | None) -> torch.Tensor | None:
    """One query a sequence over a bf16 or fp32 cache, read where it lies by the same kernel as an 8-bit cache's:
    one call instead of two block gathers, a mask and SDPA (batch-1 decode on the 1B shape: 3.7 of a 40 ms step
    went to attention; `benchmarks/cpu_step_paths.py` times both). Scores and sums in fp32; with a bf16 cache the
    softmax weights are rounded to bf16 where SDPA's bf16 kernel rounds them. queries [B, H, D] -> [B, H, D] in
    their dtype, or None where the kernel does not apply."""
    out = cpu_kv8.decode_attention(queries, k_cache, v_cache, group.block_table, block_size, group.first_pos,
                                   group.ctx_len, window, scale if scale is not None else queries.shape[-1] ** -0.5,
                                   round_bf16=queries.dtype == torch.bfloat16)
    if out is None:
        return None
    return out if queries.dtype == torch.float32 else out.to(queries.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, block_size: int, dtype: torch.dtype,
            centre: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The group's cache blocks in order, in `dtype`: [B * N * block_size, KV, D]; with `centre` (cos|sin rows,
    coefficients: kv_centre.centre_read), a centred K's rope_p(c) / scale added back at each key's position. An
    8-bit cache is gathered, widened and corrected in one pass by our AVX2 kernel where it is built (torch's
    float8 widening is scalar code: an FP8 cache's decode was 0.4x a bf16 one's), else gathered at its own
    width and widened and corrected by torch (the same values, bit for bit; with a centre within an ulp, the
    kernel fusing its multiply-adds)."""
    blocks = block_table.view(-1)
    if cache.dtype != dtype:
        widened = cpu_kv8.gather_widen(cache, blocks, block_size, dtype, centre, block_table.shape[1])
        if widened is not None:
            return widened
    # index_select: ~40% faster than advanced indexing here
    out = as_bytes(cache).view(-1, block_size, *cache.shape[1:]).index_select(0, blocks)
    out = out.view(cache.dtype).to(dtype) if cache.dtype != dtype else out
    if centre is None:
        return out
    rows, coef = centre
    positions, dim = block_table.shape[1] * block_size, cache.shape[-1]
    shift = coef[0] * rows[:positions, None, :dim] + coef[1] * rows[:positions, None, dim:]  # [P, KV, D] fp32
    widened = out.view(block_table.shape[0], positions, *cache.shape[1:]).float() + shift
    return widened.to(dtype).view(out.shape)


def _capped_attention(queries, keys, values, mask, scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with scores soft-capped to +-softcap by tanh before the mask (Gemma 2), which SDPA cannot
    do: op for op as transformers' eager attention computes it (scores in the activation dtype, softmax
    in fp32). queries [B, H, Q, D], keys/values [B, KV, N, D]."""
    group = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(queries, keys.transpose(2, 3)) * (scale if scale is not None else queries.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(queries.dtype)
    return torch.matmul(probs, values)


def paged_attention(q, k, v, kv_cache, meta: AttentionMetadata, window: int | None, scale: float | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KV, D]; kv_cache: (k_cache, v_cache), each [slots, KV, D], or a QuantKVCache
    (8-bit, with scales). `scale`: the softmax scale (default head_dim ** -0.5); `softcap`: scores capped by
    tanh (Gemma 2). Every query reads K/V back from the cache, its own step's included, so a quantized
    cache's rounding shows in prefill as in decode."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    scales = quant_scales(kv_cache)
    if scales is not None:
        store_quantized(k, v, k_cache, v_cache, meta.slot_mapping, scales)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))
    if len(meta.groups) == 1 and meta.groups[0].dense and meta.groups[0].rows.numel() == q.shape[0]:
        group = meta.groups[0]
        if scales is None and softcap is None and group.rows.shape[1] == 1 and k_cache.dtype == q.dtype:
            # every row a decode of its own sequence, in order: q [B, H, D] is the queries and the output's shape, so
            # none of _attend's regrouping (~30 us of Python a layer at batch 1, as long as the kernel)
            out = _decode_in_place(q, k_cache, v_cache, group, window, meta.block_size, scale)
            if out is not None:
                return out
        return _attend(q, k_cache, v_cache, group, window, meta.block_size, scale, softcap, scales).reshape(q.shape)
    out = torch.empty_like(q)
    for group in meta.groups:
        result = _attend(q, k_cache, v_cache, group, window, meta.block_size, scale, softcap, scales)
        out[group.rows[group.valid]] = result[group.valid]
    return out
