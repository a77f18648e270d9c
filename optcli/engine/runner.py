"""Runs one scheduled step on the model: flatten the batch, build attention metadata, forward, and
return the logits of the rows that need them (the last token of each sequence that reaches its end
this step, plus prompt rows when prompt logprobs were asked for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.attention.layout import StepLayout
from optcli.engine.scheduler import ScheduledBatch
from optcli.engine.sequence import Sequence


@dataclass
class StepOutput:
    sample_seqs: list[Sequence]  # sequences that get a new token this step
    sample_logits: torch.Tensor  # [len(sample_seqs), V] in the model's dtype (the sampler upcasts what it needs)
    prompt_logits: dict[str, tuple[int, torch.Tensor]]  # request id → (first position, logits rows)


class ModelRunner:
    def __init__(self, model, kv_caches, block_size: int, device: str, backend) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.backend = backend  # StepLayout → metadata with .attend(); see engine/attention*.py
        self.graphs = None  # a DecodeGraphs when CUDA graphs are on (decode-only steps)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        layout = StepLayout([], [], [], [], [], bs)
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: dict[str, tuple[int, list[int]]] = {}
        for seq, n in batch.items:
            start = seq.num_computed_tokens
            first_row = len(input_ids)
            table = seq.block_table
            if n == 1:  # a decode, the common case: no per-token loops
                pos = [start]
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                layout.slots.append(table[start // bs] * bs + start % bs)
            else:
                pos = list(range(start, start + n))
                input_ids.extend(seq.token_ids[start : start + n])
                positions.extend(pos)
                layout.slots.extend(table[p // bs] * bs + p % bs for p in pos)
            layout.rows.append(range(first_row, first_row + n))
            layout.query_pos.append(pos)
            layout.ctx_lens.append(start + n)
            layout.block_tables.append(table)
            if start + n == seq.num_tokens:
                sample_rows.append(first_row + n - 1)
                sample_seqs.append(seq)
            if seq.params.prompt_logprobs is not None:
                # Logits at position p score prompt token p + 1; positions already scored (before a
                # preemption) are not scored twice.
                lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    prompt_rows[seq.request_id] = (lo, list(range(first_row + lo - start, first_row + hi - start)))
        sampled = len(sample_rows)
        for seq in batch.pads:  # a static batch's finished member: its last position again, logits discarded
            last = seq.num_computed_tokens - 1
            sample_rows.append(len(input_ids))
            layout.rows.append(range(len(input_ids), len(input_ids) + 1))
            input_ids.append(seq.token_ids[last])
            positions.append(last)
            layout.slots.append(seq.block_table[last // bs] * bs + last % bs)
            layout.query_pos.append([last])
            layout.ctx_lens.append(last + 1)
            layout.block_tables.append(seq.block_table)
        dev = self.device
        if self.graphs is not None and layout.is_decode and not prompt_rows and self.graphs.fits(len(input_ids)):
            logits = self.graphs.run(input_ids, positions, layout)
            return StepOutput(sample_seqs, logits[:sampled], {})
        meta = self.backend(layout, dev)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=dev)])[:sampled]
        prompt_logits = {
            rid: (first, self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)]))
            for rid, (first, rows) in prompt_rows.items()
        }
        return StepOutput(sample_seqs, logits, prompt_logits)
