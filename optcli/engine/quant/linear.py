"""Linear layers that compute from quantized weights, one per format, each with a GPU and a CPU path:
the shared base and the int4 and int8 layers here, FP8 in `fp8_linear.py`, bitsandbytes in
`bnb_linear.py`, and which class runs which weight in `layers.py`.

| format | CUDA | CPU (every kernel: `cpu_kernels.py`; which one at which batch size: `cpu_choice.py`'s rules) |
|---|---|---|
| int4 (W4A16) | Triton GEMM, int4 dequantized in registers | AMX int8 tiles (`kernels/cpu_amx.c`); else our AVX2 q4 x q8 kernel (`kernels/cpu_lowbit.c`) with the weight rebuilt per call for prompt-sized batches; else torch's int4 pack kernel; else nibbles dequantized per call |
| int8 (W8A8) | Triton per-token quant + Triton int8 GEMM with fused scales | AMX int8 tiles; else our exact AVX2 int8 GEMM, torch's `_int_mm` (VNNI) or `_weight_int8pack_mm` |
| fp8 (FP8_DYNAMIC) | Triton per-token quant + `torch._scaled_mm` (sm_89+) | `fp8_linear.py`: AMX bf16 tiles (E4M3 widened exactly); else our AVX2 kernels; else FBGEMM's fp16-weight GEMM |
| bitsandbytes NF4 / LLM.int8 | bitsandbytes' own kernels | our AVX2 kernels on bitsandbytes' layout, else bitsandbytes' |

Where the engine's dtype was left to `auto`, a CPU layer may compute in bf16 (`compute_dtypes`): W4A16's
activations are 16-bit by the scheme's own name, and W8A8's int8 activations are exact in bf16. An
explicit `--dtype float32` keeps every matmul in fp32 (the kernels that would round refuse the layer).

Where no CPU kernel takes a shape (an output width not a multiple of 16 for torch's int4 kernel, say), the
layer keeps its weight quantized and dequantizes it per call (`mode == "dequant"`), so memory stays
quantized and numerics stay the checkpoint's; only speed is lost. Every layer's mode is `.mode`, summed up
by `quant_summary`; its per-bucket CPU kernels and why are `.plan` (`Engine.stats()["kernels"]`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from optcli.engine.kernels import cpu_amx, cpu_lowbit, triton_available
from optcli.engine.kernels import quant_reference as ops
from optcli.engine.kernels.dense_gemm import dense_linear
from optcli.engine.kernels.quant_reference import QuantizedInput
from optcli.engine.quant.cpu_choice import CpuPaths
from optcli.engine.quant.cpu_kernels import LinearSpec
from optcli.engine.quant.weights import Int4Weight, Int8Weight

# The Triton GEMMs are imported where a "triton"-mode layer calls them: triton is optional (absent from the
# CPU build of torch), so this module must import without it.


def _cuda_kernels(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available()


class QuantLinear(CpuPaths, nn.Module):
    """y = x @ W^T (+ bias) for a quantized W; each subclass holds its packed buffers and defines
    `matmul(x [T, K]) -> [T, N]`. A layer that quantizes its activations per token on the GPU names
    the format in `input_quant`, so the op before it (a fused RMSNorm or SiLU-mul) can hand over a
    `QuantizedInput` instead of a tensor, which `matmul_quantized` takes."""

    kind = "?"
    mode = "?"
    input_quant: torch.dtype | None = None
    opaque_bytes = 0  # weight bytes held outside tensors (an FBGEMM packed object), for weight_bytes()

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, device, dtype,
                 compute_dtypes: tuple[torch.dtype, ...] = ()) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        # the dtypes the CPU kernels may compute in: the activations' own first, then any allowed 16-bit one
        self.cpu_dtypes = (dtype, *(d for d in compute_dtypes if d != dtype))

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        if isinstance(x, QuantizedInput):
            shape, y = x.q.shape, self.matmul_quantized(x)
        elif x.dim() == 2:  # the engine's flat token batch: no reshapes (~3 us a call, 64+ calls a decode step)
            shape, y = None, self.matmul(x)
        else:
            shape, y = x.shape, self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y if shape is None else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}, mode={self.mode}"

    @property
    def bf16_ok(self) -> bool:
        return torch.bfloat16 in self.cpu_dtypes


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, w: Int4Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto",
                 compute_dtypes: tuple[torch.dtype, ...] = ()) -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype, compute_dtypes)
        device = torch.device(device)
        self.group_size = w.group_size
        self.register_buffer("perm", None if w.perm is None else w.perm.to(device))
        # bf16 where allowed: fp32 inputs to torch's int4 kernel measured 30-80x slower (cpu_kernels.py)
        self.cpu_dtype = torch.bfloat16 if self.bf16_ok else dtype
        layout = None
        if backend == "auto" and _cuda_kernels(device):
            backend = "triton"
        elif backend in ("auto", "cpu") and device.type == "cpu":
            layout = self.set_cpu_plan(LinearSpec("int4", n, k, dtype, self.bf16_ok, w.group_size)).layout
            backend = "dequant" if layout == "nibbles" else "cpu"
        elif backend == "auto":
            backend = "dequant"
        self.mode = backend
        if backend == "triton":
            self.register_buffer("qweight", ops.pack_int4_for_triton(w.q).to(device))
            self.register_buffer("scales", w.scales.t().contiguous().to(device=device, dtype=dtype))
            self.register_buffer("zeros", None if w.zeros is None else w.zeros.t().contiguous().to(device, dtype))
        elif layout == "amx-q4":
            # one layout (AMX's B tiles, 4 bits a weight): measured 4.5x torch's bf16 GEMM at 1 row (VNNI dot
            # products), 2.2x at 64 and 1.1-1.4x at 256-2048 on a 2048 -> 16384 layer (Xeon, 2 cores)
            self.register_buffer("qweight", cpu_amx.pack_q4(w.q))
            self.register_buffer("scales_t", w.scales.t().contiguous().float())
            self.register_buffer("zeros_t", None if w.zeros is None else w.zeros.t().contiguous().float())
        elif layout == "vnni-q4":
            # the same packed weights on a CPU with VNNI but no tiles (q4-vnni), scales block-major (cpu_vnni.c)
            self.register_buffer("qweight", cpu_amx.pack_q4(w.q))
            self.register_buffer("scales_b", cpu_amx.vnni_block_scales(w.scales))
            self.register_buffer("zeros_b", None if w.zeros is None else cpu_amx.vnni_block_scales(w.zeros))
        elif layout == "lowbit-q4":
            # our AVX2 kernel's layout only (one copy of the weight). block_*: one value per activation block
            # and column, grouped by blocks of 8 columns ([N/8, K/block, 8], `cpu_lowbit.pack_columns`)
            self.block = cpu_lowbit.q4_block(k, w.group_size)
            per_block = w.group_size // self.block
            self.register_buffer("qweight", cpu_lowbit.pack_q4(w.q))
            self.register_buffer("block_scales", cpu_lowbit.pack_columns(w.scales.repeat_interleave(per_block, 1)))
            zeros = None if w.zeros is None else cpu_lowbit.pack_columns(w.zeros.repeat_interleave(per_block, 1))
            self.register_buffer("block_zeros", zeros)
        elif layout == "int4pack":
            packed = torch._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
            zeros = w.zeros if w.zeros is not None else torch.zeros_like(w.scales)
            self.register_buffer("qweight", packed)
            scales_zeros = torch.stack([w.scales.t(), zeros.t()], -1).contiguous().to(self.cpu_dtype)
            self.register_buffer("scales_zeros", scales_zeros)
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
            return self.cpu_matmul(x)
        return self._dequant_nibbles(x)

    def _dequant_nibbles(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], -1).reshape(self.out_features, -1)
        w = Int4Weight(q[:, : self.in_features], self.scales, self.zeros, self.group_size)  # x is permuted already
        return F.linear(x, w.dequantize().to(x.dtype))

    def _q4_amx(self, x: torch.Tensor) -> torch.Tensor:
        """AMX int8 tiles: activations rounded to int8 per row and weight group, exact integer group sums."""
        y = cpu_amx.q4_gemm(x.to(torch.bfloat16), self.qweight, self.scales_t, self.zeros_t, self.group_size,
                            self.out_features)
        return y.to(x.dtype)

    def _q4_vnni(self, x: torch.Tensor) -> torch.Tensor:
        """The same product on AVX-512 VNNI dot products (Zen 4/5: no tiles), scales block-major."""
        y = cpu_amx.vnni_q4_gemm(x.to(torch.bfloat16), self.qweight, self.scales_b, self.zeros_b, self.group_size,
                                 self.out_features)
        return y.to(x.dtype)

    def _q4q8(self, x: torch.Tensor) -> torch.Tensor:
        """Our AVX2 kernel: activations rounded to int8 per row and block of (at most) 256 inputs, as
        llama.cpp does for its q4_0 weights, then exact integer sums (`kernels/cpu_lowbit.c`)."""
        y = cpu_lowbit.q4_gemm(x, self.qweight, self.block_scales, self.block_zeros, self.block, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _dequant_q4q8(self, x: torch.Tensor) -> torch.Tensor:
        """The weight dequantized from the AVX2 kernel's layout, then a dense GEMM in x's dtype."""
        n, k, b = self.out_features, self.in_features, self.block
        q = cpu_lowbit.unpack_q4(self.qweight, n).reshape(n, k // b, b)
        scales = cpu_lowbit.unpack_columns(self.block_scales, n)[..., None]  # [N, K/b, 1]
        offset = -8 * scales
        if self.block_zeros is not None:
            offset = offset + cpu_lowbit.unpack_columns(self.block_zeros, n)[..., None]
        return dense_linear(x, torch.addcmul(offset, q, scales).reshape(n, k).to(x.dtype))

    def _int4pack(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int4 kernel in `cpu_dtype` (bf16 where allowed, the only fast case)."""
        y = torch._weight_int4pack_mm_for_cpu(x.to(self.cpu_dtype).contiguous(), self.qweight, self.group_size,
                                              self.scales_zeros)
        return y.to(x.dtype)

    def _dequant_int4pack(self, x: torch.Tensor) -> torch.Tensor:
        """The weight dequantized from the kernel's own layout, then fp32 (or the model dtype) GEMM:
        measured faster than the int4 kernel from a few hundred rows up (a prompt chunk), where the
        kernel's bf16 arithmetic, not the weight read, is the cost."""
        n, k, g = self.out_features, self.in_features, self.group_size
        block = int4pack_blocks(n)
        packed = self.qweight.view(n // block, k, block // 2)
        q = torch.cat([packed & 0xF, packed >> 4], -1).transpose(1, 2).reshape(n, k // g, g)
        scales, zeros = self.scales_zeros.float().unbind(-1)  # [G, N] each
        # uint8 straight into addcmul: the float conversion happens inside its one pass over the weight
        w = torch.addcmul((zeros - 8 * scales).t()[..., None], q, scales.t()[..., None]).reshape(n, k)
        return dense_linear(x, w.to(x.dtype))


@functools.cache
def int4pack_blocks(n: int) -> int | None:
    """The block of output rows torch's CPU int4 packing interleaves (low nibble: rows 0..b/2-1 of a
    block, high nibble: the rest, per input channel), found by packing a probe; None if it is none
    of the simple layouts (then no dequant path: the layout is the kernel's private business)."""
    probe = torch.randint(0, 16, (n, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32, 16):
        if n % block or packed.numel() * 2 != probe.numel():
            continue
        p = packed.view(n // block, 64, block // 2)
        if torch.equal(torch.cat([p & 0xF, p >> 4], -1).transpose(1, 2).reshape(n, 64).to(torch.int32), probe):
            return block
    return None


class Int8Linear(QuantLinear):
    """W8A8 (dynamic per-token int8 activations), or int8 weight-only when the scheme says so."""

    kind = "int8"

    def __init__(self, w: Int8Weight, bias=None, device="cpu", dtype=torch.float32, backend: str = "auto",
                 compute_dtypes: tuple[torch.dtype, ...] = ()) -> None:
        n, k = w.shape
        super().__init__(n, k, bias, device, dtype, compute_dtypes)
        device = torch.device(device)
        self.act_quant = w.act_quant
        layout = None
        if backend == "auto" and _cuda_kernels(device) and w.act_quant:
            backend = "triton"
        elif backend in ("auto", "cpu") and device.type == "cpu":
            backend = "cpu"
            layout = self.set_cpu_plan(LinearSpec("int8", n, k, dtype, self.bf16_ok, act_quant=w.act_quant)).layout
        elif backend == "auto":
            backend = "dequant"
        self.mode = backend
        if backend == "triton" and not w.act_quant:
            raise ValueError("the Triton int8 GEMM quantizes activations: weight-only int8 takes the cpu or dequant path")
        self.input_quant = torch.int8 if backend == "triton" else None
        self.register_buffer("scales", w.scales.float().to(device))
        if layout == "amx-q8":
            # AMX's int8 tiles, the weight in their B layout (same bytes, reordered): ~3x torch's bf16 GEMM at
            # 1-64 rows on a 2048 -> 16384 layer, ahead of _int_mm (its int32 output scaled in torch costs
            # a third of its time at 64 rows)
            self.register_buffer("qweight", cpu_amx.pack_q8(w.q))
            self.register_buffer("colsum", w.q.sum(1, dtype=torch.int32), persistent=False)  # q8-vnni's correction
            return
        self.register_buffer("qweight", _aligned(w.q.to(device)))  # [N, K], as every path below takes it
        # _weight_int8pack_mm scales by a vector of the input's dtype: ones, and the fp32 scales after
        for dt in (torch.bfloat16, torch.float32):
            if f"int8pack-{_short(dt)}" in getattr(self, "paths", ()):
                self.register_buffer(f"ones_{_short(dt)}", torch.ones(n, dtype=dt), persistent=False)

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """int8 rows `ids` of W [..., K] whatever the layout (an int8 head's tied embedding reads them)."""
        if self.plan is None or self.plan.layout != "amx-q8":
            return F.embedding(ids, self.qweight)
        return cpu_amx.q8_rows(self.qweight, ids.reshape(-1)).reshape(*ids.shape, self.in_features)

    def quant_weight(self) -> Int8Weight:
        q = cpu_amx.unpack_q8(self.qweight) if self.plan is not None and self.plan.layout == "amx-q8" else self.qweight
        return Int8Weight(q, self.scales, self.act_quant)

    def matmul_quantized(self, x: QuantizedInput) -> torch.Tensor:
        from optcli.engine.kernels.int8_matmul import int8_matmul

        return int8_matmul(x.q, x.scales, self.qweight, self.scales, x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "triton":
            from optcli.engine.kernels.act_quant import quantize_per_token

            return self.matmul_quantized(QuantizedInput(*quantize_per_token(x.contiguous(), torch.int8), x.dtype))
        if self.mode == "cpu":
            return self.cpu_matmul(x)
        return self._dequant(x)

    def _dequant(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.mul(self.qweight, self.scales[:, None])  # int8 * fp32 -> fp32 in one pass
        if self.act_quant:
            xq, xs = ops.quantize_per_token(x, torch.int8)
            x = (xq.float() * xs).to(x.dtype)
        return dense_linear(x, w.to(x.dtype))

    def _q8_amx(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_amx.q8_gemm(x.to(torch.bfloat16), self.qweight, self.scales, self.out_features).to(x.dtype)

    def _q8_vnni(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_amx.vnni_q8_gemm(x.to(torch.bfloat16), self.qweight, self.colsum, self.scales,
                                    self.out_features).to(x.dtype)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = ops.quantize_per_token(x, torch.int8)
        return ops.int8_scaled_mm(xq, xs, self.qweight, self.scales, x.dtype)

    def _q8q8(self, x: torch.Tensor) -> torch.Tensor:
        """Our AVX2 kernels (`kernels/cpu_lowbit_q8.c`), one call: the same per-token quantization, int32
        sums and scaling as `_int_mm`'s path, bit for bit."""
        return cpu_lowbit.q8_linear(x, self.qweight, self.scales).to(x.dtype)

    def _i8w(self, x: torch.Tensor, panels: bool = False) -> torch.Tensor:
        """Weight-only int8 on our AVX2 kernels: fp32 activations and math, the row scales after the sum."""
        return (cpu_lowbit.i8w_gemm(x, self.qweight, panels) * self.scales).to(x.dtype)

    def _i8w_panels(self, x: torch.Tensor) -> torch.Tensor:
        return self._i8w(x, panels=True)

    def _int8pack_bf16(self, x: torch.Tensor) -> torch.Tensor:
        return self._int8pack(torch.bfloat16, x)

    def _int8pack_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return self._int8pack(torch.float32, x)

    def _int8pack(self, dt: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        """int8 weights into torch's weight-only kernel; W8A8's activations go in as their integer
        values (exact in bf16), so only the summed product is rounded to `dt`, then scaled in fp32."""
        if self.act_quant:
            xq, xs = ops.quantize_per_token(x, torch.int8)
            y = torch._weight_int8pack_mm(xq.to(dt), self.qweight, getattr(self, f"ones_{_short(dt)}"))
            return (y.float() * xs * self.scales).to(x.dtype)
        y = torch._weight_int8pack_mm(x.to(dt).contiguous(), self.qweight, getattr(self, f"ones_{_short(dt)}"))
        return (y.float() * self.scales).to(x.dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if its data does not start on a 64-byte boundary. torch's AVX-512 int8 weight kernel
    (`_weight_int8pack_mm`, bf16 inputs) reads the weight with aligned loads and segfaults on a tensor
    viewed at an odd offset into a checkpoint's buffer (seen with torch 2.13: an int8 [64, 64] weight
    loaded from safetensors at an address = 8 mod 64). Fresh torch allocations are 64-byte aligned."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
