"""GPU check: greedy equality with transformers, throughput against transformers, batch-1 roofline.

One short run on one GPU (H100/H200), one process. A seeded random bf16 model of the
Llama-3.2-1B shape (16 layers, hidden 2048, intermediate 8192, 32 heads / 8 KV heads, head_dim
64, vocab 128256, tied embeddings, rope_theta 500000) is built on the device, saved with the
builtin tokenizer (no hub), and then:

1. greedy equality: our engine (all 8 prompts in one batch) against transformers `generate`
   (one prompt at a time); per prompt, the first divergence and the logit gaps there. Random bf16
   weights give near ties, so a late flip is reported, not fatal; the script exits 1 only if some
   prompt differs within its first 8 tokens.
2. throughput, each side warmed up first:
   (a) 256 requests, prompts uniform in [64, 512), 128 new tokens each, EOS ignored: ours
       `Engine.generate` against transformers `generate_batch` (its continuous-batching front end).
       transformers runs only --hf-requests of them (default 64): its tok/s is what it measured
       on those, never extrapolated; ours is also timed on those same requests for a like-for-like
       ratio.
   (b) batch 1, 256 new tokens: ours against transformers `generate`.
3. device copy bandwidth (device-to-device copy, GB/s = 2 * bytes / time, best of N) and the
   batch-1 roofline: tok/s = bandwidth / weight bytes (every weight is read once per token).
4. one table: tok/s of each, ours/transformers for (a) (target >= 10x) and (b), batch-1 decode
   as a fraction of the roofline (target >= 70%), and the card's name.

Imports only optcli.engine (and what it imports), transformers and torch.

    python benchmarks/gpu_check.py                      # full check on the GPU (~2-3 min)
    python benchmarks/gpu_check.py --tiny               # same code path, 2-layer fp32 model (CPU test)
    python benchmarks/gpu_check.py --skip-hf            # ours only (no equality check, no ratios)
    python benchmarks/gpu_check.py --quant [--tiny]     # quantized formats: benchmarks/quant_check.py
                                                        # (a fresh machine first tunes the GEMMs: minutes)
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_model import FULL, PROMPT_ID_RANGE, TINY_PLAN, Plan, build_model, free_device_memory, log, sync
from hf_peer import hf_generate, hf_generate_batch

TARGET_CB_RATIO = 10.0  # (a) ours / transformers generate_batch
TARGET_ROOFLINE = 0.70  # ours batch-1 decode / (bandwidth / weight bytes)
GATE_TOKENS = 8  # exit 1 if any prompt differs from transformers within its first this-many tokens

def prompts_of(n: int, length_range: tuple[int, int], rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(*PROMPT_ID_RANGE) for _ in range(rng.randrange(*length_range))] for _ in range(n)]


# --- model -------------------------------------------------------------------------------------


def weight_bytes(model) -> int:
    """Bytes of distinct parameters (the tied embedding / LM head counted once): one decode step reads them all."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- ours --------------------------------------------------------------------------------------


def make_engine(model_dir: Path, plan: Plan, device: str, max_model_len: int, enforce_eager: bool):
    from optcli.engine import Engine

    kwargs = dict(device=device, dtype=plan.dtype, max_num_seqs=plan.max_num_seqs, max_model_len=max_model_len)
    accepted = inspect.signature(Engine).parameters
    note = "enforce_eager not in Engine's signature"
    if "enforce_eager" in accepted:
        kwargs["enforce_eager"] = enforce_eager
        note = f"enforce_eager={enforce_eager}"
    elif enforce_eager:
        log("warning: --enforce-eager given but this Engine has no enforce_eager parameter; ignored")
    eng = Engine(str(model_dir), **kwargs)
    graphs = getattr(getattr(eng, "runner", None), "graphs", None) is not None
    info = f"{note}, attention backend {getattr(eng, 'backend', '?')}, CUDA graphs {'on' if graphs else 'off'}"
    return eng, info


def ours_generate(eng, device: str, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, list[list[int]]]:
    from optcli.engine import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in new_tokens]
    sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = [list(o.token_ids) for o in outs]
    for t, n in zip(tokens, new_tokens, strict=True):
        if len(t) != n:
            raise RuntimeError(f"our engine returned {len(t)} tokens for a request of {n}")
    return wall, tokens


# --- transformers ------------------------------------------------------------------------------








# --- checks ------------------------------------------------------------------------------------


def greedy_check(eng, model, device: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[str], int, int]:
    """Ours (one batch) vs transformers generate (one by one). Returns (lines, prompts identical, earliest divergence)."""
    _, ours = ours_generate(eng, device, prompts, [new_tokens] * len(prompts))
    lines, same, earliest = [], 0, new_tokens
    for k, (p, mine) in enumerate(zip(prompts, ours, strict=True)):
        _, ref, logits = hf_generate(model, device, p, new_tokens, with_logits=True)
        j = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=True)) if a != b), None)
        if j is None:
            same += 1
            lines.append(f"  prompt {k} ({len(p)} tokens): identical over {new_tokens} tokens")
            continue
        earliest = min(earliest, j)
        top = torch.topk(logits[j], 2)
        gap2 = (top.values[0] - top.values[1]).item()
        gap_ours = (logits[j][ref[j]] - logits[j][mine[j]]).item()
        rank = int((logits[j] > logits[j][mine[j]]).sum())  # 0-based rank of our token in transformers' logits
        flag = f"  <-- within the first {GATE_TOKENS} tokens" if j < GATE_TOKENS else ""
        lines.append(
            f"  prompt {k} ({len(p)} tokens): first divergence at token {j}: transformers {ref[j]}, ours {mine[j]}; "
            f"transformers' top-2 logit gap {gap2:.4f}, its logit(top) - logit(ours) {gap_ours:.4f} "
            f"(ours is its #{rank + 1}){flag}"
        )
    return lines, same, earliest


def decode_rate(n: int, t1: float, tn: float) -> float:
    """Decode-only tok/s: the N-token run minus the 1-token run (prefill and first token) over N - 1 tokens."""
    return (n - 1) / (tn - t1) if n > 1 and tn > t1 else math.nan


def measure_copy_bandwidth(device: str, nbytes: int, reps: int) -> float:
    """Device-to-device copy: 2 * bytes (read + write) / time, best of `reps`."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    free_device_memory(device)
    return 2 * nbytes / best


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--quant" in argv:  # the quantized-formats check lives in its own script (issue 9)
        from quant_check import main as quant_main

        return quant_main([a for a in argv if a != "--quant"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-128 fp32 model, 8 short requests (CPU test)")
    ap.add_argument("--smoke", action="store_true", help="--tiny with 2 requests of a few tokens (a test of this script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true", help="ours only: no equality check, no transformers timings")
    ap.add_argument("--requests", type=int, help="(a) request count (default 256; --tiny 8)")
    ap.add_argument("--new-tokens", type=int, help="(a) new tokens per request (default 128; --tiny 16)")
    ap.add_argument("--hf-requests", type=int, help="(a) requests transformers runs (default 64; --tiny 4)")
    ap.add_argument("--batch1-new-tokens", type=int, help="(b) new tokens at batch 1 (default 256; --tiny 32)")
    ap.add_argument("--enforce-eager", action="store_true", help="pass enforce_eager=True to Engine (if it takes it)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    args.tiny = args.tiny or args.smoke
    plan = replace(TINY_PLAN if args.tiny else FULL)
    if args.smoke:
        plan = replace(plan, requests=2, new_tokens=4, hf_requests=1, batch1_new=4, check_prompts=2,
                       check_new=GATE_TOKENS, warm_requests=1, copy_bytes=8 << 20, copy_reps=2)
    for field_name, value in (
        ("requests", args.requests),
        ("new_tokens", args.new_tokens),
        ("hf_requests", args.hf_requests),
        ("batch1_new", args.batch1_new_tokens),
    ):
        if value is not None:
            if value < 1:
                ap.error(f"--{field_name.replace('_', '-')} must be >= 1")
            setattr(plan, field_name, value)
    plan.hf_requests = min(plan.hf_requests, plan.requests)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    card = (
        torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    )
    log(
        f"device {device}: {card}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )

    rng = random.Random(args.seed)
    work = prompts_of(plan.requests, plan.prompt_range, rng)  # (a) ours
    hf_work = prompts_of(plan.hf_requests, plan.prompt_range, rng)  # (a) transformers, and ours on the same
    warm = prompts_of(plan.warm_requests, plan.prompt_range, rng)
    warm_new = [rng.randrange(*plan.warm_new_range) for _ in warm]
    check = prompts_of(plan.check_prompts, plan.check_prompt_range, rng)
    b1 = prompts_of(3, (plan.batch1_prompt, plan.batch1_prompt + 1), rng)  # warm-up, 1 token, full run
    # Distinct fresh prompts everywhere: no run gets prefix-cache hits from an earlier one.
    max_model_len = max(
        plan.prompt_range[1] - 1 + plan.new_tokens,
        plan.batch1_prompt + plan.batch1_new,
        plan.check_prompt_range[1] - 1 + plan.check_new,
    )
    max_model_len = min(-(-max_model_len // 64) * 64, plan.shape["max_position_embeddings"])

    tmp = Path(tempfile.mkdtemp(prefix="optcli-gpu-check-"))
    res: dict = {}
    exit_code = 0
    try:
        model = build_model(tmp, plan, device, args.seed)
        wbytes = weight_bytes(model)
        nparams = sum(p.numel() for p in model.parameters())
        log(
            f"model: {plan.name}, {nparams / 1e6:.1f}M parameters ({wbytes / 1e9:.3f} GB in {plan.dtype}), "
            f"random weights (seed {args.seed}), saved to {tmp}"
        )
        if args.skip_hf:
            del model
            model = None
            free_device_memory(device)

        eng, eng_info = make_engine(tmp, plan, device, max_model_len, args.enforce_eager)
        log(f"our engine: max_num_seqs {plan.max_num_seqs}, max_model_len {max_model_len}, {eng_info}")

        # 1. greedy equality
        if model is not None:
            lines, same, earliest = greedy_check(eng, model, device, check, plan.check_new)
            res["check"] = (same, earliest)
            log(
                f"greedy equality vs transformers generate: {same}/{len(check)} prompts identical over "
                f"{plan.check_new} tokens"
            )
            for line in lines:
                print(line)
            if earliest < GATE_TOKENS:
                exit_code = 1

        # 2a / 2b, ours
        ours_generate(eng, device, warm, warm_new)
        log(f"ours: warmed up on {len(warm)} requests")
        wall, _ = ours_generate(eng, device, work, [plan.new_tokens] * len(work))
        res["ours_a"] = (len(work) * plan.new_tokens / wall, wall)
        log(f"ours (a): {len(work)} requests x {plan.new_tokens} tokens in {wall:.2f} s")
        if model is not None and plan.hf_requests < plan.requests:
            wall, _ = ours_generate(eng, device, hf_work, [plan.new_tokens] * len(hf_work))
            res["ours_a_same"] = (len(hf_work) * plan.new_tokens / wall, wall)
            log(f"ours (a) on transformers' {len(hf_work)} requests: {wall:.2f} s")
        ours_generate(eng, device, [b1[0]], [16])
        t1, _ = ours_generate(eng, device, [b1[1]], [1])
        tn, _ = ours_generate(eng, device, [b1[2]], [plan.batch1_new])
        res["ours_b"] = (plan.batch1_new / tn, decode_rate(plan.batch1_new, t1, tn), tn)
        log(f"ours (b): batch 1, {plan.batch1_new} tokens in {tn:.3f} s (1 token: {t1 * 1e3:.1f} ms)")
        del eng
        free_device_memory(device)

        # 2a / 2b, transformers
        if model is not None:
            hf_generate(model, device, b1[0], 16)
            t1, _, _ = hf_generate(model, device, b1[1], 1)
            tn, _, _ = hf_generate(model, device, b1[2], plan.batch1_new)
            res["hf_b"] = (plan.batch1_new / tn, decode_rate(plan.batch1_new, t1, tn), tn)
            log(f"transformers generate (b): batch 1, {plan.batch1_new} tokens in {tn:.3f} s")
            wall, to_last, _, cb_info = hf_generate_batch(model, device, hf_work, plan.new_tokens, warm, warm_new)
            n = len(hf_work) * plan.new_tokens
            res["hf_a"] = (n / wall, wall, n / to_last, to_last)
            log(
                f"transformers generate_batch (a): {len(hf_work)} requests x {plan.new_tokens} tokens in "
                f"{wall:.2f} s ({to_last:.2f} s to its last result); {cb_info}"
            )
            del model
            free_device_memory(device)

        # 3. bandwidth and roofline
        bw = measure_copy_bandwidth(device, plan.copy_bytes, plan.copy_reps)
        roof = bw / wbytes
        log(
            f"copy bandwidth {bw / 1e9:.1f} GB/s ({plan.copy_bytes >> 20} MiB, best of {plan.copy_reps}) "
            f"-> batch-1 roofline {roof:.1f} tok/s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 4. the table
    rows: list[tuple[str, str, str, str, str]] = []

    def add(what, value="", target="", status="", note=""):
        rows.append((what, value, target, status, note))

    if "check" in res:
        same, earliest = res["check"]
        first = "none" if same == plan.check_prompts else f"earliest at token {earliest}"
        add(
            "greedy equality vs HF generate",
            f"{same}/{plan.check_prompts} identical",
            f"first {GATE_TOKENS} tok",
            "FAIL" if earliest < GATE_TOKENS else "ok",
            f"{plan.check_new} tokens per prompt; divergences: {first}",
        )
    else:
        add("greedy equality vs HF generate", "skipped", note="--skip-hf")
    ours_a, wall_a = res["ours_a"]
    add(f"(a) ours, {plan.requests} req x {plan.new_tokens}", f"{ours_a:,.1f} tok/s", note=f"{wall_a:.2f} s")
    if "hf_a" in res:
        hf_call, wall, hf_a, to_last = res["hf_a"]
        add(
            f"(a) HF generate_batch, {plan.hf_requests} req x {plan.new_tokens}",
            f"{hf_a:,.1f} tok/s",
            note=f"to its last result ({to_last:.2f} s), measured on the {plan.hf_requests} requests it ran, "
            f"not extrapolated; whole call incl. teardown {hf_call:,.1f} tok/s ({wall:.2f} s)",
        )
        ratio = ours_a / hf_a
        add(
            "(a) ours / HF generate_batch",
            f"{ratio:.2f}x",
            f">={TARGET_CB_RATIO:g}x",
            "met" if ratio >= TARGET_CB_RATIO else "NOT met",
            (f"ours on {plan.requests} req vs HF on {plan.hf_requests}; " if plan.hf_requests < plan.requests else "")
            + f"vs HF's whole call: {ours_a / hf_call:.2f}x",
        )
        if "ours_a_same" in res:
            same_tok_s, wall = res["ours_a_same"]
            add(f"(a) ours on HF's {plan.hf_requests} req", f"{same_tok_s:,.1f} tok/s", note=f"{wall:.2f} s")
            add("(a) ours / HF, same requests", f"{same_tok_s / hf_a:.2f}x", "", "info", "like-for-like workload")
    else:
        add("(a) HF generate_batch", "skipped", note="--skip-hf")
    ours_b, ours_decode, wall = res["ours_b"]
    add(
        f"(b) ours, batch 1 x {plan.batch1_new}",
        f"{ours_b:,.1f} tok/s",
        note=f"{wall:.3f} s; decode only {ours_decode:,.1f} tok/s",
    )
    if "hf_b" in res:
        hf_b, hf_decode, wall = res["hf_b"]
        add(
            f"(b) HF generate, batch 1 x {plan.batch1_new}",
            f"{hf_b:,.1f} tok/s",
            note=f"{wall:.3f} s; decode only {hf_decode:,.1f} tok/s",
        )
        add("(b) ours / HF generate", f"{ours_b / hf_b:.2f}x", "", "info")
    else:
        add("(b) HF generate", "skipped", note="--skip-hf")
    add(
        "device copy bandwidth",
        f"{bw / 1e9:,.1f} GB/s",
        note=f"2 x {plan.copy_bytes >> 20} MiB / time, best of {plan.copy_reps}",
    )
    add("batch-1 roofline", f"{roof:,.1f} tok/s", note=f"bandwidth / {wbytes / 1e9:.3f} GB of weights")
    frac = ours_decode / roof
    add(
        "(b) ours decode / roofline",
        f"{frac:.1%}",
        f">={TARGET_ROOFLINE:.0%}",
        "met" if frac >= TARGET_ROOFLINE else "NOT met",
        "decode only: (N-1) / (t(N tokens) - t(1 token))",
    )

    print()
    print(
        f"gpu_check on {card} ({device}); model {plan.name}, {plan.dtype}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    widths = [max(len(r[i]) for r in rows + [("measurement", "value", "target", "status", "note")]) for i in range(4)]
    header = ("measurement", "value", "target", "status", "note")
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip())
    if exit_code:
        print(f"\nFAIL: some prompt differs from transformers within its first {GATE_TOKENS} tokens")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
