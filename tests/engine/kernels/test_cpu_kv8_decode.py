"""Decode attention read straight from a paged cache of 8-bit codes or of bf16 / fp32 values (`cpu_kv8.decode_attention`,
`lowbit_kv_decode` in cpu_lowbit_kv_decode.c): the same softmax-weighted values as a float64 statement of it over the
widened codes (centred K,
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
        lo = max(0, int(pos[b]) + 1 - window) if window else 0  # SDPA's mask: t > pos - window
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
    if fmt in (torch.bfloat16, torch.float32):  # a cache in the activations' dtype holds values
        return (torch.randn(shape, generator=gen) * 2).to(fmt)
    if fmt == torch.int8:
        return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    return (torch.randn(shape, generator=gen) * 40).clamp(-448, 448).to(fmt)


@needs_kernel
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8, torch.bfloat16, torch.float32])
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
@pytest.mark.parametrize("window", [None, 4])
def test_a_query_before_the_context_end_sees_only_earlier_keys(form, window) -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = codes(torch.int8, (32, 1, 16), gen), codes(torch.int8, (32, 1, 16), gen)
    table = torch.arange(8)[None]
    q = torch.randn(1, 2, 16, generator=gen)
    pos, lens = torch.tensor([9]), torch.tensor([30])
    got = cpu_kv8.decode_attention(q, k_cache, v_cache, table, 4, pos, lens, window, 0.3)
    want = reference(q, k_cache, v_cache, table, 4, pos, lens, window, 0.3, None)
    assert torch.allclose(got.double(), want, rtol=2e-5, atol=1e-4)


@needs_kernel
def test_declines_what_it_does_not_take_and_refuses_a_block_outside_the_cache() -> None:
    k_cache = torch.zeros(16, 2, 8, dtype=torch.int8)
    table, lens = torch.tensor([[0, 1]]), torch.tensor([8])
    q = torch.zeros(1, 4, 8)
    # an fp16 cache, a head dim not a multiple of 8, query heads not a multiple of the KV heads
    assert cpu_kv8.decode_attention(q, k_cache.half(), k_cache.half(), table, 4, lens - 1, lens, None, 1.0) is None
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


@needs_kernel
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_attention_path_gives_what_its_gather_and_sdpa_give(monkeypatch, fmt, dtype) -> None:
    """The engine's CPU attention on a decode step over a centred 8-bit cache (scales, centre and GQA groups as
    the layers set them): the kernel's output against the same step with the kernel declined (gather + SDPA)."""
    from optcli.engine.attention import cpu as attention
    from optcli.engine.attention.kv_quant import KVScales, QuantKVCache
    from optcli.engine.attention.layout import StepLayout

    gen = torch.Generator().manual_seed(3)
    kv, heads, dim, bs, ctx = 2, 8, 64, 16, 100
    inv = 1e4 ** (-torch.arange(0, dim, 2).float() / dim)

    def rope(pos):
        emb = pos[:, None].float() * inv[None]
        emb = torch.cat([emb, emb], dim=-1)
        return emb.cos(), emb.sin()

    scales = KVScales.unset(kv, dim, "cpu")
    scales.rope, scales.centre, scales.centre_ready = rope, torch.randn(kv, dim, generator=gen), True
    cache = QuantKVCache(torch.zeros(160, kv, dim, dtype=fmt), torch.zeros(160, kv, dim, dtype=fmt), scales)
    table = [3, 0, 7, 5, 9, 1, 2]  # 7 blocks of 16 for 100 positions, out of order
    slots = [table[p // bs] * bs + p % bs for p in range(ctx)]
    prefill = StepLayout(slots=slots[:-1], rows=[range(ctx - 1)], query_pos=[list(range(ctx - 1))],
                         ctx_lens=[ctx - 1], block_tables=[table], block_size=bs)
    k, v = torch.randn(ctx, kv, dim, generator=gen).to(dtype), torch.randn(ctx, kv, dim, generator=gen).to(dtype)
    q = torch.randn(ctx, heads, dim, generator=gen).to(dtype)
    attention.paged_attention(q[:-1], k[:-1], v[:-1], cache, attention.build_gather_metadata(prefill, "cpu"), None)
    decode = StepLayout(slots=slots[-1:], rows=[range(1)], query_pos=[[ctx - 1]], ctx_lens=[ctx],
                        block_tables=[table], block_size=bs)
    meta = attention.build_gather_metadata(decode, "cpu")
    kernel, ran = cpu_kv8.decode_attention, []
    monkeypatch.setattr(attention.cpu_kv8, "decode_attention", lambda *a, **kw: ran.append(kernel(*a, **kw)) or ran[-1])
    fused = attention.paged_attention(q[-1:], k[-1:], v[-1:], cache, meta, None)
    assert len(ran) == 1 and ran[0] is not None  # the kernel, not the fallback, gave `fused`
    monkeypatch.setattr(attention.cpu_kv8, "decode_attention", lambda *a, **kw: None)
    gathered = attention.paged_attention(q[-1:], k[-1:], v[-1:], cache, meta, None)
    assert fused.dtype == gathered.dtype == dtype and fused.shape == gathered.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(fused.float(), gathered.float(), rtol=tol, atol=tol * gathered.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 24])
def test_a_cache_in_the_activations_dtype_decodes_in_place_as_its_gather_and_sdpa(monkeypatch, dtype, window) -> None:
    """A bf16 or fp32 cache (no scales): the engine's CPU attention on decode steps of three sequences of different
    lengths (GQA groups, blocks out of order) runs the kernel once for the step's group, and gives what the block
    gather and SDPA give with the kernel declined: to fp32 rounding in fp32; in bf16, where both round the softmax
    weights to bf16, to an ulp of the output."""
    from optcli.engine.attention import cpu as attention
    from optcli.engine.attention.layout import StepLayout

    gen = torch.Generator().manual_seed(5)
    kv, heads, dim, bs = 2, 8, 64, 16
    cache = (torch.zeros(160, kv, dim, dtype=dtype), torch.zeros(160, kv, dim, dtype=dtype))
    tables = [[3, 0, 7, 5, 9, 1, 2], [4, 8], [6]]
    lens = [100, 20, 5]
    slots = [[t[p // bs] * bs + p % bs for p in range(n)] for t, n in zip(tables, lens, strict=True)]
    for s, n, t in zip(slots, lens, tables, strict=True):  # each sequence's context before this step
        prefill = StepLayout(slots=s[:-1], rows=[range(n - 1)], query_pos=[list(range(n - 1))], ctx_lens=[n - 1],
                             block_tables=[t], block_size=bs)
        k, v, q = (torch.randn(n - 1, h, dim, generator=gen).to(dtype) for h in (kv, kv, heads))
        attention.paged_attention(q, k, v, cache, attention.build_gather_metadata(prefill, "cpu"), window)
    decode = StepLayout(slots=[s[-1] for s in slots], rows=[range(i, i + 1) for i in range(3)],
                        query_pos=[[n - 1] for n in lens], ctx_lens=lens, block_tables=tables, block_size=bs)
    meta = attention.build_gather_metadata(decode, "cpu")
    k, v, q = (torch.randn(3, h, dim, generator=gen).to(dtype) for h in (kv, kv, heads))
    kernel, ran = cpu_kv8.decode_attention, []
    monkeypatch.setattr(attention.cpu_kv8, "decode_attention", lambda *a, **kw: ran.append(kernel(*a, **kw)) or ran[-1])
    in_place = attention.paged_attention(q, k, v, cache, meta, window)
    assert len(ran) == len(meta.groups) and all(r is not None for r in ran)
    monkeypatch.setattr(attention.cpu_kv8, "decode_attention", lambda *a, **kw: None)
    gathered = attention.paged_attention(q, k, v, cache, meta, window)
    assert in_place.dtype == gathered.dtype == dtype and in_place.shape == gathered.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(in_place.float(), gathered.float(), rtol=tol, atol=tol * gathered.abs().max().item())
