"""Runs one scheduled step on the model: flatten the batch, build attention metadata, forward, and
return the logits of the rows that need them (the last token of each sequence that reaches its end
this step, plus prompt rows when prompt logprobs were asked for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.attention import AttentionMetadata, build_group, split_by_length
from optcli.engine.scheduler import ScheduledBatch
from optcli.engine.sequence import Sequence


@dataclass
class StepOutput:
    sample_seqs: list[Sequence]  # sequences that get a new token this step
    sample_logits: torch.Tensor  # [len(sample_seqs), V]
    prompt_logits: dict[str, tuple[int, torch.Tensor]]  # request id → (first position, logits rows)


class ModelRunner:
    def __init__(self, model, kv_caches, block_size: int, device: str) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        groups = {"decode": ([], [], [], []), "prefill": ([], [], [], [])}
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: dict[str, tuple[int, list[int]]] = {}
        for seq, n in batch.items:
            start = seq.num_computed_tokens
            first_row = len(input_ids)
            pos = list(range(start, start + n))
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(pos)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            rows, qpos, ctx, tables = groups["decode" if n == 1 else "prefill"]
            rows.append(range(first_row, first_row + n))
            qpos.append(pos)
            ctx.append(start + n)
            tables.append(table)
            if start + n == seq.num_tokens:
                sample_rows.append(first_row + n - 1)
                sample_seqs.append(seq)
            if seq.params.prompt_logprobs is not None:
                # Logits at position p score prompt token p + 1; positions already scored (before a
                # preemption) are not scored twice.
                lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    prompt_rows[seq.request_id] = (lo, list(range(first_row + lo - start, first_row + hi - start)))
        dev = self.device
        attention_groups = []
        decode = groups["decode"]
        if decode[0]:
            for part in split_by_length(decode[2]):
                attention_groups.append(build_group(*([field[i] for i in part] for field in decode), bs, dev))
        if groups["prefill"][0]:
            attention_groups.append(build_group(*groups["prefill"], bs, dev))
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=dev), attention_groups, bs)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=dev)])
        prompt_logits = {
            rid: (first, self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)]))
            for rid, (first, rows) in prompt_rows.items()
        }
        return StepOutput(sample_seqs, logits.float(), prompt_logits)
