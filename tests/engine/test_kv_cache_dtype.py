"""An 8-bit KV cache (`kv_cache_dtype` fp8 / int8): the rounding round trip, twice the tokens in the same bytes,
prefix caching and preemption unchanged, the Triton path (interpreted) agreeing with the CPU path, calibrated
scales read back from an artifact, and the accuracy cost against a bf16 cache where the cache is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from optcli.calibration.corpus import heldout_text
from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig
from optcli.engine import Engine, SamplingParams
from optcli.engine.kernels.kv_rounding import dequantize, quantize
from optcli.errors import UsageError

FORMATS = ["fp8", "int8"]


def prompts_of(tokenizer, n: int = 12) -> list[list[int]]:
    """n prompts of 5..60 tokens cut from the held-out corpus (distinct, some sharing their first block)."""
    ids = tokenizer(heldout_text(), verbose=False).input_ids
    stem = ids[:20]
    out = []
    for i in range(n):
        length = 5 + (i * 37) % 56
        out.append(stem + ids[200 + 50 * i : 200 + 50 * i + length] if i % 3 == 0 else ids[100 * i : 100 * i + length])
    return out


def copy_scales(src: Engine, dst: Engine) -> None:
    """Give `dst` the scales `src` set, fixed (as calibrated ones are), so both store exactly the same bytes."""
    for a, b in zip(src.kv.scales, dst.kv.scales, strict=True):
        b.k.copy_(a.k)
        b.v.copy_(a.v)
        b.centre.copy_(a.centre)  # and the centre K is stored around (kv_centre.py)
        b.calibrated = b.ready = True
        b.centre_set.copy_(a.centre_set)
        b.centre_ready, b.table = bool(a.centre_set == 1), None  # set on the host or on the device


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8])
def test_quantize_dequantize_round_trip(fmt: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 16, generator=gen) * torch.linspace(0.1, 5.0, 16)
    qmax = 448.0 if fmt == torch.float8_e4m3fn else 127.0
    scale = x.abs().amax(dim=0) / qmax
    back = dequantize(quantize(x, scale, fmt), scale, torch.float32)
    err = (back - x).abs()
    if fmt == torch.int8:
        assert (err <= scale / 2 + 1e-6).all()  # half a step
    else:
        assert (err <= x.abs() / 16 + scale * 2**-9 + 1e-6).all()  # 3 mantissa bits; subnormals near 0
    # out of range saturates at the format's largest value (E4M3 has no inf: a cast alone would give NaN)
    big = quantize(x * 10, scale, fmt)
    assert not big.float().isnan().any() and big.float().abs().max() == qmax


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_an_8bit_cache_holds_twice_the_tokens_in_the_same_bytes(kv_dtype: str) -> None:
    budget = 4 << 20
    wide = Engine("builtin:tiny-llama", device="cpu", kv_cache_dtype="bfloat16", kv_cache_bytes=budget, max_num_seqs=64)
    narrow = Engine("builtin:tiny-llama", device="cpu", kv_cache_dtype=kv_dtype, kv_cache_bytes=budget, max_num_seqs=64)
    a, b = wide.stats()["kv_cache"], narrow.stats()["kv_cache"]
    assert b["bytes_per_token"] * 2 == a["bytes_per_token"]
    assert b["tokens"] == 2 * a["tokens"] and b["bytes"] == a["bytes"] <= budget
    assert b["scale_source"] == "dynamic" and a["scale_source"] is None
    assert b["dtype"] == ("fp8_e4m3" if kv_dtype == "fp8" else "int8")


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_prefix_caching_and_preemption_are_unchanged_with_a_quantized_cache(stories_dir, kv_dtype: str) -> None:
    tok = AutoTokenizer.from_pretrained(stories_dir)
    prompts = prompts_of(tok)
    params = SamplingParams(max_tokens=16)
    plain = Engine(str(stories_dir), dtype="float32", kv_cache_dtype=kv_dtype, enable_prefix_caching=False)
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    # tiny chunks, block pressure (preemption and recompute) and prefix-cache hits, all with the same scales
    stressed = Engine(str(stories_dir), dtype="float32", kv_cache_dtype=kv_dtype, max_num_seqs=12, block_size=4,
                      num_kv_blocks=48, max_model_len=128, max_num_batched_tokens=9)
    copy_scales(plain, stressed)
    for _ in range(2):  # the second pass finds the prompts' blocks cached
        assert [o.token_ids for o in stressed.generate(prompts, params)] == expected
        stressed.blocks.check_no_leaks()
    stats = stressed.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_triton_path_over_a_quantized_cache_matches_the_cpu_path(kv_dtype: str) -> None:
    pytest.importorskip("triton")
    from optcli.engine.kernels import triton_available

    if not triton_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama").path)
    prompts = prompts_of(tok, 3)
    params = SamplingParams(max_tokens=5)
    options = dict(dtype="float32", kv_cache_dtype=kv_dtype, max_num_seqs=4, max_model_len=128, block_size=4)
    triton = Engine("builtin:tiny-llama", attention_backend="triton", enforce_eager=True,
                    max_num_batched_tokens=24, **options)  # chunked prefill: later chunks read the 8-bit cache
    got = [o.token_ids for o in triton.generate(prompts, params)]
    assert all(bool((s.k > 0).all()) for s in triton.kv.scales)  # set on the device by the first write
    gather = Engine("builtin:tiny-llama", device="cpu", **options)
    assert all(s.rope is not None for s in triton.kv.scales + gather.kv.scales)  # both centre K (kv_centre.py)
    assert all(bool(s.centre_set == 1) and bool(s.centre.abs().max() > 0) for s in triton.kv.scales)
    copy_scales(triton, gather)
    assert got == [o.token_ids for o in gather.generate(prompts, params)]
    if kv_dtype == "fp8" and not torch.cuda.is_available():
        return  # the interpreter's fp32 -> E4M3 cast drops a rounding carry in some lanes (test_kv_quant_kernels.py)
    ids = prompts[0] + got[0]
    torch.testing.assert_close(triton.score(ids, chunk=4), gather.score(ids, chunk=4), atol=2e-3, rtol=2e-3)


def test_dynamic_scales_are_set_by_the_first_real_write_not_by_a_graph_capture() -> None:
    pytest.importorskip("triton")
    from optcli.engine.kernels import triton_available

    if not triton_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    calls = []

    def capture(fn):  # run once as a capture would (dummy inputs), then replay eagerly
        fn()
        calls.append(fn)
        return fn

    engine = Engine("builtin:tiny-llama", dtype="float32", kv_cache_dtype="int8", max_num_seqs=2, max_model_len=64,
                    attention_backend="triton", graph_capture=capture)
    assert calls and all(bool((s.k == 0).all()) for s in engine.kv.scales)  # the capture's dummy K/V forgotten
    assert all(bool(s.centre_set == 0) and bool((s.centre == 0).all()) for s in engine.kv.scales)  # and the centre
    engine.generate([[1, 5, 9, 13]], SamplingParams(max_tokens=3))
    assert all(bool((s.k > 0).all()) for s in engine.kv.scales)
    assert all(bool(s.centre_set == 1) and bool(s.centre.abs().max() > 0) for s in engine.kv.scales)


def kv_artifact(stories_dir: Path, out: Path, scheme: dict, per_head: bool) -> dict[int, tuple[torch.Tensor, ...]]:
    """stories260K with a compressed-tensors kv_cache_scheme and k_scale / v_scale tensors, as llm-compressor
    saves them (the weights stay dense): returns the scales written, per layer."""
    from safetensors.torch import save_file

    shutil.copytree(stories_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
                                     "kv_cache_scheme": scheme}
    (out / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(3)
    shape = (config["num_key_value_heads"],) if per_head else (1,)
    scales = {i: (torch.rand(shape, generator=gen) * 0.05 + 0.01, torch.rand(shape, generator=gen) * 0.05 + 0.01)
              for i in range(config["num_hidden_layers"])}
    tensors = {}
    for i, (k, v) in scales.items():
        tensors[f"model.layers.{i}.self_attn.k_scale"] = k.to(torch.bfloat16)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = v.to(torch.bfloat16)
    save_file(tensors, out / "kv_scales.safetensors")
    return scales


FP8_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@pytest.mark.parametrize("per_head", [False, True])
def test_calibrated_scales_are_read_back_and_used(stories_dir, tmp_path: Path, per_head: bool) -> None:
    scales = kv_artifact(stories_dir, tmp_path / "art", FP8_SCHEME, per_head)
    engine = Engine(str(tmp_path / "art"), dtype="float32")  # kv_cache_dtype auto: the artifact's scheme
    cache = engine.stats()["kv_cache"]
    assert cache["dtype"] == "fp8_e4m3" and cache["scale_source"] == "calibrated"
    dim = engine.model.cfg.head_dim
    for layer, (k, v) in scales.items():
        got = engine.kv.scales[layer]
        heads = got.k.shape[0]
        torch.testing.assert_close(got.k, k.to(torch.bfloat16).float().expand(heads)[:, None].expand(-1, dim))
        torch.testing.assert_close(got.v, v.to(torch.bfloat16).float().expand(heads)[:, None].expand(-1, dim))
    before = [s.k.clone() for s in engine.kv.scales]
    engine.generate([[1, 400, 300, 200]], SamplingParams(max_tokens=4))
    assert all(torch.equal(a, s.k) for a, s in zip(before, engine.kv.scales, strict=True))  # never re-derived
    # the stored bytes are K / the calibrated scale
    slots = engine.kv.tensor[0, 0, :3].float()
    assert slots.abs().max() > 0
    with pytest.raises(UsageError, match="differs from the artifact's calibrated"):
        Engine(str(tmp_path / "art"), kv_cache_dtype="int8")
    plain = Engine(str(tmp_path / "art"), kv_cache_dtype="bfloat16")  # asked for a 16-bit cache: no scales
    assert plain.stats()["kv_cache"]["scale_source"] is None


def test_an_unsupported_kv_cache_scheme_is_a_usage_error(stories_dir, tmp_path: Path) -> None:
    kv_artifact(stories_dir, tmp_path / "art", dict(FP8_SCHEME, num_bits=4, type="int"), False)
    with pytest.raises(UsageError, match="kv_cache_scheme int 4-bit is not supported"):
        Engine(str(tmp_path / "art"))


def test_engine_config_refuses_an_unknown_kv_cache_dtype() -> None:
    with pytest.raises(UsageError, match="--kv-cache-dtype must be one of auto, bfloat16, float16, fp8, fp8_e4m3, int8"):
        EngineConfig(kv_cache_dtype="fp4")


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_accuracy_against_a_bf16_cache_where_the_cache_is_read(stories_dir, kv_dtype: str) -> None:
    """Decode steps and chunked prefill through the 8-bit cache against a bf16 cache, same engine and model.
    The bar here is loose on purpose (the measured figures are in the issue's notes): a broken scale or a
    misread byte shows as a KLD of 0.5 or more, and top-1 near chance."""
    from optcli.bench.engine_accuracy import measure_kv_accuracy

    config = EngineConfig(device="cpu", dtype="float32", kv_cache_dtype=kv_dtype, max_model_len=256)
    report = measure_kv_accuracy(stories_dir, heldout_text()[:6000], config, decode_tokens=64, prefill_tokens=256)
    assert report["bytes_per_token"] * 2 == report["reference_bytes_per_token"]
    for part in ("decode", "chunked_prefill"):
        assert report[part]["kld_mean"] < 0.1 and report[part]["top1_agreement"] > 0.8, (part, report[part])


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32: what an AVX2-only CPU's `auto` runs
def test_the_cpu_kernel_read_of_an_8bit_cache_is_torchs_read(stories_dir, monkeypatch, kv_dtype: str,
                                                             dtype: str, centred: bool) -> None:
    """Decode steps and prefill chunks over an 8-bit cache give the same logits, bit for bit, whether K/V are
    stored and its blocks gathered and widened by our AVX2 kernels (`kernels/cpu_kv8.py`) or by torch's ops
    (the rounding statement, index_select and cast). With K centred (attention/kv_centre.py, the default) the
    kernel fuses the centre's multiply-adds, so the logits agree closely rather than bit for bit."""
    from optcli.engine.kernels import cpu_kv8, cpu_lowbit

    if cpu_lowbit.library() is None:
        pytest.skip("the AVX2 kernels are not built here")
    eng = Engine(str(stories_dir), device="cpu", dtype=dtype, kv_cache_dtype=kv_dtype, max_model_len=128,
                 block_size=4)
    ids = AutoTokenizer.from_pretrained(stories_dir)(heldout_text()[:400], verbose=False).input_ids[:70]
    if not centred:
        for s in eng.kv.scales:
            s.rope = None
    calls, stored = [], []
    kernel, store = cpu_kv8.gather_widen, cpu_kv8.store
    monkeypatch.setattr(cpu_kv8, "gather_widen", lambda *a: calls.append(a) or kernel(*a))
    monkeypatch.setattr(cpu_kv8, "store", lambda *a: stored.append(store(*a)) or stored[-1])
    with_kernel = [eng.score(ids, chunk=c) for c in (1, 16)]
    assert calls and all(c[0].dtype == eng.kv.caches[0][0].dtype for c in calls)
    assert stored and all(stored)
    monkeypatch.setattr(cpu_kv8, "gather_widen", lambda *a: None)  # torch's ops
    monkeypatch.setattr(cpu_kv8, "store", lambda *a: False)
    without = [eng.score(ids, chunk=c) for c in (1, 16)]
    assert all(bool(s.centre_ready) == centred for s in eng.kv.scales)
    for a, b in zip(with_kernel, without, strict=True):
        if centred:
            torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)
        else:
            assert torch.equal(a, b)
