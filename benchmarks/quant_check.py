"""Quantized formats side by side: per-layer GEMM times, then our engine in bf16, W4A16, FP8 and W8A8.

Run through `python benchmarks/gpu_check.py --quant` (or directly). One process, one device:

1. GEMM table: the four GEMMs of one Llama-3.2-1B decoder layer (qkv 2048->3072, o 2048->2048,
   gate_up 2048->16384, down 8192->2048), summed, GPU microseconds by batch rows M (each call
   replayed from a CUDA graph with a cold L2, as decode steps run: kernels/tuning.time_in_graph), for bf16
   cuBLAS, our int4 Triton GEMM, torch's int4 kernel (`_weight_int4pack_mm`, the stock peer),
   FP8 (our fused per-token quant + `_scaled_mm`) and W8A8 (our per-token quant + Triton int8 GEMM).
   Every quantized output is checked against `x @ dequantized(W)^T` first.
2. Engine: one seeded random bf16 model of the Llama-3.2-1B shape, loaded four times (dense, and
   quantized at load by round to nearest: `Engine(quantization=...)`, the same kernels a quantized
   checkpoint uses): batch-1 decode tok/s, the 256-request workload (prompts U[64, 512), 128 new
   tokens, EOS ignored) tok/s, ratios to bf16, weight bytes against each format's theoretical size.
3. On CUDA, a profile of eight batch-1 decode steps per format (run eagerly so the profiler sees each
   kernel): kernels per step and kernel time per step against the graph-replayed step time.

Random weights make the quantized text meaningless, so accuracy is checked at the GEMM level here
and on a real trained model in tests/engine/quant/test_quant_engine.py. `--tiny` runs the same code on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_GEMMS = [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048)]
TINY_GEMMS = [("qkv", 128, 256), ("o", 128, 128), ("gate_up", 128, 1024), ("down", 512, 128)]
FORMATS = [None, "w4a16", "fp8", "w8a8"]
TARGETS = {  # (batch-1 decode, 256-request workload) ratio to bf16, from the issue
    "w4a16": (1.5, 0.9),
    "fp8": (None, 1.2),
    "w8a8": (None, 1.0),
}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def bench_us(fn, device: str, reps: int) -> float:
    """Microseconds of one fn(): on CUDA its GPU time in a CUDA graph with a cold L2 (no launch cost,
    weights read from HBM, as in a captured decode step); on CPU the median wall time."""
    if device.startswith("cuda"):
        from optcli.engine.kernels.tuning import time_in_graph

        return time_in_graph(fn) * 1000
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def tinygemm(weight, x_dtype):
    """torch's stock int4 kernel on the same int4 values (CUDA: `_weight_int4pack_mm`), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        q = weight.q
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([weight.scales.t(), torch.zeros_like(weight.scales.t())], -1).to(x_dtype).contiguous()
        return lambda x: torch._weight_int4pack_mm(x, packed, weight.group_size, sz)
    except (RuntimeError, TypeError) as exc:
        log(f"torch int4 kernel unavailable: {str(exc).splitlines()[0]}")
        return None


def gemm_table(device: str, dtype: torch.dtype, gemms, ms: list[int], reps: int) -> list[dict]:
    from optcli.engine.quant.fp8_linear import Fp8Linear
    from optcli.engine.quant.linear import Int4Linear, Int8Linear
    from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight

    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for name, k, n in gemms:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
        int4 = Int4Weight.rtn(w, 128)
        fp8_ok = device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9) or device == "cpu"
        layers.append({
            "name": name,
            "bf16": w.to(dtype),
            "int4": (Int4Linear(int4, device=device, dtype=dtype), int4.dequantize().to(dtype)),
            "torch-int4": tinygemm(int4, dtype),
            "fp8": (Fp8Linear(Fp8Weight.rtn(w), device=device, dtype=dtype), None) if fp8_ok else None,
            "int8": (Int8Linear(Int8Weight.rtn(w), device=device, dtype=dtype), None),
        })
    rows = []
    for m in ms:
        row = {"M": m}
        for method in ("bf16", "int4", "torch-int4", "fp8", "int8"):
            total, worst = 0.0, 0.0
            for layer in layers:
                x = (torch.randn(m, layer["bf16"].shape[1], generator=gen) * 0.5).to(device, dtype)
                entry = layer[method]
                if entry is None:
                    total = None
                    break
                if method == "bf16":
                    fn = partial(F.linear, x, entry)
                elif method == "torch-int4":
                    fn = partial(entry, x)
                    ref = F.linear(x.float(), layer["int4"][1].float())
                    worst = max(worst, rel_err(fn(), ref))
                else:
                    module = entry[0]
                    fn = partial(module, x)
                    ref = F.linear(x.float(), reference_weight(module).float())
                    if method in ("fp8", "int8"):
                        ref = F.linear(fake_quant(x, module), reference_weight(module).float())
                    worst = max(worst, rel_err(fn(), ref))
                total += bench_us(fn, device, reps)
            row[method] = total
            row[f"{method}_err"] = worst
        rows.append(row)
        log("GEMM M={M}: ".format(**row) + ", ".join(
            f"{k} {row[k]:.0f}us" for k in ("bf16", "int4", "torch-int4", "fp8", "int8") if row[k] is not None))
    return rows


def tuned_tiles() -> dict:
    from optcli.engine.kernels.tuning import chosen

    return chosen()


def reference_weight(module) -> torch.Tensor:
    """The dense weight a quantized layer stands for, rebuilt from its own buffers."""
    from optcli.engine.kernels import quant_reference as ops

    if module.kind == "int4" and module.mode == "triton":
        return ops.int4_dequantize(module.qweight, module.scales, module.zeros, module.group_size,
                                   module.in_features).t()
    if module.kind == "int4":
        eye = torch.eye(module.in_features, device=module.qweight.device, dtype=torch.float32)
        return module(eye).t()  # CPU int4 kernel's view of itself: columns of W^T
    if module.kind == "int8":
        return module.qweight.float() * module.scales[:, None]
    return module.qweight.float() * module.scales.t()


def fake_quant(x: torch.Tensor, module) -> torch.Tensor:
    from optcli.engine.kernels import quant_reference as ops

    q, s = ops.quantize_per_token(x, torch.int8 if module.kind == "int8" else torch.float8_e4m3fn)
    return q.float() * s


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def theoretical_bytes(engine) -> int:
    """Each format's ideal storage: packed bits + one 16-bit scale per group (int4 g128) or a 32-bit
    scale per output channel (fp8/int8); other parameters at their stored width."""
    from optcli.engine.quant.linear import QuantLinear

    layers = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    ideal = sum(m.out_features * m.in_features // 2 + m.out_features * (m.in_features // m.group_size) * 2
                if m.kind == "int4" else m.out_features * m.in_features + m.out_features * 4 for m in layers)
    held = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    return engine.weights_bytes - held + ideal


def engine_runs(model_dir: Path, device: str, dtype: str, args) -> list[dict]:
    from optcli.engine import Engine, SamplingParams

    rng = random.Random(0)
    vocab = (3, 1000)
    workload = [[rng.randrange(*vocab) for _ in range(rng.randrange(*args.prompt_range))] for _ in range(args.requests)]
    batch1 = [rng.randrange(*vocab) for _ in range(args.batch1_prompt)]
    rows = []
    for fmt in FORMATS:
        log(f"engine: loading {fmt or 'bf16'}")
        eng = Engine(str(model_dir), device=device, dtype=dtype, max_num_seqs=args.max_num_seqs,
                     max_model_len=args.prompt_range[1] + args.new_tokens + 16, quantization=fmt)
        greedy = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        eng.generate(workload, greedy)  # warm-up: every batch-size bucket compiled and its tiling timed
        eng.generate([batch1], SamplingParams(max_tokens=8, ignore_eos=True))
        sync(device)
        start = time.perf_counter()
        eng.generate([batch1], SamplingParams(max_tokens=1, ignore_eos=True))
        sync(device)
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        eng.generate([batch1], SamplingParams(max_tokens=args.batch1_new, ignore_eos=True))
        sync(device)
        tn = time.perf_counter() - start
        start = time.perf_counter()
        outs = eng.generate(workload, greedy)
        sync(device)
        wall = time.perf_counter() - start
        row = {
            "format": fmt or "bf16",
            "kernels": eng.quantized_layers,
            "batch1_tok_s": (args.batch1_new - 1) / (tn - t1),
            "workload_tok_s": sum(len(o.token_ids) for o in outs) / wall,
            "weights_bytes": eng.weights_bytes,
            "theoretical_bytes": theoretical_bytes(eng),
        }
        if device.startswith("cuda"):
            row["decode_profile"] = profile_decode_step(eng, batch1)
        rows.append(row)
        log(f"engine {row['format']}: batch-1 {row['batch1_tok_s']:.1f} tok/s, workload {row['workload_tok_s']:.1f} "
            f"tok/s, weights {row['weights_bytes'] / 2**20:.1f} MiB ({row['kernels']})")
        del eng, outs
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def profile_decode_step(eng, prompt: list[int], steps: int = 8) -> dict:
    """Where a batch-1 decode step's GPU time goes: `steps` steps run eagerly (graphs set aside: the
    profiler sees kernels one by one) under torch.profiler. Kernel count and summed kernel time per
    step, against the graph-replayed step time the tok/s figure implies, tell launch-bound from
    bandwidth-bound; the top kernels say which to work on."""
    from torch.profiler import ProfilerActivity, profile

    from optcli.engine import SamplingParams

    try:
        eng.add_request(prompt, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
        eng.step()  # prefill
        eng.step()
        graphs, eng.runner.graphs = eng.runner.graphs, None
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    eng.step()
                torch.cuda.synchronize()
        finally:
            eng.runner.graphs = graphs
        while eng.has_unfinished():
            eng.step()
        kernels = []
        for e in prof.key_averages():
            us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            if us > 0 and e.count > 0:
                kernels.append((e.key, e.count / steps, us / steps))
        kernels.sort(key=lambda k: -k[2])
        result = {
            "kernels_per_step": sum(k[1] for k in kernels),
            "kernel_us_per_step": sum(k[2] for k in kernels),
            "top": [{"kernel": name[:60], "per_step": n, "us_per_step": us} for name, n, us in kernels[:8]],
        }
        log(f"  decode step profile: {result['kernels_per_step']:.0f} kernels, {result['kernel_us_per_step']:.0f} us "
            "of kernel time per step; top: " + "; ".join(f"{t['kernel'][:40]} {t['us_per_step']:.0f}us" for t in result["top"][:5]))
        return result
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not end the run
        log(f"  decode step profile failed: {exc!r}")
        return {"error": repr(exc)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_tables(gemm_rows: list[dict], engine_rows: list[dict], device_name: str) -> bool:
    timing = "median wall us" if device_name == "CPU" else "GPU us per call in a CUDA graph, cold L2"
    print(f"\n## Per decoder layer (4 GEMMs), {timing}, {device_name}\n")
    print("| M | bf16 | int4 ours (Triton) | int4 torch | FP8 (fused quant + _scaled_mm) | W8A8 (Triton) |")
    print("|---|---|---|---|---|---|")
    for r in gemm_rows:
        cells = [f"{r['bf16']:.0f}"]
        for k in ("int4", "torch-int4", "fp8", "int8"):
            cells.append("n/a" if r[k] is None else f"{r[k]:.0f} ({r['bf16'] / r[k]:.2f}x)")
        print(f"| {r['M']} | " + " | ".join(cells) + " |")
    errs = {k: max(r[f"{k}_err"] for r in gemm_rows) for k in ("int4", "torch-int4", "fp8", "int8")}
    print("\nmax relative error vs dequantized reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    base = engine_rows[0]
    print(f"\n## Engine, {device_name}\n")
    print("| format | batch-1 tok/s | ratio | target | 256-request tok/s | ratio | target | weights MiB | vs theory |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = all(v < 2e-2 for v in errs.values())
    for r in engine_rows:
        b1 = r["batch1_tok_s"] / base["batch1_tok_s"]
        wl = r["workload_tok_s"] / base["workload_tok_s"]
        t1, t2 = TARGETS.get(r["format"], (None, None))
        mem = r["weights_bytes"] / r["theoretical_bytes"]
        ok &= mem <= 1.10
        print(f"| {r['format']} | {r['batch1_tok_s']:.1f} | {b1:.2f}x | {f'>= {t1:.1f}x' if t1 else ''} | "
              f"{r['workload_tok_s']:.0f} | {wl:.2f}x | {f'>= {t2:.1f}x' if t2 else ''} | "
              f"{r['weights_bytes'] / 2**20:.0f} | {mem:.3f} |")
    profiled = [r for r in engine_rows if "kernels_per_step" in r.get("decode_profile", {})]
    if profiled:
        print("\n| format | batch-1 step, graph (us) | kernels per step | kernel time per step (us) |")
        print("|---|---|---|---|")
        for r in profiled:
            p = r["decode_profile"]
            print(f"| {r['format']} | {1e6 / r['batch1_tok_s']:.0f} | {p['kernels_per_step']:.0f} | "
                  f"{p['kernel_us_per_step']:.0f} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, fp32, tiny shapes (a test of this script)")
    parser.add_argument("--smoke", action="store_true", help="--tiny with 3 timing reps and 2 requests of 4 tokens")
    parser.add_argument("--json-out", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or args.smoke
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device == "cpu":
        print("no CUDA device: use --tiny for the CPU version", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.tiny else torch.bfloat16
    gemms, ms, reps = (TINY_GEMMS, [1, 16, 64], 30) if args.tiny else (LAYER_GEMMS, [1, 16, 64, 256, 1024], 100)
    args.requests, args.prompt_range, args.new_tokens = (8, (8, 32), 8) if args.tiny else (256, (64, 512), 128)
    args.batch1_prompt, args.batch1_new = (16, 16) if args.tiny else (128, 256)
    if args.smoke:
        reps, args.requests, args.new_tokens, args.batch1_new = 3, 2, 4, 4
    args.max_num_seqs = 8 if args.tiny else 256
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    log(f"device {device_name}, torch {torch.__version__}")
    gemm_rows = gemm_table(device, dtype, gemms, ms, reps)
    engine_rows = []
    if not args.skip_engine:
        from bench_model import FULL, TINY_PLAN, build_model

        with tempfile.TemporaryDirectory(prefix="optcli-quant-check-") as tmp:
            del_me = build_model(Path(tmp), TINY_PLAN if args.tiny else FULL, device, seed=0)
            del del_me  # the in-memory transformers copy: only the saved weights are needed
            gc.collect()
            engine_rows = engine_runs(Path(tmp), device, "float32" if args.tiny else "bfloat16", args)
    ok = print_tables(gemm_rows, engine_rows, device_name) if engine_rows else True
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": device_name, "gemm": gemm_rows, "tiles": tuned_tiles(), "engine": engine_rows},
                                            indent=2, default=str))
    print("\nresult:", "PASS (correctness and memory)" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
