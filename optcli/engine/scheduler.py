"""Which sequences run this step, and how many tokens each: continuous batching, or static batching.

Continuous (the default, iteration-level): each step first gives every running sequence its next
token (a decode) or its next prefill chunk, oldest first, then admits waiting sequences while the
token budget (`max_num_batched_tokens`) and `max_num_seqs` allow. A long prompt is cut into chunks, so
it never stalls running decodes. When the cache runs out of blocks, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later (its
full blocks stay in the prefix cache, so the recompute is often cheap).

Static (`scheduler_policy="static"`, the request-level "dynamic batching" of TF Serving / Triton and
of the seed article's DynamicBatcher): a batch of up to `max_num_seqs` requests is closed when that
many are waiting or when the oldest has waited `max_wait_ms`; it then runs to completion and nothing
is admitted until its last member finishes. A finished member stays in the batch as padding until then,
as in a padded batch tensor: each decode step recomputes its last position (a pad row: same token, same
position and context, so the K/V it writes are those values again) and its logits are discarded, so static
batching pays for its empty slots as a padded batch does. (Prompts are not padded to the batch's longest:
a prefill costs what its own tokens cost.) Pads hold their blocks; when a member needs blocks that are
not free, the pads give theirs up first. A member preempted for want of blocks rejoins the queue for a
later batch; an aborted member leaves at once.

`enable_chunked_prefill=False`: a prompt is admitted only when all of it fits this step's budget
(never cut across steps), the budget being at least the longest prompt the engine accepts.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from optcli.engine.kv_cache import BlockManager
from optcli.engine.sequence import Sequence, Status

POLICIES = ("continuous", "static")


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)
    num_preempted: int = 0
    pads: list[Sequence] = field(default_factory=list)  # finished static members, recomputed as padding

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "continuous", max_wait_ms: float = 50.0, chunked_prefill: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {', '.join(POLICIES)} (got '{policy}')")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy, self.max_wait_s, self.chunked_prefill, self.clock = policy, max_wait_ms / 1e3, chunked_prefill, clock
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0
        self.num_static_batches = 0  # static batches closed so far (tests, stats)
        self.padding: list[Sequence] = []  # the running static batch's finished members (pad rows)
        self.num_pad_rows = 0  # pad rows computed so far (stats)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        if seq.queued_at is None:
            seq.queued_at = self.clock()
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.policy == "static" and not self.running:
            self._close_static_batch()
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_allocate(seq, n) and self.padding:
                self.blocks.free(self.padding.pop())  # a pad's blocks before a member's progress
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]  # newest first: the oldest keep their progress
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            if not self.chunked_prefill and n < seq.num_tokens - seq.num_computed_tokens and items:
                break  # a static member's whole prompt next step, not a chunk now
            self.blocks.allocate(seq, n)
            items.append((seq, n))
            budget -= n
            i += 1
        # Admit new work only when nothing had to give way this step (no thrashing); a static batch admits
        # nothing until it is done.
        while (self.policy == "continuous" and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and not preempted):
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.chunked_prefill and n < seq.num_tokens - seq.num_computed_tokens and items:
                self.blocks.free(seq)  # the whole prompt next step, not a chunk now
                break
            if not self.blocks.can_allocate(seq, n):
                if not self.running:  # nothing will ever free up: the cache is too small for it
                    self._too_big(seq)
                self.blocks.free(seq)
                break
            self.waiting.pop(0)
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.insert(bisect.bisect([s.arrival for s in self.running], seq.arrival), seq)
            items.append((seq, n))
            budget -= n
        self.num_preemptions += preempted
        pads = list(self.padding) if items and all(n == 1 for _, n in items) else []  # decode steps only
        self.num_pad_rows += len(pads)
        return ScheduledBatch(items, preempted, pads)

    def batch_wait_s(self) -> float:
        """Static: seconds until the waiting requests' batch closes on its wait (0 when it is not waiting for
        that: continuous, a batch running, nothing queued, or a full batch). Lets the engine sleep instead of
        spinning, so a server's other threads get the time to queue the batch's last members."""
        if self.policy != "static" or self.running or not self.waiting or len(self.waiting) >= self.max_num_seqs:
            return 0.0
        return max(0.0, self.waiting[0].queued_at + self.max_wait_s - self.clock())

    def _close_static_batch(self) -> None:
        """Close a batch when `max_num_seqs` are waiting or the oldest has waited `max_wait_ms`; its members
        go to `running` together (their tokens are scheduled by the running loop, within the budget)."""
        if not self.waiting:
            return
        full = len(self.waiting) >= self.max_num_seqs
        if not full and self.clock() - self.waiting[0].queued_at < self.max_wait_s:
            return
        members = self.waiting[: self.max_num_seqs]
        first = members[0]
        if not first.block_table:
            self.blocks.match_prefix(first)
        if not self.blocks.can_allocate(first, first.num_tokens - first.num_computed_tokens):
            self._too_big(first)  # nothing runs, so the oldest alone cannot fit: no batch ever will
        del self.waiting[: len(members)]
        for seq in members:
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            seq.status = Status.RUNNING
        self.running = members
        self.num_static_batches += 1

    def _too_big(self, seq: Sequence) -> None:
        raise RuntimeError(
            f"request {seq.request_id} needs more KV-cache blocks than exist "
            f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens)"
        )

    def _release_padding(self) -> None:
        for done in self.padding:
            self.blocks.free(done)
        self.padding.clear()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        if not self.running:  # the static batch is over (its last member waits for a later one)
            self._release_padding()
        seq.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is and release its blocks; a static batch's
        finished member stays as padding (its blocks kept) until the batch's last member finishes."""
        pad = self.policy == "static" and reason != "abort" and seq in self.running and len(self.running) > 1
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.padding:
            self.padding.remove(seq)
        if pad:
            self.padding.append(seq)
        else:
            self.blocks.free(seq)
        if not self.running:  # the batch is done: its padding goes
            self._release_padding()
        seq.status = Status.FINISHED
        seq.finish_reason = reason
