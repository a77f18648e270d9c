"""How many threads should a model of this width compute with? 1 against all usable cores, by hidden size.

The measurement behind `engine/kernels/cpu_threads.py`'s width rule. A CPU engine step is a chain of
small parallel regions (one per GEMM, norm, RoPE, attention call); every region ends at a barrier. On a
narrow model a region's work is a few microseconds, about what the fork and the barrier cost, so a second
thread only adds waiting; on a wide one the GEMMs are long enough to split. This script finds where the
crossover lies on the machine it runs on.

For each hidden size in `--hidden` it builds a seeded random Llama (intermediate = 3 x hidden rounded to
128, hidden/64 heads, 4 KV heads... see `shape()`; `--layers` layers; vocab 32000, untied head) in a temp
directory, loads it in our engine (dtype auto), warms it up, and times two workloads in `--repeats`
interleaved repeats of 1 thread against the usable cores (`OPTCLI_CPU_THREADS`, so the governor does not
move): batch-1 decode (one 32-token prompt, 64 new tokens) and offline (16 requests, 32-token prompts,
32 new tokens each). Prints tok/s per thread count (median) and the ratio many/1 per workload with its
95% interval (paired repeats, t-interval on the log ratios), and the contention seen during the run.

    python benchmarks/thread_rule.py                          # hidden 256,512,768,1024,2048; 3 repeats
    python benchmarks/thread_rule.py --hidden 256,1024 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from optcli.bench.stats import ratio_interval  # noqa: E402
from optcli.report.markdown import fmt_interval  # noqa: E402

VOCAB = 32000


def shape(hidden: int, layers: int) -> dict:
    inter = max(128, round(3 * hidden / 128) * 128)
    heads = max(1, hidden // 64)
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=min(4, heads), head_dim=hidden // heads,
                vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False)


def build(out: Path, hidden: int, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from optcli.checkpoints.resolve import resolve_model

    tok_dir = resolve_model("builtin:tiny-llama").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, **shape(hidden, layers))).eval()
    model.save_pretrained(out, safe_serialization=True)


def pin(engine, threads: int) -> None:
    from optcli.engine.kernels.cpu_threads import ThreadGovernor

    os.environ["OPTCLI_CPU_THREADS"] = str(threads)
    engine.threads = ThreadGovernor()
    del os.environ["OPTCLI_CPU_THREADS"]


def rate(engine, prompts: list[list[int]], new: int) -> float:
    from optcli.engine import SamplingParams

    start = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def measure(hidden: int, args, cores: int) -> dict:
    from optcli.engine import Engine

    with tempfile.TemporaryDirectory(prefix="optcli-threads-") as tmp:
        build(Path(tmp), hidden, args.layers, args.seed)
        engine = Engine(tmp, device="cpu", enable_prefix_caching=False, max_model_len=512)
        g = torch.Generator().manual_seed(args.seed)
        workloads = {"decode b1": ([torch.randint(3, 1000, (32,), generator=g).tolist()], args.new),
                     "offline 16": ([torch.randint(3, 1000, (32,), generator=g).tolist() for _ in range(16)], 32)}
        counts = sorted({1, cores})
        for threads in counts:  # warm-up: packing, first calls, each thread count's pool
            pin(engine, threads)
            for prompts, new in workloads.values():
                rate(engine, prompts, min(new, 8))
        runs = {w: {t: [] for t in counts} for w in workloads}
        for _ in range(args.repeats):
            for name, (prompts, new) in workloads.items():
                for threads in counts:
                    pin(engine, threads)
                    runs[name][threads].append(rate(engine, prompts, new))
        del engine
    out = {"hidden": hidden, "shape": shape(hidden, args.layers), "workloads": {}}
    for name, by in runs.items():
        row = {f"tok_s_{t}": statistics.median(v) for t, v in by.items()}
        if cores > 1:
            iv = ratio_interval(by[cores], by[1])  # the paired interval profile's ratios use
            row.update(ratio=iv.median, ci_low=iv.low, ci_high=iv.high)
        out["workloads"][name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from optcli.engine.kernels.cpu_threads import CpuShare, usable_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,512,768,1024,2048", help="hidden sizes to measure")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="new tokens of the batch-1 decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="a test of this script: hidden 128, 1 layer, 2 repeats")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.new, args.repeats = "128", 1, 4, 2
    cores = usable_cores()
    share = CpuShare()
    results = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        res = measure(hidden, args, cores)
        results.append(res)
        for name, row in res["workloads"].items():
            many = f"{row.get(f'tok_s_{cores}', 0):,.0f}"
            ratio = fmt_interval({k: row[k] for k in ("ratio", "ci_low", "ci_high")}) if "ratio" in row else "n/a"
            print(f"hidden {hidden:5d}  {name:10s}  1 thread {row['tok_s_1']:9,.0f} tok/s  {cores} threads "
                  f"{many:>9s} tok/s  {cores}/1 = {ratio}", flush=True)
    seen = share.sample()
    others = None if seen is None else round(seen["others_cores"], 2)
    print(f"other processes used {others} cores on average during the run ({cores} usable)")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "others_cores": others, "results": results}, indent=1))
    print("DONE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
