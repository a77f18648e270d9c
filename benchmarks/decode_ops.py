"""Device operations per decode step: the layer's torch ops against the fused Triton kernels.

A batch-1 decode step is bound by how many kernels it launches, not by what they compute: each
launch costs a few microseconds even inside a CUDA graph, and a layer of the Llama-3.2-1B shape
reads its weights in ~30 us. This counts, for one decode step through our engine (Triton attention,
eager), every operation that would launch a device kernel: aten ops that allocate or compute (views
and metadata excluded) and Triton kernel launches, in layer 0 and in the whole step, once with
`TorchOps` (transformers' op-for-op numerics) and once with `FusedOps`.

It counts, it does not time, so it runs on CPU (under TRITON_INTERPRET=1) and gives the same
numbers as on a GPU; `benchmarks/gpu_check.py` measures what the launches cost there.

    python benchmarks/decode_ops.py            # tiny 2-layer model, CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "_local_scalar_dense"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops that write device memory while `active`; Triton launches are added by `count_triton`."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if self.active and name not in NO_KERNEL and not _is_view(func, args, out):
            self.ops[f"aten.{name}"] += 1
        return out


def _is_view(func, args, out) -> bool:
    """True for an op that returned (a view of) an input: ops like `to` or `reshape` may alias or copy."""
    if not any(r.alias_info is not None for r in func._schema.returns):
        return False
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    outs = out if isinstance(out, (list, tuple)) else [out]
    return all(not isinstance(o, torch.Tensor) or o.untyped_storage().data_ptr() in inputs for o in outs)


def count_triton(counter: OpCounter):
    """Patch Triton's launcher so each kernel launch is one op (its internals are not counted)."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)

        def counted(*args, **kwargs):
            was, counter.active = counter.active, False
            if was:
                counter.ops[f"triton.{getattr(self, '__name__', None) or self.fn.__name__}"] += 1
            try:
                return launch(*args, **kwargs)
            finally:
                counter.active = was

        return counted

    KernelInterface.__getitem__ = getitem


def decode_step_ops(engine, counter: OpCounter) -> tuple[Counter, Counter]:
    """(ops in layer 0, ops in the whole forward + logits) of one batch-1 decode step."""
    from optcli.engine import SamplingParams

    layer0, step = Counter(), Counter()
    model = engine.model
    before: list[Counter] = []
    original = model.forward, model.compute_logits

    def forward(*args, **kwargs):
        counter.ops, counter.active = Counter(), True
        out = original[0](*args, **kwargs)
        step.update(counter.ops)
        counter.active = False
        return out

    def logits(hidden):
        counter.ops, counter.active = Counter(), True
        out = original[1](hidden)
        step.update(counter.ops)
        counter.active = False
        return out

    engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # prefill
    model.forward, model.compute_logits = forward, logits
    h1 = model.layers[0].register_forward_pre_hook(lambda *_: before.append(Counter(counter.ops)))
    h2 = model.layers[0].register_forward_hook(lambda *_: layer0.update(counter.ops - before[-1]))
    with counter:
        engine.step()  # one decode step
    h1.remove(), h2.remove()
    model.forward, model.compute_logits = original
    while engine.has_unfinished():
        engine.step()
    return layer0, step


def count_both(device: str) -> list[tuple[str, Counter, Counter]]:
    """[(ops set name, layer-0 ops, step ops)] for TorchOps then FusedOps, on the tiny plan."""
    from bench_model import TINY_PLAN, build_model

    from optcli.engine import Engine
    from optcli.engine.models.layer_ops import FusedOps, TorchOps
    from optcli.engine.models.llama import Dense

    counter = OpCounter()
    count_triton(counter)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), TINY_PLAN, device, seed=0)
        for ops in (TorchOps, FusedOps):
            engine = Engine(tmp, device=device, dtype="bfloat16", max_num_seqs=4, max_model_len=128,
                            attention_backend="triton", enforce_eager=True, num_kv_blocks=32)
            engine.model.ops = ops
            for module in engine.model.modules():  # a GPU's dense layers are F.linear; a CPU's pick our kernels
                if isinstance(module, Dense):
                    module.plan = None
            if ops is TorchOps:  # as before fusion: cos/sin computed every step, not gathered from a table
                for table in engine.model.rotary.tables:
                    table.table = None
            rows.append((ops.name, *decode_step_ops(engine, counter)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench_model import TINY_PLAN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a test of this script (the same run: it counts on the tiny model)")
    ap.parse_args(argv)
    rows = count_both("cuda" if torch.cuda.is_available() else "cpu")
    layers = TINY_PLAN.shape["num_hidden_layers"]
    print(f"device ops in one batch-1 decode step ({layers}-layer model, Triton attention)")
    print(f"{'layer ops':<10} {'per layer':>10} {'per step':>9}")
    for name, layer0, step in rows:
        print(f"{name:<10} {sum(layer0.values()):>10} {sum(step.values()):>9}")
    torch_layer, fused_layer = rows[0][1], rows[1][1]
    print(f"per-layer launches: {sum(torch_layer.values()) / sum(fused_layer.values()):.1f}x fewer fused")
    for name, layer0, _ in rows:
        print(f"  {name} layer 0: " + ", ".join(f"{op} {n}" for op, n in sorted(layer0.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
