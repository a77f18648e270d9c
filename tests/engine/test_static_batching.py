"""Static ("dynamic") batching, the seed article's DynamicBatcher as a real scheduler mode: a batch closes
on size or on wait, runs to completion with no admission mid-batch, and decodes the same tokens as
continuous batching under greedy sampling."""

from __future__ import annotations

import pytest

from optcli.config import EngineConfig
from optcli.engine import Engine, SamplingParams
from optcli.engine.kv_cache import BlockManager
from optcli.engine.scheduler import Scheduler
from optcli.engine.sequence import Sequence
from optcli.errors import UsageError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(tokens: list[int], rid: str, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens))


def static(max_num_seqs: int, clock: Clock, wait_ms: float = 50.0) -> Scheduler:
    return Scheduler(BlockManager(64, 4), max_num_seqs, 256, "static", wait_ms, clock=clock)


def test_batch_closes_when_full_without_waiting() -> None:
    clock = Clock()
    sched = static(2, clock)
    for i in range(3):
        sched.add(seq([1, 2, 3], f"s{i}"))
    batch = sched.schedule()
    assert [s.request_id for s, _ in batch.items] == ["s0", "s1"]  # size reached: closed at once
    assert [s.request_id for s in sched.waiting] == ["s2"]


def test_batch_closes_after_max_wait_only() -> None:
    clock = Clock()
    sched = static(4, clock, wait_ms=50)
    sched.add(seq([1, 2, 3], "a"))
    assert sched.schedule().items == []  # one of four, and no time has passed: wait for more
    clock.now = 0.049
    sched.add(seq([4, 5, 6], "b"))
    assert sched.schedule().items == []
    assert abs(sched.batch_wait_s() - 0.001) < 1e-9  # the engine sleeps this long at most, not spins
    clock.now = 0.050  # the oldest has waited max_wait_ms: the batch closes with what is there
    assert [s.request_id for s, _ in sched.schedule().items] == ["a", "b"]


def test_no_admission_until_the_whole_batch_finished() -> None:
    clock = Clock()
    sched = static(2, clock, wait_ms=0)
    a, b = seq([1, 2, 3], "a"), seq([4, 5, 6], "b")
    sched.add(a)
    sched.add(b)
    for s, n in sched.schedule().items:
        s.num_computed_tokens += n
        s.token_ids.append(9)
    sched.finish(a, "length")  # one member done: its slot stays empty
    late = seq([7, 8], "late")
    sched.add(late)
    items = sched.schedule().items
    assert [s.request_id for s, _ in items] == ["b"]  # b decodes alone; late is not admitted mid-batch
    for s, n in items:
        s.num_computed_tokens += n
    sched.finish(b, "length")
    assert [s.request_id for s, _ in sched.schedule().items] == ["late"]  # next batch


def test_continuous_admits_mid_batch_for_contrast() -> None:
    sched = Scheduler(BlockManager(64, 4), 2, 256)
    a, b = seq([1, 2, 3], "a"), seq([4, 5, 6], "b")
    sched.add(a)
    sched.add(b)
    for s, n in sched.schedule().items:
        s.num_computed_tokens += n
        s.token_ids.append(9)
    sched.finish(a, "length")
    sched.add(seq([7, 8], "late"))
    assert sorted(s.request_id for s, _ in sched.schedule().items) == ["b", "late"]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(UsageError, match="scheduler-policy"):
        EngineConfig(scheduler_policy="dynamic")
    with pytest.raises(UsageError, match="max-wait-ms"):
        EngineConfig(max_wait_ms=-1)


@pytest.fixture(scope="module")
def engines(stories_dir):
    base = dict(device="cpu", dtype="float32", max_num_seqs=4, num_kv_blocks=128)
    return {policy: Engine(str(stories_dir), EngineConfig(**base, scheduler_policy=policy, max_wait_ms=1))
            for policy in ("continuous", "static")}


def test_static_output_equals_continuous_greedy(engines) -> None:
    prompts = [[1 + (i * 13 + j * 7) % 400 for j in range(3 + 5 * i)] for i in range(10)]
    params = [SamplingParams(max_tokens=4 + 3 * (i % 4), ignore_eos=True) for i in range(10)]
    cont = engines["continuous"].generate(prompts, params)
    stat = engines["static"].generate(prompts, params)
    assert [o.token_ids for o in stat] == [o.token_ids for o in cont]
    assert engines["static"].scheduler.num_static_batches >= 3  # 10 requests, batches of at most 4


def test_a_static_batch_computes_its_finished_members_as_padding(engines) -> None:
    """A padded batch: after a member finishes, every decode step still computes a row for it (its last
    position again), until the batch's longest member is done; then its blocks are free again."""
    eng = engines["static"]
    rows = []
    original = eng.runner.run

    def spy(batch):
        rows.append((len(batch.items), len(batch.pads)))
        return original(batch)

    eng.runner.run = spy
    free = eng.blocks.num_free_blocks
    pads_before = eng.scheduler.num_pad_rows
    try:
        lengths = (2, 3, 9)
        outs = eng.generate([[7, 8, 9 + i] for i in range(3)],
                            [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    finally:
        eng.runner.run = original
    assert [len(o.token_ids) for o in outs] == list(lengths)
    decodes = rows[1:]  # after the batch's prefill step
    assert all(items + pads == 3 for items, pads in decodes)  # every member or its pad, every step
    assert sum(p for _, p in decodes) == eng.scheduler.num_pad_rows - pads_before == (9 - 2) + (9 - 3)
    assert not eng.scheduler.padding and eng.blocks.num_free_blocks == free


def test_static_batches_run_to_completion_in_the_engine(engines) -> None:
    eng = engines["static"]
    for i in range(4):
        eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=2 + 6 * (i == 0), ignore_eos=True), f"first{i}")
    seen_together = set()
    admitted_late = False
    eng.step()  # closes the first batch (4 requests: full), prefills it
    eng.add_request([9, 9, 9], SamplingParams(max_tokens=2, ignore_eos=True), "late")
    while eng.has_unfinished():
        running = {s.request_id for s in eng.scheduler.running}
        seen_together |= running
        if "late" in running and any(r.startswith("first") for r in running):
            admitted_late = True
        eng.step()
    assert not admitted_late
    assert {"first0", "late"} <= seen_together


def test_without_chunked_prefill_a_prompt_is_never_cut(stories_dir) -> None:
    """enable_chunked_prefill=False (the optimizations table's "chunked prefill off" row): every prompt is
    prefilled in one step, whatever max_num_batched_tokens says, and greedy output is unchanged."""
    base = dict(device="cpu", dtype="float32", max_num_seqs=4, num_kv_blocks=128, max_num_batched_tokens=8)
    chunked = Engine(str(stories_dir), EngineConfig(**base))
    whole = Engine(str(stories_dir), EngineConfig(**base, enable_chunked_prefill=False))
    prompts = [[1 + (i * 11 + j * 5) % 400 for j in range(20 + 7 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    cut = []
    original = whole.runner.run

    def spy(batch):
        cut.extend(n for s, n in batch.items if s.num_computed_tokens == 0 and n < s.num_prompt_tokens)
        return original(batch)

    whole.runner.run = spy
    assert [o.token_ids for o in whole.generate(prompts, params)] == [o.token_ids for o in chunked.generate(prompts, params)]
    assert cut == [] and whole.scheduler.max_num_batched_tokens >= whole.max_model_len
