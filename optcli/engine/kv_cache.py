"""Paged KV-cache block manager: free list, reference counts, prefix caching, LRU eviction.

Blocks hold `block_size` tokens. A block that a sequence has filled and computed gets a hash of
(hash of the previous block, its token ids): the same prefix yields the same chain, so a new
request reuses cached blocks instead of recomputing them. A block no running sequence holds but
whose hash is cached stays reusable until memory is needed, then the least recently used goes.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from optcli.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # never hashed, or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; LRU first
        self.cached: dict[int, int] = {}  # hash → block id
        self.prefix_hits = 0  # tokens served from the prefix cache
        self.prefix_queries = 0

    # --- accounting -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (free now, or evictable)."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # --- prefix cache ---------------------------------------------------------------------------
    @staticmethod
    def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
        return hash((previous, tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix of a new sequence; returns tokens reused.

        At least the last token is always left to compute, because its logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        bs = self.block_size
        previous = None
        usable = (seq.num_tokens - 1) // bs  # full blocks that end before the last token
        self.prefix_queries += seq.num_tokens
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(previous, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            previous = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence holds (as vLLM's `reset_prefix_cache`), so the next request
        finds nothing cached: a benchmark's repeats then each start cold. Returns the blocks freed."""
        freed = list(self.evictable)
        for block in freed:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.block_tokens[block] = None
            self.free_blocks.append(block)
        self.evictable.clear()
        return len(freed)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that `seq` has completely filled and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            h = self.chain_hash(previous, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = tokens

    # --- allocation -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError("KV cache exhausted: the scheduler should have checked can_allocate")
        for _ in range(needed):
            seq.block_table.append(self._fresh_block())

    def free(self, seq: Sequence) -> None:
        """Release a finished, aborted or preempted sequence's blocks (cached ones stay reusable)."""
        for block in reversed(seq.block_table):  # tail first: it is evicted before the shared head
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                    self.evictable.move_to_end(block)
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _fresh_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # evict the least recently used cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.block_tokens[block] = None
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    # --- invariants (tests) ---------------------------------------------------------------------
    def check_no_leaks(self) -> None:
        """With no live sequences: every block is free or an unreferenced prefix-cache entry."""
        held = [b for b, r in enumerate(self.ref_counts) if r != 0]
        assert not held, f"blocks still referenced: {held[:10]}"
        assert len(self.free_blocks) + len(self.evictable) == self.num_blocks, "a block is neither free nor cached"
        assert set(self.cached.values()) == set(self.evictable), "prefix cache and evictable set disagree"
