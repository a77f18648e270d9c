"""The AMX kernels of `cpu_amx.c` (int8 tiles for W4A16 and W8A8 layers on Sapphire Rapids and later),
compiled once per machine and called through ctypes, like `cpu_lowbit`.

`library()` is None unless the CPU has AMX-INT8, the kernel grants the process AMX tile state, and
the C compiler knows the AMX intrinsics; then the quantized layers simply do not offer these paths.
`vnni_library()` is the same build on a CPU with AVX-512 VNNI and BF16, AMX or not (Zen 4/5): only its
VNNI kernels (`vnni_q4_gemm`, `vnni_q8_gemm`: W4A16 and W8A8 at every batch size in the AMX layouts) run
there.
`reference_q4_gemm` / `reference_q8_gemm` are the plain-PyTorch statements of what they compute.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from optcli.engine.kernels import quant_reference as ops
from optcli.engine.kernels.cpu_build import I64, CLibrary, P
from optcli.engine.kernels.cpu_flags import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")  # the int8-tile kernels; FP8's, VNNI's and the shared header beside it
GEMV_ROWS = 4  # rows up to which the 4-bit product runs as VNNI dot products instead of on the tiles

_VOID = [
    ("amx_quant_groups", [P, I64, I64, I64, P, P, P]),
    ("amx_q4_gemm", [P, P, P, I64, I64, I64, P, P, P, I64, P, P]),
    ("amx_q4_gemv", [P, P, P, I64, I64, I64, P, P, P, I64, P]),
    ("amx_q4_linear", [P, I64, I64, I64, P, P, P, I64, I64, P]),
    ("amx_q8_linear", [P, I64, I64, P, P, I64, P]),
    ("amx_q8_gemm", [P, P, P, I64, I64, P, P, I64, P, P]),
    ("amx_fp8_gemm", [P, I64, I64, P, I64, P, P, P]),
    ("amx_fp8_round_rows", [P, I64, I64, P, P]),
    ("vnni_q4_linear", [P, I64, I64, I64, P, P, P, I64, P]),
    ("vnni_q8_linear", [P, I64, I64, P, P, P, I64, P]),
    ("vnni_fp8_gemm", [P, I64, I64, P, I64, P, P, P]),
    ("vnni_bf16_gemm", [P, I64, I64, P, I64, P]),
]
LIBRARY = CLibrary(
    name="amx",
    sources=(SOURCE, SOURCE.with_name("cpu_amx_fp8.c"), SOURCE.with_name("cpu_vnni.c")),
    header=SOURCE.with_suffix(".h"),
    flags=("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mamx-tile",
           "-mamx-int8", "-mamx-bf16", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"),
    functions={**{name: (args, None) for name, args in _VOID}, "amx_init": ([], ctypes.c_int)},
)

VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")


def _cpu_has_amx() -> bool:
    return {"amx_int8", "amx_bf16", "amx_tile", *VNNI_FLAGS} <= cpu_flags()


def _cpu_has_vnni512() -> bool:
    return set(VNNI_FLAGS) <= cpu_flags()


@functools.cache
def source_key() -> str:
    return LIBRARY.source_key()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where AMX is absent, not granted, or the build fails."""
    if os.environ.get("OPTCLI_CPU_AMX", "1") == "0" or not _cpu_has_amx():
        return None
    lib = _build()
    if lib is None or not lib.amx_init():
        log.info("the kernel did not grant AMX tile state: the AMX CPU kernels are not used")
        return None
    return lib


@functools.cache
def vnni_library() -> ctypes.CDLL | None:
    """The same build where the CPU has AVX-512 VNNI and BF16 (AMX or not): its VNNI kernels only
    (`vnni_q4_gemm`); None where those flags are absent or the build fails."""
    if os.environ.get("OPTCLI_CPU_VNNI", "1") == "0" or not _cpu_has_vnni512():
        return None
    return _build()


@functools.cache
def _build() -> ctypes.CDLL | None:
    return LIBRARY.build("the AMX CPU kernels")


def q4_ok(n: int, k: int, group_size: int) -> bool:
    """Shapes the 4-bit kernel takes: 32-column panels, 64-input chunks, groups of whole chunks."""
    return n % 32 == 0 and k % 64 == 0 and group_size % 64 == 0 and k % group_size == 0


def vnni_q4_ok(n: int, k: int, group_size: int) -> bool:
    """Shapes the VNNI-only 4-bit kernel takes: blocks of 16 columns, 64-input chunks (pack_q4), groups of
    whole 4-input rows in fours (its one-row form sums four rows a step): 16, 32, 64, ... inputs."""
    return n % 16 == 0 and k % 64 == 0 and group_size % 16 == 0 and k % group_size == 0


def _vnni_rows(q: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/64, 16, 64]: per block of 16 columns and chunk of 64 inputs, row r holds inputs
    4r..4r+3 of the 16 columns (byte 4n + i = W[n, 4r + i])."""
    n, k = q.shape
    return q.reshape(n // 16, 16, k // 64, 16, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, k // 64, 16, 64)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """Nibbles u [N, K] (0..15) -> uint8 [N/16, K/64, 16, 32]: low nibbles are bytes 0..31 of a row, high 32..63."""
    rows = _vnni_rows(q.to(torch.uint8))
    return (rows[..., :32] | (rows[..., 32:] << 4)).contiguous()


def pack_q8(w: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int8 [N/16, K/64, 16, 64] VNNI rows."""
    return _vnni_rows(w.to(torch.int8)).contiguous()


def vnni_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-group scales (or zero points) [N, K/G] -> fp32 [N/16, K/G, 16], the VNNI kernels' block-major order:
    each block of 16 columns reads its groups' values from one contiguous run (cpu_vnni.c)."""
    n, groups = scales.shape
    return scales.float().reshape(n // 16, 16, groups).transpose(1, 2).contiguous()


def quantize_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 x [M, K] -> (int8 [M, K], scales fp32 [M, K/G], int32 sums [M, K/G]): `ops.quantize_per_token`
    on each group of G inputs."""
    m, k = x.shape
    qa = torch.empty(m, k, dtype=torch.int8)
    sa = torch.empty(m, k // group_size, dtype=torch.float32)
    asum = torch.empty(m, k // group_size, dtype=torch.int32)
    (library() or vnni_library()).amx_quant_groups(x.data_ptr(), m, k, group_size, qa.data_ptr(), sa.data_ptr(),
                                                   asum.data_ptr())
    return qa, sa, asum


def q4_gemm(x: torch.Tensor, packed: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None,
            group_size: int, n: int) -> torch.Tensor:
    """bf16 x [M, K] @ W^T -> bf16 [M, N]; W from `pack_q4`, scales_t / zeros_t fp32 [K/G, N]. One foreign
    call: the activations' int8 rounding per (row, group) in C scratch, then VNNI dot products up to
    GEMV_ROWS rows (the tiles' fixed cost per step is wasted on a row or two), the tiles beyond."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        library().amx_q4_linear(x.data_ptr(), m, k, group_size, packed.data_ptr(), scales_t.data_ptr(),
                                None if zeros_t is None else zeros_t.data_ptr(), n, GEMV_ROWS, out.data_ptr())
    return out


def vnni_q4_gemm(x: torch.Tensor, packed: torch.Tensor, scales_b: torch.Tensor, zeros_b: torch.Tensor | None,
                 group_size: int, n: int) -> torch.Tensor:
    """`q4_gemm` on AVX-512 VNNI dot products at every M (no tiles): the same packed weights and result, the
    scales and zero points block-major (`vnni_block_scales`)."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        vnni_library().vnni_q4_linear(x.data_ptr(), m, k, group_size, packed.data_ptr(), scales_b.data_ptr(),
                                      None if zeros_b is None else zeros_b.data_ptr(), n, out.data_ptr())
    return out


def vnni_q8_gemm(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, scales: torch.Tensor,
                 n: int) -> torch.Tensor:
    """`q8_gemm` on AVX-512 VNNI dot products (no tiles); colsum: int32 [N], each column's weight sum."""
    assert colsum.dtype == torch.int32
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        vnni_library().vnni_q8_linear(x.data_ptr(), m, k, packed.data_ptr(), colsum.data_ptr(), scales.data_ptr(),
                                      n, out.data_ptr())
    return out


def q8_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """W8A8: bf16 x [M, K] quantized per token, @ int8 W^T (from `pack_q8`) * per-channel scales -> bf16 [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        library().amx_q8_linear(x.data_ptr(), m, k, packed.data_ptr(), scales.data_ptr(), n, out.data_ptr())
    return out


def reference_q4_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """What q4_gemm computes, in fp32: activations rounded per (row, group), exact integer group sums, scaled."""
    m, k = x.shape
    xg = x.float().reshape(m * (k // group_size), group_size)
    qa, sa = ops.quantize_per_token(xg, torch.int8)
    qa, sa = qa.reshape(m, k // group_size, group_size).float(), sa.reshape(m, k // group_size)
    wq = (q.float() - 8).reshape(q.shape[0], k // group_size, group_size)
    dots = torch.einsum("mgk,ngk->mgn", qa, wq)  # exact: integers below 2^24
    y = (dots * scales.t()[None]).mul(sa[..., None]).sum(1)
    if zeros is not None:
        y = y + (qa.sum(-1) * sa) @ zeros.t()
    return y


def unpack_q8(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q8`'s inverse: int8 [N/16, K/64, 16, 64] -> [N, K]."""
    nb, kc = packed.shape[:2]
    return packed.reshape(nb, kc, 16, 16, 4).permute(0, 3, 1, 2, 4).reshape(nb * 16, kc * 64)


def pack_fp8(w: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes [N, K] -> uint8 [N/16, K/32, 16, 32]: row r holds inputs 2r, 2r+1 of 16 columns."""
    n, k = w.shape
    q = w.view(torch.uint8)
    return q.reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 16, 32).contiguous()


def unpack_fp8(packed: torch.Tensor) -> torch.Tensor:
    """`pack_fp8`'s inverse, as float8_e4m3fn [N, K]."""
    nb, kc = packed.shape[:2]
    q = packed.reshape(nb, kc, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(nb * 16, kc * 32)
    return q.contiguous().view(torch.float8_e4m3fn)


def fp8_gemm(a: torch.Tensor, packed: torch.Tensor, post_n: torch.Tensor, post_m: torch.Tensor | None,
             n: int) -> torch.Tensor:
    """bf16 a [M, K] @ W^T (W from `pack_fp8`, widened exactly) * post_m [M] * post_n [N] -> bf16 [M, N]."""
    return _fp8_call(library, "amx_fp8_gemm", a, packed, post_n, post_m, n)


def vnni_bf16_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x [M, K] @ bf16 W [N, K]^T -> fp32 [M, N] on AVX-512 BF16 dot products (fp32 sums of the exact
    products), a weight row streamed at a time: the few-row kernel of a bf16 model's dense layers. K % 32 == 0."""
    x, w = x.to(torch.bfloat16).contiguous(), w.contiguous()
    m, k = x.shape
    out = torch.empty(m, w.shape[0], dtype=torch.float32)
    vnni_library().vnni_bf16_gemm(x.data_ptr(), m, k, w.data_ptr(), w.shape[0], out.data_ptr())
    return out


def vnni_fp8_gemm(a: torch.Tensor, packed: torch.Tensor, post_n: torch.Tensor, post_m: torch.Tensor | None,
                  n: int) -> torch.Tensor:
    """`fp8_gemm` on AVX-512 BF16 dot products (no tiles), the same layout and numbers: N % 16 suffices."""
    return _fp8_call(vnni_library, "vnni_fp8_gemm", a, packed, post_n, post_m, n)


def _fp8_call(lib, name: str, a: torch.Tensor, packed: torch.Tensor, post_n: torch.Tensor, post_m: torch.Tensor | None,
              n: int) -> torch.Tensor:
    """The one calling convention of the two FP8 kernels (tiles, dot products): bf16 in, bf16 out; the
    library (`lib()`, built on first use) is asked for `name` only when there are rows."""
    a = a.to(torch.bfloat16).contiguous()
    m, k = a.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        pm = None if post_m is None else post_m.float().contiguous()
        getattr(lib(), name)(a.data_ptr(), m, k, packed.data_ptr(), n, post_n.data_ptr(),
                             None if pm is None else pm.data_ptr(), out.data_ptr())
    return out


def fp8_round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 x [M, K] -> (its per-token FP8 rounding as bf16 [M, K], fp32 scales [M]): bit for bit
    `ops.quantize_per_token(x.float(), torch.float8_e4m3fn)`, the values widened back (exact in bf16)."""
    x = x.to(torch.bfloat16).contiguous()
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.bfloat16)
    scales = torch.empty(m, dtype=torch.float32)
    (library() or vnni_library()).amx_fp8_round_rows(x.data_ptr(), m, k, out.data_ptr(), scales.data_ptr())
    return out, scales


def q8_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of the int8 [N, K] matrix held as `pack_q8`'s layout, as [T, K] (no full unpack)."""
    nb, kc = packed.shape[:2]
    v = packed.view(nb, kc, 16, 16, 4)
    return v[ids // 16, :, :, ids % 16, :].reshape(ids.shape[0], kc * 64)
