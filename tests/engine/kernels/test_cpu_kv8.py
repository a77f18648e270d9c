"""The CPU store and read of an 8-bit KV cache (`kernels/cpu_kv8.py`, the AVX2 kernels in `cpu_lowbit_kv.c`):
gathering cache blocks and widening them to bf16 or fp32 in one pass is bit for bit torch's `index_select` then
cast, for every one of the 256 codes of each format (E4M3's subnormals, signed zeros and NaNs included), on the
vector body and the scalar tail alike; the store writes the codes `kv_rounding.quantize` gives for every bf16
bit pattern and every rounding tie; without the build both decline (the attention keeps torch's ops)."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_kv8, cpu_lowbit
from optcli.engine.kernels.kv_rounding import quantize

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
    got = cpu_kv8.gather_widen(cache, blocks, block_size, out)
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
        got = cpu_kv8.gather_widen(cache, table.view(-1), 16, out)
        assert torch.equal(got.view(OUTS[out]), torch_read(cache, table.view(-1), 16, out).view(OUTS[out]))


def test_declines_without_the_build_or_for_a_dtype_it_does_not_write(monkeypatch) -> None:
    cache = torch.zeros(32, 2, 8, dtype=torch.int8)
    blocks = torch.tensor([1, 0])
    assert cpu_kv8.gather_widen(cache, blocks, 16, torch.float16) is None  # fp16 out: torch's cast
    assert cpu_kv8.gather_widen(cache.float(), blocks, 16, torch.bfloat16) is None  # not an 8-bit cache
    monkeypatch.setattr(cpu_lowbit, "library", lambda: None)
    assert cpu_kv8.gather_widen(cache, blocks, 16, torch.bfloat16) is None


@needs_kernel
def test_a_block_outside_the_cache_is_refused() -> None:
    cache = torch.zeros(32, 2, 8, dtype=torch.int8)
    for bad in ([0, 2], [1, -1]):  # the cache holds blocks 0 and 1
        with pytest.raises(IndexError):
            cpu_kv8.gather_widen(cache, torch.tensor(bad), 16, torch.bfloat16)


def torch_store(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor) -> None:
    cache.view(torch.uint8).index_copy_(0, slots, quantize(x, scale, cache.dtype).view(torch.uint8))


def store_inputs(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x [T, 4, 16], scale [4, 16]) pairs: every bf16 bit pattern (infinities and NaNs included), fp32 values on
    and between the formats' rounding ties, at scales that saturate, reach E4M3's subnormals, or are 0 (unset)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(-1, 4, 16)
    grid = torch.arange(-480 * 64, 480 * 64 + 1, dtype=torch.float32) / 64  # steps of 1/64: every tie of both
    ties = grid[: grid.numel() // 64 * 64].view(-1, 4, 16)
    gen = torch.Generator().manual_seed(0)
    scales = [torch.ones(4, 16), torch.rand(4, 16, generator=gen) * 0.01, torch.rand(4, 16, generator=gen) * 4,
              torch.zeros(4, 16), torch.full((4, 16), 2.0**-12)]
    xs = [every, ties, torch.randn(300, 4, 16, generator=gen) * 3]
    return [(x.to(dtype) if x.dtype != dtype and not (dtype == torch.float32 and x is every) else x, s)
            for x in xs for s in scales]


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_dtype", list(OUTS))
def test_the_store_quantizes_code_for_code_as_the_torch_statement(fmt, x_dtype) -> None:
    for x, scale in store_inputs(x_dtype):
        x = x.to(x_dtype)
        slots = torch.randperm(x.shape[0] + 7)[: x.shape[0]]
        got = torch.zeros(x.shape[0] + 7, 4, 16, dtype=fmt)
        want = got.clone()
        assert cpu_kv8.store(x, got, slots, scale)
        torch_store(x, want, slots, scale)
        got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert not got[~torch.isin(torch.arange(got.shape[0]), slots)].any()  # only the slots are written
        same = got[slots] == want[slots]
        if fmt == torch.int8:  # NaN input: a float -> int cast of NaN is undefined (torch's and C's may differ)
            same |= x.float().isnan()
        assert same.all(), (x[~same][:5], got[slots][~same][:5], want[slots][~same][:5])


@needs_kernel
def test_the_store_declines_or_refuses() -> None:
    cache = torch.zeros(8, 2, 4, dtype=torch.int8)
    x, scale = torch.randn(2, 2, 4), torch.ones(2, 4)
    assert not cpu_kv8.store(x.half(), cache, torch.tensor([0, 1]), scale)  # fp16 input: torch's statement
    assert not cpu_kv8.store(x, cache, torch.tensor([0, 1]), torch.ones(2))  # a per-head scale
    with pytest.raises(IndexError):
        cpu_kv8.store(x, cache, torch.tensor([0, 8]), scale)
    assert not cache.any()  # nothing written
