"""Block manager and scheduler units: prefix reuse, LRU eviction, preemption order, grouping."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from optcli.engine.attention.cpu import split_by_length
from optcli.engine.kv_cache import BlockManager
from optcli.engine.sampling_params import SamplingParams
from optcli.engine.scheduler import Scheduler
from optcli.engine.sequence import Sequence


def seq(ids: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, ids, SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    bm.allocate(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit_full_blocks(s)


def test_prefix_blocks_are_shared_and_last_token_is_recomputed() -> None:
    bm = BlockManager(16, 4)
    a = seq(list(range(10)), "a")
    assert bm.match_prefix(a) == 0
    run_prefill(bm, a)  # blocks: [0-3] [4-7] [8, 9]
    b = seq(list(range(8)) + [99, 98], "b")
    assert bm.match_prefix(b) == 8 and b.block_table == a.block_table[:2]
    exact = seq(list(range(8)), "c")  # whole prompt cached: the last block is still recomputed
    assert bm.match_prefix(exact) == 4
    for s in (a, b, exact):
        bm.free(s)
    bm.check_no_leaks()
    assert len(bm.cached) == 2


def test_lru_evicts_least_recently_released_cached_block_first() -> None:
    bm = BlockManager(4, 2)
    old, new = seq([1, 2, 3], "old"), seq([5, 6, 7], "new")
    for s in (old, new):
        run_prefill(bm, s)
    bm.free(old)
    bm.free(new)
    assert len(bm.evictable) == 2 and bm.num_free_blocks == 4
    hog = seq(list(range(100, 105)), "hog")  # needs 3 blocks: 2 free + the LRU cached one
    bm.allocate(hog, 5)
    assert bm.match_prefix(seq([1, 2, 9], "x")) == 0  # old's block was evicted
    again = seq([5, 6, 9], "y")
    assert bm.match_prefix(again) == 2  # new's survived
    bm.free(again)
    bm.free(hog)
    bm.check_no_leaks()


def test_reset_prefix_cache_forgets_released_blocks_and_keeps_held_ones() -> None:
    """A benchmark's repeats start cold: nothing released is found again; a running sequence keeps its blocks."""
    bm = BlockManager(8, 4)
    done, running = seq(list(range(9)), "done"), seq(list(range(50, 59)), "running")
    for s in (done, running):
        run_prefill(bm, s)
    bm.free(done)
    held = list(running.block_table)
    assert bm.reset_prefix_cache() == 2  # done's two full blocks
    assert bm.match_prefix(seq(list(range(9)), "again")) == 0 and not bm.evictable
    assert bm.match_prefix(seq(list(range(50, 59)), "share")) == 8  # the running one's stay cached and shared
    assert running.block_table == held
    assert bm.num_free_blocks == 8 - len(held)


def test_scheduler_preempts_newest_and_readmits_in_arrival_order() -> None:
    bm = BlockManager(6, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [seq([1, 2, 3], f"s{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()  # 3 x 2 blocks: the cache is full
    assert [s.request_id for s, _ in batch.items] == ["s0", "s1", "s2"]
    for s, n in batch.items:
        s.num_computed_tokens += n
        s.token_ids.append(7)  # each grows to 4 tokens: fits its 2 blocks
        s.token_ids.append(8)  # 5 tokens: needs a third block
    batch = sched.schedule()
    assert batch.num_preempted >= 1
    assert [s.request_id for s in sched.waiting][0] == "s2"  # the newest gave way
    assert "s0" in [s.request_id for s, _ in batch.items]


@settings(deadline=None, max_examples=60)
@given(st.lists(st.integers(1, 500), min_size=1, max_size=64))
def test_length_groups_partition_and_do_not_pad_more_than_one_group(lens: list[int]) -> None:
    groups = split_by_length(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert 1 <= len(groups) <= 3
    padded = sum(len(g) * max(lens[i] for i in g) for g in groups)
    assert sum(lens) <= padded <= len(lens) * max(lens)


def test_random_alloc_free_never_leaks() -> None:
    rng = random.Random(0)
    bm = BlockManager(64, 4)
    live = []
    for step in range(400):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        s = seq([rng.randrange(5) for _ in range(rng.randrange(1, 20))], f"q{step}")
        bm.match_prefix(s)
        if bm.can_allocate(s, s.num_tokens - s.num_computed_tokens):
            run_prefill(bm, s)
            live.append(s)
        else:
            bm.free(s)
    for s in live:
        bm.free(s)
    bm.check_no_leaks()
