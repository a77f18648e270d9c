"""Quantized GEMM kernels and layers against the dequantized reference (Triton on the CPU interpreter).

Every Triton kernel (int4 GEMM, int8 GEMM, per-token activation quantization) is checked on small
ragged shapes (M, N, K not multiples of the tiles; K not a multiple of 8 for int4), split-K and
not, symmetric and zero-point, group sizes 32-256 and per channel; then each QuantLinear's CPU and
Triton paths against `x @ W_dequantized^T` with the activations quantized as the scheme says.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from optcli.engine.kernels import quant_reference as ops  # noqa: E402
from optcli.engine.kernels import triton_available  # noqa: E402
from optcli.engine.kernels.act_quant import quantize_per_token  # noqa: E402
from optcli.engine.kernels.int4_matmul import Int4Config, int4_config, int4_matmul  # noqa: E402
from optcli.engine.kernels.int8_matmul import Int8Config, int8_matmul  # noqa: E402
from optcli.engine.quant.fp8_linear import Fp8Linear
from optcli.engine.quant.linear import Int4Linear, Int8Linear  # noqa: E402
from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight, cat_weights  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# (M, N, K, group, symmetric, tiles): ragged everything; split-K with a partial last split;
# groups narrower than, equal to and wider than the K tile; per channel (group = K).
INT4_CASES = [
    (3, 48, 64, 32, True, Int4Config(16, 16, 16, 2)),
    (5, 40, 96, 32, False, Int4Config(16, 16, 64, 1)),  # K tile spans two groups: per-row scale gather
    (17, 33, 128, 128, False, Int4Config(16, 32, 32, 3)),
    (1, 64, 256, 64, True, Int4Config(16, 32, 32, 4)),
    (2, 24, 256, 256, True, None),
    (4, 20, 84, 84, False, Int4Config(16, 16, 32, 2)),  # per channel, K = 84 not a multiple of 8
    # the GEMV form (rows padded to a power of two <= 8, no tl.dot): split or not, ragged N and K
    (1, 64, 256, 64, True, Int4Config(1, 32, 64, 2, kernel="gemv")),
    (3, 40, 96, 32, False, Int4Config(4, 16, 32, 1, kernel="gemv")),
    (8, 33, 256, 128, False, Int4Config(8, 32, 128, 3, kernel="gemv")),
    (2, 20, 84, 84, True, Int4Config(2, 16, 32, 2, kernel="gemv")),
    (1, 40, 96, 32, False, Int4Config(1, 32, 32, 2, kernel="gemv-deferred")),
    (5, 33, 256, 128, True, Int4Config(8, 16, 64, 1, kernel="gemv-deferred")),
    # the GEMM unpacking per input channel, then the large-M form: dequantize to a [K, N] buffer, then torch.mm
    (17, 33, 128, 128, False, Int4Config(16, 32, 32, 3, kernel="dot-rows")),
    (4, 20, 84, 84, True, Int4Config(16, 16, 32, 2, kernel="dot-rows")),
    (5, 40, 96, 32, False, Int4Config(16, 16, 64, 1, kernel="dot-rows")),
    (17, 33, 128, 128, False, Int4Config(0, 16, 32, 1, kernel="dequant")),
    (5, 40, 96, 32, True, Int4Config(0, 32, 16, 1, kernel="dequant")),
    (3, 20, 84, 84, False, Int4Config(0, 16, 64, 1, kernel="dequant")),
]


@pytest.mark.parametrize("m,n,k,group,symmetric,config", INT4_CASES)
def test_int4_gemm_matches_dequantized_reference(m, n, k, group, symmetric, config) -> None:
    weight = Int4Weight.rtn(rand(n, k, seed=k), group, symmetric)
    x = rand(m, k, seed=m)
    packed = ops.pack_int4_for_triton(weight.q)
    scales = weight.scales.t().contiguous()
    zeros = None if symmetric else weight.zeros.t().contiguous()
    assert torch.equal(ops.int4_dequantize(packed, scales, zeros, group, k), weight.dequantize().t())
    expected = x @ weight.dequantize().t()
    got = int4_matmul(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), None if zeros is None else zeros.to(DEVICE),
                      group, config)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-4)
    # bf16 activations and scales, fp32 accumulation: compare with the same rounding of the inputs.
    xb, sb = x.bfloat16(), scales.bfloat16()
    zb = None if zeros is None else zeros.bfloat16()
    expected_bf16 = xb.float() @ ops.int4_dequantize(packed, sb, zb, group, k)
    got_bf16 = int4_matmul(xb.to(DEVICE), packed.to(DEVICE), sb.to(DEVICE), None if zb is None else zb.to(DEVICE),
                           group, config)
    assert got_bf16.dtype == torch.bfloat16
    # Weights rounded to bf16 (a tl.dot operand, or the dequantized buffer) and a bf16 output: errors
    # scale with the output's magnitude, so the absolute tolerance does too.
    atol = max(2e-2, 1e-2 * expected_bf16.abs().max().item())
    torch.testing.assert_close(got_bf16.float().cpu(), expected_bf16, rtol=2e-2, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,group", [(96, 32), (100, 100)])  # tiles straddling groups; K not a multiple of 8
def test_int4_dequantize_kernel_rounds_like_torch(dtype, k, group) -> None:
    from optcli.engine.kernels.int4_dequant import int4_dequantize

    n = 48
    weight = Int4Weight.rtn(rand(n, k, seed=5), group, symmetric=False)
    packed, scales, zeros = ops.pack_int4_for_triton(weight.q), weight.scales.t().contiguous(), weight.zeros.t().contiguous()
    expected = ops.int4_dequantize(packed, scales, zeros, group, k).to(dtype)
    got = int4_dequantize(packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, k, dtype, block_rows=4, block_n=32)
    assert torch.equal(got.cpu(), expected)


def test_int4_candidates_offer_gemv_for_decode_and_dequant_for_large_batches() -> None:
    from optcli.engine.kernels.int4_matmul import int4_candidates

    assert {c.kernel for c in int4_candidates(1, 2048, 2048, 128)} == {"dot", "gemv", "gemv-deferred"}
    assert all(c.bm == 4 for c in int4_candidates(3, 2048, 2048, 128) if c.kernel.startswith("gemv"))
    assert {c.kernel for c in int4_candidates(16, 2048, 2048, 128)} == {"dot"}  # GEMV only up to 8 rows
    assert {c.kernel for c in int4_candidates(8, 2048, 2048, 24)} == {"dot"}  # a tile would straddle groups
    assert {c.kernel for c in int4_candidates(32, 2048, 2048, 128)} == {"dot", "dot-rows", "dequant"}
    assert {c.kernel for c in int4_candidates(1024, 2048, 2048, 128)} == {"dot", "dot-rows", "dequant"}
    assert int4_candidates(1, 2048, 2048, 128)[0].kernel == "dot"  # the untimed default stays the tested one


def test_int4_config_splits_k_only_for_thin_batches() -> None:
    assert int4_config(1, 2048, 2048, 128).split_k > 1  # decode: 32 tiles cannot fill an H100 alone
    assert int4_config(1024, 2048, 2048, 128).split_k == 1
    assert int4_config(1, 16384, 2048, 128).split_k == 1  # enough output tiles already


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_per_token_quantization_matches_torch(dtype) -> None:
    x = rand(7, 300, seed=1, scale=3.0)
    x[2] = 0.0  # a padded row: scale must not be zero
    x[3, 5] = 1000.0  # an outlier sets its own row's scale only
    q, scales = quantize_per_token(x.to(DEVICE), dtype)
    ref_q, ref_scales = ops.quantize_per_token(x, dtype)
    torch.testing.assert_close(scales.cpu(), ref_scales)
    assert torch.equal(q.cpu().float(), ref_q.float())
    assert torch.isfinite(q.float()).all() and q.float()[2].abs().max() == 0


@pytest.mark.parametrize("m,n,k,config", [(3, 48, 64, Int8Config(16, 16, 32, 2)), (20, 40, 72, None),
                                          (1, 16, 256, Int8Config(16, 16, 32, 4))])
def test_int8_gemm_matches_exact_integer_reference(m, n, k, config) -> None:
    xq, xs = ops.quantize_per_token(rand(m, k, seed=m, scale=2.0), torch.int8)
    weight = Int8Weight.rtn(rand(n, k, seed=n))
    expected = (xq.double() @ weight.q.double().t()).float() * xs * weight.scales
    got = int8_matmul(xq.to(DEVICE), xs.to(DEVICE), weight.q.to(DEVICE), weight.scales.to(DEVICE), torch.float32, config)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-4)


def fake_quant(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, s = ops.quantize_per_token(x, dtype)
    return q.float() * s


@pytest.mark.parametrize("backend", ["cpu", "dequant", "triton"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_paths_agree_with_act_order(backend, symmetric) -> None:
    n, k, group = 32, 128, 32
    dense = rand(n, k, seed=3)
    weight = Int4Weight.rtn(dense, group, symmetric)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    # An act-order checkpoint: group g holds input channels perm[g*32:(g+1)*32], stored in that order.
    ordered = Int4Weight.rtn(dense[:, perm], group, symmetric)
    ordered.perm = perm
    for w in (weight, ordered):
        layer = Int4Linear(w, bias=torch.arange(n, dtype=torch.float32), device=DEVICE if backend == "triton" else "cpu",
                           backend=backend)
        x = rand(5, k, seed=4)
        expected = x @ w.dequantize().t() + torch.arange(n)
        torch.testing.assert_close(layer(x.to(layer.qweight.device)).cpu(), expected, rtol=1e-5, atol=1e-4)
    assert (ordered.dequantize() - dense).abs().max() < (dense.abs().max() / 7)


@pytest.mark.parametrize("backend", ["cpu", "dequant", "triton"])
def test_int8_linear_quantizes_activations_per_token(backend) -> None:
    weight = Int8Weight.rtn(rand(48, 64, seed=5))
    layer = Int8Linear(weight, device=DEVICE if backend == "triton" else "cpu", backend=backend)
    x = rand(6, 64, seed=6, scale=2.0)
    expected = fake_quant(x, torch.int8) @ weight.dequantize().t()
    torch.testing.assert_close(layer(x.to(layer.qweight.device)).cpu(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "dequant"])
def test_fp8_linear_quantizes_activations_per_token(backend) -> None:
    weight = Fp8Weight.rtn(rand(48, 64, seed=7))
    layer = Fp8Linear(weight, backend=backend)
    x = rand(6, 64, seed=8, scale=2.0)
    expected = fake_quant(x, torch.float8_e4m3fn) @ weight.dequantize().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_weight_only_int8_and_mixed_parts() -> None:
    weight = Int8Weight.rtn(rand(32, 64, seed=9), act_quant=False)
    x = rand(3, 64, seed=10)
    torch.testing.assert_close(Int8Linear(weight)(x), x @ weight.dequantize().t(), rtol=1e-5, atol=1e-4)
    # Fused parts of one format join along output rows; mixed formats fall back to dense.
    a, b = Int4Weight.rtn(rand(16, 64, seed=11), 32), Int4Weight.rtn(rand(32, 64, seed=12), 32)
    joined = cat_weights([a, b])
    assert isinstance(joined, Int4Weight) and joined.shape == (48, 64)
    assert torch.equal(joined.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = cat_weights([a, rand(8, 64, seed=13)])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (24, 64)


# The body of a tests/engine/kernels/sm90_compile.py script: build() and bf come from its prelude.
COMPILE_SCRIPT = """
for zero, aligned in ((True, True), (False, False)):
    for bm, bn, bk, warps in ((16, 64, 128, 4), (128, 128, 64, 8)):
        build("int4_matmul", "_int4_matmul_kernel", dict(x_ptr=bf, w_ptr="*i32", s_ptr=bf, z_ptr=bf, out_ptr="*fp32"),
              dict(GROUP=128, GROUP_ALIGNED=aligned, HAS_ZERO=zero, BM=bm, BN=bn, BK=bk, BY_ROW=bm == 128,
                   PRECISION="tf32", UPCAST_DOT=False))
for bm, zero, deferred in ((1, False, False), (8, True, False), (1, True, True), (4, False, True)):
    build("int4_matmul", "_int4_gemv_kernel", dict(x_ptr=bf, w_ptr="*i32", s_ptr=bf, z_ptr=bf, out_ptr="*fp32"),
          dict(GROUP=128, HAS_ZERO=zero, BM=bm, BN=128, BK=128, DEFERRED=deferred))
build("int4_dequant", "_int4_dequant_kernel", dict(w_ptr="*i32", s_ptr=bf, z_ptr=bf, out_ptr=bf),
      dict(GROUP=128, HAS_ZERO=True, BR=8, BN=128))
build("split_k", "_sum_splits_kernel", dict(part_ptr="*fp32", out_ptr=bf), dict(BLOCK=1024))
for bm in (16, 128):
    build("int8_matmul", "_int8_matmul_kernel", dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32", ws_ptr="*fp32",
          out_ptr=bf), dict(BM=bm, BN=128, BK=128, EXACT_DOT=False))
INT8 = dict(DIVISOR=127.5, QMIN=-128.0, QMAX=127.0, IS_INT=True)
FP8 = dict(DIVISOR=448.0, QMIN=-448.0, QMAX=448.0, IS_INT=False)
for res, out, quant in ((True, bf, None), (False, bf, None), (True, "*i8", INT8), (True, "*fp8e4nv", FP8)):
    build("fused_elementwise", "_rms_norm_kernel", dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, out_ptr=out, res_out_ptr=bf,
          q_ptr=out, scale_ptr="*fp32", eps="fp32"),
          dict(HAS_RESIDUAL=res, BLOCK=2048, QUANT=quant is not None, **(quant or INT8)))
for store in (False, True):
    build("fused_elementwise", "_rotary_kernel", dict(q_ptr=bf, k_ptr=bf, cos_ptr=bf, sin_ptr=bf, v_ptr=bf,
          k_cache_ptr=bf, v_cache_ptr=bf, slot_ptr="*i32"),
          dict(NUM_Q=32, NUM_K=8, HALF=32, BLOCK_H=32, BLOCK_D=32, STORE=store))
build("fused_elementwise", "_silu_mul_kernel", dict(x_ptr=bf, out_ptr=bf), dict(BLOCK=1024))
for out, quant in (("*i8", INT8), ("*fp8e4nv", FP8)):
    build("fused_elementwise", "_silu_mul_quant_kernel", dict(x_ptr=bf, q_ptr=out, scale_ptr="*fp32"),
          dict(BLOCK=1024, **quant))
for out, is_int in (("*i8", True), ("*fp8e4nv", False)):
    build("act_quant", "_quant_rows_kernel", dict(x_ptr=bf, q_ptr=out, scale_ptr="*fp32"),
          dict(DIVISOR=127.5 if is_int else 448.0, QMIN=-128.0, QMAX=127.0, IS_INT=is_int, BLOCK=1024))
"""


def test_quant_kernels_compile_for_sm90() -> None:
    """Lower the quantized-GEMM and fused elementwise kernels through Triton's real pipeline to an sm_90 cubin (no GPU needed)."""
    from sm90_compile import compile_for_sm90

    compile_for_sm90(COMPILE_SCRIPT)


def test_tuner_keeps_the_fastest_working_candidate_once_per_bucket(monkeypatch, tmp_path) -> None:
    """The selection logic and its on-disk cache (timings faked: the CUDA-graph timing needs a GPU)."""
    from optcli.engine.kernels import tuning

    cache = tmp_path / "tuning.json"
    monkeypatch.setattr(tuning, "_STORE", tuning.SavedChoices(lambda: cache))
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def fake_time(fn):
        config = fn()
        if config == "broken":
            raise RuntimeError("out of shared memory")
        calls.append(config)
        return times[config]

    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "time_in_graph", fake_time)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    built = []
    candidates = lambda: built.append(1) or ["a", "broken", "b", "c"]  # noqa: E731
    assert tuning.pick("k", 3, 64, 128, candidates, lambda c: c) == "b"
    assert tuning.pick("k", 4, 64, 128, candidates, lambda c: c) == "b"  # same bucket (<= 4): cached
    assert calls == ["a", "b", "c"] and len(built) == 1
    assert tuning.chosen() == {"k M<=4 N=64 K=128": "b"}
    assert json.loads(cache.read_text()) == {"k M<=4 N=64 K=128": "'b'"}
    # a new process on the same GPU model: the saved choice, no timing
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "_STORE", tuning.SavedChoices(lambda: cache))
    assert tuning.pick("k", 3, 64, 128, candidates, lambda c: c) == "b" and calls == ["a", "b", "c"]
    # a saved choice that is no longer a candidate is timed again
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    times["d"] = 0.5
    assert tuning.pick("k", 3, 64, 128, lambda: ["a", "c", "d"], lambda c: c) == "d"
    assert json.loads(cache.read_text()) == {"k M<=4 N=64 K=128": "'d'"}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning.pick("k", 5, 64, 128, candidates, lambda c: c) == "a"  # capturing: the default, untimed
