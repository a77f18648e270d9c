"""An 8-bit KV cache's blocks gathered and widened on CPU in one pass (`cpu_lowbit_kv.c`, part of the AVX2
library `cpu_lowbit` builds): what `index_select` then `.to(dtype)` give, bit for bit, in one read of the 8-bit
blocks. torch widens float8_e4m3fn with scalar code (~4.5x its int8 widening), which made an FP8 cache's CPU
decode slower than a bf16 cache's.

`gather_widen` returns None where the kernel does not apply (no AVX2 build here, a dtype it does not write);
the caller then keeps torch's ops, which compute the same values.
"""

from __future__ import annotations

import torch

from optcli.engine.kernels import cpu_lowbit

KINDS = {torch.float8_e4m3fn: 1, torch.int8: 2}  # the C file's KV_FP8 / KV_INT8
OUT_FP32 = {torch.bfloat16: 0, torch.float32: 1}


def available(cache_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    return cache_dtype in KINDS and out_dtype in OUT_FP32 and cpu_lowbit.library() is not None


def gather_widen(cache: torch.Tensor, blocks: torch.Tensor, block_size: int,
                 out_dtype: torch.dtype) -> torch.Tensor | None:
    """cache [slots, ...] (8-bit, contiguous, on CPU), blocks [n] int64 block indices -> [n * block_size, ...]
    in out_dtype; None where the kernel does not apply."""
    if cache.device.type != "cpu" or not available(cache.dtype, out_dtype) or not cache.is_contiguous():
        return None
    if blocks.dtype != torch.int64 or not blocks.is_contiguous():
        blocks = blocks.to(torch.int64).contiguous()
    block_elems = block_size * cache[0].numel()
    out = torch.empty(blocks.numel() * block_size, *cache.shape[1:], dtype=out_dtype)
    status = cpu_lowbit.library().lowbit_kv_gather(cache.data_ptr(), block_elems, cache.shape[0] // block_size,
                                                   blocks.data_ptr(), blocks.numel(), KINDS[cache.dtype],
                                                   OUT_FP32[out_dtype], out.data_ptr())
    if status != 0:  # checked in C before anything is written
        raise IndexError("a block index outside the cache")
    return out
