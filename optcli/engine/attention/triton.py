"""Attention through the Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1, for tests).

Decode steps use the split-K paged decode kernel, any step with a multi-token chunk uses the ragged
prefill kernel. All tensors have fixed shapes given the batch size and the block-table width, so a
decode step can be captured in a CUDA graph (see cuda_graphs.py): padded rows have slot -1 (their
K/V are not stored) and context length 0 (their output is zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.attention.kv_quant import ensure_scales, quant_scales
from optcli.engine.attention.layout import StepLayout, block_table_tensor
from optcli.engine.kernels import paged_decode_attention, paged_prefill_attention, store_kv


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] int64 (int32 in CUDA-graph buffers); -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32; 0 = padding
    query_start_loc: torch.Tensor | None  # [B+1] int32; None for decode (one query row per sequence)
    block_size: int

    def attend(self, q, k, v, kv_cache, window: int | None, scale: float | None = None,
               softcap: float | None = None) -> torch.Tensor:
        scales = quant_scales(kv_cache)
        if scales is not None:  # decided on the device, so a captured decode graph sets them on first replay too
            ensure_scales(scales, k, v, kv_cache[0].dtype, live=self.slot_mapping >= 0, on_device=True)
            store_kv(k, v, kv_cache[0], kv_cache[1], self.slot_mapping, scales.k, scales.v)
        else:
            store_kv(k, v, kv_cache[0], kv_cache[1], self.slot_mapping)
        return self.attend_cached(q, kv_cache, window, scale, softcap)

    def attend_cached(self, q, kv_cache, window: int | None, scale: float | None = None,
                      softcap: float | None = None) -> torch.Tensor:
        """Attention of q over the cache, this step's K/V already stored (e.g. by the fused RoPE kernel).
        `scale` defaults to head_dim ** -0.5; `softcap` caps scores at +-softcap by tanh (Gemma 2)."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        scales = quant_scales(kv_cache)
        kv_scales = (scales.k, scales.v) if scales is not None else None
        kv_centre = (scales.centre, scales.rope.table) if scales is not None and scales.rope is not None else None
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        if self.query_start_loc is None:
            return paged_decode_attention(
                q, k_cache, v_cache, self.block_tables, self.context_lens, self.block_size, scale, sliding_window=window,
                softcap=softcap, kv_scales=kv_scales, kv_centre=kv_centre,
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, self.block_tables, self.query_start_loc, self.context_lens, self.block_size, scale,
            sliding_window=window, softcap=softcap, kv_scales=kv_scales, kv_centre=kv_centre,
        )


def build_triton_metadata(layout: StepLayout, device) -> TritonMetadata:
    bs = layout.block_size
    width = max(-(-c // bs) for c in layout.ctx_lens)
    query_start_loc = None
    if not layout.is_decode:
        starts = [0]
        for rows in layout.rows:
            starts.append(starts[-1] + len(rows))
        query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    return TritonMetadata(
        slot_mapping=torch.tensor(layout.slots, dtype=torch.long, device=device),
        block_tables=block_table_tensor(layout.block_tables, width, torch.int32).to(device),
        context_lens=torch.tensor(layout.ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc,
        block_size=bs,
    )
