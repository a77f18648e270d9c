"""CPU throughput benchmark: our engine vs transformers' continuous batching vs padded static `generate`.

One process, one workload, three systems, each warmed up on a few throw-away requests before its
timed run:

1. ours      `optcli.engine.Engine(...).generate(token ids, SamplingParams(max_tokens=n, ignore_eos=True))`
2. HF CB     transformers' continuous batching manager (`model.init_continuous_batching(...)`, then
             `add_request(ids, max_new_tokens=n, eos_token_id=-1)` per request and `get_result` until
             every request has finished; `generate_batch` takes one max_new_tokens for all requests,
             so the manager API is used for per-request lengths)
3. HF static `model.generate` in batches of 16 (arrival order, left padding); every batch runs to its
             longest requested length (min_new_tokens = max_new_tokens, so EOS cannot stop it early);
             only the requested tokens count as useful

Workload (issue spec): a seeded random fp32 Llama of ~56M parameters, 64 requests, prompt lengths
uniform in [16, 128), output lengths uniform in [8, 256), EOS ignored, greedy decoding.
Reported: useful output tokens / wall time per system, the ratios against our targets, and the
fraction of the compute floor (the workload's FLOPs at this machine's measured fp32 matmul rate).

    python benchmarks/engine_cpu.py            # full workload (minutes on a laptop-class CPU)
    python benchmarks/engine_cpu.py --quick    # smoke test: 2-layer model, 8 short requests
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from engine_cpu_model import (
    MODEL_SHAPE,
    build_model_dir,
    make_requests,
    measure_matmul_flops,
    workload_flops,
)

TARGET_VS_CB = 2.0
TARGET_VS_STATIC = 2.5
STATIC_BATCH = 16


@dataclass
class Workload:
    layers: int
    num_requests: int
    prompt_range: tuple[int, int]  # [lo, hi)
    output_range: tuple[int, int]  # [lo, hi)
    warmup_requests: int
    warmup_prompt_range: tuple[int, int]
    warmup_new_tokens: int
    matmul_size: int
    matmul_reps: int


FULL = Workload(8, 64, (16, 128), (8, 256), 4, (16, 48), 8, 2048, 5)
QUICK = Workload(2, 8, (8, 32), (4, 24), 2, (8, 16), 4, 1024, 3)
SMOKE = Workload(1, 3, (4, 12), (2, 6), 1, (4, 8), 2, 128, 1)  # a test of the script (tests/test_benchmarks_smoke.py)



# --- setup --------------------------------------------------------------------------------------










# --- the three systems --------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    wall_s: float
    useful_tokens: int
    computed_tokens: int  # generated tokens the system actually computed (static: padding included)
    outputs: list[list[int]]
    extra: dict

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall_s


def run_ours(model_dir: Path, prompts, outputs, warm_prompts, warm_new) -> Result:
    from optcli.engine import Engine, SamplingParams

    eng = Engine(str(model_dir), device="cpu", dtype="float32", max_num_seqs=64, max_model_len=2048)
    warm = eng.generate(warm_prompts, [SamplingParams(max_tokens=warm_new, ignore_eos=True) for _ in warm_prompts])
    assert all(len(o.token_ids) == warm_new for o in warm)
    before = eng.stats()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t0
    after = eng.stats()
    # stats() is cumulative (warm-up included): take the timed run's share of steps and scheduled seqs.
    steps = after["num_steps"] - before["num_steps"]
    scheduled = _scheduled(after, eng.max_num_seqs) - _scheduled(before, eng.max_num_seqs)
    tokens = [list(o.token_ids) for o in outs]
    extra = {
        "batch_efficiency": scheduled / steps / eng.max_num_seqs if steps else None,
        "num_steps": steps,
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "kv_blocks_total": after["kv_blocks_total"],
        "kv_cache_mib": after["kv_cache_bytes"] / 2**20,
        "max_num_seqs": eng.max_num_seqs,
        "finish_reasons": sorted({o.finish_reason for o in outs}),
    }
    useful = sum(min(len(t), n) for t, n in zip(tokens, outputs, strict=True))
    return Result("ours (optcli engine)", wall, useful, sum(len(t) for t in tokens), tokens, extra)


def _scheduled(stats: dict, max_num_seqs: int) -> float:
    if not stats["num_steps"]:
        return 0.0
    return stats["batch_efficiency"] * stats["num_steps"] * max_num_seqs


def run_hf_cb(model_dir: Path, prompts, outputs, warm_prompts, warm_new) -> Result:
    from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM
    from transformers.generation.continuous_batching.utils import WorkloadHints

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(outputs), eos_token_id=-1, pad_token_id=0)
    max_len = max(len(p) for p in prompts) + max(outputs)
    block_size = 256  # ContinuousBatchingConfig's default
    # Sized explicitly: on CPU transformers would otherwise size the KV cache from 90% of total RAM.
    # Same token budget per step as our engine's default (2048); room for every request at full length.
    cb_cfg = ContinuousBatchingConfig(
        block_size=block_size,
        num_blocks=len(prompts) * (math.ceil(max_len / block_size) + 1),
        max_batch_tokens=2048,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts), max_generated_length=max(outputs), num_requests=len(prompts)
    )
    manager = model.init_continuous_batching(
        generation_config=gen_cfg, continuous_batching_config=cb_cfg, workload_hints=hints
    )
    attn_impl = model.config._attn_implementation  # the paged variant CB switched to; stop() restores the original
    manager.warmup()  # a no-op on CPU (no CUDA graphs, no compile), kept as the documented entry path
    manager.start()
    ok = False
    try:
        collect(manager, warm_prompts, [warm_new] * len(warm_prompts), "warm")
        t0 = time.perf_counter()
        results = collect(manager, prompts, outputs, "req")
        wall = time.perf_counter() - t0
        ok = True
    finally:
        # On an error, a hard stop: a flushing stop would first finish every pending request.
        manager.stop(block=True, timeout=60, hard_stop=not ok)
        manager.destroy()
    tokens = [list(r.generated_tokens) for r in results]
    useful = sum(min(len(t), n) for t, n in zip(tokens, outputs, strict=True))
    cfg = manager.continuous_batching_config
    extra = {
        "attn_implementation": attn_impl,
        "num_blocks": cfg.num_blocks,
        "block_size": cfg.block_size,
        "max_batch_tokens": cfg.max_batch_tokens,
        "max_requests_per_batch": cfg.max_requests_per_batch,
    }
    return Result("HF continuous batching", wall, useful, sum(len(t) for t in tokens), tokens, extra)


def collect(manager, prompts, outputs, prefix: str):
    """Submit every request, then wait for all of them; returns GenerationOutputs in request order."""
    ids = [f"{prefix}-{k}" for k in range(len(prompts))]
    for rid, p, n in zip(ids, prompts, outputs, strict=True):
        if manager.add_request(p, request_id=rid, max_new_tokens=n, eos_token_id=-1) is None:
            raise RuntimeError(f"transformers CB refused request {rid}")
    done: dict = {}
    while len(done) < len(ids):
        res = manager.get_result(timeout=1)
        if res is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers CB loop stopped with {len(ids) - len(done)} requests unfinished")
            continue
        if res.is_finished():
            if res.error is not None:
                raise RuntimeError(f"transformers CB request {res.request_id} failed: {res.error}")
            done[res.request_id] = res
    return [done[rid] for rid in ids]


def run_hf_static(model_dir: Path, prompts, outputs, warm_prompts, warm_new, eos: int) -> Result:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def batch_generate(batch_prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        width = max(len(p) for p in batch_prompts)
        ids = torch.zeros(len(batch_prompts), width, dtype=torch.long)  # pad id 0 (<unk>), left padding
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch_prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # EOS cannot end a batch early
                do_sample=False,
                pad_token_id=0,
                eos_token_id=eos,
            )
        return out[:, width:]

    batch_generate(warm_prompts, warm_new)
    tokens: list[list[int]] = []
    computed = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), STATIC_BATCH):
        bp, bo = prompts[start : start + STATIC_BATCH], outputs[start : start + STATIC_BATCH]
        gen = batch_generate(bp, max(bo))
        computed += gen.numel()
        tokens.extend(gen[row, :n].tolist() for row, n in enumerate(bo))
    wall = time.perf_counter() - t0
    useful = sum(len(t) for t in tokens)
    extra = {"batch_size": STATIC_BATCH, "padding_waste": 1 - useful / computed if computed else 0.0}
    return Result(f"HF static generate (b={STATIC_BATCH})", wall, useful, computed, tokens, extra)


# --- report -------------------------------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose greedy tokens are identical (informational: random weights, near ties)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 2-layer model, 8 short requests (~1 min)")
    ap.add_argument("--smoke", action="store_true", help="a test of this script: 1 layer, 3 tiny requests (seconds)")
    ap.add_argument("--skip-cb", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--skip-static", action="store_true", help="skip padded static model.generate")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the workload")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    wl = SMOKE if args.smoke else QUICK if args.quick else FULL
    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(
        f"threads: torch intra-op {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}; "
        f"cpu: {platform.processor() or platform.machine()}"
    )
    print(f"mode: {'smoke' if args.smoke else 'quick' if args.quick else 'full'}  seed {args.seed}")

    rng = random.Random(args.seed)
    prompts, outputs = make_requests(wl.num_requests, wl.prompt_range, wl.output_range, rng)
    warm_prompts, _ = make_requests(wl.warmup_requests, wl.warmup_prompt_range, (1, 2), random.Random(args.seed + 1))

    tmp = Path(tempfile.mkdtemp(prefix="optcli-bench-"))
    try:
        params, eos = build_model_dir(tmp, wl.layers, args.seed)
        print(
            f"model: Llama {wl.layers} layers, hidden {MODEL_SHAPE['hidden_size']}, vocab {MODEL_SHAPE['vocab_size']}, "
            f"untied lm_head: {params / 1e6:.1f}M parameters, fp32, random weights (seed {args.seed})"
        )
        print(
            f"workload: {len(prompts)} requests, prompt tokens {sum(map(len, prompts))} "
            f"(lengths in [{wl.prompt_range[0]}, {wl.prompt_range[1]})), output tokens {sum(outputs)} "
            f"(lengths in [{wl.output_range[0]}, {wl.output_range[1]})), EOS ignored, greedy"
        )
        flops = workload_flops(prompts, outputs, wl.layers)
        print(
            f"workload FLOPs: {flops['total'] / 1e9:.1f} GFLOP (decoder matmuls {flops['decoder_matmuls'] / 1e9:.1f}, "
            f"lm_head {flops['lm_head'] / 1e9:.1f}, attention {flops['attention'] / 1e9:.1f}); "
            f"with the LM head on every token: {flops['naive_total'] / 1e9:.1f} GFLOP"
        )
        peak = measure_matmul_flops(wl.matmul_size, wl.matmul_reps)
        floor_s = flops["total"] / peak
        print(
            f"fp32 matmul ({wl.matmul_size}^3, best of {wl.matmul_reps}): {peak / 1e9:.1f} GFLOP/s -> "
            f"compute floor {floor_s:.2f} s = {sum(outputs) / floor_s:.0f} tok/s"
        )
        sys.stdout.flush()

        results: list[Result] = []
        print("running ours ...", flush=True)
        results.append(run_ours(tmp, prompts, outputs, warm_prompts, wl.warmup_new_tokens))
        if not args.skip_cb:
            print("running transformers continuous batching ...", flush=True)
            results.append(run_hf_cb(tmp, prompts, outputs, warm_prompts, wl.warmup_new_tokens))
        if not args.skip_static:
            print(f"running transformers static generate (batches of {STATIC_BATCH}) ...", flush=True)
            results.append(run_hf_static(tmp, prompts, outputs, warm_prompts, wl.warmup_new_tokens, eos))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ours = results[0]
    requested = sum(outputs)
    print()
    print(f"{'system':<30} {'wall s':>8} {'useful tok':>10} {'tok/s':>9} {'ours/this':>10} {'target':>8}  note")
    for r in results:
        if r is ours:
            ratio, target, note = "", "", ""
        else:
            x = ours.tok_s / r.tok_s
            goal = TARGET_VS_CB if "continuous" in r.name else TARGET_VS_STATIC
            ratio, target = f"{x:.2f}x", f">={goal:g}x"
            note = "met" if x >= goal else "NOT met"
        if r.useful_tokens != requested:
            note += f" (!{r.useful_tokens} of {requested} requested tokens)"
        if "padding_waste" in r.extra:
            note += f" padding waste {r.extra['padding_waste']:.0%}"
        print(f"{r.name:<30} {r.wall_s:>8.2f} {r.useful_tokens:>10} {r.tok_s:>9.1f} {ratio:>10} {target:>8}  {note}")
    floor_tok_s = requested / floor_s
    print(f"{'compute floor':<30} {floor_s:>8.2f} {requested:>10} {floor_tok_s:>9.1f}")
    print()
    print(
        f"ours: {ours.tok_s / floor_tok_s:.1%} of the compute floor "
        f"({flops['total'] / ours.wall_s / 1e9:.1f} useful GFLOP/s of {peak / 1e9:.1f} measured)"
    )
    e = ours.extra
    be = e["batch_efficiency"]
    print(
        f"ours: batch efficiency {be:.3f} (mean scheduled seqs per step / max_num_seqs {e['max_num_seqs']}), "
        f"{e['num_steps']} steps, {e['num_preemptions']} preemptions, KV cache {e['kv_blocks_total']} blocks "
        f"({e['kv_cache_mib']:.0f} MiB), finish reasons {e['finish_reasons']}"
    )
    for r in results[1:]:
        info = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        print(f"{r.name}: {info}; identical greedy outputs vs ours: {agreement(ours.outputs, r.outputs):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
