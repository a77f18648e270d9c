"""Every CPU matmul path of the quantized layers against the dequantized reference, and the
per-batch-size choice between them (engine/quant/cpu_choice.py).

Paths that compute in bf16 (allowed when the engine picks the dtype) round the activations or the
summed product to bf16, so they are held to bf16's tolerance; fp32 paths to fp32 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from optcli.engine.quant import cpu_choice, ops
from optcli.engine.quant.linear import Fp8Linear, Int4Linear, Int8Linear
from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight

BF16 = (torch.bfloat16,)


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
def test_every_int8_path_matches_the_reference(monkeypatch, act_quant) -> None:
    weight = Int8Weight.rtn(rand(48, 64, seed=1), act_quant=act_quant)
    layer = Int8Linear(weight, compute_dtypes=BF16)
    expected_paths = {"int8pack-bf16", "dequant"} | ({"int_mm"} if act_quant else set())
    assert set(layer.paths) == expected_paths
    for m in (1, 5, 33):
        x = rand(m, 64, seed=m, scale=2.0)
        want = (fake_quant(x, torch.int8) if act_quant else x) @ weight.dequantize().t()
        for name in layer.paths:
            monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
            close(layer(x), want, bf16=name.endswith("bf16"))


def test_explicit_fp32_offers_no_bf16_path() -> None:
    layer = Int8Linear(Int8Weight.rtn(rand(16, 32, seed=2)))
    assert set(layer.paths) == {"int8pack-fp32", "int_mm", "dequant"}
    int4 = Int4Linear(Int4Weight.rtn(rand(32, 128, seed=3), 32))
    assert int4.cpu_dtype == torch.float32 and int4.scales_zeros.dtype == torch.float32


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_paths_match_the_reference(monkeypatch, symmetric) -> None:
    """The int4 kernel in bf16, and the weight dequantized from that kernel's own packed layout."""
    weight = Int4Weight.rtn(rand(96, 256, seed=4), 64, symmetric)
    layer = Int4Linear(weight, compute_dtypes=BF16)
    assert layer.mode == "cpu" and layer.cpu_dtype == torch.bfloat16 and layer.scales_zeros.dtype == torch.bfloat16
    assert set(layer.paths) == {"int4pack-bf16", "dequant"}
    x = rand(7, 256, seed=5)
    for name in layer.paths:  # both hold the scales in bf16: bf16's tolerance
        monkeypatch.setenv("OPTCLI_CPU_KERNEL", name)
        close(layer(x), x @ weight.dequantize().t(), bf16=True)


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_on_cpu_widens_exactly_and_counts_its_bytes(act_quant) -> None:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    weight = Fp8Weight.rtn(rand(48, 64, seed=6), act_quant=act_quant)
    layer = Fp8Linear(weight)
    assert layer.mode == "fbgemm-fp16" and layer.opaque_bytes == 48 * 64 * 2
    x = rand(6, 64, seed=7, scale=2.0)
    want = (fake_quant(x, torch.float8_e4m3fn) if act_quant else x) @ weight.dequantize().t()
    close(layer(x), want, bf16=False)
    back = layer.quant_weight()  # the fp8 values come back bit for bit
    assert torch.equal(back.q.view(torch.uint8), weight.q.view(torch.uint8))


def test_choice_is_the_fastest_once_per_bucket_and_persists(monkeypatch, tmp_path) -> None:
    from optcli.engine.kernels.tuning import SavedChoices

    cache = tmp_path / "cpu.json"
    monkeypatch.delenv("OPTCLI_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_choice, "_CHOSEN", {})
    monkeypatch.setattr(cpu_choice, "_STORE", SavedChoices(lambda: cache))
    times = {"slow": 3.0, "fast": 1.0}
    timed = []

    def fake_best(fn, x, bound=float("inf")):
        name = fn(x)
        timed.append(name)
        return times[name]

    monkeypatch.setattr(cpu_choice, "_best_seconds", fake_best)
    paths = {"slow": lambda x: "slow", "fast": lambda x: "fast"}
    x3, x4, x9 = torch.zeros(3, 8), torch.zeros(4, 8), torch.zeros(9, 8)
    assert cpu_choice.choose("w8a8", x3, 16, 8, paths) == "fast"
    assert cpu_choice.choose("w8a8", x4, 16, 8, paths) == "fast" and timed == ["slow", "fast"]  # same bucket
    times["slow"] = 0.5
    assert cpu_choice.choose("w8a8", x9, 16, 8, paths) == "slow"  # M <= 16: its own measurement
    saved = json.loads(cache.read_text())
    assert saved == {"w8a8[slow|fast] M<=4 N=16 K=8": "fast", "w8a8[slow|fast] M<=16 N=16 K=8": "slow"}
    # a new process on this CPU: the saved choice, no timing
    monkeypatch.setattr(cpu_choice, "_CHOSEN", {})
    monkeypatch.setattr(cpu_choice, "_STORE", SavedChoices(lambda: cache))
    timed.clear()
    assert cpu_choice.choose("w8a8", x3, 16, 8, paths) == "fast" and timed == []
    # forcing a path by name (where offered)
    monkeypatch.setenv("OPTCLI_CPU_KERNEL", "slow")
    assert cpu_choice.choose("w8a8", x3, 16, 8, paths) == "slow"


def test_tied_head_reads_the_embedding_itself() -> None:
    from safetensors import safe_open

    from optcli.builtin import model_dir
    from optcli.engine import Engine

    path = model_dir("tiny-llama")
    engine = Engine(str(path), dtype="float32", max_model_len=128)
    model = engine.model
    assert model.cfg.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    with safe_open(path / "model.safetensors", "pt") as f:  # the checkpoint holds the tied matrix once
        params = sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())
    assert engine.weights_bytes == params * 4


def test_int8_head_holds_the_tied_matrix_once_in_int8() -> None:
    from optcli.builtin import model_dir
    from optcli.engine import Engine, SamplingParams

    path = str(model_dir("tiny-llama"))
    dense = Engine(path, dtype="float32", max_model_len=128)
    int8 = Engine(path, dtype="float32", max_model_len=128, lm_head="int8")
    vocab, hidden = dense.model.cfg.vocab_size, dense.model.cfg.hidden_size
    # fp32 -> int8, plus a scale per row and the kernel's vector of ones
    assert dense.weights_bytes - int8.weights_bytes == vocab * hidden * 3 - vocab * 8
    cost = int8.head_cost()
    assert cost["tied"] and cost["head_bytes"] == vocab * hidden + vocab * 4 + vocab * 4  # q, scales, ones
    ids = list(range(3, 120))
    ref, got = dense.score(ids), int8.score(ids)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9  # a small, real accuracy cost
    assert int8.generate([ids[:8]], SamplingParams(max_tokens=4))[0].token_ids


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
