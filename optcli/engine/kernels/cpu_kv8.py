"""An 8-bit KV cache's CPU store and read by our AVX2 kernels (`cpu_lowbit_kv.c`, `cpu_lowbit_kv_decode.c`, part of
the library `cpu_lowbit` builds), each code for code what torch's ops give:

- `gather_widen`: a group's blocks gathered and widened to bf16 / fp32 in one pass (`index_select` then `.to`).
  torch widens float8_e4m3fn with scalar code (~4.5x its int8 widening), which made an FP8 cache's CPU decode
  0.4x a bf16 cache's.
- `decode_attention`: decode attention (one query a sequence) read straight from the 8-bit blocks, in fp32, with
  no widened copy of the context (which `gather_widen` writes and SDPA reads back: four times the bytes the
  8-bit cache saves). It reads a bf16 or fp32 cache too, in place of a block gather, a mask and torch's SDPA.
- `store`: this step's K or V rows quantized into their slots (`kv_rounding.quantize`, then `index_copy_`) in
  one call instead of ~10 torch ops.

Each returns None / False where its kernel does not apply (no AVX2 build here, a dtype it does not handle); the
caller then runs torch's ops, which compute the same bytes.
"""

from __future__ import annotations

import torch

from optcli.engine.kernels import cpu_lowbit

KINDS = {torch.float8_e4m3fn: 1, torch.int8: 2}  # the C file's KV_FP8 / KV_INT8
DENSE_KINDS = {torch.bfloat16: 3, torch.float32: 4}  # KV_BF16 / KV_F32: read by decode_attention only
OUT_FP32 = {torch.bfloat16: 0, torch.float32: 1}


def available(cache_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    return cache_dtype in KINDS and out_dtype in OUT_FP32 and cpu_lowbit.library() is not None


def _centre_fits(centre: tuple[torch.Tensor, torch.Tensor] | None, kv: int, dim: int, positions: int) -> bool:
    """Whether a centred K's (cos|sin rows, coef) is in the form the C kernels read: fp32, contiguous, rows [>=
    positions, 2D], coef [2, KV, D]; True for no centre."""
    if centre is None:
        return True
    rows, coef = centre
    return (rows.dtype == torch.float32 and coef.dtype == torch.float32 and rows.is_contiguous()
            and coef.is_contiguous() and rows.shape[1] == 2 * dim and coef.shape == (2, kv, dim)
            and rows.shape[0] >= positions)


def gather_widen(cache: torch.Tensor, blocks: torch.Tensor, block_size: int, out_dtype: torch.dtype,
                 centre: tuple[torch.Tensor, torch.Tensor] | None = None, per_seq: int = 1) -> torch.Tensor | None:
    """cache [slots, KV, D] (8-bit, contiguous, on CPU), blocks [n] int64 block indices -> [n * block_size, KV, D]
    in out_dtype; None where the kernel does not apply. `centre` (a centred K, attention/kv_centre.py): (cos|sin
    rows [>= per_seq * block_size, 2D] fp32, coef [2, KV, D] fp32), the blocks being [sequences, per_seq] in
    order: code + (a * cos + b * sin) at each key's position, rounded to out_dtype."""
    if cache.device.type != "cpu" or not available(cache.dtype, out_dtype) or not cache.is_contiguous():
        return None
    kv, dim = cache.shape[1], cache.shape[2]
    if not _centre_fits(centre, kv, dim, per_seq * block_size) or (centre is not None and blocks.numel() % per_seq):
        return None
    rows, coef = centre if centre is not None else (None, None)
    if blocks.dtype != torch.int64 or not blocks.is_contiguous():
        blocks = blocks.to(torch.int64).contiguous()
    block_elems = block_size * cache[0].numel()
    out = torch.empty(blocks.numel() * block_size, *cache.shape[1:], dtype=out_dtype)
    status = cpu_lowbit.library().lowbit_kv_gather(cache.data_ptr(), block_elems, cache.shape[0] // block_size,
                                                   blocks.data_ptr(), blocks.numel(), KINDS[cache.dtype],
                                                   OUT_FP32[out_dtype], out.data_ptr(),
                                                   rows.data_ptr() if rows is not None else None,
                                                   coef.data_ptr() if coef is not None else None, per_seq, kv, dim)
    if status != 0:  # checked in C before anything is written
        raise IndexError("a block index outside the cache")
    return out


def store(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor) -> bool:
    """Quantize x [T, KV, D] (bf16 or fp32) with scale [KV, D] into the 8-bit cache rows `slots`, code for code
    `kv_rounding.quantize` (one call instead of its ~10 torch ops per tensor: at one decode token a layer, those
    cost an 8-bit cache 20-30 us a layer against bf16's 4). False, writing nothing, where the kernel does not
    apply (the caller then runs the torch statement)."""
    if (x.device.type != "cpu" or x.dtype not in OUT_FP32 or cache.dtype not in KINDS or not cache.is_contiguous()
            or cpu_lowbit.library() is None or scale.shape != cache.shape[1:] or scale.dtype != torch.float32):
        return False
    x, scale = x.contiguous(), scale.contiguous()
    if slots.dtype != torch.int64 or not slots.is_contiguous():
        slots = slots.to(torch.int64).contiguous()
    status = cpu_lowbit.library().lowbit_kv_store(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0],
                                                  scale.numel(), scale.data_ptr(), slots.data_ptr(), cache.shape[0],
                                                  KINDS[cache.dtype], cache.data_ptr())
    if status != 0:  # checked in C before anything is written
        raise IndexError("a slot outside the cache")
    return True


def _int64(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous int64, converted only where it is not (at batch 1 even a no-op conversion costs a microsecond
    a call, and there are three a layer)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def decode_attention(queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     block_size: int, query_pos: torch.Tensor, ctx_len: torch.Tensor, window: int | None, scale: float,
                     centre: tuple[torch.Tensor, torch.Tensor] | None = None,
                     round_bf16: bool = False) -> torch.Tensor | None:
    """queries [B, H, D] (in code units: K's scale folded in), 8-bit, bf16 or fp32 caches [slots, KV, D] (a bf16 or
    fp32 cache holds values: its code unit is 1), block_table [B, N],
    query_pos / ctx_len [B] -> [B, H, D] fp32 in V's code units: softmax(scale * q.k) over the keys at positions
    max(0, pos + 1 - window) .. min(pos, ctx_len - 1), times V. `centre` as gather_widen's (rows covering the
    keys' positions). `round_bf16`: the centred keys and the softmax weights rounded to bf16 where SDPA over a
    widened bf16 copy would round them (the sums stay fp32), so the result differs from the gather path's only by
    the order of its sums. None where the kernel does not apply (the caller then gathers and runs SDPA)."""
    kind = KINDS.get(k_cache.dtype, DENSE_KINDS.get(k_cache.dtype))
    if (queries.device.type != "cpu" or kind is None or v_cache.dtype != k_cache.dtype
            or cpu_lowbit.library() is None or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    batch, heads, dim = queries.shape
    kv = k_cache.shape[1]
    n_blocks = block_table.shape[1]
    if not _centre_fits(centre, kv, dim, n_blocks * block_size):
        return None
    rows, coef = centre if centre is not None else (None, None)
    q = queries if queries.dtype == torch.float32 and queries.is_contiguous() else queries.float().contiguous()
    table, pos, lens = _int64(block_table), _int64(query_pos), _int64(ctx_len)
    out = torch.empty(batch, heads, dim, dtype=torch.float32)
    status = cpu_lowbit.library().lowbit_kv_decode(
        q.data_ptr(), batch, heads, kv, dim, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0] // block_size,
        block_size, kind, table.data_ptr(), n_blocks, pos.data_ptr(), lens.data_ptr(), window or 0,
        scale, rows.data_ptr() if rows is not None else None, coef.data_ptr() if coef is not None else None,
        int(round_bf16), out.data_ptr())
    if status == -2:  # a shape the kernel does not take: checked before anything is read
        return None
    if status == -1:
        raise IndexError("a block index outside the cache")
    if status != 0:
        raise MemoryError("decode attention: no memory for the scores")
    return out
