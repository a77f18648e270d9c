"""Every CPU kernel a linear layer can run, one class each: what it computes, in which weight layout, and
`can_implement(spec, caps) -> (ok, reason)`: whether it runs this layer on this CPU, and if not, why.

Modelled on vLLM's `choose_mp_linear_kernel`: the rules in `cpu_choice.py` list, per weight format and
batch-size bucket, kernel names in priority order, and a layer takes the first whose `can_implement`
agrees. A kernel refuses a layer where it would be wrong (activations rounded where the user asked for
fp32, a shape its layout cannot hold) or where it is known to be an emulation slower than any other path
(torch's `_int_mm` without VNNI runs reference loops: 241 ms against 1.1 ms for our AVX2 int8 kernel at
one row on a 2048 -> 16384 layer, measured on a 2-core AVX2 EPYC).

A layer holds its weight in one layout (`layout`), chosen once; the kernels of that layout then share it
across batch sizes (`dequant` paths rebuild the dense weight from it per call, for prompt-sized batches).
`method` names the layer's method that runs the kernel. Here: the base, dense and int4 kernels; int8, FP8 and
bitsandbytes ones in `cpu_kernels_8bit.py`; all of them listed in `cpu_choice.KERNELS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from optcli.engine.kernels import cpu_amx, cpu_lowbit
from optcli.engine.kernels.cpu_caps import CpuCaps

CPU_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes


@dataclass(frozen=True)
class LinearSpec:
    """What the rules look at in a layer: its weight format and shape, and the numerics it may use."""

    fmt: str  # "bf16" (a bf16-held dense weight), "dense" (any other dense weight), "int4", "int8", "fp8", "nf4", "int8-bnb"
    n: int  # output features
    k: int  # input features
    dtype: torch.dtype = torch.float32  # the activations' (the model's) dtype
    bf16_ok: bool = False  # 16-bit compute allowed (`--dtype auto`): bf16 activations, or int8-rounded ones
    group_size: int = 0
    act_quant: bool = False  # W8A8 / FP8 dynamic: activations rounded per token by the scheme itself

    @property
    def bf16_inputs(self) -> bool:
        return self.bf16_ok or self.dtype == torch.bfloat16


Verdict = tuple[bool, str]
OK: Verdict = (True, "")


class CpuKernel:
    name: ClassVar[str]
    fmt: ClassVar[str]
    layout: ClassVar[str]
    method: ClassVar[str]
    what: ClassVar[str]

    @classmethod
    def can_implement(cls, spec: LinearSpec, caps: CpuCaps) -> Verdict:
        return OK


def _need(cond: bool, why: str) -> Verdict:
    return OK if cond else (False, why)


def _lowbit(caps: CpuCaps) -> Verdict:
    return _need(caps.lowbit, "our AVX2 kernels are not built here (no AVX2 or no C compiler)")


def _both(*verdicts: Verdict) -> Verdict:
    return next((v for v in verdicts if not v[0]), OK)


# ---- dense layers whose weight is held bf16 (models/llama.py `Dense`) ------------------------------------

class Bf16Dpbf16(CpuKernel):
    name, fmt, layout, method = "bf16-dpbf16", "bf16", "bf16", "_bf16_dpbf16"
    what = "AVX-512 BF16 dot products on the bf16 weight and activations, fp32 sums, a weight row at a time"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(spec.dtype == torch.bfloat16, "the activations are fp32 (bf16 would round them)"),
                     _need(caps.vnni_kernels, "no AVX-512 BF16 + VNNI (or our VNNI kernels are not built here)"),
                     _need(spec.k % 32 == 0, "shape: K % 32"))


class Bf16Dot(CpuKernel):
    name, fmt, layout, method = "bf16w-dot", "bf16", "bf16", "_bf16_dot"
    what = "each bf16 weight widened exactly in registers, fp32 FMA, dot-product form"

    @classmethod
    def can_implement(cls, spec, caps):
        return _lowbit(caps)


class Bf16Panels(Bf16Dot):
    name, method = "bf16w-panels", "_bf16_panels"
    what = "each bf16 weight widened exactly in registers, fp32 FMA, SGEMM-style panels"


class Bf16Onednn(CpuKernel):
    name, fmt, layout, method = "onednn-bf16", "bf16", "bf16", "_bf16_onednn"
    what = "torch's bf16 GEMM (oneDNN: AMX tiles or AVX-512 BF16 dot products, fp32 sums)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(spec.dtype == torch.bfloat16, "the activations are fp32 (bf16 would round them)"),
                     _need(caps.native_bf16, "no native bf16 (torch emulates it through fp32, 2.7x slower than fp32)"))


class Bf16Widen(CpuKernel):
    name, fmt, layout, method = "widen-onednn", "bf16", "bf16", "_bf16_widen"
    what = "the weight widened to fp32 per call, then oneDNN's fp32 GEMM"


class DenseOnednn(CpuKernel):
    name, fmt, layout, method = "onednn-fp32", "dense", "onednn-packed", "_onednn"
    what = "oneDNN's fp32 GEMM on the weight packed once into its blocked layout"

    @classmethod
    def can_implement(cls, spec, caps):
        from optcli.engine.kernels.dense_gemm import onednn_linear_available

        return _both(_need(spec.dtype == torch.float32, "not an fp32 weight"),
                     _need(onednn_linear_available(), "torch has no oneDNN linear here"))


class DenseTorch(CpuKernel):
    name, fmt, layout, method = "torch-linear", "dense", "plain", "_torch_linear"
    what = "torch's F.linear in the weight's dtype"


# ---- int4 (W4A16) ----------------------------------------------------------------------------------------

class Q4Amx(CpuKernel):
    name, fmt, layout, method = "q4-amx", "int4", "amx-q4", "_q4_amx"
    what = "AMX int8 tiles (VNNI dot products up to 4 rows), activations rounded to int8 per group"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(caps.amx_kernels, "no AMX (or our AMX kernels are not built here)"),
                     _need(spec.bf16_ok, "rounds activations to int8: only under --dtype auto"),
                     _need(cpu_amx.q4_ok(spec.n, spec.k, spec.group_size), "shape: N % 32, K % 64, group % 64"))


class Q4Vnni(CpuKernel):
    name, fmt, layout, method = "q4-vnni", "int4", "vnni-q4", "_q4_vnni"
    what = ("AVX-512 VNNI dot products on AMX's 4-bit weight layout (scales block-major), activations rounded to "
            "int8 per group, every M")

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(caps.vnni_kernels, "no AVX-512 VNNI + BF16 (or our VNNI kernels are not built here)"),
                     _need(spec.bf16_ok, "rounds activations to int8: only under --dtype auto"),
                     _need(cpu_amx.vnni_q4_ok(spec.n, spec.k, spec.group_size), "shape: N % 16, K % 64, group % 16"))


class Q4q8Avx2(CpuKernel):
    name, fmt, layout, method = "q4q8-avx2", "int4", "lowbit-q4", "_q4q8"
    what = "our AVX2 q4 x q8 kernel: activations rounded to int8 per block, exact integer sums"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_lowbit(caps), _need(spec.bf16_ok, "rounds activations to int8: only under --dtype auto"),
                     _need(cpu_lowbit.q4_block(spec.k, spec.group_size) is not None, "shape: K % 64, group % 64"))


class Q4LowbitDequant(CpuKernel):
    name, fmt, layout, method = "dequant", "int4", "lowbit-q4", "_dequant_q4q8"
    what = "the weight rebuilt from the AVX2 layout per call, then a dense GEMM"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_lowbit(caps), _need(cpu_lowbit.q4_block(spec.k, spec.group_size) is not None,
                                          "shape: K % 64, group % 64"))


def _int4pack_shape(spec: LinearSpec) -> Verdict:
    return _need(spec.n % 16 == 0 and spec.group_size in CPU_INT4_GROUPS and spec.k % spec.group_size == 0,
                 f"shape: N % 16, group in {CPU_INT4_GROUPS}")


class Int4PackBf16(CpuKernel):
    name, fmt, layout, method = "int4pack-bf16", "int4", "int4pack", "_int4pack"
    what = "torch's `_weight_int4pack_mm_for_cpu` in bf16"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_int4pack_shape(spec), _need(spec.bf16_inputs, "bf16 activations not allowed"))


class Int4PackFp32(CpuKernel):
    name, fmt, layout, method = "int4pack-fp32", "int4", "int4pack", "_int4pack"
    what = "torch's `_weight_int4pack_mm_for_cpu` in fp32 (30-80x slower than in bf16)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_int4pack_shape(spec), _need(spec.dtype == torch.float32, "not fp32 activations"),
                     _need(not spec.bf16_ok, "bf16 inputs allowed: 30-80x faster there"))


class Int4PackDequant(CpuKernel):
    name, fmt, layout, method = "dequant", "int4", "int4pack", "_dequant_int4pack"
    what = "the weight rebuilt from torch's int4 layout per call, then a dense GEMM"

    @classmethod
    def can_implement(cls, spec, caps):
        from optcli.engine.quant.linear import int4pack_blocks

        shape = _int4pack_shape(spec)
        if not shape[0]:  # torch's packing itself refuses N % 16 != 0: no probe then
            return shape
        return _need(int4pack_blocks(spec.n) is not None, "torch's layout unknown")


class Q4Nibbles(CpuKernel):
    name, fmt, layout, method = "dequant-nibbles", "int4", "nibbles", "_dequant_nibbles"
    what = "two nibbles a byte, dequantized per call, then a dense GEMM (any shape)"
