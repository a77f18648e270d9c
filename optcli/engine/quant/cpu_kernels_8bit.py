"""The CPU kernels of the int8 (W8A8, W8A16), FP8 and bitsandbytes layers, one class each; the base, the dense
and the int4 kernels and what `can_implement` means: `cpu_kernels.py`."""

from __future__ import annotations

from optcli.engine.kernels import cpu_lowbit
from optcli.engine.quant.cpu_kernels import CpuKernel, LinearSpec, Verdict, _both, _lowbit, _need

# ---- int8 (W8A8, and weight-only W8A16) ------------------------------------------------------------------

def _w8a8(spec: LinearSpec) -> Verdict:
    return _need(spec.act_quant, "weight-only int8 (no int8 activations)")


class Q8Amx(CpuKernel):
    name, fmt, layout, method = "q8-amx", "int8", "amx-q8", "_q8_amx"
    what = "AMX int8 tiles, activations rounded per token (the scheme's own rounding)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_w8a8(spec), _need(caps.amx_kernels, "no AMX (or our AMX kernels are not built here)"),
                     _need(spec.bf16_ok, "bf16 inputs: only under --dtype auto"),
                     _need(spec.n % 32 == 0 and spec.k % 64 == 0, "shape: N % 32, K % 64"))


class Q8Vnni(CpuKernel):
    name, fmt, layout, method = "q8-vnni", "int8", "amx-q8", "_q8_vnni"
    what = "AVX-512 VNNI dot products on AMX's int8 layout, activations rounded per token, every M"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_w8a8(spec), _need(caps.vnni_kernels, "no AVX-512 VNNI + BF16 (or our VNNI kernels not built)"),
                     _need(spec.bf16_ok, "bf16 inputs: only under --dtype auto"),
                     _need(spec.n % 16 == 0 and spec.k % 64 == 0, "shape: N % 16, K % 64"))


class Q8q8Avx2(CpuKernel):
    name, fmt, layout, method = "q8q8-avx2", "int8", "int8-rows", "_q8q8"
    what = "our AVX2 int8 x int8 kernel: per-token rounding and exact int32 sums in one call"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_w8a8(spec), _lowbit(caps), _need(spec.k % 16 == 0, "shape: K % 16"))


class IntMm(CpuKernel):
    name, fmt, layout, method = "int_mm", "int8", "int8-rows", "_int_mm"
    what = "torch's `_int_mm` (oneDNN VNNI), the int32 result scaled in torch"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_w8a8(spec), _need(caps.vnni or caps.amx, "without VNNI torch's _int_mm runs reference loops"))


class Int8PackBf16(CpuKernel):
    name, fmt, layout, method = "int8pack-bf16", "int8", "int8-rows", "_int8pack_bf16"
    what = "torch's `_weight_int8pack_mm` on bf16 inputs (W8A8: the integer activations, exact in bf16)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(spec.bf16_inputs, "bf16 inputs not allowed"),
                     _need(spec.k % 16 == 0, "shape: K % 16 (torch 2.13's kernel crashes otherwise)"))


class Int8PackFp32(CpuKernel):
    name, fmt, layout, method = "int8pack-fp32", "int8", "int8-rows", "_int8pack_fp32"
    what = "torch's `_weight_int8pack_mm` on fp32 inputs (5-18x slower than on bf16)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _need(not (spec.bf16_inputs and spec.k % 16 == 0), "bf16 inputs allowed: 5-18x faster there")


class I8wDot(CpuKernel):
    name, fmt, layout, method = "i8w-dot", "int8", "int8-rows", "_i8w"
    what = "weight-only int8 widened exactly in registers, fp32 math, dot-product form"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(not spec.act_quant, "W8A8 rounds activations (the integer kernels run it)"), _lowbit(caps))


class I8wPanels(I8wDot):
    name, method = "i8w-panels", "_i8w_panels"
    what = "weight-only int8 widened exactly in registers, fp32 math, SGEMM-style panels"


class Int8Dequant(CpuKernel):
    name, fmt, layout, method = "dequant", "int8", "int8-rows", "_dequant"
    what = "the weight scaled to the activations' dtype per call, then a dense GEMM"


# ---- FP8 (E4M3 weights, per-token FP8 activations when act_quant) ----------------------------------------

class Fp8Amx(CpuKernel):
    name, fmt, layout, method = "fp8-amx", "fp8", "amx-fp8", "_fp8_amx"
    what = "E4M3 widened exactly to bf16 a panel at a time, AMX bf16 tiles"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(caps.amx_kernels, "no AMX (or our AMX kernels are not built here)"),
                     _need(spec.bf16_ok, "bf16 inputs: only under --dtype auto"),
                     _need(spec.n % 32 == 0 and spec.k % 32 == 0, "shape: N % 32, K % 32"))


class Fp8Bf16Dot(CpuKernel):
    name, fmt, layout, method = "fp8-bf16dot", "fp8", "amx-fp8", "_fp8_bf16dot"
    what = "E4M3 widened exactly to bf16 a 16-column block at a time, AVX-512 BF16 dot products"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_need(caps.vnni_kernels, "no AVX-512 BF16 + VNNI (or our VNNI kernels are not built here)"),
                     _need(spec.bf16_ok, "bf16 inputs: only under --dtype auto"),
                     _need(spec.n % 16 == 0 and spec.k % 32 == 0, "shape: N % 16, K % 32"))


class Fp8Dot(CpuKernel):
    name, fmt, layout, method = "fp8-dot", "fp8", "e4m3", "_fp8_dot"
    what = "E4M3 bytes widened exactly in registers, fp32 math, dot-product form"

    @classmethod
    def can_implement(cls, spec, caps):
        return _lowbit(caps)


class Fp8Panels(Fp8Dot):
    name, method = "fp8-panels", "_fp8_panels"
    what = "E4M3 bytes widened exactly in registers, fp32 math, SGEMM-style panels"


class Fp8Widen(Fp8Dot):
    name, method = "widen-onednn", "_fp8_widened"
    what = "the E4M3 weight widened to fp32 per call, then oneDNN's fp32 GEMM"


class Fp8Fbgemm(CpuKernel):
    name, fmt, layout, method = "fbgemm-fp16", "fp8", "fbgemm-fp16", "_fp8_fbgemm"
    what = "the weight widened once to fp16 (exact) for FBGEMM's fp16-weight GEMM: 2 bytes a weight"

    @classmethod
    def can_implement(cls, spec, caps):
        from optcli.engine.quant.fp8_linear import fbgemm_available

        return _need(fbgemm_available(), "torch has no FBGEMM fp16 GEMM here")


class Fp8ScaledMm(CpuKernel):
    name, fmt, layout, method = "scaled_mm", "fp8", "e4m3", "_fp8_scaled_mm"
    what = "torch's CPU `_scaled_mm` (scalar code)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _need(spec.act_quant and spec.n % 16 == 0 and spec.k % 16 == 0, "needs FP8 activations, N, K % 16")


class Fp8Dequant(CpuKernel):
    name, fmt, layout, method = "dequant", "fp8", "e4m3", "_fp8_dequant"
    what = "the weight cast to the activations' dtype per call (torch's scalar fp8 cast), then F.linear"


# ---- bitsandbytes ----------------------------------------------------------------------------------------

class Nf4Avx2(CpuKernel):
    name, fmt, layout, method = "nf4-avx2", "nf4", "bnb-4bit", "_nf4"
    what = "our AVX2 float kernel on bitsandbytes' layout (code book looked up 8 values at a time)"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_lowbit(caps), _need(cpu_lowbit.nf4_ok(spec.k, spec.group_size), "shape: blocks within rows"))


class Nf4Dequant(Nf4Avx2):
    name, method = "dequant", "_dequant_nf4"
    what = "the weight dequantized by our kernel per call, then a dense GEMM"


class Nf4Bnb(CpuKernel):
    name, fmt, layout, method = "bitsandbytes", "nf4", "bnb-4bit", "_bnb"
    what = "bitsandbytes' own CPU kernel (7x slower than the fp32 source at one row)"


class BnbQ8q8(CpuKernel):
    name, fmt, layout, method = "q8q8-avx2", "int8-bnb", "bnb-int8", "_q8q8"
    what = "LLM.int8's decomposition with the int8 part on our exact AVX2 int8 GEMM"

    @classmethod
    def can_implement(cls, spec, caps):
        return _both(_lowbit(caps), _need(spec.k % 16 == 0, "shape: K % 16"))


class BnbInt8(CpuKernel):
    name, fmt, layout, method = "bitsandbytes", "int8-bnb", "bnb-int8", "_bnb"
    what = "bitsandbytes' own LLM.int8 CPU path (fp16; 7x slower than the fp32 source at one row)"
