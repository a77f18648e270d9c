"""The CPU decode step's non-GEMM paths, ours against torch's, on the same engine in one process: batch-1 decode
ms/step with `CpuOps` (fp32 add+RMSNorm, RoPE, SiLU-mul as one C call each) and decode attention read in place from
the bf16/fp32 cache (`attention/cpu.py` `_decode_in_place`), against `TorchOps` and the block gather + mask + SDPA
they replace.

For each format (default bf16 and W4A16 of the Llama-3.2-1B shape, in `quant_cpu.py`'s workdir, built and quantized
there when missing) one engine is loaded and both paths run on it in interleaved repeats (ours first in even
repeats, torch's first in odd ones): one 64-token prompt, then `--new` tokens greedily, EOS ignored; the figure is
wall ms per decode step after the first token. It prints each path's median ms/step and torch's / ours per
repeat pair as a median with its 95% interval (`optcli.bench.stats.ratio_interval`): above 1 means ours is faster.

    python benchmarks/cpu_step_paths.py                       # 1B shape, bf16 and w4a16, 6 repeats
    python benchmarks/cpu_step_paths.py --formats w4a16 --repeats 8
    python benchmarks/cpu_step_paths.py --smoke               # bf16, 1 layer of the small shape, 2 repeats
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from quant_cpu_checkpoint import LLAMA_3_2_1B, SMALL, build_source, default_workdir, log, make_artifact

from optcli.bench.stats import ratio_interval
from optcli.engine.attention import cpu as attention

RECIPES = {"bf16": None, "w4a16": "w4a16-rtn"}
IN_PLACE = attention._decode_in_place  # ours; torch's path is this declined (the caller then gathers and runs SDPA)


def decode_ms(engine, ours: bool, new: int, rng: random.Random) -> float:
    """ms per decode step after the first token, with our paths or torch's."""
    from optcli.engine import SamplingParams
    from optcli.engine.models.layer_ops import CpuOps, TorchOps

    engine.model.ops = CpuOps if ours else TorchOps
    attention._decode_in_place = IN_PLACE if ours else (lambda *args: None)
    engine.add_request([rng.randrange(3, 1000) for _ in range(64)], SamplingParams(max_tokens=new, ignore_eos=True))
    engine.step()  # the prompt and the first token
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="bf16,w4a16", help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--new", type=int, default=48, help="new tokens a run (default 48)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: quant_cpu.py's for the shape")
    ap.add_argument("--smoke", action="store_true", help="a test of this script: bf16, 1 small layer, 2 repeats, 4 tokens")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if unknown := sorted(set(formats) - set(RECIPES)):
        ap.error(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(RECIPES)})")
    shape = dict(SMALL, num_hidden_layers=1) if args.smoke else LLAMA_3_2_1B
    if args.smoke:  # the source only: no quantize subprocess in a smoke run
        args.repeats, args.new, formats = 2, 4, ["bf16"]
    workdir = args.workdir or (Path(tempfile.mkdtemp(prefix="optcli-step-paths-")) if args.smoke
                               else default_workdir(shape, False))
    source = workdir / "bf16"
    rebuilt = build_source(source, shape, 0)
    from optcli.engine import Engine

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; workdir {workdir}")
    print("| format | ours ms/step | torch's ms/step | torch's / ours [95% interval] |\n|---|---|---|---|")
    for fmt in formats:
        path = source if RECIPES[fmt] is None else make_artifact(workdir, source, RECIPES[fmt], rebuilt)
        engine = Engine(str(path), device="cpu", enable_prefix_caching=False, max_model_len=256, num_kv_blocks=32)
        rng = random.Random(1)
        decode_ms(engine, True, 4, rng), decode_ms(engine, False, 4, rng)  # warm-up: first calls, packing
        ours, theirs = [], []
        for r in range(args.repeats):
            for path_is_ours in ((True, False) if r % 2 == 0 else (False, True)):
                (ours if path_is_ours else theirs).append(decode_ms(engine, path_is_ours, args.new, rng))
        gain = ratio_interval(theirs, ours)
        interval = f"[{gain.low:.3f}, {gain.high:.3f}]" if gain.low is not None else "[-]"
        print(f"| {fmt} | {statistics.median(ours):.2f} | {statistics.median(theirs):.2f} | "
              f"{gain.median:.3f}x {interval} |", flush=True)
        del engine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
