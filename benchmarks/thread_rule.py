"""How many threads should a model this size compute with? 1 against all usable cores, by matmul size.

One of the measurements behind `engine/kernels/cpu_threads.py`'s thread rule (SPLIT_MIN_ELEMENTS says what
it found and why the rule keeps toy models on one thread anyway). A CPU engine step is a chain of parallel
regions (one per matmul, and torch's ops above its grain size); every region ends at a barrier, so on a
small model a second thread buys less. The rule's input is the mean weight elements (n x k) of the model's
CPU-planned matmuls, the LM head included (`engine/quant/cpu_choice.mean_matmul_size`), so a large
vocabulary counts too. Run it quiet: beside any other busy process two pinned threads collapse (the
engine's governor would drop to one).

For each shape in `--shapes` (HIDDENxVOCAB) it builds a seeded random Llama (intermediate = 3 x hidden
rounded to 128, hidden/64 heads, up to 4 KV heads: `shape()`; `--layers` layers; untied head) in a temp
directory, loads it in our engine (dtype auto), warms it up, and times two workloads in `--repeats`
interleaved repeats of 1 thread against the usable cores (`OPTCLI_CPU_THREADS`, so the governor does not
move): batch-1 decode (one 32-token prompt, `--new` new tokens) and offline (16 requests, 32-token prompts,
32 new tokens each). Prints the mean matmul size, tok/s per thread count (median) and the ratio many/1 per
workload with its 95% interval (paired repeats), and the contention seen during the run.

    python benchmarks/thread_rule.py                          # the default shapes, 3 repeats
    python benchmarks/thread_rule.py --shapes 256x1024,1024x32000 --repeats 5 --json out.json
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


def shape(hidden: int, vocab: int, layers: int) -> dict:
    inter = max(128, round(3 * hidden / 128) * 128)
    heads = max(1, hidden // 64)
    kv = next(d for d in (4, 2, 1) if heads % d == 0)
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)


def build(out: Path, hidden: int, vocab: int, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from optcli.checkpoints.resolve import resolve_model

    tok_dir = resolve_model("builtin:tiny-llama").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, **shape(hidden, vocab, layers))).eval()
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


def measure(hidden: int, vocab: int, args, cores: int) -> dict:
    from optcli.engine import Engine
    from optcli.engine.quant.cpu_choice import mean_matmul_size

    with tempfile.TemporaryDirectory(prefix="optcli-threads-") as tmp:
        build(Path(tmp), hidden, vocab, args.layers, args.seed)
        engine = Engine(tmp, device="cpu", enable_prefix_caching=False, max_model_len=512)
        mean = mean_matmul_size(engine.model)
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
    out = {"hidden": hidden, "vocab": vocab, "mean_matmul": mean, "shape": shape(hidden, vocab, args.layers),
           "workloads": {}}
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
    ap.add_argument("--shapes", default="256x1024,256x32000,512x1024,512x32000,768x32000,1024x32000,2048x32000",
                    help="HIDDENxVOCAB shapes to measure")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="new tokens of the batch-1 decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="a test of this script: hidden 128, 1 layer, 2 repeats")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.layers, args.new, args.repeats = "128x1024", 1, 4, 2
    cores = usable_cores()
    share = CpuShare()
    results = []
    for spec in args.shapes.split(","):
        hidden, vocab = (int(x) for x in spec.lower().split("x"))
        res = measure(hidden, vocab, args, cores)
        results.append(res)
        for name, row in res["workloads"].items():
            many = f"{row.get(f'tok_s_{cores}', 0):,.0f}"
            ratio = fmt_interval({k: row[k] for k in ("ratio", "ci_low", "ci_high")}) if "ratio" in row else "n/a"
            print(f"hidden {hidden:5d} vocab {vocab:6d} (matmuls {res['mean_matmul'] / 1e6:5.2f}M)  {name:10s}  1 thread {row['tok_s_1']:9,.0f} tok/s  {cores} threads "
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
