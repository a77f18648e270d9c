"""Fused elementwise kernels (add + RMSNorm, RoPE with its KV-cache store, SiLU-mul, and the norms'
and SiLU-mul's per-token quantized outputs) against the torch ops they replace.

They run on Triton's CPU interpreter here. bf16 results must be bit-identical to the torch ops (the
kernels round to bf16 where torch's ops round), except SiLU, whose exp may differ by an fp32 ulp;
fp32 results agree to an ulp (exp, rsqrt). The last test pins the fused decode layer's op count.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from optcli.engine.kernels import triton_available  # noqa: E402
from optcli.engine.models.layer_ops import FusedOps, TorchOps  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float32]


def same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16:
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=3e-7, atol=1e-7)


def rand(*shape, gen, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 100, 128])  # power of two or not
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, hidden, with_residual) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = rand(7, hidden, gen=gen, scale=3.0, dtype=dtype)
    residual = rand(7, hidden, gen=gen, dtype=dtype) if with_residual else None
    weight = (1 + rand(hidden, gen=gen, scale=0.2)).to(dtype)
    want_h, want_r = TorchOps.rms_norm(x, weight, 1e-5, residual)
    got_h, got_r = FusedOps.rms_norm(x, weight, 1e-5, residual)
    same(got_h, want_h, dtype)
    assert torch.equal(got_r, want_r)  # the residual stream itself is an exact add
    if residual is None:
        assert got_r is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_an_fp32_weight_rounds_once_as_gemma(dtype) -> None:
    """Gemma's (1 + w) weight is held fp32: the fp32 row times it, rounded once, as TorchOps (and transformers)."""
    gen = torch.Generator().manual_seed(5)
    x = rand(7, 128, gen=gen, scale=3.0, dtype=dtype)
    residual = rand(7, 128, gen=gen, dtype=dtype)
    weight = 1 + rand(128, gen=gen, scale=0.2)
    want_h, want_r = TorchOps.rms_norm(x, weight, 1e-6, residual)
    got_h, got_r = FusedOps.rms_norm(x, weight, 1e-6, residual)
    assert want_h.dtype == dtype
    same(got_h, want_h, dtype)
    assert torch.equal(got_r, want_r)


def test_rms_norm_of_a_strided_row_view_and_no_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = rand(4, 160, gen=gen, dtype=torch.bfloat16)
    x = wide[:, :96]  # rows of a wider buffer: row stride 160
    weight = rand(96, gen=gen, dtype=torch.bfloat16)
    same(FusedOps.rms_norm(x, weight, 1e-6)[0], TorchOps.rms_norm(x, weight, 1e-6)[0], torch.bfloat16)
    empty = torch.empty(0, 96, dtype=torch.bfloat16, device=DEVICE)
    assert FusedOps.rms_norm(empty, weight, 1e-6, empty)[0].shape == (0, 96)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (3, 1, 32), (8, 8, 64)])
def test_rotary_in_place_on_qkv_views_matches_torch(dtype, heads, kv_heads, dim) -> None:
    gen = torch.Generator().manual_seed(heads * dim)
    tokens = 6
    qkv = rand(tokens, (heads + 2 * kv_heads) * dim, gen=gen, dtype=dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 1, 5, 17, 300, 4000]).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    want_q, want_k = TorchOps.rotary(q, k, cos, sin)
    v_before = v.clone()
    got_q, got_k = FusedOps.rotary(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # rotated in place
    same(got_q, want_q, dtype)
    same(got_k, want_k, dtype)
    assert torch.equal(v, v_before)  # V, the third part of the same buffer, is untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_can_store_rotated_k_and_v_into_the_paged_cache(dtype) -> None:
    """RoPE + store_kv in one kernel == TorchOps.rotary then store_kv's reference; slot -1 writes nothing."""
    from optcli.engine.kernels.fused_elementwise import rotary_
    from optcli.engine.kernels.store_kv import store_kv_reference

    gen = torch.Generator().manual_seed(11)
    tokens, heads, kv_heads, dim = 5, 4, 2, 16
    qkv = rand(tokens, (heads + 2 * kv_heads) * dim, gen=gen, dtype=dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    emb = torch.cat([torch.arange(tokens).float()[:, None] * torch.rand(1, dim // 2, generator=gen)] * 2, dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    slots = torch.tensor([7, 0, -1, 12, 3], dtype=torch.int32, device=DEVICE)
    caches = [torch.full((16, kv_heads, dim), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    want_q, want_k = TorchOps.rotary(q, k, cos, sin)
    store_kv_reference(want_k, v, caches[0], caches[1], slots)
    k_before = k.clone()
    rotary_(q, k, cos, sin, store=(v, caches[2], caches[3], slots))
    same(q, want_q, dtype)
    assert torch.equal(k, k_before)  # K goes to the cache, not back into the qkv buffer
    for want, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(want.isnan(), got.isnan())  # the same slots written (none for the padded token)
        same(torch.nan_to_num(got), torch.nan_to_num(want), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,block", [(100, 1024), (256, 64)])  # one ragged tile; several tiles
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_silu_mul_matches_torch(dtype, inter, block, act) -> None:
    from optcli.engine.kernels.fused_elementwise import silu_mul

    gen = torch.Generator().manual_seed(inter)
    gate_up = rand(5, 2 * inter, gen=gen, scale=4.0, dtype=dtype)
    want = TorchOps.act_mul(gate_up, act)
    got = silu_mul(gate_up, block=block, act=act)
    if act == "gelu_tanh":
        # x * sigmoid(2z) here, 0.5 x (1 + tanh z) in torch, whose 1 + tanh cancels for negative x: torch's
        # fp32 value is off by ~1e-7 there, enough to move 12% of bf16 roundings. Values agree, not bits.
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)
    elif dtype == torch.bfloat16:
        # SiLU's exp may differ from torch's by an fp32 ulp, which moves a bf16 rounding only on an exact tie.
        mismatch = (got != want).float().mean().item()
        assert mismatch < 0.01
        torch.testing.assert_close(got, want, rtol=8e-3, atol=0)
    else:
        same(got, want, dtype)


def test_a_fused_decode_layer_launches_a_third_of_the_ops() -> None:
    """benchmarks/decode_ops.py's count: the fused layer is its 4 GEMMs, attention and 4 fused kernels."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[3] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("decode_ops", bench / "decode_ops.py")
        decode_ops = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(decode_ops)
        (torch_name, torch_layer, torch_step), (fused_name, fused_layer, fused_step) = decode_ops.count_both(DEVICE)
    finally:
        sys.path.remove(str(bench))
    assert (torch_name, fused_name) == ("torch", "triton")
    assert fused_layer["aten.linear"] == torch_layer["aten.linear"] == 4
    assert {op: n for op, n in fused_layer.items() if op.startswith("triton.")} == {
        "triton._rms_norm_kernel": 2, "triton._rotary_kernel": 1, "triton._silu_mul_kernel": 1,
        "triton._decode_split_kernel": 1,  # RoPE also stores K/V: no _store_kv_kernel
    }
    assert sum(fused_layer.values()) == 9 and sum(torch_layer.values()) >= 30
    assert sum(fused_step.values()) < sum(torch_step.values()) / 3


QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]


@pytest.mark.parametrize("quant", QUANT_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_can_hand_over_per_token_quantized_rows(quant, with_residual) -> None:
    """The normed row quantized in the same kernel == the stored normed row quantized by torch."""
    from optcli.engine.kernels.quant_reference import QuantizedInput, quantize_per_token

    gen = torch.Generator().manual_seed(7)
    x = rand(6, 100, gen=gen, scale=3.0, dtype=torch.bfloat16)
    x[2] = 0.0  # an all-zero row (padding) keeps a positive scale
    residual = rand(6, 100, gen=gen, dtype=torch.bfloat16) if with_residual else None
    if residual is not None:
        residual[2] = 0.0
    weight = (1 + rand(100, gen=gen, scale=0.2)).to(torch.bfloat16)
    dense, want_r = TorchOps.rms_norm(x, weight, 1e-5, residual)
    want_q, want_s = quantize_per_token(dense, quant)
    got, got_r = FusedOps.rms_norm(x, weight, 1e-5, residual, quant)
    assert isinstance(got, QuantizedInput) and got.dtype == torch.bfloat16 and got.q.dtype == quant
    assert torch.equal(got_r, want_r)
    torch.testing.assert_close(got.scales, want_s, rtol=0, atol=0)
    assert torch.equal(got.q.float(), want_q.float())


@pytest.mark.parametrize("quant", QUANT_DTYPES)
def test_silu_mul_can_hand_over_per_token_quantized_rows(quant) -> None:
    from optcli.engine.kernels.fused_elementwise import silu_mul
    from optcli.engine.kernels.quant_reference import quantize_per_token

    gen = torch.Generator().manual_seed(8)
    gate_up = rand(4, 2 * 300, gen=gen, scale=3.0, dtype=torch.bfloat16)
    want_q, want_s = quantize_per_token(TorchOps.silu_mul(gate_up), quant)
    got = silu_mul(gate_up, block=128, quant=quant)  # three chunks per row, the last one ragged
    torch.testing.assert_close(got.scales, want_s, rtol=1e-2, atol=0)
    # SiLU's exp may round a bf16 value one ulp apart from torch's; elsewhere the codes are identical.
    assert (got.q.float() != want_q.float()).float().mean().item() < 0.01


@pytest.mark.parametrize("quant", QUANT_DTYPES)
def test_quantized_layers_take_pre_quantized_input(quant) -> None:
    from optcli.engine.quant.fp8_linear import Fp8Linear
    from optcli.engine.quant.linear import Int8Linear
    from optcli.engine.quant.weights import Fp8Weight, Int8Weight

    gen = torch.Generator().manual_seed(9)
    w = rand(48, 64, gen=gen)
    layer = (Int8Linear(Int8Weight.rtn(w), device=DEVICE, dtype=torch.bfloat16, backend="triton") if quant == torch.int8
             else Fp8Linear(Fp8Weight.rtn(w), device=DEVICE, dtype=torch.bfloat16, backend="triton"))
    assert layer.input_quant == quant
    x = rand(5, 64, gen=gen, dtype=torch.bfloat16)
    weight = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    fused, _ = FusedOps.rms_norm(x, weight, 1e-5, quant=quant)
    dense, _ = TorchOps.rms_norm(x, weight, 1e-5)
    assert torch.equal(layer(fused), layer(dense))
