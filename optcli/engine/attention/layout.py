"""What one step attends, independent of the attention backend: the per-sequence StepLayout the
engine builds each step, and the block-table packing both backends use."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    """What one step computes, per scheduled sequence, independent of the attention backend."""

    slots: list[int]  # cache slot of every new token, in flat batch order
    rows: list[range]  # per sequence: its rows in the flat batch
    query_pos: list[list[int]]  # per sequence: positions of its new tokens
    ctx_lens: list[int]  # per sequence: tokens in the cache after this step
    block_tables: list[list[int]]
    block_size: int

    @property
    def is_decode(self) -> bool:
        return all(len(r) == 1 for r in self.rows)


def block_table_tensor(tables: list[list[int]], width: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Per-sequence block tables cut or zero-padded to `width` columns (padding is masked or unread).

    Rows are filled through a numpy view: a torch tensor per row was the largest host cost of a
    256-sequence decode step (1.9 ms on a 2-core VM; 0.2 ms this way)."""
    out = torch.zeros(len(tables), width, dtype=dtype)
    rows = out.numpy()
    for i, table in enumerate(tables):
        used = table[:width]
        rows[i, : len(used)] = used
    return out
