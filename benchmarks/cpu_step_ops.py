"""The non-GEMM CPU ops of a decode step, three ways each: what the CPU attention path and the
greedy sampler's argmax are written from (`engine/attention/cpu.py` `_attend`, `engine/sampler.py`
`greedy_argmax`).

On the Llama-3.2-1B shape (32 heads / 8 KV heads, head_dim 64, vocab 128256) it times, in interleaved
repeats on one thread:

- decode SDPA (one query a sequence over 80 keys, a boolean mask) at B = 1 and 64: bf16 with `enable_gqa`,
  bf16 with the 4 query heads of each KV head as the rows of one query block (what the engine runs), and
  the inputs widened to fp32 (the casts and the cast back included);
- the argmax of [1, 128256] and [64, 128256] bf16 logits, as they are and through a float32 copy.

Per-op CPU time of the calling thread (`time.thread_time`), so that other processes on a shared machine
slow the figures less than they slow wall-clock time; each figure is the median of the repeats.

    python benchmarks/cpu_step_ops.py
    python benchmarks/cpu_step_ops.py --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM, VOCAB = 32, 8, 64, 128256


def per_call_us(fn, calls: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


VARIANTS = ("bf16", "heads as rows", "fp32")


def sdpa_cases() -> dict[str, dict]:
    """name -> {"calls": calls per timing, variant: fn}."""
    cases = {}
    for name, (b, n) in {"decode B=1 (80 keys)": (1, 80), "decode B=64 (80 keys)": (64, 80)}.items():
        q = torch.randn(b, HEADS, 1, DIM).bfloat16()
        k = torch.randn(b, KV_HEADS, n, DIM).bfloat16()
        v = torch.randn(b, KV_HEADS, n, DIM).bfloat16()
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)

        def as_is(q=q, k=k, v=v, m=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

        def rows(q=q, k=k, v=v, m=mask, b=b):
            return F.scaled_dot_product_attention(q.reshape(b, KV_HEADS, HEADS // KV_HEADS, DIM), k, v,
                                                  attn_mask=m).reshape(b, HEADS, 1, DIM)

        def widened(q=q, k=k, v=v, m=mask):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                                  enable_gqa=True).to(torch.bfloat16)

        cases[f"sdpa {name}"] = {"calls": 3 if b > 1 else 50, "bf16": as_is, "heads as rows": rows, "fp32": widened}
    for rows_n in (1, 64):
        logits = torch.randn(rows_n, VOCAB).bfloat16()
        cases[f"argmax [{rows_n}, {VOCAB}]"] = {"calls": 3 if rows_n > 1 else 50, "bf16": lambda x=logits: x.argmax(-1),
                                                "fp32": lambda x=logits: x.float().argmax(-1)}
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a test of this script: one repeat")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(1)
    cases = sdpa_cases()
    times: dict[str, dict[str, list[float]]] = {name: {v: [] for v in VARIANTS if v in c} for name, c in cases.items()}
    for _ in range(args.repeats):
        for name, case in cases.items():
            for variant, values in times[name].items():
                values.append(per_call_us(case[variant], case["calls"]))
    print(f"{'op':32s}" + "".join(f"{v + ' µs':>17s}" for v in VARIANTS))
    for name, by_variant in times.items():
        cells = [f"{statistics.median(by_variant[v]):17.0f}" if v in by_variant else f"{'-':>17s}" for v in VARIANTS]
        print(f"{name:32s}" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
