"""Does the engine degrade gracefully on a busy machine? Quiet against beside one CPU-bound process.

The engine's throughput with nothing else running and with one busy loop beside it
(`python3 -c "while True: pass"`, started before the timed run and killed after it), interleaved: quiet,
busy, quiet, busy, ... so slow drifts of the machine hit both alike. Each pair gives a ratio busy / quiet.
On 2 cores the hog takes one, so a fair target is about half the quiet throughput: the issue asks for
>= 0.45x. Before the work split and thread count were made contention-aware, the 56M model below fell from
1,322 to 155 tok/s (0.12x) at 2 threads on a 2-core Xeon, and kept 905 (0.68x) at 1 thread.

Thread modes (`--modes`): `adaptive` (the engine's default: `engine/kernels/cpu_threads.ThreadGovernor`
follows the free cores), `pinned-N` (`OPTCLI_CPU_THREADS=N`, no sampling: `pinned-2` on 2 cores is the
old fixed count, now with the C kernels' dynamic split).

Model: `engine_cpu.py`'s seeded random Llama (8 layers, hidden 512, untied head, vocab 32000, 56.4M
parameters), dtype auto (bf16 where the CPU has it). Workload: `--requests` requests, prompts uniform in
[16, 128), outputs in [8, `--max-output`), EOS ignored, greedy, all submitted at once (`Engine.generate`),
one warm-up run first. Prints tok/s per mode (median [min, max] over the repeats), the busy/quiet ratio of
each pair (median [min, max]), and PASS/MISS of the adaptive mode against 0.45x.

    python benchmarks/contention.py                        # adaptive and pinned-<cores>, 3 pairs each
    python benchmarks/contention.py --modes adaptive,pinned-1,pinned-2 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 0.45


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def set_mode(engine, mode: str) -> None:
    """Give the engine a fresh thread governor for `mode` (adaptive, or pinned-N). Run against a tree from
    before the governor (a copy of this script outside the repo, PYTHONPATH=old tree), pinned-N just sets
    torch's thread count: the before figures."""
    try:
        from optcli.engine.kernels.cpu_threads import ThreadGovernor
    except ImportError:
        import torch

        assert mode.startswith("pinned-"), "this tree has no thread governor: pinned-N modes only"
        torch.set_num_threads(int(mode.removeprefix("pinned-")))
        return
    os.environ.pop("OPTCLI_CPU_THREADS", None)
    if mode.startswith("pinned-"):
        os.environ["OPTCLI_CPU_THREADS"] = mode.removeprefix("pinned-")
    engine.threads = ThreadGovernor()
    os.environ.pop("OPTCLI_CPU_THREADS", None)


def timed(engine, prompts, outputs) -> float:
    from optcli.engine import SamplingParams

    start = time.perf_counter()
    outs = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs])
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(outputs)
    return tokens / wall


def main(argv: list[str] | None = None) -> int:
    import engine_cpu_model as engine_cpu
    import torch

    from optcli.engine import Engine

    try:
        from optcli.engine.kernels.cpu_threads import usable_cores
    except ImportError:  # a tree from before the governor
        def usable_cores() -> int:
            return len(os.sched_getaffinity(0))

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a test of this script: adaptive, 1 pair, 1 layer, 2 tiny requests")
    ap.add_argument("--modes", default=None, help="adaptive,pinned-N,... (default: adaptive,pinned-<usable cores>)")
    ap.add_argument("--repeats", type=int, default=3, help="quiet/busy pairs per mode")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.modes, args.repeats, args.requests, args.max_output, args.layers = "adaptive", 1, 2, 10, 1
    cores = usable_cores()
    modes = (args.modes or f"adaptive,pinned-{cores}").split(",")
    rng = random.Random(args.seed)
    prompts, outputs = engine_cpu.make_requests(args.requests, (16, 128), (8, args.max_output), rng)
    warm_prompts, warm_outputs = engine_cpu.make_requests(8, (16, 48), (4, 16), rng)
    with tempfile.TemporaryDirectory() as tmp:
        params, _ = engine_cpu.build_model_dir(Path(tmp), args.layers, args.seed)
        engine = Engine(tmp, device="cpu", dtype=args.dtype, max_num_seqs=64, max_model_len=512)
        print(f"torch {torch.__version__}; {cores} usable cores; model {params / 1e6:.1f}M parameters, "
              f"{engine.config.dtype} ({engine.dtype_reason}); {args.requests} requests, {sum(outputs)} output "
              f"tokens; {args.repeats} quiet/busy pairs per mode", flush=True)
        timed(engine, warm_prompts, warm_outputs)
        results = {}
        for mode in modes:
            quiet, busy, threads_busy = [], [], []
            for _ in range(args.repeats):
                set_mode(engine, mode)
                quiet.append(timed(engine, prompts, outputs))
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.5)
                    set_mode(engine, mode)
                    busy.append(timed(engine, prompts, outputs))
                    threads_busy.append(engine.threads.threads if getattr(engine, "threads", None) else None)
                finally:
                    hog.kill()
                    hog.wait()
                time.sleep(0.5)
                print(f"  {mode}: quiet {quiet[-1]:.1f}, busy {busy[-1]:.1f} tok/s "
                      f"({threads_busy[-1]} threads at the end of the busy run)", flush=True)
            ratios = [b / q for q, b in zip(quiet, busy, strict=True)]
            results[mode] = {"quiet_tok_s": quiet, "busy_tok_s": busy, "ratios": ratios,
                             "threads_at_end_busy": threads_busy}
    print("\n| mode | quiet tok/s | busy tok/s | busy / quiet |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {spread(r['quiet_tok_s'])} | {spread(r['busy_tok_s'])} | "
              f"{statistics.median(r['ratios']):.2f}x [{min(r['ratios']):.2f}, {max(r['ratios']):.2f}] |")
    if "adaptive" in results:
        got = statistics.median(results["adaptive"]["ratios"])
        print(f"\n{'PASS' if got >= TARGET else 'MISS'}  adaptive busy / quiet >= {TARGET}x: {got:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "params": params, "dtype": engine.config.dtype,
                                         "requests": args.requests, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
