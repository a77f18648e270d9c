"""Does an 8-bit KV cache cost decode speed on CPU, and does it hold twice the tokens? bf16 vs fp8 vs int8 caches.

The acceptance benchmark of issue 35 ("a quantized KV cache"). One process, one CPU:

1. The seeded random bf16 checkpoint of the Llama-3.2-1B shape that quant_cpu_checkpoint.py builds (16 layers,
   hidden 2048, 32 heads / 8 KV heads of 64, vocab 128256, context 2048; 32 KiB of bf16 K/V per token), reused
   from `$OPTCLI_CACHE/bench/` when present. `--smoke`: quant_cpu.py's small shape (2 layers, hidden 256).
2. One engine per cache dtype (`--dtypes`, default bfloat16,fp8,int8), all from that checkpoint, dtype auto,
   side by side in this process, sharing one copy of the weights (`share_weights`). Every engine gets the
   same number of cache blocks, so the 8-bit engines get half the bytes of the bf16 one (`kv_cache_bytes`):
   that is the "same sequences in half the memory" claim, checked by the run itself (no preemption may happen).
3. Each engine warmed up on both workloads, then `--repeats` interleaved repeats (each repeat runs every dtype
   back to back, in alternating order, so a busy moment of the shared machine hits them alike). Only decode is
   timed, and prefix caching keeps prefill (which the cache dtype does not change) from dominating a small CPU:
   - batch 1: one fixed prompt of `--context` - `--new` tokens (the context ends at `--context`), `--new`
     greedy tokens; decode tok/s = tokens after the first / the time after the first token. After the warm-up
     the prompt's blocks are cached, so a repeat prefills only its last token.
   - `--batch` requests at once, each `--batch-context` - `--batch-new` tokens: a fixed common part, then 16
     tokens of its own (fresh each repeat); decode tok/s = tokens after every request had its first / the
     remaining time. Each decode step reads every sequence's whole context through its own block table, as for
     distinct prompts; only the prefill is shared. The cache is sized for `--batch` distinct sequences at full
     length plus the batch-1 prompt, in the same number of blocks for every dtype.
4. Printed: each dtype's medians with 95% intervals, and each 8-bit dtype's paired ratio to bf16 with its
   interval (optcli/bench/stats.py), the bytes per token and the cache's token capacity, PASS/MISS for the
   issue's targets (informational; exit 0 either way): batch-1 decode no slower than bf16 (the ratio's interval
   reaches 1.0 or above it), the batch run's decode throughput the same within the interval (the interval
   contains 1.0, or is above it), no preemption in half the bytes, and 2x the tokens per byte. The machine's
   contention (optcli.bench.contention) is sampled over the timed part and printed with the figures.

    python benchmarks/kv_cache_dtype.py                         # the 1B shape: 2,048 context, 64 x 1,024
    python benchmarks/kv_cache_dtype.py --smoke                 # tiny shape, seconds (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_cpu_checkpoint as checkpoint  # noqa: E402  (a sibling module: the benchmark shape and its checkpoint)
from bench_model import timed_steps  # noqa: E402

BLOCK = 16
PROMPT_ID_RANGE = (3, 1000)  # real tokens of the builtin tokenizer, as quant_cpu.py draws them
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def prompts(n: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)] for _ in range(n)]


def share_weights() -> None:
    """Every engine after the first reuses the first one's model: they differ only in their caches, and three
    copies of the 1B shape's weights (2.5 GB each) beside a 64 x 1,024-token cache overran a 24 GB machine."""
    import optcli.engine.engine as core

    load_model, loaded = core.load_engine_model, {}

    def once(spec, config):
        if spec not in loaded:
            loaded[spec] = load_model(spec, config)
        model, tokenizer, eos, resolved, reason = loaded[spec]
        return model, tokenizer, eos, config.with_options(device=resolved.device, dtype=resolved.dtype), reason

    core.load_engine_model = once


def memory_needed(source: Path, cfg, blocks: int, bf16_block: int, dtypes: list[str], args) -> int:
    """What the run holds at once: one copy of the weights (shared), every engine's cache (half the bf16 bytes
    for an 8-bit one), and the widest step's workspace: the batch's gathered K and V in bf16 for one layer,
    plus the prefill's fp32 scores, with 2x slack for the allocator."""
    weights = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    caches = sum(blocks * bf16_block // (1 if d == "bfloat16" else 2) for d in dtypes)
    per_token_layer = bf16_block // BLOCK // cfg.num_layers  # K and V, bf16
    gathered = args.batch * args.batch_context * per_token_layer
    scores = 4 * args.batch * cfg.num_heads * OWN * args.batch_context
    return weights + caches + 2 * (gathered + scores) + (1 << 30)  # + the interpreter, torch and tokenizer


def load(path: Path, dtype: str, args, blocks: int, bf16_block_bytes: int):
    """An engine whose cache has `blocks` blocks: bytes = blocks x its own block size (half for 8-bit)."""
    from optcli.engine import Engine

    per_byte = 2 if dtype == "bfloat16" else 1
    eng = Engine(str(path), device="cpu", kv_cache_dtype=dtype, enable_prefix_caching=True,
                 max_model_len=args.context, max_num_seqs=args.batch,
                 kv_cache_bytes=blocks * bf16_block_bytes * per_byte // 2, block_size=BLOCK)
    if eng.blocks.num_blocks != blocks:
        raise RuntimeError(f"{dtype}: {eng.blocks.num_blocks} blocks in {eng.kv_cache_bytes} bytes, {blocks} wanted")
    return eng


OWN = 16  # tokens of its own at the end of each batch prompt


def run_once(eng, args, fixed: random.Random, rng: random.Random) -> dict:
    """One timed batch-1 run and one batch run; `fixed` draws the same prompts each time, `rng` fresh tails."""
    b1 = timed_steps(eng, prompts(1, args.context - args.new, fixed), args.new)
    common = prompts(1, args.batch_context - args.batch_new - OWN, fixed)[0]
    timed_steps(eng, [common + [3]], 1)  # its blocks cached first: requests admitted together share nothing yet
    before = eng.scheduler.num_preemptions
    many = timed_steps(eng, [common + p for p in prompts(args.batch, OWN, rng)], args.batch_new)
    return {"b1_decode": b1["decode_tok_s"], "batch_decode": many["decode_tok_s"],
            "preemptions": eng.scheduler.num_preemptions - before}


def summarize(results: dict, engines: dict, args) -> list[dict]:
    from optcli.bench.stats import median_interval, ratio_interval

    rows = []
    base = results.get("bfloat16")
    for dtype, runs in results.items():
        cache = engines[dtype]
        row = {"dtype": dtype, **cache, "preemptions": sum(r["preemptions"] for r in runs)}
        for key in ("b1_decode", "batch_decode"):
            values = [r[key] for r in runs]
            med = median_interval(values)
            row[key] = {"median": med.median, "low": med.low, "high": med.high, "values": values}
            if base is not None and dtype != "bfloat16":
                rat = ratio_interval(values, [r[key] for r in base])
                row[key]["ratio"] = {"median": rat.median, "low": rat.low, "high": rat.high}
        rows.append(row)
    return rows


def fmt(x: dict) -> str:
    low = f"{x['low']:.2f}" if x.get("low") is not None else "?"
    high = f"{x['high']:.2f}" if x.get("high") is not None else "?"
    return f"{x['median']:.2f} [{low}, {high}]"


def report(rows: list[dict], args, contention: dict | None) -> list[dict]:
    print(f"\nbatch-1 decode at {args.context} context, {args.batch} requests at {args.batch_context} tokens; "
          f"{args.repeats} interleaved repeats; medians [95% interval]")
    print(f"{'cache':10} {'B/token':>8} {'tokens':>8} {'cache MiB':>10} {'b1 decode tok/s':>24} "
          f"{'batch decode tok/s':>26} {'ratio b1':>20} {'ratio batch':>20}")
    for r in rows:
        ratios = [fmt(r[k]["ratio"]) if "ratio" in r[k] else "-" for k in ("b1_decode", "batch_decode")]
        print(f"{r['dtype']:10} {r['bytes_per_token']:>8} {r['tokens']:>8} {r['bytes'] / 2**20:>10.1f} "
              f"{fmt(r['b1_decode']):>24} {fmt(r['batch_decode']):>26} {ratios[0]:>20} {ratios[1]:>20}")
    print(f"contention over the timed part: {json.dumps(contention)}")
    base = next((r for r in rows if r["dtype"] == "bfloat16"), None)
    checks = []
    for r in rows:
        if r["dtype"] == "bfloat16" or base is None:
            continue
        b1, many = r["b1_decode"]["ratio"], r["batch_decode"]["ratio"]
        checks += [
            (f"{r['dtype']}: 2x the tokens per byte", base["bytes_per_token"] == 2 * r["bytes_per_token"]),
            (f"{r['dtype']}: {args.batch} requests in half the bytes, no preemption",
             r["bytes"] * 2 == base["bytes"] and r["preemptions"] == 0),
            (f"{r['dtype']}: batch-1 decode no slower (interval reaches 1.0)", (b1["high"] or 0) >= 1.0),
            (f"{r['dtype']}: batch decode the same within the interval", (many["high"] or 0) >= 1.0),
        ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    return [{"check": n, "passed": ok} for n, ok in checks]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape and workloads (seconds)")
    p.add_argument("--dtypes", default="bfloat16,fp8,int8")
    p.add_argument("--context", type=int, default=2048, help="batch-1: tokens of context at the last step")
    p.add_argument("--new", type=int, default=32, help="batch-1: generated tokens")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-context", type=int, default=1024)
    p.add_argument("--batch-new", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.context, args.new, args.batch, args.batch_context, args.batch_new = 128, 8, 8, 64, 8
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from optcli.bench.contention import ContentionMonitor
    from optcli.engine.kv_storage import bytes_per_block
    from optcli.engine.models import ModelConfig

    shape = checkpoint.SMALL if args.smoke else checkpoint.LLAMA_3_2_1B
    workdir = args.workdir or checkpoint.default_workdir(shape, args.smoke)
    source = workdir / "bf16"
    checkpoint.build_source(source, shape, args.seed)
    from transformers import AutoConfig

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(source))
    blocks = args.batch * -(-args.batch_context // BLOCK) + -(-args.context // BLOCK)
    bf16_block = bytes_per_block(cfg, BLOCK, "bfloat16", torch.bfloat16)
    dtypes = args.dtypes.split(",")
    need = memory_needed(source, cfg, blocks, bf16_block, dtypes, args)
    import psutil

    free = psutil.virtual_memory().available
    log(f"memory: ~{need / 2**30:.1f} GiB needed (weights once, {len(dtypes)} caches, workspace), "
        f"{free / 2**30:.1f} GiB available")
    if need > free:
        print(f"error: this run needs ~{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is available; "
              "run fewer --dtypes or a smaller --batch / --batch-context", file=sys.stderr)
        return 2
    share_weights()
    engines, caches = {}, {}
    rng = random.Random(args.seed)
    for dtype in dtypes:
        engines[dtype] = eng = load(source, dtype, args, blocks, bf16_block)
        caches[dtype] = eng.kv.describe(BLOCK)
        log(f"{dtype}: {caches[dtype]} (engine dtype {eng.config.dtype})")
        run_once(eng, args, random.Random(args.seed), rng)  # warm-up: fills the prefix cache too
    results: dict[str, list] = {d: [] for d in dtypes}
    with ContentionMonitor() as monitor:
        for i in range(args.repeats):
            for dtype in dtypes if i % 2 == 0 else dtypes[::-1]:
                fresh = random.Random(args.seed * 1000 + i)  # the same tails for every dtype in a repeat
                results[dtype].append(run_once(engines[dtype], args, random.Random(args.seed), fresh))
                log(f"repeat {i + 1} {dtype}: {results[dtype][-1]}")
    contention = monitor.result()
    import resource

    log(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    rows = summarize(results, caches, args)
    checks = report(rows, args, contention)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "checks": checks, "contention": contention}, indent=1, default=str))
    del engines
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
