"""Iteration-level continuous batching: which sequences run this step, and how many tokens each.

Each step first gives every running sequence its next token (a decode) or its next prefill chunk,
oldest first, then admits waiting sequences while the token budget (`max_num_batched_tokens`) and
`max_num_seqs` allow. A long prompt is cut into chunks, so it never stalls running decodes. When
the cache runs out of blocks, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later (its full blocks stay in the prefix
cache, so the recompute is often cheap).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from optcli.engine.kv_cache import BlockManager
from optcli.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]  # newest first: the oldest keep their progress
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            self.blocks.allocate(seq, n)
            items.append((seq, n))
            budget -= n
            i += 1
        # Admit new work only when nothing had to give way this step (no thrashing).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_allocate(seq, n):
                if not self.running:  # nothing will ever free up: the cache is too small for it
                    raise RuntimeError(
                        f"request {seq.request_id} needs more KV-cache blocks than exist "
                        f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens)"
                    )
                self.blocks.free(seq)
                break
            self.waiting.pop(0)
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.insert(bisect.bisect([s.arrival for s in self.running], seq.arrival), seq)
            items.append((seq, n))
            budget -= n
        self.num_preemptions += preempted
        return ScheduledBatch(items, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
