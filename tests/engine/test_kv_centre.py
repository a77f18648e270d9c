"""Centring K before RoPE in an 8-bit KV cache (engine/attention/kv_centre.py): the store takes rope_p(c) away,
the read adds it back, so a key comes back as itself up to the format's rounding of the centred value; with
c = 0 the path is the uncentred one exactly; and the accuracy bar of issue 35 against a bf16 cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from optcli.calibration.corpus import heldout_text
from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig
from optcli.engine import Engine
from optcli.engine.attention.kv_centre import centre_keys, centre_read, ensure_centre
from optcli.engine.attention.kv_quant import KVScales, ensure_scales
from optcli.engine.kernels.kv_rounding import quantize

FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
KV, D, T = 2, 8, 40


def rope_table(theta: float = 1e4):
    """positions -> (cos, sin) [P, D], half-split as the models' RoPE."""
    inv = theta ** (-torch.arange(0, D, 2).float() / D)

    def rope(pos: torch.Tensor):
        emb = pos[:, None].float() * inv[None]
        emb = torch.cat([emb, emb], dim=-1)
        return emb.cos(), emb.sin()

    return rope


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def keys_with_a_mean(seed: int = 0) -> torch.Tensor:
    """Pre-RoPE keys [T, KV, D] whose slowest pair carries a mean far above its spread (as stories260K's)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(T, KV, D, generator=gen)
    k[..., D // 2 - 1] += 12.0
    k[..., D - 1] -= 8.0
    return k


def store_and_read(scales: KVScales, k_pre: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """The CPU path in miniature: centre, rotate, centre the rotated keys, quantize; read the codes back with the
    centre table added, times K's scale (which the engine folds into the queries)."""
    pos = torch.arange(1000, 1000 + T)  # far from 0: the centre must follow the rotation
    cos, sin = scales.rope(pos) if scales.rope is not None else rope_table()(pos)
    ensure_centre(scales, k_pre)
    stored = centre_keys(scales, rotate(k_pre, cos, sin), cos, sin)
    ensure_scales(scales, stored, stored, fmt)
    codes = quantize(stored, scales.k, fmt).float()
    read = centre_read(scales, 1000 + T, torch.float32)
    if read is not None:
        rows, coef = read
        codes = codes + (coef[0] * rows[pos, None, :D] + coef[1] * rows[pos, None, D:])
    return codes * scales.k


@pytest.mark.parametrize("fmt", FORMATS.values())
def test_a_centred_key_reads_back_as_itself_up_to_the_rounding_of_its_centred_value(fmt) -> None:
    k_pre = keys_with_a_mean()
    pos = torch.arange(1000, 1000 + T)
    cos, sin = rope_table()(pos)
    truth = rotate(k_pre, cos, sin)
    centred = KVScales.unset(KV, D, "cpu")
    centred.rope = rope_table()
    back = store_and_read(centred, k_pre, fmt)
    torch.testing.assert_close(centred.centre, k_pre.mean(dim=0))
    residual = truth - rotate(centred.centre[None].expand(T, -1, -1), cos, sin)
    err = (back - truth).abs()
    if fmt == torch.int8:
        assert (err <= centred.k / 2 + 1e-4).all()  # half a step of the centred value's scale
    else:
        assert (err <= residual.abs() / 16 + centred.k * 2**-9 + 1e-4).all()  # 3 mantissa bits of the residual
    plain = KVScales.unset(KV, D, "cpu")  # no RoPE table attached: today's path
    plain_err = (store_and_read(plain, k_pre, fmt) - truth).abs()
    assert plain.centre_ready is False and bool((plain.centre == 0).all())
    assert err.pow(2).mean() < plain_err.pow(2).mean() / 4  # the mean no longer spends the format's range


def test_a_zero_centre_is_the_uncentred_path_exactly() -> None:
    scales = KVScales.unset(KV, D, "cpu")
    scales.rope = rope_table()
    scales.centre_ready = True  # set, to zero
    pos = torch.arange(5, 5 + T)
    cos, sin = scales.rope(pos)
    k_rot = rotate(keys_with_a_mean(), cos, sin).bfloat16()
    assert torch.equal(centre_keys(scales, k_rot, cos.bfloat16(), sin.bfloat16()), k_rot)
    rows, coef = centre_read(scales, 64, torch.bfloat16)
    assert rows.shape[0] >= 64 and torch.equal(coef, torch.zeros(2, KV, D))


def test_reset_forgets_the_centre_even_with_calibrated_scales() -> None:
    scales = KVScales(torch.ones(KV, D), torch.ones(KV, D), calibrated=True, ready=True)
    scales.rope = rope_table()
    ensure_centre(scales, keys_with_a_mean())
    assert scales.centre_ready and centre_read(scales, 8, torch.float32) is not None and scales.coef is not None
    scales.reset()  # a warm-up / CUDA-graph capture wrote dummy K/V
    assert not scales.centre_ready and scales.coef is None and bool((scales.centre == 0).all())
    assert bool(scales.centre_set == 0) and centre_read(scales, 8, torch.float32) is None
    assert torch.equal(scales.k, torch.ones(KV, D))  # calibrated scales stay


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_engine_with_a_zero_centre_scores_as_without_centring(stories_dir, kv_dtype: str) -> None:
    """Same scales, centre forced to 0: logits bit for bit those of the uncentred path (decode and chunks)."""
    options = dict(device="cpu", dtype="bfloat16", kv_cache_dtype=kv_dtype, max_model_len=128, block_size=4)
    plain, zero = Engine(str(stories_dir), **options), Engine(str(stories_dir), **options)
    ids = AutoTokenizer.from_pretrained(stories_dir)(heldout_text()[:400], verbose=False).input_ids[:70]
    for s in plain.kv.scales:
        s.rope = None
    plain.score(ids[:32], chunk=32)  # sets the scales
    for a, b in zip(plain.kv.scales, zero.kv.scales, strict=True):
        b.k.copy_(a.k)
        b.v.copy_(a.v)
        b.calibrated = b.ready = b.centre_ready = True  # centre stays 0
        assert b.rope is not None
    for chunk in (1, 16):
        assert torch.equal(plain.score(ids, chunk=chunk), zero.score(ids, chunk=chunk))
    assert all(bool((s.centre == 0).all()) for s in zero.kv.scales)


def demo_model() -> str:
    return str(resolve_model("builtin:tiny-llama").path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("model", ["stories260K", "tiny-llama"])
def test_an_8bit_cache_meets_the_accuracy_bar_against_a_bf16_cache(request, model: str, kv_dtype: str,
                                                                   dtype: str) -> None:
    """Issue 35's bar, where the cache is read (decode steps, chunked prefill): KLD <= 0.01, top-1 >= 0.95
    against the same engine with a bf16 cache, held-out text, scales and centre from the first write."""
    from optcli.bench.engine_accuracy import measure_kv_accuracy

    path = request.getfixturevalue("stories_dir") if model == "stories260K" else demo_model()
    config = EngineConfig(device="cpu", dtype=dtype, kv_cache_dtype=kv_dtype, max_model_len=512)
    report = measure_kv_accuracy(path, heldout_text(), config)
    assert report["scale_source"] == "dynamic"
    for part in ("decode", "chunked_prefill"):
        assert report[part]["kld_mean"] <= 0.01 and report[part]["top1_agreement"] >= 0.95, (part, report[part])


@pytest.mark.parametrize("fmt", FORMATS.values())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_the_cpu_kernel_adds_the_centre_back_as_torch_does(fmt, out_dtype, monkeypatch) -> None:
    """Our AVX2 gather with a centred K (kernels/cpu_kv8.py) agrees with the torch fallback (gather, widen, then
    code + (a cos + b sin) in fp32, rounded) within an ulp of the output dtype (the kernel fuses the multiply-adds),
    for blocks of several sequences read out of order, head dims that exercise the vector body and the scalar
    tail."""
    from optcli.engine.attention import cpu
    from optcli.engine.kernels import cpu_kv8, cpu_lowbit

    if cpu_lowbit.library() is None:
        pytest.skip("the AVX2 kernels are not built here")
    gen = torch.Generator().manual_seed(1)
    calls, kernel = [], cpu_kv8.gather_widen
    for kv, dim in ((3, 12), (2, 64)):
        block, n_blocks = 4, 10
        codes = (torch.randn(n_blocks * block, kv, dim, generator=gen) * 40).clamp(-127, 127)
        cache = codes.round().to(torch.int8) if fmt == torch.int8 else codes.to(fmt)
        rows = torch.randn(5 * block, 2 * dim, generator=gen)
        coef = torch.randn(2, kv, dim, generator=gen) * 60  # sums past 256: bf16 rounding ties
        table = torch.tensor([[7, 2, 2, 9], [0, 5, 3, 1]])  # 2 sequences of 4 blocks
        monkeypatch.setattr(cpu_kv8, "gather_widen", lambda *a: calls.append(1) or kernel(*a))
        got = cpu._gather(cache, table, block, out_dtype, (rows, coef))
        monkeypatch.setattr(cpu_kv8, "gather_widen", lambda *a: None)  # torch's ops
        want = cpu._gather(cache, table, block, out_dtype, (rows, coef))
        want = want.reshape(got.shape).float()
        # bf16: one rounding of nearly the same fp32 sum, so an ulp of the result; fp32: the intermediate sums'
        # rounding (terms up to ~1,000 here), which cancellation can make large against the result
        bound = want.abs() * 2**-7 + 1e-6 if out_dtype == torch.bfloat16 else torch.full_like(want, 1024 * 2**-22)
        assert calls and bool(((got.float() - want).abs() <= bound).all())
        if out_dtype == torch.bfloat16:
            assert (got.float() == want).float().mean() > 0.9  # mostly the same value, not just close
        plain = cpu._gather(cache, table, block, out_dtype).reshape(got.shape)
        assert (got.float() - plain.float()).abs().max() > 1  # the centre was added


@pytest.mark.parametrize("fmt", FORMATS.values())
def test_the_avx512_correction_is_the_avx2_one_bit_for_bit(fmt) -> None:
    """Where the CPU has AVX-512, a centred K's bf16 read adds the centre 16 lanes at a time (cpu_lowbit_kv.c
    add_centre16): the same multiply-adds in the same order and the same rounding as the AVX2 form, so the same
    bits; head dims that are not a multiple of 16 stay on the AVX2 form."""
    from optcli.engine.kernels import cpu_kv8, cpu_lowbit
    from optcli.engine.kernels.cpu_flags import cpu_flags

    lib = cpu_lowbit.library()
    if lib is None or not {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags():
        pytest.skip("no AVX-512 (or the AVX2 kernels are not built) here")
    gen = torch.Generator().manual_seed(2)
    for kv, dim in ((2, 64), (3, 32), (2, 48)):
        block, n_blocks = 16, 8
        codes = (torch.randn(n_blocks * block, kv, dim, generator=gen) * 40).clamp(-127, 127)
        cache = codes.round().to(torch.int8) if fmt == torch.int8 else codes.to(fmt)
        rows = torch.randn(4 * block, 2 * dim, generator=gen)
        coef = torch.randn(2, kv, dim, generator=gen) * 60
        blocks = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])  # 2 sequences of 4 blocks
        try:
            lib.lowbit_kv_wide(0)
            narrow = cpu_kv8.gather_widen(cache, blocks, block, torch.bfloat16, (rows, coef), 4)
            lib.lowbit_kv_wide(1)
            wide = cpu_kv8.gather_widen(cache, blocks, block, torch.bfloat16, (rows, coef), 4)
        finally:
            lib.lowbit_kv_wide(-1)  # back to the CPU's flags
        assert torch.equal(wide.view(torch.int16), narrow.view(torch.int16))
