"""Rotary position embedding tables (cos, sin) for the positions of a step, from transformers' own RoPE
parameter functions, so every rope type it supports (default, linear, llama3, yarn, dynamic NTK, longrope, ...)
gives its values. Applying them is a layer op (`layer_ops.py`, through `attention/rope.py`). Gemma 3 gives each layer type its own
parameters (local layers a smaller theta): `LayerRotary` holds one table set per kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from optcli.engine.models.config import ModelConfig


class LayerRotary(nn.Module):
    """The RoPE tables of every layer kind: one RotaryEmbedding, keyed None, unless the config gives each
    layer type its own parameters (`cfg.rope_kinds`). Called with a step's positions, cos/sin per kind."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kinds = sorted(set(cfg.rope_kinds)) if cfg.rope_kinds else [None]
        self.kinds = kinds
        self.tables = nn.ModuleList(RotaryEmbedding(cfg, kind) for kind in kinds)

    @property
    def rope_type(self) -> str:
        """"dynamic" if any kind's table depends on the batch (the engine then reads sizes on the host)."""
        types = {t.rope_type for t in self.tables}
        return "dynamic" if "dynamic" in types else types.pop()

    def build_table(self, max_len: int, dtype: torch.dtype) -> None:
        for table in self.tables:
            table.build_table(max_len, dtype)

    def forward(self, positions: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: table(positions) for kind, table in zip(self.kinds, self.tables, strict=True)}


class RotaryEmbedding(nn.Module):
    """cos/sin for the given positions, from transformers' own RoPE parameter functions; `kind` names
    the layer type whose parameters to use where the config has one set per type."""

    def __init__(self, cfg: ModelConfig, kind: str | None = None) -> None:
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.hf_config = cfg.hf_config
        params = getattr(cfg.hf_config, "rope_parameters", None) or {}
        if kind is not None:
            params = params[kind]
        self.extra = extra = {"layer_type": kind} if kind is not None else {}  # for transformers' functions
        self.rope_type = params.get("rope_type", "default")
        if self.rope_type == "default":
            base = params.get("rope_theta", getattr(cfg.hf_config, "rope_theta", 10000.0))
            dim = cfg.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](cfg.hf_config, None, **extra)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = scaling
        self.original_max = params.get("original_max_position_embeddings", cfg.max_position_embeddings)
        long_inv_freq = None  # Phi-3's longrope: the long factors, past the pretraining length
        if self.rope_type == "longrope":
            long_inv_freq = ROPE_INIT_FUNCTIONS["longrope"](cfg.hf_config, None, seq_len=self.original_max + 1,
                                                            **extra)[0].float()
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.table: torch.Tensor | None = None  # [max_len, 2 * head_dim]: cos | sin, see build_table

    def build_table(self, max_len: int, dtype: torch.dtype) -> None:
        """Precompute cos|sin for positions < max_len (the same ops, so the same values), so a step
        gathers its rows in one op instead of ~9. Not for dynamic NTK, whose table depends on the batch."""
        if self.rope_type != "dynamic":
            cos, sin = self.forward(torch.arange(max_len, device=self.inv_freq.device))
            self.table = torch.cat([cos, sin], dim=-1).to(dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None:
            rows = self.table[positions]
            half = rows.shape[-1] // 2
            return rows[:, :half], rows[:, half:]
        inv_freq, scaling = self.inv_freq, self.scaling
        if self.rope_type == "dynamic":  # NTK scaling grows with the longest sequence, as in transformers
            seq_len = int(positions.max()) + 1
            if seq_len > self.original_max:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](self.hf_config, positions.device, seq_len=seq_len,
                                                                **self.extra)
                inv_freq = inv_freq.float().to(positions.device)
        inv_freq = inv_freq[None, :]
        if self.long_inv_freq is not None:
            # Per token: a position past the pretraining length takes the long factors. transformers switches
            # a whole forward pass by its longest sequence, so the two agree for every token generated after
            # a prompt that fits in original_max_position_embeddings, and on the prompt's tokens before it.
            inv_freq = torch.where(positions[:, None] >= self.original_max, self.long_inv_freq[None, :], inv_freq)
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling
