"""Decode attention read straight from an 8-bit paged cache (`cpu_kv8.decode_attention`, `lowbit_kv_decode` in
cpu_lowbit_kv.c): the same softmax-weighted values as a float64 statement of it over the widened codes (centred K,
sliding windows, GQA groups, contexts that end mid-block and shorter than eight keys included), in both of its
forms (AVX-512, sixteen keys at a time, where the CPU has it; AVX2, eight at a time), and the calls it must
decline or refuse."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_kv8, cpu_lowbit

needs_kernel = pytest.mark.skipif(cpu_lowbit.library() is None, reason="the AVX2 kernels are not built here")


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def reference(q, k_cache, v_cache, table, block_size, pos, lens, window, scale, centre, round_bf16=False):
    """float64: the keys and values at each sequence's positions, widened (and re-centred), then softmax;
    `round_bf16`: the centred keys and the softmax's exponentials rounded to bf16, the sum of the unrounded ones."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    heads, kv = q.shape[1], k_cache.shape[1]
    for b in range(q.shape[0]):
        hi = min(int(pos[b]) + 1, int(lens[b]))
        lo = max(0, hi - window) if window else 0
        t = torch.arange(lo, hi)
        slots = table[b, t // block_size] * block_size + t % block_size
        k = k_cache[slots].double()
        if centre is not None:
            rows, coef = centre
            dim = k.shape[-1]
            k = k + coef[0].double() * rows[t, None, :dim].double() + coef[1].double() * rows[t, None, dim:].double()
            k = bf16(k) if round_bf16 else k
        v = v_cache[slots].double()
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)  # [n, H, D]
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        out[b] = torch.einsum("hn,nhd->hd", bf16(e) if round_bf16 else e, v) / e.sum(-1, keepdim=True)
    return out


@pytest.fixture(params=["avx512", "avx2"])
def form(request):
    """Run a test on each form of the kernel: the CPU's own (AVX-512 where it has it), then AVX2 forced."""
    lib = cpu_lowbit.library()
    if request.param == "avx2":
        lib.lowbit_kv_wide(0)
    elif not torch.backends.cpu.get_cpu_capability() == "AVX512":
        pytest.skip("no AVX-512 here: the AVX2 form is the one that runs")
    yield request.param
    lib.lowbit_kv_wide(-1)  # back to the CPU's flags


def codes(fmt, shape, gen):
    if fmt == torch.int8:
        return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    return (torch.randn(shape, generator=gen) * 40).clamp(-448, 448).to(fmt)


@needs_kernel
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8])
# G=4 x 64 and 8 x 64: the AVX-512 form's constant-shape bodies; 4 x 16 its generic one; 6 x 8 AVX2 only
@pytest.mark.parametrize(("heads", "kv", "dim"), [(8, 2, 64), (16, 2, 64), (4, 4, 16), (6, 1, 8)])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_a_float64_statement(form, fmt, heads, kv, dim, centred, window) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    block_size, n_blocks, slots_blocks = 4, 6, 20
    k_cache = codes(fmt, (slots_blocks * block_size, kv, dim), gen)
    v_cache = codes(fmt, (slots_blocks * block_size, kv, dim), gen)
    table = torch.stack([torch.randperm(slots_blocks, generator=gen)[:n_blocks] for _ in range(4)])
    lens = torch.tensor([1, 7, 13, 24])  # one key; under eight; mid-block (and past 16 keys); every block full
    pos = lens - 1
    q = torch.randn(4, heads, dim, generator=gen) * 0.05
    centre = None
    if centred:
        rows = torch.randn(n_blocks * block_size, 2 * dim, generator=gen)
        centre = (rows, torch.randn(2, kv, dim, generator=gen) * 3)
    got = cpu_kv8.decode_attention(q, k_cache, v_cache, table, block_size, pos, lens, window, 0.125, centre)
    want = reference(q, k_cache, v_cache, table, block_size, pos, lens, window, 0.125, centre)
    assert got is not None and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


@needs_kernel
def test_a_query_before_the_context_end_sees_only_earlier_keys(form) -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = codes(torch.int8, (32, 1, 16), gen), codes(torch.int8, (32, 1, 16), gen)
    table = torch.arange(8)[None]
    q = torch.randn(1, 2, 16, generator=gen)
    got = cpu_kv8.decode_attention(q, k_cache, v_cache, table, 4, torch.tensor([9]), torch.tensor([30]), None, 0.3)
    want = reference(q, k_cache, v_cache, table, 4, torch.tensor([9]), torch.tensor([30]), None, 0.3, None)
    assert torch.allclose(got.double(), want, rtol=2e-5, atol=1e-4)


@needs_kernel
def test_declines_what_it_does_not_take_and_refuses_a_block_outside_the_cache() -> None:
    k_cache = torch.zeros(16, 2, 8, dtype=torch.int8)
    table, lens = torch.tensor([[0, 1]]), torch.tensor([8])
    q = torch.zeros(1, 4, 8)
    # a bf16 cache, a head dim not a multiple of 8, query heads not a multiple of the KV heads
    assert cpu_kv8.decode_attention(q, k_cache.bfloat16(), k_cache.bfloat16(), table, 4, lens - 1, lens, None, 1.0) is None
    assert cpu_kv8.decode_attention(torch.zeros(1, 4, 4), k_cache[..., :4].contiguous(), k_cache[..., :4].contiguous(),
                                    table, 4, lens - 1, lens, None, 1.0) is None
    assert cpu_kv8.decode_attention(torch.zeros(1, 3, 8), k_cache, k_cache, table, 4, lens - 1, lens, None, 1.0) is None
    with pytest.raises(IndexError):
        cpu_kv8.decode_attention(q, k_cache, k_cache, torch.tensor([[0, 9]]), 4, lens - 1, lens, None, 1.0)


@needs_kernel
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8])
def test_rounds_centred_keys_and_weights_to_bf16_where_asked(form, fmt) -> None:
    """bf16 activations: the gather path's SDPA reads bf16 keys and multiplies bf16 weights; the kernel rounds the
    same two things (an exact code needs no rounding), so its result is that statement's up to fp32 sums."""
    gen = torch.Generator().manual_seed(7)
    kv, dim, block_size = 2, 64, 4
    k_cache, v_cache = codes(fmt, (40, kv, dim), gen), codes(fmt, (40, kv, dim), gen)
    table = torch.randperm(10, generator=gen)[None]
    lens = torch.tensor([37])
    q = torch.randn(1, 8, dim, generator=gen) * 0.05
    centre = (torch.randn(40, 2 * dim, generator=gen), torch.randn(2, kv, dim, generator=gen) * 3)
    args = (q, k_cache, v_cache, table, block_size, lens - 1, lens, None, 0.125, centre)
    got = cpu_kv8.decode_attention(*args, round_bf16=True)
    rounded, exact = reference(*args, round_bf16=True), reference(*args)
    assert torch.allclose(got.double(), rounded, rtol=2e-5, atol=2e-5 * rounded.abs().max().item())
    assert not torch.allclose(got.double(), exact, rtol=2e-5, atol=2e-5 * exact.abs().max().item())
