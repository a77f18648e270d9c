"""The CPU read of an 8-bit KV cache (`kernels/cpu_kv_read.py`, the AVX2 kernel in `cpu_lowbit_kv.c`): gathering
cache blocks and widening them to bf16 or fp32 in one pass is bit for bit torch's `index_select` then cast, for
every one of the 256 codes of each format (E4M3's subnormals, signed zeros and NaNs included), on the vector
body and the scalar tail alike; and without the build it declines (the attention keeps torch's ops)."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_kv_read, cpu_lowbit

FORMATS = [torch.float8_e4m3fn, torch.int8]
OUTS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}  # compared as bit patterns (NaN == NaN)

needs_kernel = pytest.mark.skipif(cpu_lowbit.library() is None, reason="the AVX2 kernels are not built here")


def torch_read(cache: torch.Tensor, blocks: torch.Tensor, block_size: int, out: torch.dtype) -> torch.Tensor:
    rows = cache.view(torch.uint8).view(-1, block_size, *cache.shape[1:]).index_select(0, blocks)
    return rows.view(cache.dtype).to(out).reshape(-1, *cache.shape[1:])


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out", list(OUTS))
# blocks of 8 codes (a scalar tail only), 16, 24 (int8: a vector and a tail), 32 (fp8: one vector), 40 (and a tail), 64
@pytest.mark.parametrize(("block_size", "dim"), [(1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (4, 16)])
def test_every_code_widens_bit_for_bit_as_torch(fmt, out, block_size: int, dim: int) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    per_block = block_size * dim
    slots = -(-256 // per_block) * block_size
    cache = torch.cat([codes, codes[: slots * dim - 256]]).view(fmt).view(slots, 1, dim)
    blocks = torch.arange(slots // block_size).flip(0)
    blocks = torch.cat([blocks, blocks[:3]])  # a block read twice (a shared prefix) and out of order
    got = cpu_kv_read.gather_widen(cache, blocks, block_size, out)
    want = torch_read(cache, blocks, block_size, out)
    assert got.shape == want.shape and got.dtype == out
    assert torch.equal(got.view(OUTS[out]), want.view(OUTS[out]))


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cache_read_as_attention_does(fmt) -> None:
    """A cache shaped as the engine's ([slots, KV heads, head dim], blocks of 16) read through a block table."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 256, (64 * 16, 4, 64), dtype=torch.uint8, generator=gen).view(fmt)
    table = torch.randint(0, 64, (3, 9), generator=gen)
    for out in OUTS:
        got = cpu_kv_read.gather_widen(cache, table.view(-1), 16, out)
        assert torch.equal(got.view(OUTS[out]), torch_read(cache, table.view(-1), 16, out).view(OUTS[out]))


def test_declines_without_the_build_or_for_a_dtype_it_does_not_write(monkeypatch) -> None:
    cache = torch.zeros(32, 2, 8, dtype=torch.int8)
    blocks = torch.tensor([1, 0])
    assert cpu_kv_read.gather_widen(cache, blocks, 16, torch.float16) is None  # fp16 out: torch's cast
    assert cpu_kv_read.gather_widen(cache.float(), blocks, 16, torch.bfloat16) is None  # not an 8-bit cache
    monkeypatch.setattr(cpu_lowbit, "library", lambda: None)
    assert cpu_kv_read.gather_widen(cache, blocks, 16, torch.bfloat16) is None


@needs_kernel
def test_a_block_outside_the_cache_is_refused() -> None:
    cache = torch.zeros(32, 2, 8, dtype=torch.int8)
    for bad in ([0, 2], [1, -1]):  # the cache holds blocks 0 and 1
        with pytest.raises(IndexError):
            cpu_kv_read.gather_widen(cache, torch.tensor(bad), 16, torch.bfloat16)
