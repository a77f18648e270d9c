"""Does quantization buy speed on CPU? Our engine on a bf16 checkpoint and on its W4A16, W8A8 and FP8 artifacts.

The acceptance benchmark of the issue "quantization must buy speed". One process, one CPU:

1. A seeded random bf16 checkpoint of the Llama-3.2-1B shape (16 layers, hidden 2048, intermediate
   8192, 32 heads / 8 KV heads, head_dim 64, vocab 128256, tied embeddings, rope_theta 500000), saved
   with the builtin tokenizer into `$OPTCLI_CACHE/bench/llama-3.2-1b-shape/bf16` (or `--workdir`).
2. Artifacts made from it by `optcli quantize` (a subprocess, so llm-compressor's memory is not ours):
   W4A16 (`w4a16-rtn`), W8A8 (int8 weights by round to nearest, dynamic per-token int8 activations:
   a recipe written into the workdir, no SmoothQuant or GPTQ, so no calibration data), FP8
   (`fp8-dynamic`), and bitsandbytes NF4 (`nf4-bnb`) and LLM.int8 (`int8-bnb`). The checkpoint and
   the artifacts are reused when present.
3. The source and every artifact loaded side by side (`Engine(path, device="cpu", enable_prefix_caching=False,
   max_model_len=512)`, dtype "auto", a KV cache sized for the 64-request run), each warmed up on both
   workloads, then timed step by step in `--repeats` interleaved repeats (each repeat runs every format back
   to back, so a busy moment of the machine hits them alike):
   - batch 1: one 64-token prompt, 64 new tokens. Prompt tok/s = 64 / time to the first token;
     decode tok/s = tokens after the first / time after the first token.
   - 64 requests at once, distinct random 64-token prompts, 16 new tokens each. Prompt tok/s = all
     prompt tokens / time until every request has its first token; decode tok/s = tokens produced
     after that step / the remaining time.
   EOS is ignored, decoding is greedy, prompt ids are drawn from [3, 1000) (the builtin tokenizer's).
   The source runs its own best path at each batch size, by the same rules as the artifacts
   (`optcli/engine/quant/cpu_choice.py`: AVX-512 BF16 dot products or fp32 math over its bf16 weights for
   few-row steps, oneDNN's bf16 GEMM for batched ones), so every ratio is against the best the source can do.
4. Per-layer GEMMs: the four matmul modules of `engine.model.layers[0]` (qkv_proj, o_proj,
   gate_up_proj, down_proj), called on random inputs of M = 1, 16, 64 rows, best of a few calls,
   microseconds summed over the four; and `engine.model.lm_head` at M = 1.
5. The machine's read bandwidth: `roi.hardware.measure_host_bandwidth` (a multi-threaded read probe, the one
   report.json's roofline uses), once after every repeat's runs: each repeat's batch-1 decode is set against
   its own repeat's probe (a shared host's bandwidth drifts over minutes).

It prints the throughput table (medians of the repeats), the ratios to the bf16 source (the geometric mean
of the paired repeats with a 95% t-interval on the log-ratios), each format's batch-1 decode as weight-read
bandwidth (weights bytes x decode tok/s) against the probe, the kernel each layer kind runs at 1 and at 64
rows, each engine's resolved dtype and quantized-layer summary, the GEMM table, and PASS/MISS for each of
issue 32's targets (informational: the exit status is 0 either way): W4A16 batch-1 decode >= 2.0x, W8A8
>= 1.5x, FP8 >= 1.0x; at 64 requests (decode) every format >= 1.2x; every format's batch-1 decode reads its
weights at >= 80% of the probe's bandwidth.

`--moe`: the same run on a mixture-of-experts model, a seeded random bf16 Qwen3-MoE checkpoint
(`Qwen3MoeForCausalLM`) in `$OPTCLI_CACHE/bench/qwen3-moe-shape/`: 8 layers, all sparse, hidden 1024,
16 heads / 4 KV heads, head_dim 64, 32 experts of intermediate 512 with top-4 routing renormalised
(`norm_topk_prob`), vocab 32000, untied embeddings: 489.4M parameters (0.98 GB in bf16), 137.1M active
per token (embeddings and LM head included). bf16 + W4A16 (build, quantize, both runs) took about a
minute on a 2-core CPU with 24 GiB (52 s, of it 13 s quantizing). `--small --moe` is a smoke run:
2 layers, hidden 256, 4 heads / 1 KV head, 8 experts of 128, top-2, vocab 1024. Every linear's in_features
is a multiple of 128, W4A16's group size, so every expert quantizes. What changes under --moe:
- formats default to bf16,w4a16; w8a8 and fp8 may be asked for and quantize the experts too. nf4 and
  int8-bnb are refused up front, as `optcli quantize` refuses them for a MoE model (bitsandbytes cannot
  quantize fused experts).
- the GEMM table times qkv_proj, o_proj and expert 0's gate_up and down (`layer.moe.gate_up[0]`,
  `layer.moe.down[0]`): a MoE layer has no gate_up_proj / down_proj. Each chosen expert runs one such
  pair per step over its own rows (at 64 requests x top-4 over 32 experts, ~8 rows each).
- each format's line adds `engine.stats()["moe"]["expert_layers"]` (how the experts run, e.g.
  {"int4/cpu": 512} for 8 layers x 32 experts x gate_up/down), also in the JSON under "moe", and a
  WARNING when a quantized format runs experts unquantized.
- targets: the issue's were set for the dense Llama shape and are not checked. A MoE step adds costs
  that are the same in every format (routing, a sort, a host sync for the per-expert counts, one small
  GEMM pair per chosen expert, index_add), and the untied bf16 LM head is about a third of the weights a
  batch-1 token reads, so the weight-byte saving buys less than on the dense shape. The one MoE target:
  W4A16 batch-1 decode faster than the bf16 source (ratio > 1.0x): the quantized expert path must be a
  speed-up, not a regression. The ratio table shows the rest.

    python benchmarks/quant_cpu.py                      # the 1B shape (tens of minutes on a small CPU; memory
                                                        # for all four engines at once: ~8 GB)
    python benchmarks/quant_cpu.py --small              # smoke run: hidden 256, 2 layers, vocab 1024
    python benchmarks/quant_cpu.py --formats bf16,w4a16 --hog --json out.json   # beside one busy loop
    python benchmarks/quant_cpu.py --moe                # Qwen3-MoE shape, bf16 + W4A16 (about a minute)
    python benchmarks/quant_cpu.py --small --moe        # MoE smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_model import timed_steps
from quant_cpu_checkpoint import (
    LLAMA_3_2_1B,
    QWEN3_MOE,
    SMALL,
    SMALL_MOE,
    build_source,
    default_workdir,
    log,
    make_artifact,
    param_counts,
)
from quant_cpu_gemms import gemm_times, layer0_gemms
from quant_cpu_report import (
    METRICS,
    bandwidth_shares,
    check_targets,
    print_tables,
)

PROMPT_ID_RANGE = (3, 1000)  # real tokens of the builtin tokenizer (1024 entries; 0-2 are special)
MAX_MODEL_LEN = 512

FORMATS = {"bf16": None, "w4a16": "w4a16-rtn", "w8a8": "w8a8-rtn", "fp8": "fp8-dynamic", "nf4": "nf4-bnb",
           "int8-bnb": "int8-bnb", "mixed": "mixed-rtn"}
# --formats ...,mixed (never by default): the kind of layout `--recipe auto:4.5` gives a model whose widths divide
# 128, W8A16 q/k/v in the first layers, 4-bit zero point groups 128/64/32 elsewhere (quant_cpu_checkpoint.mixed_recipe).
DEFAULT_FORMATS = tuple(f for f in FORMATS if f != "mixed")
MOE_FORMATS = ("bf16", "w4a16")  # the default under --moe; w8a8 and fp8 quantize the experts too
# Formats refused under --moe, before anything is built: `optcli quantize` refuses them for a MoE model.
MOE_REFUSED = {
    fmt: "`optcli quantize` refuses bitsandbytes recipes for a MoE model: bitsandbytes replaces nn.Linear modules "
         "only, and transformers holds the experts as fused 3-D parameters"
    for fmt in ("nf4", "int8-bnb")
} | {"mixed": "its fixed layout names a dense model's MLP projections"}


@dataclass
class Workload:
    b1_prompt: int = 64
    b1_new: int = 64
    many_requests: int = 64
    many_prompt: int = 64
    many_new: int = 16


# --- engine throughput --------------------------------------------------------------------------


def random_prompts(n: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)] for _ in range(n)]


def timed_run(eng, prompts: list[list[int]], new_tokens: int) -> dict:
    """`bench_model.timed_steps`, checked: every request produced all its tokens."""
    run = timed_steps(eng, prompts, new_tokens)
    if run["tokens"] != len(prompts) * new_tokens:
        raise RuntimeError(f"{run['tokens']} tokens generated, {len(prompts)} x {new_tokens} requested")
    return run


def warm_up(eng, wl: Workload, rng: random.Random) -> None:
    """Both workloads' shapes once (throw-away prompts): packing, first calls and allocator growth."""
    timed_run(eng, random_prompts(1, wl.b1_prompt, rng), 8)
    timed_run(eng, random_prompts(wl.many_requests, wl.many_prompt, rng), 4)


def engine_once(eng, wl: Workload, rng: random.Random) -> dict:
    """One timed batch-1 run and one 64-request run with fresh prompts: the four figures."""
    b1 = timed_run(eng, random_prompts(1, wl.b1_prompt, rng), wl.b1_new)
    many = timed_run(eng, random_prompts(wl.many_requests, wl.many_prompt, rng), wl.many_new)
    return {"b1_prompt": b1["prompt_tok_s"], "b1_decode": b1["decode_tok_s"],
            "many_prompt": many["prompt_tok_s"], "many_decode": many["decode_tok_s"]}


def load_format(fmt: str, path: Path, wl: Workload, seed: int, lm_head: str = "dense"):
    """(engine, row): the engine loaded and warmed up; the row holds what does not change between repeats."""
    from optcli.engine import Engine

    log(f"{fmt}: loading {path}")
    blocks = wl.many_requests * -(-(wl.many_prompt + wl.many_new + 16) // 16) + 16  # the 64-request run, no more
    blocks = max(blocks, -(-MAX_MODEL_LEN // 16))  # and one whole sequence (a --smoke workload is smaller)
    eng = Engine(str(path), device="cpu", enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN, lm_head=lm_head,
                 num_kv_blocks=blocks)
    row = {
        "format": fmt,
        "path": str(path),
        "dtype": eng.config.dtype,
        "dtype_reason": eng.dtype_reason,
        "quantized_layers": eng.quantized_layers,
        "kernels": eng.kernel_paths(),  # per layer kind and batch-size bucket: the kernel and why
        "moe": eng.stats()["moe"],  # None when dense; else expert_layers: how the experts run, e.g. {"int4/cpu": 16}
        "weights_bytes": eng.weights_bytes,
        "gemm_modules": [name for name, _, _ in layer0_gemms(eng.model)],
        "repeats": {k: [] for k in METRICS},
    }
    warm_up(eng, wl, random.Random(seed))
    return eng, row


def summarize(row: dict) -> None:
    """Each figure: the median of its repeats."""
    for k, values in row["repeats"].items():
        row[k] = statistics.median([v for v in values if v is not None]) if any(values) else None
    experts = f", experts {row['moe']['expert_layers']}" if row["moe"] else ""
    log(f"{row['format']}: batch-1 prompt {row['b1_prompt']:.1f} / decode {row['b1_decode']:.1f} tok/s, 64-req prompt "
        f"{row['many_prompt']:.1f} / decode {row['many_decode']:.1f} tok/s (medians of {len(row['repeats']['b1_decode'])}; "
        f"{row['dtype']}, {row['quantized_layers']}{experts})")


# --- report -------------------------------------------------------------------------------------


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smoke run: hidden 256, 2 layers, vocab 1024")
    ap.add_argument("--smoke", action="store_true",
                    help="a test of this script: --small with 1 layer, bf16 and W4A16, a few tokens, 1 repeat, a temporary workdir, no bandwidth probe")
    ap.add_argument("--moe", action="store_true",
                    help="a Qwen3-MoE shape instead (8 layers, hidden 1024, 32 experts top-4, expert intermediate "
                         "512, vocab 32000; with --small: 2 layers, hidden 256, 8 experts top-2, 128)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 16, --moe 8; --small: 2)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default 128256, --moe 32000; --small: 1024)")
    ap.add_argument("--formats", default=None,
                    help=f"subset of {','.join(FORMATS)} (default: all but mixed; --moe: {','.join(MOE_FORMATS)})")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="checkpoint and artifacts (default $OPTCLI_CACHE/bench/llama-3.2-1b-shape..., "
                         "--moe: qwen3-moe-shape...)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats (every format once per repeat); figures are medians, ratios paired")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompts")
    ap.add_argument("--lm-head", default="dense", choices=("dense", "int8"),
                    help="the engine's LM head for every format (int8: rounded per row at load)")
    ap.add_argument("--hog", action="store_true",
                    help="time the repeats beside one busy-loop process (python -c 'while True: pass'); "
                         "checks the busy target (W4A16 batch-1 decode >= 1.5x) instead of the quiet ones")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.small, args.layers, args.repeats = True, args.layers or 1, 1
        args.formats = args.formats or "bf16,w4a16"
    if args.formats is None:
        args.formats = ",".join(MOE_FORMATS if args.moe else DEFAULT_FORMATS)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    refused = [f for f in args.formats if f in MOE_REFUSED] if args.moe else []
    if refused:
        ap.error(f"--moe cannot measure {', '.join(refused)}: {MOE_REFUSED[refused[0]]}; "
                 f"use {', '.join(f for f in FORMATS if f not in MOE_REFUSED)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.moe:
        shape = dict(SMALL_MOE if args.small else QWEN3_MOE)
    else:
        shape = dict(SMALL if args.small else LLAMA_3_2_1B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    workdir = args.workdir or (Path(tempfile.mkdtemp(prefix="optcli-quant-cpu-")) if args.smoke
                               else default_workdir(shape, args.small))
    wl = Workload(b1_prompt=8, b1_new=4, many_requests=4, many_prompt=8, many_new=4) if args.smoke else Workload()
    log(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, cpu {platform.processor() or platform.machine()}")
    total, active = param_counts(shape)
    if args.moe:
        log(f"shape: Qwen3-MoE, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
            f"{shape['num_experts']} experts top-{shape['num_experts_per_tok']}, expert intermediate "
            f"{shape['moe_intermediate_size']}, vocab {shape['vocab_size']}; {total / 1e6:.1f}M parameters, "
            f"{active / 1e6:.1f}M active per token; workdir {workdir}")
    else:
        log(f"shape: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
            f"{shape['intermediate_size']}, vocab {shape['vocab_size']}; {total / 1e6:.1f}M parameters; "
            f"workdir {workdir}")

    source = workdir / "bf16"
    rebuilt = build_source(source, shape, args.seed)
    paths = {fmt: source if recipe is None else make_artifact(workdir, source, recipe, rebuilt)
             for fmt, recipe in FORMATS.items() if fmt in args.formats}
    loaded = [load_format(fmt, path, wl, args.seed, args.lm_head) for fmt, path in paths.items()]
    rng = random.Random(args.seed + 1)
    from optcli.engine.kernels.cpu_threads import CpuShare
    from optcli.roi.hardware import measure_host_bandwidth

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    share = CpuShare()
    probes: list[float | None] = []
    try:
        for repeat in range(args.repeats):  # interleaved: each repeat runs every format back to back
            for eng, row in loaded:
                for k, v in engine_once(eng, wl, rng).items():
                    row["repeats"][k].append(v)
            # the read probe in every repeat too: this host's bandwidth drifted from 47 to 77 GB/s within an hour,
            # so a share of a probe taken minutes apart from the decode it divides says little (not in a smoke run)
            probes.append(None if args.smoke else measure_host_bandwidth(fresh=True)["gbs"])
            log(f"repeat {repeat + 1}/{args.repeats} done" + (f", read probe {probes[-1]:.1f} GB/s" if probes[-1] else ""))
    finally:
        contention = share.sample()
        if hog is not None:
            hog.kill()
            hog.wait()
    others = None if contention is None else round(contention["others_cores"], 2)
    log(f"other processes used {others} cores on average while timing" + (" (one busy loop: --hog)" if hog else ""))
    rows = []
    for eng, row in loaded:
        summarize(row)
        row["gemm_us"] = gemm_times(eng)
        rows.append(row)
    del loaded, eng
    gc.collect()
    gbs = [g for g in probes if g]
    probe = {"gbs": statistics.median(gbs) if gbs else None, "per_repeat_gbs": probes,
             "source": "read probe (roi.hardware.measure_host_bandwidth) after each repeat's runs"}
    bandwidth_shares(rows, probes)
    print_tables(rows)
    targets = check_targets(rows, moe=args.moe, gbs=probe["gbs"], hog=args.hog)
    if args.json:
        args.json.write_text(json.dumps({
            "shape": shape, "moe": args.moe, "parameters": {"total": total, "active": active}, "workload": asdict(wl), "repeats": args.repeats, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "formats": rows, "targets": targets, "read_probe": probe, "hog": args.hog, "others_cores": others,
        }, indent=2, default=str))
        log(f"wrote {args.json}")
    if args.smoke and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
