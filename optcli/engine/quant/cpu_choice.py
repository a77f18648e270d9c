"""Which CPU kernel each linear layer runs at each batch size: decided by written rules, never timed.

A layer's choice follows from three things only: the CPU's capabilities (`kernels/cpu_caps.py`: flags,
and which of our kernel builds exist), the layer (`LinearSpec`: weight format, shape, the numerics the
user allowed) and the batch-size bucket of the call. So the same model on the same machine takes the same
paths in every run, busy or not. The rules list, per weight format and bucket, kernel classes
(`cpu_kernels.py`, `cpu_kernels_8bit.py`) in priority order; a layer takes the first whose `can_implement` agrees, as vLLM's
`choose_mp_linear_kernel` does. Its weight layout is the one of the kernel chosen at one row (decode
reads every weight once a step, so the layout is chosen for it); larger buckets then take the first kernel
of that layout.

The orders come from measurements (`benchmarks/cpu_paths.py`, which times every kernel of every format at
each bucket on the Llama-3.2-1B layer shapes, in interleaved repeats). Each rule's `why` cites them.

- `OPTCLI_CPU_KERNEL=<name>` forces a kernel wherever a layer can run it (debugging, tests).
- `OPTCLI_CPU_TUNE=1` opts in to timing instead (`cpu_tune.py`): robust statistics, refused on a busy
  machine. Never on by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from optcli.engine.kernels import cpu_caps
from optcli.engine.kernels.cpu_caps import CpuCaps
from optcli.engine.quant.cpu_kernels import (
    Bf16Dot,
    Bf16Dpbf16,
    Bf16Onednn,
    Bf16Panels,
    Bf16Widen,
    CpuKernel,
    DenseOnednn,
    DenseTorch,
    Int4PackBf16,
    Int4PackDequant,
    Int4PackFp32,
    LinearSpec,
    Q4Amx,
    Q4LowbitDequant,
    Q4Nibbles,
    Q4q8Avx2,
    Q4Vnni,
)
from optcli.engine.quant.cpu_kernels_8bit import (
    BnbInt8,
    BnbQ8q8,
    Fp8Amx,
    Fp8Bf16Dot,
    Fp8Dequant,
    Fp8Dot,
    Fp8Fbgemm,
    Fp8Panels,
    Fp8ScaledMm,
    Fp8Widen,
    I8wDot,
    I8wPanels,
    Int8Dequant,
    Int8PackBf16,
    Int8PackFp32,
    IntMm,
    Nf4Avx2,
    Nf4Bnb,
    Nf4Dequant,
    Q8Amx,
    Q8q8Avx2,
    Q8Vnni,
)

# Every kernel, in the order the tests and benchmarks/cpu_paths.py walk them (the rules' orders are below).
KERNELS: tuple[type[CpuKernel], ...] = (
    Bf16Dpbf16, Bf16Dot, Bf16Panels, Bf16Onednn, Bf16Widen, DenseOnednn, DenseTorch,
    Q4Amx, Q4Vnni, Q4q8Avx2, Q4LowbitDequant, Int4PackBf16, Int4PackFp32, Int4PackDequant, Q4Nibbles,
    Q8Amx, Q8Vnni, Q8q8Avx2, IntMm, Int8PackBf16, Int8PackFp32, I8wDot, I8wPanels, Int8Dequant,
    Fp8Amx, Fp8Bf16Dot, Fp8Dot, Fp8Panels, Fp8Widen, Fp8Fbgemm, Fp8ScaledMm, Fp8Dequant,
    Nf4Avx2, Nf4Dequant, Nf4Bnb, BnbQ8q8, BnbInt8,
)


def kernels_of(fmt: str) -> list[type[CpuKernel]]:
    return [k for k in KERNELS if k.fmt == fmt]


BOUNDS = (1, 4, 16, 64, 256)  # upper ends of the batch-size buckets; a sixth holds everything above
LABELS = ("1", "2-4", "5-16", "17-64", "65-256", ">256")
_INDEX = [0, 0] + [next(i for i, b in enumerate(BOUNDS) if m <= b) for m in range(2, BOUNDS[-1] + 1)]


def bucket(m: int) -> int:
    """The bucket index of a call with `m` rows (tokens in the step)."""
    return _INDEX[m] if m <= BOUNDS[-1] else len(BOUNDS)


@dataclass(frozen=True)
class Rule:
    upto: int | None  # the largest batch size this order covers (None: all larger ones)
    order: tuple[type[CpuKernel], ...]
    why: str  # the measurement behind the order


# Per format, the orders by batch size. Figures: ms summed over one Llama-3.2-1B layer's four GEMMs
# (qkv, o, gate_up, down), medians of interleaved repeats from benchmarks/cpu_paths.py.
RULES: dict[str, tuple[Rule, ...]] = {
    "bf16": (
        Rule(4, (Bf16Dpbf16, Bf16Dot, Bf16Onednn, Bf16Panels, Bf16Widen),
             "few rows read every weight once, so the kernel that streams it fastest wins: our AVX-512 BF16 dot "
             "products (Zen 5, 1 thread: 28 GB/s at M=1 against 23 for our widening fp32 kernel and 16 for "
             "oneDNN's bf16 GEMM; 1.2x oneDNN at M=4), else the widening kernel (AMX Xeon, 1B decode: 12.2 "
             "tok/s against oneDNN's 7.5)"),
        Rule(None, (Bf16Onednn, Bf16Panels, Bf16Dot, Bf16Widen),
             "batched rows are arithmetic: bf16 dot products or tiles (oneDNN) where the CPU has them "
             "(Zen 5 M=16: 2.0x our dot products, 2.2x our fp32 panels), else our fp32 panels"),
    ),
    "dense": (Rule(None, (DenseOnednn, DenseTorch),
                   "oneDNN's packed fp32 GEMM: 1.4-3.5x F.linear (MKL) at M = 1-2048 (AVX2 EPYC)"),),
    "int4": (
        Rule(64, (Q4Amx, Q4Vnni, Q4q8Avx2, Int4PackBf16, Q4LowbitDequant, Int4PackDequant, Int4PackFp32, Q4Nibbles),
             "AMX's int8 tiles beat every other path at each M (Xeon: 4.5x bf16 at M=1); without tiles, AVX-512 "
             "VNNI dot products on the same layout (Zen 5: 1.1x our AVX2 q4 x q8 kernel at M=1, 1.9x at 4-16, "
             "2.4x at 64); with AVX2 alone our q4 x q8 kernel (AVX2 EPYC: 1.3-5x torch's int4 kernel at M = 1-64)"),
        Rule(None, (Q4Amx, Q4Vnni, Q4q8Avx2, Q4LowbitDequant, Int4PackDequant, Int4PackBf16, Int4PackFp32, Q4Nibbles),
             "prompt-sized batches are arithmetic: tiles or VNNI where the CPU has them (Zen 5 M=256: VNNI 6x the "
             "AVX2 layout's dequant), else our q4 x q8 kernel (AVX2 Zen 3: 10.9x the weight rebuilt per call at "
             "M=128 and 256, 1.2x the bf16 source's fp32 panels at 128-256)"),
    ),
    "int8": (
        Rule(64, (Q8Amx, Q8Vnni, Q8q8Avx2, IntMm, Int8PackBf16, I8wDot, I8wPanels, Int8PackFp32, Int8Dequant),
             "AMX's int8 tiles (~3x bf16 at M = 1-64); else AVX-512 VNNI dot products on the same layout (Zen 5: "
             "1.0x our AVX2 int8 kernel at M=1, 1.6x at 4, 3.7x at 16, 3.9x at 64, against its earlier tiled form); "
             "else our exact AVX2 int8 kernel "
             "(AVX2 EPYC: 1.1 ms at M=1 against 3.0 for torch's int8 weight kernel, 241 for _int_mm without VNNI; "
             "Zen 3: 1.9x / 1.9x / 1.7x the bf16 source's fp32 panels at M = 8 / 16 / 64)"),
        Rule(None, (Q8Amx, Q8Vnni, IntMm, Q8q8Avx2, Int8PackBf16, I8wPanels, Int8PackFp32, Int8Dequant),
             "prompt-sized batches: tiles, or VNNI (ours, or oneDNN's _int_mm: within 15% of each other at M=256 on "
             "Zen 5), else our AVX2 int8 kernel"),
    ),
    "fp8": (
        Rule(4, (Fp8Amx, Fp8Bf16Dot, Fp8Dot, Fp8Panels, Fp8Fbgemm, Fp8ScaledMm, Fp8Dequant),
             "AMX bf16 tiles on E4M3 widened exactly; else AVX-512 BF16 dot products on the same layout (Zen 5: "
             "1.6x our AVX2 fp32 dot kernel at M=1, 1.4x at 4); else that AVX2 kernel: one byte a weight (AVX2 EPYC: "
             "1.2x the bf16 weight kernels at M = 1-8)"),
        Rule(64, (Fp8Amx, Fp8Bf16Dot, Fp8Panels, Fp8Dot, Fp8Widen, Fp8Fbgemm, Fp8ScaledMm, Fp8Dequant),
             "more rows: tiles or BF16 dot products (Zen 5: 2.2x our AVX2 panels at M=16, 2.6x at 64), else our "
             "SGEMM-style panels, which reuse each widened weight across rows"),
        Rule(None, (Fp8Amx, Fp8Bf16Dot, Fp8Panels, Fp8Widen, Fp8Fbgemm, Fp8ScaledMm, Fp8Dequant),
             "prompt-sized batches: tiles or BF16 dot products (Zen 5 M=256: 2.4x the widened weight in oneDNN's "
             "fp32 GEMM), else our panels (AVX2 Zen 3: 1.9x / 1.4x / 1.2x / 1.0x the weight widened per call into "
             "oneDNN's fp32 GEMM at M = 128 / 256 / 512 / 1024)"),
    ),
    "nf4": (
        Rule(64, (Nf4Avx2, Nf4Dequant, Nf4Bnb), "our kernel reads 4 bits a weight; bitsandbytes' is 7x slower "
             "(AVX2 Zen 3, one 1B layer, 1 thread: 9.4 ms at M=1 against 163; still 1.08x the dequantized weight at 64)"),
        Rule(None, (Nf4Dequant, Nf4Avx2, Nf4Bnb), "prompt-sized batches: dequantize once, then a dense GEMM (AVX2 "
             "Zen 3: 1.4x / 1.8x our row kernel at M = 128 / 256, level with bitsandbytes')"),
    ),
    "int8-bnb": (Rule(None, (BnbQ8q8, BnbInt8), "our exact int8 GEMM; bitsandbytes' CPU path is 7x slower"),),
}


def rule_for(fmt: str, index: int) -> Rule:
    top = BOUNDS[index] if index < len(BOUNDS) else None
    for rule in RULES[fmt]:
        if rule.upto is None or (top is not None and top <= rule.upto):
            return rule
    raise AssertionError(f"no rule covers bucket {LABELS[index]} of {fmt}")


@dataclass(frozen=True)
class KernelPlan:
    """One layer's decision: its weight layout and, per bucket, the kernel and the reason."""

    fmt: str
    layout: str
    kernels: tuple[type[CpuKernel], ...]
    reasons: tuple[str, ...]

    def kernel(self, m: int) -> type[CpuKernel]:
        return self.kernels[bucket(m)]

    def names(self) -> list[str]:
        """Every kernel name this plan runs, in bucket order, once each."""
        return list(dict.fromkeys(k.name for k in self.kernels))

    def table(self) -> dict[str, dict[str, str]]:
        """{bucket label: {"kernel", "reason"}}, for stats() and the profile report."""
        return {label: {"kernel": k.name, "reason": r} for label, k, r in zip(LABELS, self.kernels, self.reasons,
                                                                               strict=True)}


def forced() -> str | None:
    return os.environ.get("OPTCLI_CPU_KERNEL") or None


def plan_for(spec: LinearSpec, caps: CpuCaps | None = None, layout: str | None = None) -> KernelPlan:
    """The layout and per-bucket kernels of a layer (`layout`: only that one's kernels); no timing, no
    state: a pure function of its inputs and `OPTCLI_CPU_KERNEL`."""
    caps = caps if caps is not None else cpu_caps.detect()
    candidates = [k for k in kernels_of(spec.fmt) if layout is None or k.layout == layout]
    name = forced()
    if name is not None:
        for kernel in candidates:
            if kernel.name == name and kernel.can_implement(spec, caps)[0]:
                n = len(LABELS)
                return KernelPlan(spec.fmt, kernel.layout, (kernel,) * n, ("forced by OPTCLI_CPU_KERNEL",) * n)
    verdicts: dict[type[CpuKernel], str] = {}

    def refusal(kernel: type[CpuKernel]) -> str:
        """Why `kernel` cannot run this layer ("" when it can)."""
        if kernel not in verdicts:
            ok, why = kernel.can_implement(spec, caps) if kernel in candidates else (False, f"not {layout}")
            verdicts[kernel] = "" if ok else why
        return verdicts[kernel]

    lead = next((k for k in rule_for(spec.fmt, 0).order if not refusal(k)), None)
    if lead is None:
        raise RuntimeError(f"no CPU kernel implements {spec} on {caps.describe()}")
    kernels, reasons = [], []
    for index, label in enumerate(LABELS):
        rule = rule_for(spec.fmt, index)
        kernel = next((k for k in rule.order if k.layout == lead.layout and not refusal(k)), None)
        if kernel is None:
            raise RuntimeError(f"no {lead.layout} kernel implements {spec} at M {label} on {caps.describe()}")
        passed = [f"{k.name}: {refusal(k) or f'not the {lead.layout} layout (chosen at M=1)'}"
                  for k in rule.order[:rule.order.index(kernel)]]
        why = f"{kernel.what}. Rule, {caps.tier}: {rule.why}"
        kernels.append(kernel)
        reasons.append(why + ("; passed over: " + "; ".join(passed) if passed else ""))
    return KernelPlan(spec.fmt, lead.layout, tuple(kernels), tuple(reasons))


def tuning_enabled() -> bool:
    return os.environ.get("OPTCLI_CPU_TUNE", "") not in ("", "0")


class CpuPaths:
    """What a layer with CPU kernels mixes in: `set_cpu_plan` decides (once, at load) and `cpu_matmul`
    runs the plan's kernel for the call's bucket. `paths`: every kernel of the layer's layout that runs
    it, by name (what `OPTCLI_CPU_KERNEL`, the opt-in tuner and the tests pick from)."""

    plan: KernelPlan | None = None
    tuned: dict[int, tuple[str, str]] | None = None  # bucket -> (kernel, reason), OPTCLI_CPU_TUNE=1 only

    def set_cpu_plan(self, spec: LinearSpec, layout: str | None = None) -> KernelPlan:
        caps = cpu_caps.detect()
        plan = plan_for(spec, caps, layout)
        self.cpu_spec, self.plan = spec, plan
        self.paths = {k.name: getattr(self, k.method) for k in kernels_of(spec.fmt)
                      if k.layout == plan.layout and k.can_implement(spec, caps)[0]}
        self._runs = tuple(self.paths[k.name] for k in plan.kernels)
        return plan

    def cpu_matmul(self, x):
        name = os.environ.get("OPTCLI_CPU_KERNEL")
        if name is not None and name in self.paths:
            return self.paths[name](x)
        if tuning_enabled():
            from optcli.engine.quant.cpu_tune import tuned_kernel

            return self.paths[tuned_kernel(self, x)](x)
        return self._runs[bucket(x.shape[0])](x)

    def plan_table(self) -> dict[str, dict[str, str]]:
        table = self.plan.table()
        for index, (name, reason) in (self.tuned or {}).items():
            table[LABELS[index]] = {"kernel": name, "reason": reason}
        return table


KINDS = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}


def layer_kind(name: str) -> str:
    """A module's kind from its name: "layers.3.qkv_proj" -> "qkv", "layers.0.moe.gate_up.7" -> "moe_gate_up"."""
    parts = [p for p in name.split(".") if not p.isdigit() and p not in ("model", "layers")]
    return "_".join(KINDS.get(p, p) for p in parts)


def kernel_table(model) -> dict[str, dict]:
    """{layer kind: {"format", "layout", "layers", "buckets": {bucket label: {"kernel", "reason"}}}} over every
    CPU-planned layer of `model`; a kind whose layers took different plans is split by shape ("down[2048x8192]")."""
    groups: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, CpuPaths) and module.plan is not None:
            groups.setdefault(layer_kind(name), []).append(module)
    table: dict[str, dict] = {}
    for kind, modules in groups.items():
        plans: dict[str, list] = {}
        for module in modules:
            plans.setdefault(repr(module.plan_table()), []).append(module)
        for same in plans.values():
            spec, plan = same[0].cpu_spec, same[0].plan
            key = kind if len(plans) == 1 else f"{kind}[{spec.n}x{spec.k}]"
            table[key] = {"format": spec.fmt, "layout": plan.layout, "layers": len(same),
                          "buckets": same[0].plan_table()}
    return table


def mean_matmul_size(model) -> float | None:
    """The mean weight elements (n x k) of the CPU-planned matmuls, the LM head included: how much work one
    of a step's parallel regions holds (the thread rule's input, `kernels/cpu_threads.size_ceiling`). By
    shape, not bytes, so a source and its quantized artifact get the same thread ceiling. None if no layer
    is CPU-planned."""
    sizes = [m.cpu_spec.n * m.cpu_spec.k for m in model.modules() if isinstance(m, CpuPaths) and m.plan is not None]
    return sum(sizes) / len(sizes) if sizes else None
