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
3. For the source and each artifact, one engine at a time (`Engine(path, device="cpu",
   enable_prefix_caching=False, max_model_len=512)`, dtype "auto"), warmed up, then timed step by step:
   - batch 1: one 64-token prompt, 64 new tokens. Prompt tok/s = 64 / time to the first token;
     decode tok/s = tokens after the first / time after the first token.
   - 64 requests at once, distinct random 64-token prompts, 16 new tokens each. Prompt tok/s = all
     prompt tokens / time until every request has its first token; decode tok/s = tokens produced
     after that step / the remaining time.
   EOS is ignored, decoding is greedy, prompt ids are drawn from [3, 1000) (the builtin tokenizer's).
4. Per-layer GEMMs: the four matmul modules of `engine.model.layers[0]` (qkv_proj, o_proj,
   gate_up_proj, down_proj), called on random inputs of M = 1, 16, 64 rows, best of a few calls,
   microseconds summed over the four; and `engine.model.lm_head` at M = 1.

It prints the throughput table (absolute and as ratios to the bf16 source in the same run), each
engine's resolved dtype and quantized-layer summary, the GEMM table, and PASS/MISS for each of the
issue's targets (informational: the exit status is 0 either way).

    python benchmarks/quant_cpu.py                      # the 1B shape (tens of minutes on a small CPU)
    python benchmarks/quant_cpu.py --small              # smoke run: hidden 256, 2 layers, vocab 1024
    python benchmarks/quant_cpu.py --formats bf16,w4a16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (a sibling script: the one definition of the benchmark shape)

LLAMA_3_2_1B = dict(gpu_check.LLAMA_3_2_1B, initializer_range=0.02)  # the shape gpu_check.py measures
SMALL = dict(LLAMA_3_2_1B, num_hidden_layers=2, hidden_size=256, intermediate_size=1024,
             num_attention_heads=4, num_key_value_heads=1, vocab_size=1024)
PROMPT_ID_RANGE = (3, 1000)  # real tokens of the builtin tokenizer (1024 entries; 0-2 are special)
MAX_MODEL_LEN = 512

# format -> (recipe for `optcli quantize`, artifact directory); bf16 is the source checkpoint itself.
W8A8_RTN_RECIPE = """\
name: w8a8-rtn
description: INT8 weights per channel by round to nearest, INT8 activations per token (dynamic). No calibration data.
backend: llmcompressor
scheme: W8A8
ignore: [lm_head]
calibration:
  required: false
llmcompressor:
  quant_stage:
    quant_modifiers:
      QuantizationModifier:
        targets: [Linear]
        scheme: W8A8
"""
FORMATS = {"bf16": None, "w4a16": "w4a16-rtn", "w8a8": "w8a8-rtn", "fp8": "fp8-dynamic", "nf4": "nf4-bnb",
           "int8-bnb": "int8-bnb"}

# The targets: (format, metric, minimum ratio to the bf16 source). "W8A8 batch-1" and
# "W8A8 64-request" are read as decode, the phase weight bytes decide.
TARGETS = [
    ("w4a16", "b1_decode", 2.0),
    ("w4a16", "many_decode", 0.9),
    ("w4a16", "many_prompt", 0.9),
    ("w8a8", "b1_decode", 1.5),
    ("w8a8", "many_decode", 1.3),
    *(("fp8", m, 0.9) for m in ("b1_prompt", "b1_decode", "many_prompt", "many_decode")),
]
METRICS = {
    "b1_prompt": "batch-1 prompt tok/s",
    "b1_decode": "batch-1 decode tok/s",
    "many_prompt": "64-req prompt tok/s",
    "many_decode": "64-req decode tok/s",
}
GEMM_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GEMM_ROWS = (1, 16, 64)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Workload:
    b1_prompt: int = 64
    b1_new: int = 64
    many_requests: int = 64
    many_prompt: int = 64
    many_new: int = 16


# --- checkpoint and artifacts -------------------------------------------------------------------


def default_workdir(shape: dict, small: bool) -> Path:
    from optcli.config import cache_dir

    name = "llama-3.2-1b-shape"
    if small:
        name = f"llama-small-h{shape['hidden_size']}"
    if small or shape["num_hidden_layers"] != 16 or shape["vocab_size"] != 128256:
        name += f"-l{shape['num_hidden_layers']}-v{shape['vocab_size']}"
    return cache_dir() / "bench" / name


def build_source(out: Path, shape: dict, seed: int) -> bool:
    """The seeded random bf16 checkpoint plus the builtin tokenizer; False when a matching one is there."""
    stamp = {"shape": shape, "seed": seed}
    marker = out / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return False
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from optcli.builtin import model_dir

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok_dir = model_dir("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    bos, eos = tok_cfg.get("bos_token_id", 1), tok_cfg.get("eos_token_id", 2)
    config = LlamaConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    marker.write_text(json.dumps(stamp))  # written last: its presence means the checkpoint is complete
    log(f"built {out}: {params / 1e6:.1f}M parameters, bf16")
    return True


def recipe_path(workdir: Path, recipe: str) -> str:
    """A builtin recipe's name, or the path of the W8A8 RTN recipe written into the workdir."""
    if recipe != "w8a8-rtn":
        return recipe
    path = workdir / "w8a8-rtn.yaml"
    path.write_text(W8A8_RTN_RECIPE)
    return str(path)


def make_artifact(workdir: Path, source: Path, recipe: str, rebuild: bool) -> Path:
    """`optcli quantize` in a subprocess; an existing artifact (its manifest present) is reused."""
    out = workdir / recipe
    if (out / "optcli.json").is_file() and not rebuild:
        log(f"reusing {out}")
        return out
    cmd = [sys.executable, "-m", "optcli.cli", "quantize", str(source), "--recipe", recipe_path(workdir, recipe),
           "--out", str(out), "--device", "cpu", "--force", "--json"]
    log(f"quantizing: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"optcli quantize --recipe {recipe} failed (exit {done.returncode})")
    log(f"quantized {recipe} in {time.perf_counter() - start:.0f}s")
    return out


# --- engine throughput --------------------------------------------------------------------------


def random_prompts(n: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)] for _ in range(n)]


def timed_run(eng, prompts: list[list[int]], new_tokens: int) -> dict:
    """Drive `eng.step()` and time it: until every request has its first token, and the rest."""
    from optcli.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    firsts: set[str] = set()
    t_first = None
    total = after_first = 0  # after_first: tokens of the steps after every request had its first one
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        total += len(outs)
        if t_first is not None:
            after_first += len(outs)
            continue
        firsts.update(o.request_id for o in outs)
        if len(firsts) == len(prompts):
            t_first = now
    end = time.perf_counter()
    if total != len(prompts) * new_tokens:
        raise RuntimeError(f"{total} tokens generated, {len(prompts)} x {new_tokens} requested")
    return {
        "prompt_tok_s": sum(map(len, prompts)) / (t_first - start),
        "decode_tok_s": after_first / (end - t_first) if after_first else None,
        "ttft_s": t_first - start,
        "decode_tokens": after_first,
        "wall_s": end - start,
    }


def engine_throughput(eng, wl: Workload, rng: random.Random, repeats: int) -> dict:
    """Warm-up on both workloads (throw-away prompts), then the timed batch-1 and 64-request runs,
    `repeats` times with fresh prompts; each figure is the best of its repeats."""
    timed_run(eng, random_prompts(1, wl.b1_prompt, rng), 8)
    timed_run(eng, random_prompts(wl.many_requests, wl.many_prompt, rng), 4)
    best: dict = {}
    for _ in range(repeats):
        b1 = timed_run(eng, random_prompts(1, wl.b1_prompt, rng), wl.b1_new)
        many = timed_run(eng, random_prompts(wl.many_requests, wl.many_prompt, rng), wl.many_new)
        figures = {"b1_prompt": b1["prompt_tok_s"], "b1_decode": b1["decode_tok_s"],
                   "many_prompt": many["prompt_tok_s"], "many_decode": many["decode_tok_s"]}
        best = {k: max(v, best.get(k, 0.0)) for k, v in figures.items()}
    return best


# --- per-layer GEMMs ----------------------------------------------------------------------------


def in_features(model, name: str) -> int:
    """Input width of a layer-0 matmul (a packed dense layer keeps no [out, in] weight to read it from)."""
    cfg = model.cfg
    return {"qkv_proj": cfg.hidden_size, "o_proj": cfg.num_heads * cfg.head_dim,
            "gate_up_proj": cfg.hidden_size, "down_proj": cfg.intermediate_size, "lm_head": cfg.hidden_size}[name]


@torch.inference_mode()
def best_us(module, x: torch.Tensor, reps: int = 5) -> float:
    module(x)
    module(x)  # warm-up: first calls pay for kernel selection and packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        module(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def gemm_times(eng) -> dict:
    """µs of layer 0's four matmuls summed, by rows M, and of the LM head at M = 1."""
    model, dtype = eng.model, getattr(torch, eng.config.dtype)
    gen = torch.Generator().manual_seed(0)
    layer = model.layers[0]
    out = {}
    for m in GEMM_ROWS:
        total = 0.0
        for name in GEMM_MODULES:
            x = (torch.randn(m, in_features(model, name), generator=gen) * 0.5).to(dtype)
            total += best_us(getattr(layer, name), x)
        out[f"layer M={m}"] = total
    x = (torch.randn(1, in_features(model, "lm_head"), generator=gen) * 0.5).to(dtype)
    out["lm_head M=1"] = best_us(model.lm_head, x)
    return out


# --- one format ---------------------------------------------------------------------------------


def measure_format(fmt: str, path: Path, wl: Workload, seed: int, repeats: int, lm_head: str = "dense") -> dict:
    from optcli.engine import Engine

    log(f"{fmt}: loading {path}")
    eng = Engine(str(path), device="cpu", enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN, lm_head=lm_head)
    row = {
        "format": fmt,
        "path": str(path),
        "dtype": eng.config.dtype,
        "dtype_reason": eng.dtype_reason,
        "quantized_layers": eng.quantized_layers,
        "weights_bytes": eng.weights_bytes,
    }
    row.update(engine_throughput(eng, wl, random.Random(seed), repeats))
    row["gemm_us"] = gemm_times(eng)
    log(f"{fmt}: batch-1 prompt {row['b1_prompt']:.1f} / decode {row['b1_decode']:.1f} tok/s, 64-req prompt "
        f"{row['many_prompt']:.1f} / decode {row['many_decode']:.1f} tok/s ({row['dtype']}, {row['quantized_layers']})")
    del eng
    gc.collect()
    return row


# --- report -------------------------------------------------------------------------------------


def ratio(row: dict, base: dict | None, key: str) -> float | None:
    if base is None or not base.get(key) or row.get(key) is None:
        return None
    return row[key] / base[key]


def print_tables(rows: list[dict]) -> None:
    base = next((r for r in rows if r["format"] == "bf16"), None)
    head = "| format | weights MiB | " + " | ".join(METRICS.values()) + " |"
    rule = "|---" * (2 + len(METRICS)) + "|"
    print("\n## Engine throughput\n")
    print(head)
    print(rule)
    for r in rows:
        print(f"| {r['format']} | {r['weights_bytes'] / 2**20:.1f} | " + " | ".join(f"{r[k]:.1f}" for k in METRICS) + " |")
    if base is not None:
        print("\n## Ratio to the bf16 source\n")
        print(head)
        print(rule)
        for r in rows:
            cells = [f"{ratio(r, base, k):.2f}x" for k in METRICS]
            print(f"| {r['format']} | {r['weights_bytes'] / base['weights_bytes']:.2f}x | " + " | ".join(cells) + " |")
    print("\n## Engine dtype and quantized layers\n")
    for r in rows:
        layers = ", ".join(f"{k}: {v}" for k, v in r["quantized_layers"].items()) or "none (dense)"
        print(f"- {r['format']}: dtype {r['dtype']} ({r['dtype_reason']}); quantized layers {layers}")
    print("\n## Layer-0 GEMMs (qkv + o + gate_up + down, summed) and lm_head, best-of-5 wall µs\n")
    keys = list(rows[0]["gemm_us"])
    print("| rows | " + " | ".join(r["format"] for r in rows) + " |")
    print("|---" * (1 + len(rows)) + "|")
    for k in keys:
        cells = []
        for r in rows:
            us = r["gemm_us"][k]
            x = f" ({base['gemm_us'][k] / us:.2f}x)" if base is not None and r is not base else ""
            cells.append(f"{us:.0f}{x}")
        print(f"| {k} | " + " | ".join(cells) + " |")


def check_targets(rows: list[dict]) -> list[dict]:
    by_format = {r["format"]: r for r in rows}
    base = by_format.get("bf16")
    results = []
    for fmt, metric, goal in TARGETS:
        got = ratio(by_format[fmt], base, metric) if fmt in by_format else None
        status = "n/a" if got is None else "PASS" if got >= goal else "MISS"
        results.append({"format": fmt, "metric": metric, "target": goal, "ratio": got, "status": status})
    print("\n## Targets (ratio to the bf16 source, this run)\n")
    for t in results:
        got = "not measured" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"- {t['status']:<4}  {t['format']} {METRICS[t['metric']]} >= {t['target']:.1f}x: {got}")
    return results


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smoke run: hidden 256, 2 layers, vocab 1024")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; --small: 2)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 128256; --small: 1024)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="checkpoint and artifacts (default $OPTCLI_CACHE/bench/llama-3.2-1b-shape...)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per workload; each figure is the best")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompts")
    ap.add_argument("--lm-head", default="dense", choices=("dense", "int8"),
                    help="the engine's LM head for every format (int8: rounded per row at load)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = ap.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    shape = dict(SMALL if args.small else LLAMA_3_2_1B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    workdir = args.workdir or default_workdir(shape, args.small)
    wl = Workload()
    log(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, cpu {platform.processor() or platform.machine()}")
    log(f"shape: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}; workdir {workdir}")

    source = workdir / "bf16"
    rebuilt = build_source(source, shape, args.seed)
    paths = {fmt: source if recipe is None else make_artifact(workdir, source, recipe, rebuilt)
             for fmt, recipe in FORMATS.items() if fmt in args.formats}
    rows = [measure_format(fmt, path, wl, args.seed, args.repeats, args.lm_head) for fmt, path in paths.items()]

    print_tables(rows)
    targets = check_targets(rows)
    if args.json:
        args.json.write_text(json.dumps({
            "shape": shape, "workload": asdict(wl), "repeats": args.repeats, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "formats": rows, "targets": targets,
        }, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
