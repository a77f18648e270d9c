"""The FP8 (E4M3, per-channel weight scales, dynamic per-token activations) linear layer; see linear.py's
table for which kernel runs where."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from optcli.engine.kernels import cpu_amx, cpu_lowbit
from optcli.engine.kernels import quant_reference as ops
from optcli.engine.kernels.dense_gemm import dense_linear
from optcli.engine.kernels.quant_reference import QuantizedInput
from optcli.engine.quant.cpu_kernels import LinearSpec
from optcli.engine.quant.linear import QuantLinear, _cuda_kernels
from optcli.engine.quant.weights import Fp8Weight


class Fp8Linear(QuantLinear):
    """FP8 weights; with dynamic per-token FP8 activations, one `_scaled_mm` on FP8 tensor cores.

    A CPU has no FP8 units, and torch's CPU `_scaled_mm` and fp8 -> float conversions run scalar
    code (an fp8 -> fp32 cast of a 2048x16384 weight: 109 ms, against 6.8 ms for the whole fp32
    GEMM). On an AVX2 CPU our kernels (`kernels/cpu_lowbit.c`) keep the weight as its E4M3 bytes and
    widen them exactly in registers, fp32 math, activations rounded to FP8 per token first (the
    scheme's numerics): one byte a weight. Measured on a 2048 -> 16384 GEMM against the bf16 weight
    kernels: 1.2x at 1-8 rows, 0.82x at 16, 0.92x at 64, 1.0x at 256 (`fp8-dot` / `fp8-panels` by batch
    size: `cpu_choice.py`'s rule). Without them every E4M3 value is exact in fp16, so the weight is widened once to
    fp16 for FBGEMM's fp16-weight GEMM (2 bytes a weight); without FBGEMM, `_scaled_mm`.

    On a CPU with AMX (`kernels/cpu_amx.c`) the E4M3 bytes are widened exactly to bf16 a panel at a time and
    multiplied on the bf16 tiles, where 16-bit activations are allowed (`--dtype auto`; FP8-rounded per token
    first with act_quant, exact in bf16): one layout, one byte a weight, every M."""

    kind = "fp8"

    def __init__(self, w: Fp8Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto",
                 compute_dtypes: tuple[torch.dtype, ...] = ()) -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype, compute_dtypes)
        device = torch.device(device)
        self.act_quant = w.act_quant
        scaled_mm_ok = w.act_quant and n % 16 == 0 and k % 16 == 0
        if backend == "auto" and device.type == "cuda":
            backend = "triton" if scaled_mm_ok and _cuda_kernels(device) and _fp8_tensor_cores(device) else "dequant"
        elif device.type == "cpu" and backend != "triton":
            spec = LinearSpec("fp8", n, k, dtype, self.bf16_ok, act_quant=w.act_quant)
            layout = self.set_cpu_plan(spec, CPU_LAYOUTS.get(backend)).layout
            backend = {"amx-fp8": "cpu-amx" if "fp8-amx" in self.paths else "cpu-avx512",
                       "fbgemm-fp16": "fbgemm-fp16"}.get(layout) or (
                "cpu-lowbit" if "fp8-dot" in self.paths else "cpu" if "scaled_mm" in self.paths else "dequant")
        self.mode = backend
        self.input_quant = torch.float8_e4m3fn if backend == "triton" and w.act_quant else None
        self.register_buffer("scales", w.scales.float().reshape(1, -1).to(device))
        if backend == "fbgemm-fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(w.q.to(torch.float16).float(), None)
            self.opaque_bytes = n * k * 2
            self.qweight = None
        elif backend in ("cpu-amx", "cpu-avx512"):  # AMX's layout: its tiles, or AVX-512 BF16 dot products
            self.register_buffer("qweight", cpu_amx.pack_fp8(w.q))
        else:  # [N, K]; .t() is the column-major operand _scaled_mm wants
            self.register_buffer("qweight", w.q.to(device))

    def quant_weight(self) -> Fp8Weight:
        if self.mode in ("cpu-amx", "cpu-avx512"):
            return Fp8Weight(cpu_amx.unpack_fp8(self.qweight), self.scales.reshape(-1), self.act_quant)
        if self.qweight is not None:
            return Fp8Weight(self.qweight, self.scales.reshape(-1), self.act_quant)
        wide = torch.ops.quantized.linear_unpack_fp16(self.packed)[0]
        return Fp8Weight(wide.to(torch.float8_e4m3fn), self.scales.reshape(-1), self.act_quant)

    def matmul_quantized(self, x: QuantizedInput) -> torch.Tensor:
        return torch._scaled_mm(x.q, self.qweight.t(), scale_a=x.scales, scale_b=self.scales, out_dtype=x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is not None:
            return self.cpu_matmul(x)
        return self._fp8_dequant(x)

    def _fp8_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scales
        xf = x.float()
        if self.act_quant and cpu_lowbit.library() is not None:  # the same rounding, vectorized
            xf, xs = cpu_lowbit.fp8_round_rows(xf)
            scale = xs * self.scales
        elif self.act_quant:
            xq, xs = ops.quantize_per_token(xf, torch.float8_e4m3fn)
            xf, scale = xq.float(), xs * self.scales
        y = torch.ops.quantized.linear_dynamic_fp16(xf.contiguous(), self.packed)
        return (y * scale).to(x.dtype)

    def _fp8_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = ops.quantize_per_token(x, torch.float8_e4m3fn)
        return self.matmul_quantized(QuantizedInput(xq, xs, x.dtype))

    def _fp8_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 activations where the scheme has them, then the weight cast per call (or Triton's FP8 GEMM)."""
        if self.act_quant:
            if self.mode == "triton":
                from optcli.engine.kernels.act_quant import quantize_per_token

                xq, xs = quantize_per_token(x.contiguous(), torch.float8_e4m3fn)
                return self.matmul_quantized(QuantizedInput(xq, xs, x.dtype))
            xq, xs = ops.quantize_per_token(x, torch.float8_e4m3fn)
            x = (xq.float() * xs).to(x.dtype)
        return F.linear(x, (self.qweight.float() * self.scales.t()).to(x.dtype))

    def _fp8_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 activations (FP8-rounded per token with act_quant) and the scale the product needs."""
        if not self.act_quant:
            return x.float(), self.scales
        xf, xs = cpu_lowbit.fp8_round_rows(x.float())
        return xf, xs * self.scales

    def _fp8_amx(self, x: torch.Tensor) -> torch.Tensor:
        a, xs = x, None
        if self.act_quant:  # FP8-rounded per token (exact in bf16), the row scales applied after the sums
            a, xs = cpu_amx.fp8_round_rows(x)
        return cpu_amx.fp8_gemm(a, self.qweight, self.scales.reshape(-1), xs, self.out_features).to(x.dtype)

    def _fp8_bf16dot(self, x: torch.Tensor) -> torch.Tensor:
        """AMX's layout and numbers on AVX-512 BF16 dot products (no tiles)."""
        a, xs = x, None
        if self.act_quant:
            a, xs = cpu_amx.fp8_round_rows(x)
        return cpu_amx.vnni_fp8_gemm(a, self.qweight, self.scales.reshape(-1), xs, self.out_features).to(x.dtype)

    def _fp8_dot(self, x: torch.Tensor, panels: bool = False) -> torch.Tensor:
        xf, scale = self._fp8_inputs(x)
        return (cpu_lowbit.fp8_gemm(xf, self.qweight, panels) * scale).to(x.dtype)

    def _fp8_panels(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp8_dot(x, panels=True)

    def _fp8_widened(self, x: torch.Tensor) -> torch.Tensor:
        xf, scale = self._fp8_inputs(x)
        return (dense_linear(xf, cpu_lowbit.fp8_widen(self.qweight)) * scale).to(x.dtype)


CPU_LAYOUTS = {"cpu-amx": "amx-fp8", "cpu-avx512": "amx-fp8", "cpu-lowbit": "e4m3", "fbgemm-fp16": "fbgemm-fp16", "cpu": "e4m3", "dequant": "e4m3"}


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_prepack_fp16")


def _fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)
