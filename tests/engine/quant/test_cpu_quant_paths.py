"""Every CPU matmul path of the quantized layers against the dequantized reference (the rules that pick
between them: test_cpu_choice.py).

Paths that compute in bf16 (allowed when the engine picks the dtype) round the activations or the
summed product to bf16, so they are held to bf16's tolerance; fp32 paths to fp32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from optcli.engine.kernels import cpu_amx, cpu_caps, cpu_lowbit
from optcli.engine.kernels import quant_reference as ops
from optcli.engine.quant.fp8_linear import Fp8Linear
from optcli.engine.quant.linear import Int4Linear, Int8Linear
from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight

BF16 = (torch.bfloat16,)
HAS_LOWBIT = cpu_lowbit.library() is not None
LOWBIT_Q8 = {"q8q8-avx2"} if HAS_LOWBIT else set()
INT_MM = {"int_mm"} if cpu_caps.detect().vnni else set()  # without VNNI torch's _int_mm is reference loops
needs_lowbit = pytest.mark.skipif(not HAS_LOWBIT, reason="no AVX2 CPU or no C compiler here")
HAS_AMX = cpu_amx.library() is not None
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="no AMX-INT8 CPU here (or the kernel did not grant tile state)")


@pytest.fixture
def no_amx(monkeypatch):
    """The layers as on a CPU without AMX or AVX-512 VNNI: the paths that AMX's single layout would replace."""
    monkeypatch.setattr(cpu_amx, "library", lambda: None)
    monkeypatch.setattr(cpu_amx, "vnni_library", lambda: None)


def test_the_avx2_kernels_build_in_ci() -> None:
    """CI's machine is an AVX2 x86 CPU with a C compiler: the kernels must build there, not fall back."""
    if os.environ.get("CI") == "true" and cpu_lowbit._cpu_has_avx2():
        assert HAS_LOWBIT, "cpu_lowbit.c did not build (see the warning logged by cpu_lowbit.library)"


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def fake_quant(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, s = ops.quantize_per_token(x, dtype)
    return q.float() * s


def close(got: torch.Tensor, want: torch.Tensor, bf16: bool) -> None:
    tol = dict(rtol=2e-2, atol=2e-2 * want.abs().max().item()) if bf16 else dict(rtol=1e-5, atol=1e-4)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("act_quant", [True, False])
def test_every_int8_path_matches_the_reference(monkeypatch, no_amx, act_quant) -> None:
    weight = Int8Weight.rtn(rand(48, 64, seed=1), act_quant=act_quant)
    layer = Int8Linear(weight, compute_dtypes=BF16)
    lowbit = ({*INT_MM, *LOWBIT_Q8} if act_quant else {"i8w-dot", "i8w-panels"} if HAS_LOWBIT else set())
    expected_paths = {"int8pack-bf16", "dequant"} | lowbit
    assert set(layer.paths) == expected_paths
    for m in (1, 5, 33):
        x = rand(m, 64, seed=m, scale=2.0)
        want = (fake_quant(x, torch.int8) if act_quant else x) @ weight.dequantize().t()
        for name in layer.paths:
            monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
            close(layer(x), want, bf16=name.endswith("bf16"))


def test_a_weight_at_an_odd_address_is_copied_aligned(monkeypatch, no_amx) -> None:
    """A checkpoint's int8 tensor can start 8 bytes into a 64-byte line (safetensors offsets); torch's
    AVX-512 int8 kernel segfaults on it, so the layer holds an aligned copy and every path runs."""
    rounded = Int8Weight.rtn(rand(64, 64, seed=6), act_quant=True)
    buffer = torch.empty(64 * 64 + 64, dtype=torch.int8)
    odd = buffer[8 : 8 + 64 * 64].view(64, 64)
    odd.copy_(rounded.q)
    assert odd.data_ptr() % 64 == 8
    layer = Int8Linear(Int8Weight(odd, rounded.scales, True), compute_dtypes=BF16)
    assert layer.qweight.data_ptr() % 64 == 0
    x = rand(5, 64, seed=7)
    for name in layer.paths:
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
        close(layer(x), fake_quant(x, torch.int8) @ rounded.dequantize().t(), bf16=True)


def test_explicit_fp32_offers_no_bf16_path() -> None:
    layer = Int8Linear(Int8Weight.rtn(rand(16, 32, seed=2)))
    assert set(layer.paths) == {"int8pack-fp32", "dequant", *INT_MM, *LOWBIT_Q8}
    int4 = Int4Linear(Int4Weight.rtn(rand(32, 128, seed=3), 32))
    assert int4.cpu_dtype == torch.float32 and int4.scales_zeros.dtype == torch.float32


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_paths_of_torch_match_the_reference(monkeypatch, no_amx, symmetric) -> None:
    """Without our AVX2 kernels: the int4 kernel in bf16, and the weight dequantized from that
    kernel's own packed layout. N = 128: torch packs blocks of 64 rows on AVX-512 (32 on AVX2) and a
    tail block differently, and only whole simple blocks get a dequant path (`_int4pack_blocks`)."""
    monkeypatch.setattr(cpu_lowbit, "library", lambda: None)
    weight = Int4Weight.rtn(rand(128, 256, seed=4), 64, symmetric)
    layer = Int4Linear(weight, compute_dtypes=BF16)
    assert layer.mode == "cpu" and layer.cpu_dtype == torch.bfloat16 and layer.scales_zeros.dtype == torch.bfloat16
    assert set(layer.paths) == {"int4pack-bf16", "dequant"}
    x = rand(7, 256, seed=5)
    for name in layer.paths:  # both hold the scales in bf16: bf16's tolerance
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
        close(layer(x), x @ weight.dequantize().t(), bf16=True)


@needs_lowbit
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("n", "k", "group"), [(96, 256, 64), (44, 512, 128), (24, 1024, 512)])
def test_int4_avx2_paths_match_the_reference(monkeypatch, no_amx, symmetric, n, k, group) -> None:
    """Our kernel's layout only (no second copy of the weight); the q4 x q8 path equals its plain-PyTorch
    statement to fp32 rounding and the dequantized reference to int8-activation rounding; dequant
    from that layout equals the reference to fp32 rounding. N = 44 pads to 48 columns."""
    weight = Int4Weight.rtn(rand(n, k, seed=4), group, symmetric)
    assert set(Int4Linear(weight).paths) == {"dequant"}  # explicit fp32: no int8 rounding of activations
    layer = Int4Linear(weight, compute_dtypes=BF16)
    assert layer.mode == "cpu" and set(layer.paths) == {"q4q8-avx2", "dequant"}
    assert not hasattr(layer, "scales_zeros") and layer.qweight.numel() == -(-n // 8) * 8 * k // 2
    block = layer.block
    scales = weight.scales.repeat_interleave(group // block, 1)
    zeros = None if weight.zeros is None else weight.zeros.repeat_interleave(group // block, 1)
    for m in (1, 3, 70):  # 70: two row tiles of the kernel
        x = rand(m, k, seed=m, scale=2.0)
        want = x @ weight.dequantize().t()
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", "q4q8-avx2")
        got = layer(x)
        close(got, cpu_lowbit.reference_q4_gemm(x, weight.q, scales, zeros, block), bf16=False)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", "dequant")
        close(layer(x), want, bf16=False)


@needs_lowbit
def test_avx2_kernel_layouts_and_exact_int8_sums() -> None:
    q = torch.randint(0, 16, (13, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = cpu_lowbit.pack_q4(q)
    assert packed.shape == (2, 2, 8, 32) and torch.equal(cpu_lowbit.unpack_q4(packed, 13), q)
    scales = torch.rand(13, 3, generator=torch.Generator().manual_seed(2))
    columns = cpu_lowbit.pack_columns(scales)  # [N/8, G, 8]: a block of 8 columns' values together
    assert columns.shape == (2, 3, 8) and torch.equal(columns[1, 2, :5], scales[8:, 2]) and not columns[1, :, 5:].any()
    assert torch.equal(cpu_lowbit.unpack_columns(columns, 13), scales)
    assert cpu_lowbit.q4_block(128, 32) is None and cpu_lowbit.q4_block(96, 96) is None  # not multiples of 64
    assert cpu_lowbit.q4_block(4096, 4096) == 256 and cpu_lowbit.q4_block(256, 128) == 128
    # every int8 value, -128 included, on both sides: bit for bit the int32 reference
    g = torch.Generator().manual_seed(1)
    # M <= 4: one row a stream; more: panels of 16 columns x 512 inputs (a last partial panel of inputs at
    # K = 1040, rows past the last tile of 6, columns past the last panel)
    for m, k, n in ((1, 16, 1), (3, 80, 6), (4, 4096, 5), (5, 48, 9), (67, 256, 20), (13, 1040, 35), (64, 2048, 48)):
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        xq[0, :] = -128
        wq[0, :] = -128
        xs, ws = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
        assert torch.equal(cpu_lowbit.q8_gemm(xq, xs, wq, ws), ops.int8_scaled_mm(xq, xs, wq, ws, torch.float32))
    # W8A8's activation quantization in C, bit for bit torch's: ties (x / scale = k + 0.5) round to
    # even, an all-zero row takes the minimum scale, K not a multiple of 8
    for m, k in ((1, 16), (6, 37), (3, 2048)):
        x = torch.randn(m, k, generator=g) * 3
        x[0, :4] = torch.tensor([2.5, -2.5, 127.5, -127.5]) * (x[0].abs().max() / 127.5)
        if m > 2:
            x[2] = 0
        want_q, want_s = ops.quantize_per_token(x, torch.int8)
        got_q, got_s = cpu_lowbit.quantize_rows_int8(x)
        assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
        w = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g)
        ws = torch.rand(5, generator=g)
        if k % 16 == 0:
            assert torch.equal(cpu_lowbit.q8_linear(x, w, ws), ops.int8_scaled_mm(want_q, want_s, w, ws, torch.float32))


@needs_lowbit
def test_int8_activation_rounding_costs_little_on_a_trained_model(tmp_path, monkeypatch) -> None:
    """W4A16 through the int8-activation kernel (AMX's or VNNI's where the CPU has them, else the AVX2 q4 x q8) against
    the same artifact dequantized, on real text (the builtin trained model, the shared stories text): the
    activations' int8 rounding per block must cost far less than the 4-bit weights themselves."""
    from helpers import shared_data
    from transformers import AutoTokenizer

    from optcli.builtin import model_dir
    from optcli.engine import Engine
    from optcli.quantize.pipeline import quantize

    quantize("builtin:tiny-llama", "w4a16-rtn", tmp_path / "w4", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir("tiny-llama"))
    ids = tokenizer(shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:4000])["input_ids"][:512]
    fast = "q4-amx" if HAS_AMX else "q4-vnni" if cpu_amx.vnni_library() is not None else "q4q8-avx2"
    logp = {}
    for path in (fast, "dequant"):
        if path == "dequant":
            monkeypatch.setattr(cpu_amx, "library", lambda: None)  # AMX's layout has no dequant path
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", path)
        engine = Engine(str(tmp_path / "w4"), max_model_len=640)
        assert path in engine.model.layers[0].down_proj.paths
        logp[path] = engine.score(ids).float().log_softmax(-1)
    source = Engine(str(model_dir("tiny-llama")), max_model_len=640).score(ids).float().log_softmax(-1)

    def kld(p: torch.Tensor, q: torch.Tensor) -> float:
        return (p.exp() * (p - q)).sum(-1).mean().item()

    rounding, weights = kld(logp["dequant"], logp[fast]), kld(source, logp["dequant"])
    agree = (logp["dequant"].argmax(-1) == logp[fast].argmax(-1)).float().mean().item()
    assert rounding < 0.25 * weights and agree > 0.97, (rounding, weights, agree)


@needs_amx
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 64, 128, 64), (5, 96, 256, 128), (37, 32, 512, 128),
                                                    (70, 128, 1024, 256)])
def test_amx_q4_layer_matches_its_statement_and_the_reference(monkeypatch, symmetric, m, n, k, group) -> None:
    """AMX's int4 path: one layout (4 bits a weight), its bf16 output equal to `reference_q4_gemm` (int8
    activations per row and group, exact integer sums) to bf16 rounding, and to the dequantized product
    to int8-activation rounding. M = 37 and 70 leave partial 16-row tiles; an explicit fp32 keeps it out."""
    weight = Int4Weight.rtn(rand(n, k, seed=4), group, symmetric)
    assert "q4-amx" not in Int4Linear(weight).paths
    layer = Int4Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert set(layer.paths) == {"q4-amx"} and layer.qweight.numel() == n * k // 2
    x = rand(m, k, seed=m, scale=2.0).bfloat16()
    got = layer(x).float()
    statement = cpu_amx.reference_q4_gemm(x, weight.q, weight.scales, weight.zeros, group)
    torch.testing.assert_close(got, statement, rtol=8e-3, atol=8e-3 * statement.abs().max().item())
    want = x.float() @ weight.dequantize().t()
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2 * want.abs().max().item())


@pytest.mark.skipif(cpu_amx.vnni_library() is None, reason="no AVX-512 VNNI + BF16 CPU here")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 64, 128, 64), (2, 96, 256, 128), (5, 32, 512, 128),
                                                    (19, 128, 1024, 256), (70, 64, 256, 64), (1, 48, 128, 32),
                                                    (7, 80, 192, 16), (1, 16, 64, 64)])
def test_vnni_q4_layer_matches_its_statement_and_the_reference(monkeypatch, symmetric, m, n, k, group) -> None:
    """W4A16 on AVX-512 VNNI alone (no tiles; every M, row tiles of 8 with a partial last one): AMX's layout and
    `reference_q4_gemm`'s numbers (int8 activations per row and group, exact integer sums) to bf16 rounding."""
    monkeypatch.setattr(cpu_amx, "library", lambda: None)
    weight = Int4Weight.rtn(rand(n, k, seed=4), group, symmetric)
    layer = Int4Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert set(layer.paths) == {"q4-vnni"} and layer.qweight.numel() == n * k // 2
    x = rand(m, k, seed=m, scale=2.0).bfloat16()
    got = layer(x).float()
    statement = cpu_amx.reference_q4_gemm(x, weight.q, weight.scales, weight.zeros, group)
    torch.testing.assert_close(got, statement, rtol=8e-3, atol=8e-3 * statement.abs().max().item())
    want = x.float() @ weight.dequantize().t()
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2 * want.abs().max().item())


@pytest.mark.skipif(cpu_amx.vnni_library() is None, reason="no AVX-512 VNNI + BF16 CPU here")
def test_vnni_w8a8_layer_matches_the_int8_reference(monkeypatch) -> None:
    """W8A8 on VNNI alone: the activations shifted to unsigned for dpbusd and the shift taken off again
    (exact int32 sums), per-token and per-channel scales as the reference, at 1 to 19 rows."""
    monkeypatch.setattr(cpu_amx, "library", lambda: None)
    weight = Int8Weight.rtn(rand(96, 192, seed=8), act_quant=True)
    layer = Int8Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert set(layer.paths) == {"q8-vnni"} and torch.equal(layer.quant_weight().q, weight.q)
    g = torch.Generator().manual_seed(3)
    for m in (1, 2, 5, 19):
        x = (torch.randn(m, 192, generator=g) * 3).bfloat16()
        xq, xs = ops.quantize_per_token(x, torch.int8)
        want = ops.int8_scaled_mm(xq, xs, weight.q, weight.scales, torch.float32)
        torch.testing.assert_close(layer(x).float(), want, rtol=8e-3, atol=8e-3 * want.abs().max().item())


@needs_amx
def test_amx_w8a8_layer_matches_the_int8_reference_and_round_trips_its_weight() -> None:
    """W8A8 on AMX: compressed-tensors' per-token int8 activations (bit for bit `ops.quantize_per_token`),
    exact int32 sums, per-channel scales; the weight held in AMX's layout and given back unchanged."""
    weight = Int8Weight.rtn(rand(96, 192, seed=8), act_quant=True)
    layer = Int8Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert set(layer.paths) == {"q8-amx"} and torch.equal(layer.quant_weight().q, weight.q)
    g = torch.Generator().manual_seed(3)
    for m in (1, 17, 40):
        x = (torch.randn(m, 192, generator=g) * 3).bfloat16()
        xq, xs = ops.quantize_per_token(x, torch.int8)
        qa, sa, _ = cpu_amx.quantize_groups(x, 192)
        assert torch.equal(qa, xq) and torch.equal(sa, xs)
        want = ops.int8_scaled_mm(xq, xs, weight.q, weight.scales, torch.float32)
        torch.testing.assert_close(layer(x).float(), want, rtol=8e-3, atol=8e-3 * want.abs().max().item())


@needs_amx
@pytest.mark.parametrize("act_quant", [True, False])
def test_amx_fp8_layer_widens_every_code_exactly_on_the_bf16_tiles(act_quant) -> None:
    """FP8 on AMX: every E4M3 code widened exactly (a one-hot activation reads the weight back), the
    layer's product equal to the reference to bf16 rounding, one byte a weight, and the weight given back."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # every finite code
    for start in range(0, len(codes), 256):
        w = codes[(torch.arange(32 * 32) + start) % len(codes)].reshape(32, 32).view(torch.float8_e4m3fn)
        got = cpu_amx.fp8_gemm(torch.eye(32).bfloat16(), cpu_amx.pack_fp8(w), torch.ones(32), None, 32)
        assert torch.equal(got.float(), w.float().t())
    weight = Fp8Weight.rtn(rand(64, 96, seed=6), act_quant=act_quant)
    layer = Fp8Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert layer.mode == "cpu-amx" and set(layer.paths) == {"fp8-amx"} and layer.qweight.numel() == 64 * 96
    for m in (1, 19, 40):
        x = rand(m, 96, seed=7 + m, scale=2.0).bfloat16()
        want = (fake_quant(x.float(), torch.float8_e4m3fn) if act_quant else x.float()) @ weight.dequantize().t()
        got = layer(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3 * want.abs().max().item())
    assert torch.equal(layer.quant_weight().q.view(torch.uint8), weight.q.view(torch.uint8))


@pytest.mark.skipif(cpu_amx.vnni_library() is None, reason="no AVX-512 VNNI + BF16 CPU here")
@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_on_avx512_bf16_widens_every_code_exactly(monkeypatch, act_quant) -> None:
    """FP8 on AVX-512 BF16 dot products (no tiles): every E4M3 code widened exactly (one-hot rows read the
    weight back, on the streaming path at <= 8 rows and the buffered one above), and the layer's product equal
    to the reference to bf16 rounding, one byte a weight, N a multiple of 16 only."""
    monkeypatch.setattr(cpu_amx, "library", lambda: None)
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    w = codes[torch.arange(16 * 256) % len(codes)].reshape(16, 256).view(torch.float8_e4m3fn)
    eye = torch.eye(256).bfloat16()
    for rows in (range(0, 8), range(8, 40)):
        got = cpu_amx.vnni_fp8_gemm(eye[rows.start:rows.stop], cpu_amx.pack_fp8(w), torch.ones(16), None, 16)
        assert torch.equal(got.float(), w.float().t()[rows.start:rows.stop])
    weight = Fp8Weight.rtn(rand(48, 96, seed=6), act_quant=act_quant)
    layer = Fp8Linear(weight, dtype=torch.bfloat16, compute_dtypes=BF16)
    assert layer.mode == "cpu-avx512" and set(layer.paths) == {"fp8-bf16dot"} and layer.qweight.numel() == 48 * 96
    for m in (1, 5, 19):
        x = rand(m, 96, seed=7 + m, scale=2.0).bfloat16()
        want = (fake_quant(x.float(), torch.float8_e4m3fn) if act_quant else x.float()) @ weight.dequantize().t()
        torch.testing.assert_close(layer(x).float(), want, rtol=8e-3, atol=8e-3 * want.abs().max().item())
    assert torch.equal(layer.quant_weight().q.view(torch.uint8), weight.q.view(torch.uint8))


@needs_lowbit
@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_on_cpu_keeps_one_byte_a_weight_and_widens_exactly(monkeypatch, no_amx, act_quant) -> None:
    weight = Fp8Weight.rtn(rand(48, 64, seed=6), act_quant=act_quant)
    layer = Fp8Linear(weight)
    torch_paths = {"dequant", "scaled_mm"} if act_quant else {"dequant"}  # the same E4M3 bytes, torch's code
    assert layer.mode == "cpu-lowbit" and set(layer.paths) == {"fp8-dot", "fp8-panels", "widen-onednn", *torch_paths}
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.opaque_bytes == 0  # 1 byte a weight
    for m in (1, 3, 6, 19):
        x = rand(m, 64, seed=7 + m, scale=2.0)
        want = (fake_quant(x, torch.float8_e4m3fn) if act_quant else x) @ weight.dequantize().t()
        for name in layer.paths:
            monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
            close(layer(x), want, bf16=False)
    assert torch.equal(layer.quant_weight().q.view(torch.uint8), weight.q.view(torch.uint8))


@needs_lowbit
def test_fp8_kernels_widen_every_e4m3_value_exactly() -> None:
    """Each non-NaN byte (subnormals, +-0, +-448) against an identity: the product is the value itself."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 254 values
    w = codes.view(torch.float8_e4m3fn).repeat(20, 1)  # N = 20: one panel of 16 and 4 columns past it
    eye = torch.eye(codes.numel())
    for m, panels in ((1, False), (4, False), (7, False), (254, True), (5, True)):
        got = cpu_lowbit.fp8_gemm(eye[:m].contiguous(), w, panels=panels)
        assert torch.equal(got, w.float()[:, :m].t()), (m, panels)
    odd = torch.cat([codes, codes[:13]]).view(torch.float8_e4m3fn)  # 267: past the last 16
    assert torch.equal(cpu_lowbit.fp8_widen(odd), odd.float()) and torch.equal(cpu_lowbit.fp8_widen(w), w.float())
    x = rand(9, 300, seed=11)  # K past a panel's 256 inputs, and not a multiple of 16
    w = (rand(37, 300, seed=12) * 40).to(torch.float8_e4m3fn)
    want = (x.double() @ w.double().t()).float()
    bound = 1e-6 * (x.abs() @ w.float().abs().t()).max().item()  # fp32 summation of 300 products
    for panels in (False, True):
        torch.testing.assert_close(cpu_lowbit.fp8_gemm(x, w, panels=panels), want, rtol=0, atol=bound)


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_without_our_kernels_widens_to_fp16_for_fbgemm(act_quant) -> None:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    weight = Fp8Weight.rtn(rand(48, 64, seed=6), act_quant=act_quant)
    layer = Fp8Linear(weight, backend="fbgemm-fp16")
    assert layer.mode == "fbgemm-fp16" and layer.opaque_bytes == 48 * 64 * 2
    x = rand(6, 64, seed=7, scale=2.0)
    want = (fake_quant(x, torch.float8_e4m3fn) if act_quant else x) @ weight.dequantize().t()
    close(layer(x), want, bf16=False)
    back = layer.quant_weight()  # the fp8 values come back bit for bit
    assert torch.equal(back.q.view(torch.uint8), weight.q.view(torch.uint8))


def test_tied_head_reads_the_embedding_itself() -> None:
    from safetensors import safe_open

    from optcli.builtin import model_dir
    from optcli.engine import Engine

    path = model_dir("tiny-llama")
    engine = Engine(str(path), dtype="float32", max_model_len=128)
    model = engine.model
    assert model.cfg.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    # the checkpoint holds the tied matrix once; its bf16 matrices stay bf16 where our kernels run
    # them (fp32 math on the widened values), its norms are fp32
    with safe_open(path / "model.safetensors", "pt") as f:
        shapes = [f.get_slice(name).get_shape() for name in f.keys()]
    assert engine.weights_bytes == sum(torch.Size(s).numel() * (2 if HAS_LOWBIT and len(s) == 2 else 4) for s in shapes)


def test_int8_head_holds_the_tied_matrix_once_in_int8() -> None:
    from optcli.builtin import model_dir
    from optcli.engine import Engine, SamplingParams

    path = str(model_dir("tiny-llama"))
    dense = Engine(path, dtype="float32", max_model_len=128)
    int8 = Engine(path, dtype="float32", max_model_len=128, lm_head="int8")
    vocab, hidden = dense.model.cfg.vocab_size, dense.model.cfg.hidden_size
    # fp32 -> int8, plus a scale per row and the kernel's vector of ones
    # bf16 (held as such where our kernels run) or fp32 -> int8, plus a scale per row and the kernel's ones
    assert dense.weights_bytes - int8.weights_bytes == vocab * hidden * (1 if HAS_LOWBIT else 3) - vocab * 8
    cost = int8.head_cost()
    assert cost["tied"] and cost["head_bytes"] == vocab * hidden + vocab * 4 + vocab * 4  # q, scales, ones
    ids = list(range(3, 120))
    ref, got = dense.score(ids), int8.score(ids)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9  # a small, real accuracy cost
    assert int8.generate([ids[:8]], SamplingParams(max_tokens=4))[0].token_ids


@needs_amx
def test_int8_head_on_amx_runs_on_the_tiles_and_embeds_from_their_layout() -> None:
    """`--lm-head int8` with 16-bit activations on an AMX CPU: W8A8 on the int8 tiles, the tied embedding
    read from the tiles' layout (the same rows as the plain matrix), one int8 copy of the matrix."""
    from optcli.builtin import model_dir
    from optcli.engine import Engine

    path = str(model_dir("tiny-llama"))
    dense, int8 = Engine(path, max_model_len=128), Engine(path, max_model_len=128, lm_head="int8")
    head = int8.model.lm_head
    assert set(head.paths) == {"q8-amx"} and int8.model.cfg.tie_word_embeddings
    ids = torch.tensor([0, 3, 17, 300, int8.model.cfg.vocab_size - 1])
    assert torch.equal(head.weight_rows(ids), head.quant_weight().q[ids])
    vocab, hidden = dense.model.cfg.vocab_size, dense.model.cfg.hidden_size
    assert int8.head_cost()["head_bytes"] == vocab * hidden + vocab * 4  # q and the row scales
    tokens = list(range(3, 120))
    assert (dense.score(tokens).argmax(-1) == int8.score(tokens).argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("k", [48, 100, 172])
def test_int8_paths_on_widths_torch_kernels_are_picky_about(monkeypatch, k) -> None:
    """K = 100 and 172 (stories260K's MLP) crash torch's bf16 int8 kernel: those layers must not offer it."""
    weight = Int8Weight.rtn(rand(40, k, seed=k))
    layer = Int8Linear(weight, compute_dtypes=BF16)
    assert ("int8pack-bf16" in layer.paths) == (k % 16 == 0)
    x = rand(5, k, seed=1)
    want = fake_quant(x, torch.int8) @ weight.dequantize().t()
    for name in layer.paths:
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
        close(layer(x), want, bf16=name.endswith("bf16"))
    bf16_model = Int8Linear(Int8Weight.rtn(rand(40, k, seed=2), act_quant=False), dtype=torch.bfloat16)
    assert bf16_model(x.bfloat16()).dtype == torch.bfloat16


@needs_lowbit
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_paths_match_bitsandbytes_dequantization(monkeypatch, quant_type) -> None:
    """Our float kernels on bitsandbytes' own 4-bit layout (GEMV for few rows, dequantize + a dense GEMM
    for many) against bitsandbytes' dequantized weight, in fp32."""
    from optcli.engine.quant.bnb_linear import BnbNf4Linear
    from optcli.engine.quant.weights import BnbNf4Weight

    n, k = 40, 192
    weight = BnbNf4Weight.rtn(rand(n, k, seed=8), 64, quant_type)
    layer = BnbNf4Linear(weight)
    assert layer.mode == "cpu" and set(layer.paths) == {"nf4-avx2", "dequant", "bitsandbytes"}
    assert torch.equal(cpu_lowbit.nf4_dequantize(weight.packed, weight.absmax, weight.code, 64, n, k), weight.dequantize())
    for m in (1, 6):  # 6: a tile of 4 rows and two single rows
        x = rand(m, k, seed=m)
        for name in layer.paths:
            monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
            close(layer(x), x @ weight.dequantize().t(), bf16=False)


@needs_lowbit
@pytest.mark.parametrize("outliers", [False, True])
def test_llm_int8_on_our_int8_gemm_is_bitsandbytes_decomposition(monkeypatch, outliers) -> None:
    """LLM.int8 through our exact int8 GEMM: the same outlier columns and per-row rounding as
    bitsandbytes' CPU code, in fp32 rather than fp16, so it matches bitsandbytes to fp16's rounding
    and a plain-PyTorch statement of the decomposition to fp32's."""
    from optcli.engine.quant.bnb_linear import BnbInt8Linear
    from optcli.engine.quant.weights import BnbInt8Weight

    w = rand(24, 64, seed=9)
    scb = w.abs().amax(1)
    weight = BnbInt8Weight(torch.round(w * (127 / scb[:, None])).to(torch.int8), scb, threshold=6.0)
    layer = BnbInt8Linear(weight)
    assert layer.mode == "cpu" and set(layer.paths) == {"q8q8-avx2", "bitsandbytes"}
    x = rand(5, 64, seed=10)
    if outliers:
        x[1, 3], x[4, 40] = 9.0, -7.5
    cols = (x.abs() >= 6.0).any(0)
    inliers = x.masked_fill(x.abs() >= 6.0, 0)
    row_max = inliers.abs().amax(-1, keepdim=True)
    xq = torch.round(inliers * (127 / row_max)).masked_fill(cols, 0)
    want = (xq @ weight.q.float().t()) * row_max / 127 * scb / 127 + x[:, cols] @ weight.dequantize()[:, cols].t()
    monkeypatch.setenv("OPTCLI_CPU_KERNEL", "q8q8-avx2")
    ours = layer(x)
    close(ours, want, bf16=False)
    monkeypatch.setenv("OPTCLI_CPU_KERNEL", "bitsandbytes")
    torch.testing.assert_close(ours, layer(x), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_lowbit
def test_fp8_activation_rounding_is_torchs_bit_for_bit() -> None:
    """Our vectorized per-token E4M3 rounding equals torch's cast on every grid point and tie: a dense
    sweep of the normal range, the subnormal range, and random rows of three magnitudes."""
    sweeps = [torch.linspace(-448, 448, 400_001)[None],  # amax 448: scale 1, so y = x
              torch.cat([torch.linspace(-0.05, 0.05, 200_001), torch.tensor([448.0])])[None]]
    for scale in (1e-3, 1.0, 100.0):
        sweeps.append(rand(9, 300, seed=11, scale=scale))
    sweeps.append(torch.zeros(2, 64))  # an all-zero row: the minimum scale, zeros out
    for x in sweeps:
        got, scales = cpu_lowbit.fp8_round_rows(x)
        q, want_scales = ops.quantize_per_token(x, torch.float8_e4m3fn)
        assert torch.equal(got, q.float()) and torch.equal(scales, want_scales)


@pytest.mark.skipif(cpu_amx.vnni_library() is None, reason="no AVX-512 VNNI + BF16 CPU here")
def test_bf16_dot_products_are_the_exact_products_summed_in_fp32() -> None:
    """A bf16 model's few-row kernel (bf16-dpbf16): bf16 x bf16 products are exact in fp32, summed in fp32,
    so against a float64 product only fp32 summation error remains; 1-6 rows, K past a 128-wide step."""
    g = torch.Generator().manual_seed(12)
    for m, k, n in ((1, 64, 16), (3, 2048, 40), (6, 160, 7), (4, 96, 33)):
        x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        want = x.double() @ w.double().t()
        got = cpu_amx.vnni_bf16_gemm(x, w).double()
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@needs_lowbit
def test_bf16_weights_stay_bf16_with_fp32_math(monkeypatch) -> None:
    """A bf16 checkpoint in an fp32 CPU model holds its linear weights and embedding in bf16 (half the
    bytes) and computes exactly the fp32 product of the widened values: both kernels against a
    float64 reference, and the engine's logits against the same model held in fp32."""
    from optcli.builtin import model_dir
    from optcli.engine import Engine

    g = torch.Generator().manual_seed(12)
    for m, k, n in ((1, 64, 16), (7, 300, 40), (13, 512, 33), (70, 264, 50)):  # ragged K, N, M
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
        want = x.double() @ w.double().t()
        for panels in (False, True):
            got = cpu_lowbit.bf16_gemm(x, w, panels=panels).double()
            assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    path = str(model_dir("tiny-llama"))
    engine = Engine(path, max_model_len=256, dtype="float32")  # auto would pick bf16 on a CPU with native bf16
    model = engine.model
    assert model.layers[0].qkv_proj.weight.dtype == model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = list(range(3, 200))
    ours = engine.score(ids)
    monkeypatch.setattr(cpu_lowbit, "library", lambda: None)  # no kernels: the weights widen to fp32
    fp32 = Engine(path, max_model_len=256, dtype="float32")
    assert fp32.model.layers[0].qkv_proj.packed is not None and engine.weights_bytes < 0.51 * fp32.weights_bytes
    torch.testing.assert_close(ours, fp32.score(ids), rtol=0, atol=2e-5)
