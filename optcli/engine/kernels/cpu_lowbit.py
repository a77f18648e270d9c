"""The AVX2 CPU kernels of `cpu_lowbit.c` and `cpu_lowbit_q8.c` (low-bit GEMMs), `cpu_lowbit_float.c` (bf16-weight
GEMMs, FP8 activation rounding), the KV cache's store and read (`cpu_lowbit_kv.c` and `cpu_lowbit_kv_decode.c`,
called by `cpu_kv8.py`) and the decoder layer's fp32 norm, RoPE and SiLU-mul (`cpu_lowbit_layer_ops.c`, called by
`cpu_layer_ops.py`), compiled once per machine and called through ctypes.

No maintained library gives an exact low-bit GEMM on an AVX2 CPU without VNNI, or an fp32 GEMM on
bf16-held weights (see the C file's header), so these are ours: compiled with the system's C compiler (`$CC`, else `cc`) on first use
into `$OPTCLI_CACHE/cpu-kernels/`, keyed by the source's hash, the flags and the compiler. Where there
is no compiler, no AVX2, or the build fails, `library()` is None and the quantized layers keep torch's
paths (every kernel here is one class in `engine/quant/cpu_kernels.py`, which refuses a layer without this build).

Plain C called on torch tensors' memory rather than a torch C++ extension: it builds in about a second
without torch's headers, and the OpenMP runtime it asks for is the one torch has already loaded.

`reference_q4_gemm` is the plain-PyTorch statement of what the q4 kernel computes (tests compare the
two); the q8 kernel's reference is `ops.int8_scaled_mm`, which it matches exactly; the bitsandbytes
4-bit (NF4/FP4) kernels are float GEMMs, compared with bitsandbytes' own dequantization; the bf16
ones with a float64 product of the widened weights; the FP8 rounding with torch's own cast.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from optcli.engine.kernels.cpu_build import I64, CLibrary, P

SOURCE = Path(__file__).with_suffix(".c")  # the integer kernels; the float ones and the shared header beside it
MAX_BLOCK = 256  # activation block of the q4 kernel: 8 chunks of 32 at most add up in int16 exactly

_VOID = [
    ("lowbit_quant_blocks", [P, I64, I64, I64, P, P, P]),
    ("lowbit_q4_gemm", [P, P, P, I64, I64, I64, P, P, P, I64, P]),
    ("lowbit_q8_gemm", [P, P, I64, I64, P, P, I64, P]),
    ("lowbit_nf4_gemm", [P, I64, I64, P, P, P, I64, I64, P]),
    ("lowbit_nf4_dequant", [P, P, P, I64, I64, I64, P]),
    ("lowbit_fp8_round_rows", [P, I64, I64, P, P]),
    ("lowbit_bf16_gemm", [P, I64, I64, P, I64, P]),
    ("lowbit_bf16_gemm_panels", [P, I64, I64, P, I64, P]),
    ("lowbit_q4_linear", [P, I64, I64, I64, P, P, P, I64, P]),
    ("lowbit_fp8_gemm", [P, I64, I64, P, I64, ctypes.c_float, ctypes.c_int, P]),
    ("lowbit_fp8_widen", [P, I64, ctypes.c_float, P]),
    ("lowbit_i8w_gemm", [P, I64, I64, P, I64, ctypes.c_int, P]),
    ("lowbit_quant_rows_int8", [P, I64, I64, P, P]),
    ("lowbit_q8_linear", [P, I64, I64, P, P, I64, P]),
    ("lowbit_rms_norm", [P, P, I64, I64, P, ctypes.c_float, P, P]),
    ("lowbit_rope", [P, I64, I64, P, I64, I64, I64, I64, P, P]),
    ("lowbit_silu_mul", [P, I64, I64, P]),
]
LIBRARY = CLibrary(
    name="lowbit",
    sources=(SOURCE, *(SOURCE.with_name(name) for name in ("cpu_lowbit_q8.c", "cpu_lowbit_float.c", "cpu_lowbit_kv.c",
                                                              "cpu_lowbit_kv_decode.c", "cpu_lowbit_layer_ops.c"))),
    header=SOURCE.with_suffix(".h"),
    flags=("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"),
    functions={**{name: (args, None) for name, args in _VOID}, "lowbit_read_probe": ([P, I64], I64),
               "lowbit_kv_gather": ([P, I64, I64, P, I64, ctypes.c_int, ctypes.c_int, P, P, P, I64, I64, I64], I64),
               "lowbit_kv_store": ([P, ctypes.c_int, I64, I64, P, P, I64, ctypes.c_int, P], I64),
               "lowbit_kv_wide": ([ctypes.c_int], None),
               "lowbit_kv_decode": ([P, I64, I64, I64, I64, P, P, I64, I64, ctypes.c_int, P, I64, P, P, I64,
                                     ctypes.c_float, P, P, ctypes.c_int, P], I64)},
)


def _cpu_has_avx2() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


@functools.cache
def source_key() -> str:
    """A short hash of the kernels' C source (names the opt-in tuned choices made with this build of them)."""
    return LIBRARY.source_key()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (then nothing offers them)."""
    if os.environ.get("OPTCLI_CPU_LOWBIT", "1") == "0" or not _cpu_has_avx2():
        return None
    return LIBRARY.build("the AVX2 low-bit CPU kernels")


def q4_block(k: int, group_size: int) -> int | None:
    """The activation block the q4 kernel uses for this layer (the weight group, capped at 256), or
    None where the shape does not fit it (K and the group must be multiples of 32)."""
    block = min(group_size, MAX_BLOCK)
    if k % 64 or group_size % 64 or k % group_size or group_size % block or block % 64:
        return None
    return block


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [N, K] (0..15) -> the kernel's layout uint8 [ceil(N/8), K/64, 8, 32]: per block of
    8 output columns and chunk of 64 inputs, each column's 32 bytes hold input i in the low nibble of
    byte i and input 32 + i in its high nibble. Padded columns hold 8 (a zero weight)."""
    n, k = q.shape
    q = F.pad(q, (0, 0, 0, -n % 8), value=8)
    chunks = q.reshape(-1, 8, k // 64, 2, 32)
    return (chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)).transpose(1, 2).to(torch.uint8).contiguous()


def unpack_q4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_q4`: uint8 [n, K] nibbles."""
    blocks, chunks = packed.shape[:2]
    cols = packed.transpose(1, 2)  # [N/8, 8, K/64, 32]
    return torch.stack([cols & 0xF, cols >> 4], 3).reshape(blocks * 8, chunks * 64)[:n]


def pack_columns(t: torch.Tensor) -> torch.Tensor:
    """Per-column fp32 [N, G] scales or zeros -> the kernel's [ceil(N/8), G, 8]: each block of 8 output
    columns with its own G x 8 values, next to each other (zero-padded columns past N)."""
    n, g = t.shape
    return F.pad(t.float(), (0, 0, 0, -n % 8)).reshape(-1, 8, g).transpose(1, 2).contiguous()


def unpack_columns(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_columns`: fp32 [n, G]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def q4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            block: int, n: int) -> torch.Tensor:
    """fp32 [M, K] @ W^T -> fp32 [M, n], W = (u - 8) * scales (+ zeros) per block of `block` inputs
    (`pack_q4` and `pack_columns` layouts); activations rounded to int8 per row and block."""
    m, k = x.shape
    n_padded = scales.shape[0] * 8
    if x.dtype != torch.float32 or not x.is_contiguous():  # guarded: even a no-op conversion costs ~1 us a call
        x = x.float().contiguous()
    out = torch.empty((m, n_padded), dtype=torch.float32)
    library().lowbit_q4_linear(_ptr(x), m, k, block, _ptr(packed), _ptr(scales), _ptr(zeros), n_padded, _ptr(out))
    return out if n == n_padded else out[:, :n]


def q8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T in exact int32, then * xs [M, 1] * ws [N] -> fp32 [M, N] (K % 16 == 0)."""
    lib = library()
    m, k = xq.shape
    n = wq.shape[0]
    xq, xs, wq, ws = xq.contiguous(), xs.float().contiguous(), wq.contiguous(), ws.float().contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    lib.lowbit_q8_gemm(_ptr(xq), _ptr(xs), m, k, _ptr(wq), _ptr(ws), n, _ptr(out))
    return out


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization, bit for bit `ops.quantize_per_token(x, torch.int8)` (int8 [M, K],
    fp32 scales [M, 1]), in one vectorized pass."""
    return _per_row(library().lowbit_quant_rows_int8, x, torch.int8)


def _per_row(kernel, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a per-token rounding kernel (x, M, K, values, scales): (values [M, K] of `dtype`, fp32 scales [M, 1])."""
    m, k = x.shape
    x = x.float().contiguous()
    values = torch.empty((m, k), dtype=dtype)
    scales = torch.empty((m, 1), dtype=torch.float32)
    kernel(_ptr(x), m, k, _ptr(values), _ptr(scales))
    return values, scales


def q8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """W8A8 in one foreign call: `quantize_rows_int8(x)`, then `q8_gemm` (the same result bit for bit)."""
    m, k = x.shape
    x, wq, ws = x.float().contiguous(), wq.contiguous(), ws.float().contiguous()
    out = torch.empty((m, wq.shape[0]), dtype=torch.float32)
    library().lowbit_q8_linear(_ptr(x), m, k, _ptr(wq), _ptr(ws), wq.shape[0], _ptr(out))
    return out


def bf16_gemm(x: torch.Tensor, w: torch.Tensor, panels: bool = False) -> torch.Tensor:
    """fp32 [M, K] @ bf16 [N, K]^T -> fp32 [M, N]: the weight widened exactly, fp32 accumulation.
    `panels`: the SGEMM-style kernel (many rows) rather than the dot-product one (few rows)."""
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    w = w.contiguous()
    out = torch.empty((m, w.shape[0]), dtype=torch.float32)
    kernel = library().lowbit_bf16_gemm_panels if panels else library().lowbit_bf16_gemm
    kernel(_ptr(x), m, k, _ptr(w), w.shape[0], _ptr(out))
    return out


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, panels: bool = False) -> torch.Tensor:
    """fp32 [M, K] @ W^T -> fp32 [M, N] for W float8_e4m3fn [N, K], held as its bytes and widened
    exactly in registers (fp32 accumulation; no copy of the weight in any wider type). `panels`: the
    SGEMM-style kernel (many rows) rather than the dot-product one (few rows)."""
    m, k = x.shape
    x, w = x.float().contiguous(), w.contiguous().view(torch.uint8)
    out = torch.empty((m, w.shape[0]), dtype=torch.float32)
    library().lowbit_fp8_gemm(_ptr(x), m, k, _ptr(w), w.shape[0], 256.0, int(panels), _ptr(out))
    return out


def i8w_gemm(x: torch.Tensor, w: torch.Tensor, panels: bool = False) -> torch.Tensor:
    """fp32 [M, K] @ int8 [N, K]^T -> fp32 [M, N] (weight-only int8: each weight widened exactly, fp32
    math; the caller applies the per-row scales). `panels` as in `fp8_gemm`."""
    m, k = x.shape
    x, w = x.float().contiguous(), w.contiguous()
    out = torch.empty((m, w.shape[0]), dtype=torch.float32)
    library().lowbit_i8w_gemm(_ptr(x), m, k, _ptr(w), w.shape[0], int(panels), _ptr(out))
    return out


def fp8_widen(w: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] -> its exact fp32 values (vectorized; torch's cast is scalar code)."""
    w = w.contiguous().view(torch.uint8)
    out = torch.empty(w.shape, dtype=torch.float32)
    library().lowbit_fp8_widen(_ptr(w), w.numel(), 256.0, _ptr(out))
    return out


def fp8_round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 (E4M3) rounding: (the fp8 values as fp32 [M, K], fp32 scales [M, 1]), bit for bit
    `ops.quantize_per_token(x, torch.float8_e4m3fn)` widened back to fp32, without torch's scalar fp8 casts."""
    return _per_row(library().lowbit_fp8_round_rows, x, torch.float32)


def nf4_ok(k: int, blocksize: int) -> bool:
    """Whether the bitsandbytes 4-bit kernels take this layer: blocks within rows, 16 values at a time."""
    return k % blocksize == 0 and blocksize % 16 == 0


def nf4_gemm(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             n: int) -> torch.Tensor:
    """fp32 [M, K] @ W^T -> fp32 [M, n] for W in bitsandbytes' 4-bit layout (NF4 or FP4 code book)."""
    m, k = x.shape
    x = x.float().contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    library().lowbit_nf4_gemm(_ptr(x), m, k, _ptr(packed), _ptr(absmax), _ptr(code), blocksize, n, _ptr(out))
    return out


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
                   k: int) -> torch.Tensor:
    """The bitsandbytes 4-bit weight as fp32 [n, k] (what `bitsandbytes.functional.dequantize_4bit` gives)."""
    packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    w = torch.empty((n, k), dtype=torch.float32)
    library().lowbit_nf4_dequant(_ptr(packed), _ptr(absmax), _ptr(code), blocksize, n, k, _ptr(w))
    return w


def read_seconds(buf: torch.Tensor) -> float:
    """Seconds one pass of `lowbit_read_probe` takes to read every byte of `buf` (uint8, numel % 128 == 0)
    with the current OpenMP thread count."""
    import time

    start = time.perf_counter()
    library().lowbit_read_probe(_ptr(buf), buf.numel())
    return time.perf_counter() - start


def reference_q4_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      block: int) -> torch.Tensor:
    """What `q4_gemm` computes (scales/zeros here [N, K/block]), in plain PyTorch: the same per-block int8 rounding of x, exact sums."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    sa = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    qa = (xb * (1 / sa)).round().clamp(-127, 127)  # [M, nb, B]
    w = q.float().reshape(q.shape[0], k // block, block) - 8  # [N, nb, B]
    dots = torch.einsum("mbk,nbk->mnb", qa.double(), w.double())  # exact integers
    y = (dots * (sa.squeeze(-1)[:, None, :] * scales[None]).double()).sum(-1)
    if zeros is not None:
        y = y + (sa.squeeze(-1) * qa.sum(-1)).double() @ zeros.double().t()
    return y.float()
