"""CUDA graphs for decode steps: one graph per batch-size bucket (1, 2, 4, 8, ... max_num_seqs).

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
overhead, which dominates at small batch sizes. Graphs read fixed buffers, so each step copies its
inputs into them, pads to the bucket (slot -1, context length 0: padded rows touch no cache and
produce ignored logits) and replays. Prefill and prompt-logprob steps run eagerly.

`capture` is injectable: tests pass an eager stand-in to check the bucketing and padding on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optcli.engine.attention import StepLayout, block_table_tensor
from optcli.engine.attention_triton import TritonMetadata

Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_seqs]


def cuda_capture(pool=None) -> Capture:
    """Capture `fn` in a CUDA graph after warming it up on a side stream; return its replay."""

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
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
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
        width = self.block_tables.shape[1]
        self.input_ids[:n] = torch.tensor(input_ids)
        self.positions[:n] = torch.tensor(positions)
        self.slot_mapping[:n] = torch.tensor(layout.slots)
        self.slot_mapping[n:size] = -1
        self.context_lens[:n] = torch.tensor(layout.ctx_lens, dtype=torch.int32)
        self.context_lens[n:size] = 0
        self.block_tables[:n] = block_table_tensor(layout.block_tables, width, torch.int32)
        return self.replays[size]()[:n]
