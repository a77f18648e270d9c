"""Every CPU kernel of every weight format at each batch-size bucket: the measurements the rules in
`optcli/engine/quant/cpu_choice.py` are written from, and a check of what those rules pick here.

For each format (a bf16 weight in a bf16 model and in an fp32 model, W4A16, W8A8, FP8, NF4) it builds the four
linear layers of one Llama-3.2-1B decoder layer (qkv 2048 -> 3072, o 2048 -> 2048, gate_up 2048 -> 16384,
down 8192 -> 2048) from seeded random weights, once per weight layout (`OPTCLI_CPU_KERNEL` forces the
kernel, and with it the layout, at construction), in enough copies that one pass reads more than 4x the
last-level cache (so M = 1 streams its weights from memory, as a decode step does). Then, in `--repeats`
interleaved rounds (each round times every kernel once at each M, so a burst of other work hits them
alike), the time of one pass over the four layers, per copy. It prints, per format and M: each kernel's
median ms with [min, max] over the rounds, the fastest by median, the rule's pick, and the pick's time
against the fastest (a pick more than 10% off the fastest, outside the spread, is flagged: a rule to
revisit on this CPU). `--lm-head` adds the 128256 x 2048 head (bf16 weight).

    python benchmarks/cpu_paths.py                         # every format, M = 1, 4, 16, 64, 256
    python benchmarks/cpu_paths.py --formats bf16,int4 --rows 1,16 --repeats 9 --threads 1
    python benchmarks/cpu_paths.py --json paths.json

On a shared machine use --threads 1 (a second thread beside another busy process waits on it, see
`engine/kernels/cpu_threads.py`) and more --repeats; the medians and spreads say how much to trust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optcli.engine.kernels import cpu_caps  # noqa: E402
from optcli.engine.quant import cpu_choice  # noqa: E402
from optcli.engine.quant.cpu_choice import kernels_of  # noqa: E402
from optcli.engine.quant.cpu_kernels import LinearSpec  # noqa: E402
from optcli.engine.quant.weights import BnbNf4Weight  # noqa: E402

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
HEAD = {"lm_head": (128256, 2048)}
SMOKE_SHAPES = {"qkv": (384, 256), "o": (256, 256), "gate_up": (1024, 256), "down": (256, 512)}  # --smoke
# format -> (weight format of the rules, activation dtype, 16-bit compute allowed, W8A8/FP8 act_quant)
FORMATS = {
    "bf16": ("bf16", torch.bfloat16, True, False),
    "bf16-fp32": ("bf16", torch.float32, False, False),  # a bf16 checkpoint in an fp32 model (AVX2, --dtype float32)
    "int4": ("int4", torch.bfloat16, True, False),
    "int8": ("int8", torch.bfloat16, True, True),
    "fp8": ("fp8", torch.bfloat16, True, True),
    "nf4": ("nf4", torch.float32, False, False),  # bitsandbytes NF4, run in fp32 as the engine does
}


def build(fmt: str, name: str, shapes: dict, seed: int) -> dict | None:
    """The layers of `shapes` in `fmt` with kernel `name` forced (None where it cannot run them here)."""
    from optcli.engine.models.llama import Dense
    from optcli.engine.quant.bnb_linear import BnbNf4Linear
    from optcli.engine.quant.layers import make_quant_linear
    from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight

    wfmt, dtype, bf16_ok, act_quant = FORMATS[fmt]
    os.environ["OPTCLI_CPU_KERNEL"] = name
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    try:
        for kind, (n, k) in shapes.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            if wfmt == "bf16":
                layer = Dense(k, n).to(dtype)
                layer.load(w.bfloat16())
            elif wfmt == "nf4":
                layer = BnbNf4Linear(BnbNf4Weight.rtn(w), dtype=dtype)
            else:
                weight = (Int4Weight.rtn(w, 128) if wfmt == "int4" else Int8Weight.rtn(w, act_quant=True)
                          if wfmt == "int8" else Fp8Weight.rtn(w, act_quant=True))
                layer = make_quant_linear(weight, None, "cpu", dtype, (torch.bfloat16,) if bf16_ok else ())
            if layer.plan is None or layer.plan.kernels[0].name != name:
                return None
            layers[kind] = layer
    finally:
        os.environ.pop("OPTCLI_CPU_KERNEL", None)
    return layers


def weight_bytes(layers: dict) -> int:
    total = 0
    for layer in layers.values():
        total += getattr(layer, "opaque_bytes", 0)  # FBGEMM's packed object
        for t in (*layer.parameters(), *layer.buffers(), getattr(layer, "packed", None)):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def last_level_cache() -> int:
    try:
        sizes = [int(Path(p).read_text().strip().rstrip("K")) * 1024
                 for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
        return max(sizes)
    except (OSError, ValueError):
        return 32 << 20


@torch.inference_mode()
def measure(fmt: str, rows: list[int], repeats: int, shapes: dict, seed: int, stream: bool = True) -> dict:
    """Times of one pass over `shapes` per kernel and M; `stream`: in enough copies to stream the weights from
    memory (else one copy: --smoke)."""
    wfmt, dtype, bf16_ok, act_quant = FORMATS[fmt]
    caps = cpu_caps.detect()
    names = list(dict.fromkeys(k.name for k in kernels_of(wfmt)))
    sets: dict[str, list[dict]] = {}
    for name in names:
        first = build(fmt, name, shapes, seed)
        if first is None:
            continue
        copies = max(2, math.ceil(4 * last_level_cache() / max(weight_bytes(first), 1))) if stream else 1
        sets[name] = [first] + [build(fmt, name, shapes, seed + c) for c in range(1, copies)]
    gen = torch.Generator().manual_seed(seed)
    inputs = {m: {kind: (torch.randn(m, k, generator=gen) * 0.5).to(dtype) for kind, (n, k) in shapes.items()}
              for m in rows}
    times: dict[int, dict[str, list[float]]] = {m: {name: [] for name in sets} for m in rows}
    skip: dict[int, set[str]] = {m: set() for m in rows}
    for m in rows:  # warm-up; a kernel 20x slower than the best warm-up is not timed further at this M
        warm = {}
        for name, copies in sets.items():
            start = time.perf_counter()
            for kind, layer in copies[0].items():
                layer.paths[name](inputs[m][kind])
            warm[name] = time.perf_counter() - start
        skip[m] = {name for name, t in warm.items() if t > 20 * min(warm.values())}
    for _ in range(repeats):
        for m in rows:
            for name, copies in sets.items():
                if name in skip[m]:
                    continue
                start = time.perf_counter()
                for layers in copies:
                    for kind, layer in layers.items():
                        layer.paths[name](inputs[m][kind])
                times[m][name].append((time.perf_counter() - start) / len(copies) * 1e3)
    n, k = next(iter(shapes.values()))
    group = BnbNf4Weight.DEFAULT_BLOCKSIZE if wfmt == "nf4" else 128  # bitsandbytes' blocks; W4A16's groups
    rule = {m: cpu_choice.plan_for(LinearSpec(wfmt, n, k, dtype, bf16_ok, group, act_quant), caps).kernel(m).name
            for m in rows}
    return {"format": fmt, "times_ms": {m: {name: t for name, t in ts.items() if t} for m, ts in times.items()},
            "skipped": {m: sorted(s) for m, s in skip.items()}, "rule": rule,
            "bytes_per_pass": {name: weight_bytes(copies[0]) for name, copies in sets.items()}}


def report(result: dict) -> list[str]:
    flags = []
    print(f"\n## {result['format']}  (ms per pass over {', '.join(SHAPES)}; median [min, max] of the rounds)\n")
    for m, ts in result["times_ms"].items():
        med = {name: statistics.median(t) for name, t in ts.items()}
        best = min(med, key=med.get)
        rule = result["rule"][m]
        cells = ", ".join(f"{name} {med[name]:.2f} [{min(t):.2f}, {max(t):.2f}]" for name, t in ts.items())
        skipped = f"; not timed (>20x): {', '.join(result['skipped'][m])}" if result["skipped"][m] else ""
        verdict = "n/a"
        if rule in med:
            ratio = med[rule] / med[best]
            verdict = f"rule {rule}: {ratio:.2f}x the fastest ({best})"
            if ratio > 1.1 and min(ts[rule]) > max(ts[best]):
                verdict += "  <-- REVISIT"
                flags.append(f"{result['format']} M={m}: rule {rule} {med[rule]:.2f} ms, {best} {med[best]:.2f} ms")
        print(f"- M={m}: {cells}{skipped}\n    {verdict}")
    for name, b in result["bytes_per_pass"].items():
        ts = result["times_ms"].get(1, {}).get(name)
        if ts:
            print(f"  {name}: {b / 2**20:.1f} MiB a pass; at M=1 {b / statistics.median(ts) / 1e6:.1f} GB/s (median)")
    return flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="a test of this script: every format and kernel on small layers, M = 1 and 16, 1 round")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    ap.add_argument("--rows", default="1,4,16,64,256", help="batch sizes M (one per bucket)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--lm-head", action="store_true", help="time the 128256 x 2048 head instead of the layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.repeats, args.lm_head = "1,16", 1, False
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = cpu_caps.detect()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {caps.describe()} (rules tier {caps.tier})")
    rows = [int(m) for m in args.rows.split(",")]
    shapes = SMOKE_SHAPES if args.smoke else HEAD if args.lm_head else SHAPES
    results, flags = [], []
    for fmt in args.formats.split(","):
        if args.lm_head and FORMATS[fmt][0] != "bf16":
            continue
        result = measure(fmt, rows, args.repeats, shapes, args.seed, stream=not args.smoke)
        flags += report(result)
        results.append(result)
    print("\nrules to revisit on this CPU:" if flags else "\nevery rule's pick is within 10% of the fastest, or "
          "inside its spread")
    for f in flags:
        print(f"- {f}")
    if args.json:
        args.json.write_text(json.dumps({"caps": caps.describe(), "threads": torch.get_num_threads(),
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
