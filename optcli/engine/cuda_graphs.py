"""CUDA graphs for decode steps: one graph per batch-size bucket (1, 2, 4, 8, ... max_num_seqs).

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
overhead, which dominates at small batch sizes. Graphs read fixed buffers, so each step writes its
inputs into them, pads to the bucket (slot -1, context length 0: padded rows touch no cache and
produce ignored logits) and replays. All inputs (token ids, positions, slots, context lengths, block
tables) are int32 views of one device buffer, filled from one pinned host buffer by one asynchronous
copy instead of five synchronous pageable ones.
Prefill and prompt-logprob steps run eagerly.

`capture` is injectable: tests pass an eager stand-in to check the bucketing and padding on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optcli.engine.attention.layout import StepLayout, block_table_tensor
from optcli.engine.attention.triton import TritonMetadata

Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_seqs]


def cuda_capture(pool=None) -> Capture:
    """Capture `fn` in a CUDA graph after warming it up on a side stream; return its replay.
    Every graph captured through one `cuda_capture()` shares one memory pool: buckets are captured
    largest first and replayed one at a time, so each graph's temporaries reuse the same memory."""
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay

    return capture


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks: int, block_size: int, device, capture: Capture):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = batch_buckets(max_num_seqs)
        n = self.buckets[-1]
        self.width = max_blocks
        sizes = [n, n, n, n, n * max_blocks]  # ids, positions, slots, context lengths, block tables
        self.host = torch.zeros(sum(sizes), dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        self.inputs = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
        ids, pos, slots, ctx, tables = self.inputs.split(sizes)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = ids, pos, slots, ctx
        self.block_tables = tables.view(n, max_blocks)
        self.host_parts = self.host.split(sizes)
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}
        with torch.inference_mode():
            for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
                self.replays[size] = capture(self._step_fn(size))

    def _step_fn(self, size: int) -> Callable[[], torch.Tensor]:
        meta = TritonMetadata(
            self.slot_mapping[:size], self.block_tables[:size], self.context_lens[:size], None, self.block_size
        )

        def step() -> torch.Tensor:
            hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
            return self.model.compute_logits(hidden)

        return step

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def run(self, input_ids: list[int], positions: list[int], layout: StepLayout) -> torch.Tensor:
        """Logits [n, V] of a decode step (one token per sequence), through the bucket's graph."""
        n = len(input_ids)
        size = self.bucket(n)
        ids, pos, slots, ctx, tables = self.host_parts
        ids[:n] = torch.tensor(input_ids, dtype=torch.int32)
        pos[:n] = torch.tensor(positions, dtype=torch.int32)
        slots[:n] = torch.tensor(layout.slots, dtype=torch.int32)
        slots[n:size] = -1
        ctx[:n] = torch.tensor(layout.ctx_lens, dtype=torch.int32)
        ctx[n:size] = 0
        tables[: n * self.width] = block_table_tensor(layout.block_tables, self.width, torch.int32).view(-1)
        # Safe to reuse the pinned buffer next step: the step's sampled tokens are read back (a sync)
        # after this copy, on the same stream, before the next run() writes it again.
        self.inputs.copy_(self.host, non_blocking=True)
        return self.replays[size]()[:n]
