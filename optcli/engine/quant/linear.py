"""Linear layers that compute from quantized weights, one per format, each with a GPU and a CPU path.

| format | CUDA | CPU |
|---|---|---|
| int4 (W4A16) | Triton GEMM, int4 dequantized in registers | torch's int4 pack kernel (`_weight_int4pack_mm_for_cpu`) |
| int8 (W8A8) | Triton per-token quant + Triton int8 GEMM with fused scales | same quant in torch + `torch._int_mm` |
| fp8 (FP8_DYNAMIC) | Triton per-token quant + `torch._scaled_mm` (sm_89+) | same quant in torch + CPU `_scaled_mm` |
| bitsandbytes NF4 / LLM.int8 | bitsandbytes' own kernels | bitsandbytes' own kernels |

Where a kernel's shape rules are not met (e.g. an output width not a multiple of 16 for the CPU int4
kernel), the layer keeps its weight quantized and dequantizes it per call (`mode == "dequant"`),
so memory stays quantized and numerics stay the checkpoint's; only speed is lost. The mode of
every layer is visible as `.mode` and summed up by `quant_summary`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optcli.engine.quant import ops
from optcli.engine.quant.ops import QuantizedInput
from optcli.engine.quant.weights import BnbInt8Weight, BnbNf4Weight, Fp8Weight, Int4Weight, Int8Weight

CPU_INT4_GROUPS = (32, 64, 128, 256)


def _cuda_kernels(device: torch.device) -> bool:
    from optcli.engine.kernels import triton_available

    return device.type == "cuda" and triton_available()


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) for a quantized W; each subclass holds its packed buffers and defines
    `matmul(x [T, K]) -> [T, N]`. A layer that quantizes its activations per token on the GPU names
    the format in `input_quant`, so the op before it (a fused RMSNorm or SiLU-mul) can hand over a
    `QuantizedInput` instead of a tensor, which `matmul_quantized` takes."""

    kind = "?"
    mode = "?"
    input_quant: torch.dtype | None = None

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, device, dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        if isinstance(x, QuantizedInput):
            shape, y = x.q.shape, self.matmul_quantized(x)
        else:
            shape, y = x.shape, self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}, mode={self.mode}"


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, w: Int4Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto") -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype)
        device = torch.device(device)
        self.group_size = w.group_size
        self.register_buffer("perm", None if w.perm is None else w.perm.to(device))
        cpu_ok = (n % 16 == 0 and w.group_size in CPU_INT4_GROUPS and k % w.group_size == 0
                  and dtype in (torch.float32, torch.bfloat16))
        if backend == "auto":
            backend = "triton" if _cuda_kernels(device) else "cpu" if device.type == "cpu" and cpu_ok else "dequant"
        self.mode = backend
        if backend == "triton":
            self.register_buffer("qweight", ops.pack_int4_for_triton(w.q).to(device))
            self.register_buffer("scales", w.scales.t().contiguous().to(device=device, dtype=dtype))
            self.register_buffer("zeros", None if w.zeros is None else w.zeros.t().contiguous().to(device, dtype))
        elif backend == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
            zeros = w.zeros if w.zeros is not None else torch.zeros_like(w.scales)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_zeros", torch.stack([w.scales.t(), zeros.t()], -1).contiguous().to(dtype))
        else:  # two nibbles per byte, unpacked per call
            q = w.q if k % 2 == 0 else F.pad(w.q, (0, 1))
            self.register_buffer("qweight", (q[:, 0::2] | (q[:, 1::2] << 4)).to(device))
            self.register_buffer("scales", w.scales.to(device))
            self.register_buffer("zeros", None if w.zeros is None else w.zeros.to(device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.mode == "triton":
            from optcli.engine.kernels.int4_matmul import int4_matmul

            return int4_matmul(x.contiguous(), self.qweight, self.scales, self.zeros, self.group_size)
        if self.mode == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.qweight, self.group_size, self.scales_zeros)
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], -1).reshape(self.out_features, -1)
        w = Int4Weight(q[:, : self.in_features], self.scales, self.zeros, self.group_size)  # x is permuted already
        return F.linear(x, w.dequantize().to(x.dtype))


class Int8Linear(QuantLinear):
    """W8A8 (dynamic per-token int8 activations), or int8 weight-only when the scheme says so."""

    kind = "int8"

    def __init__(self, w: Int8Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto") -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype)
        device = torch.device(device)
        self.act_quant = w.act_quant
        if backend == "auto":
            backend = "triton" if _cuda_kernels(device) and w.act_quant else "cpu" if device.type == "cpu" else "dequant"
        self.mode = backend
        if backend == "triton" and not w.act_quant:
            raise ValueError("the Triton int8 GEMM quantizes activations: weight-only int8 takes the cpu or dequant path")
        self.input_quant = torch.int8 if backend == "triton" else None
        self.register_buffer("qweight", w.q.to(device))  # [N, K], as every path here takes it
        self.register_buffer("scales", w.scales.float().to(device))

    def matmul_quantized(self, x: QuantizedInput) -> torch.Tensor:
        from optcli.engine.kernels.int8_matmul import int8_matmul

        return int8_matmul(x.q, x.scales, self.qweight, self.scales, x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "triton":
            from optcli.engine.kernels.act_quant import quantize_per_token

            return self.matmul_quantized(QuantizedInput(*quantize_per_token(x.contiguous(), torch.int8), x.dtype))
        if not self.act_quant:
            if self.mode == "cpu" and x.dtype == torch.float32:
                return torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
            return F.linear(x, (self.qweight.float() * self.scales[:, None]).to(x.dtype))
        xq, xs = ops.quantize_per_token(x, torch.int8)
        if self.mode == "cpu":
            return ops.int8_scaled_mm(xq, xs, self.qweight, self.scales, x.dtype)
        w = self.qweight.float() * self.scales[:, None]
        return F.linear((xq.float() * xs).to(x.dtype), w.to(x.dtype))


class Fp8Linear(QuantLinear):
    """FP8 weights; with dynamic per-token FP8 activations, one `_scaled_mm` on FP8 tensor cores."""

    kind = "fp8"

    def __init__(self, w: Fp8Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto") -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype)
        device = torch.device(device)
        self.act_quant = w.act_quant
        if backend == "auto":
            scaled_mm_ok = w.act_quant and n % 16 == 0 and k % 16 == 0
            if device.type == "cuda":
                backend = "triton" if scaled_mm_ok and _cuda_kernels(device) and _fp8_tensor_cores(device) else "dequant"
            else:
                backend = "cpu" if scaled_mm_ok else "dequant"
        self.mode = backend
        self.input_quant = torch.float8_e4m3fn if backend == "triton" and w.act_quant else None
        self.register_buffer("qweight", w.q.to(device))  # [N, K]; .t() is the column-major operand _scaled_mm wants
        self.register_buffer("scales", w.scales.float().reshape(1, -1).to(device))

    def matmul_quantized(self, x: QuantizedInput) -> torch.Tensor:
        return torch._scaled_mm(x.q, self.qweight.t(), scale_a=x.scales, scale_b=self.scales, out_dtype=x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            if self.mode == "triton":
                from optcli.engine.kernels.act_quant import quantize_per_token

                xq, xs = quantize_per_token(x.contiguous(), torch.float8_e4m3fn)
            else:
                xq, xs = ops.quantize_per_token(x, torch.float8_e4m3fn)
            if self.mode in ("triton", "cpu"):
                return self.matmul_quantized(QuantizedInput(xq, xs, x.dtype))
            x = (xq.float() * xs).to(x.dtype)
        return F.linear(x, (self.qweight.float() * self.scales.t()).to(x.dtype))


def _fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


class BnbNf4Linear(QuantLinear):
    kind = "nf4"
    mode = "bitsandbytes"

    def __init__(self, w: BnbNf4Weight, bias=None, device="cpu", dtype=torch.float32) -> None:
        super().__init__(w.out_features, w.in_features, bias, device, dtype)
        self.register_buffer("packed", w.packed.to(device))
        self.register_buffer("absmax", w.absmax.to(device))
        self.register_buffer("code", w.code.to(device))
        self.blocksize, self.quant_type = w.blocksize, w.quant_type

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           code=self.code, blocksize=self.blocksize, quant_type=self.quant_type, dtype=x.dtype)
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=state)


class BnbInt8Linear(QuantLinear):
    kind = "int8-bnb"
    mode = "bitsandbytes"

    def __init__(self, w: BnbInt8Weight, bias=None, device="cpu", dtype=torch.float32) -> None:
        super().__init__(*w.shape, bias, device, dtype)
        self.register_buffer("qweight", w.q.to(device))
        self.register_buffer("scb", w.scb.to(device))
        self.threshold = w.threshold

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        state = bnb.MatmulLtState()
        state.CB, state.SCB, state.threshold = self.qweight, self.scb, self.threshold
        state.has_fp16_weights, state.is_training = False, False
        # LLM.int8 computes in fp16 (bitsandbytes would cast, and warn on every call).
        return bnb.matmul(x.half(), self.qweight, state=state).to(x.dtype)


_LAYERS = {Int4Weight: Int4Linear, Int8Weight: Int8Linear, Fp8Weight: Fp8Linear, BnbNf4Weight: BnbNf4Linear,
           BnbInt8Weight: BnbInt8Linear}


def make_quant_linear(weight, bias: torch.Tensor | None, device, dtype: torch.dtype) -> QuantLinear:
    return _LAYERS[type(weight)](weight, bias, device, dtype)


def quant_summary(model: nn.Module) -> dict[str, int]:
    """How many layers run each format through each path, e.g. {"int4/triton": 112}."""
    summary: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            key = f"{module.kind}/{module.mode}"
            summary[key] = summary.get(key, 0) + 1
    return summary
