"""Host time of one decode step of the CUDA-graph path, with the graph replaced by a stub.

On a GPU a decode step is: schedule, build the step's inputs, copy them, replay the graph, sample,
bookkeeping. Everything but the replay runs on the host, and at batch 1 it is a visible part of the
step. This measures that host part alone, on any machine: the engine runs with Triton attention
metadata and CUDA-graph bucketing, but the captured "graph" returns fixed logits without computing,
and prefill steps are skipped (their sequences are marked computed). Greedy sampling, EOS ignored.

    python benchmarks/host_overhead.py                 # batch sizes 1, 64, 256
    python benchmarks/host_overhead.py --profile 256   # and a cProfile of 20 steps at batch 256
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton metadata path, without running kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def host_us_per_step(model_dir: str, batch: int, steps: int, profile: bool) -> float:
    from optcli.engine import Engine, SamplingParams
    from optcli.engine.cuda_graphs import DecodeGraphs
    from optcli.engine.runner import StepOutput

    max_len, block = 1024, 16
    eng = Engine(model_dir, device="cpu", dtype="float32", max_num_seqs=256, max_model_len=max_len,
                 attention_backend="triton", num_kv_blocks=256 * (max_len // block))
    vocab = eng.model.cfg.vocab_size
    logits = torch.zeros(256, vocab)
    eng.runner.graphs = DecodeGraphs(eng.model, eng.runner.kv_caches, 256, max_len // block, block, "cpu",
                                     lambda fn: (lambda: logits))
    decode = eng.runner.run

    def run(batch_):  # prefill chunks: no compute, just "done"
        if all(n == 1 for _, n in batch_.items):
            return decode(batch_)
        done = [s for s, n in batch_.items if s.num_computed_tokens + n == s.num_tokens]
        return StepOutput(done, torch.zeros(len(done), vocab), {})

    eng.runner.run = run
    params = SamplingParams(max_tokens=steps + 40, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request([5 + i % 900] * 100, params)
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in eng.requests.values()):
        eng.step()
    for _ in range(5):
        eng.step()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    elapsed = (time.perf_counter() - start) / steps
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            eng.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return elapsed * 1e6


def main() -> int:
    from bench_model import TINY_PLAN, build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a test of this script: batches 1 and 4, 5 steps")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", type=int, default=None, help="cProfile 20 steps at this batch size")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.steps = "1,4", 5
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), TINY_PLAN, "cpu", seed=0)
        print(f"host time per decode step (graph stubbed), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        for batch in (int(b) for b in args.batches.split(",")):
            us = host_us_per_step(tmp, batch, args.steps, args.profile == batch)
            print(f"batch {batch:>4}: {us:8.0f} us/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
