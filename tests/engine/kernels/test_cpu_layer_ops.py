"""The decoder layer's fp32 norm, RoPE and SiLU-mul as one C call each (`cpu_layer_ops`, `cpu_lowbit_layer_ops.c`) and
`layer_ops.CpuOps`, which runs them: TorchOps' values (RoPE bit for bit, the residual sum bit for bit, the norm and
SiLU to fp32 rounding), on one row and on enough rows for the threaded form, with tails past the 8-lane loops;
what they decline; and the engine on CPU running them."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_layer_ops, cpu_lowbit
from optcli.engine.models.layer_ops import CpuOps, TorchOps

needs_kernel = pytest.mark.skipif(cpu_lowbit.library() is None, reason="the AVX2 kernels are not built here")

ROWS = [1, 3, 70]  # 70 x 2048 is past the C file's PARALLEL_FROM: rows split across threads


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [2048, 100])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_gives_torchops_values(rows, hidden, with_residual) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x, weight = torch.randn(rows, hidden, generator=gen) * 3, torch.randn(hidden, generator=gen)
    residual = torch.randn(rows, hidden, generator=gen) if with_residual else None
    got_h, got_r = cpu_layer_ops.rms_norm(x, weight, 1e-5, residual)
    want_h, want_r = TorchOps.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(got_r, want_r)  # the residual stream: one fp32 add either way
    assert torch.allclose(got_h, want_h, rtol=1e-5, atol=1e-5 * want_h.abs().max().item())
    assert not torch.equal(got_h, torch.zeros_like(got_h))


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize(("heads", "kv", "dim"), [(32, 8, 64), (4, 2, 20)])  # dim 20: a half of 10, past 8 lanes
def test_rope_in_place_is_torchops_bit_for_bit(tokens, heads, kv, dim) -> None:
    gen = torch.Generator().manual_seed(tokens + dim)
    qkv = torch.randn(tokens, (heads + 2 * kv) * dim, generator=gen)  # the fused projection's output, as the layer has it
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv) * dim].view(tokens, kv, dim)
    angles = torch.randn(tokens, dim // 2, generator=gen) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want_q, want_k = TorchOps.rotary(q.clone(), k.clone(), cos, sin)
    v_before = qkv[:, (heads + kv) * dim:].clone()
    assert cpu_layer_ops.rotary_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (heads + kv) * dim:], v_before)  # v, beside them, untouched


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [8192, 13])
def test_silu_mul_gives_torchops_values(rows, width) -> None:
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # e^100 would overflow: the kernel takes e^-|g|
    got, want = cpu_layer_ops.silu_mul(gate_up), TorchOps.silu_mul(gate_up)
    assert got.shape == want.shape == (rows, width)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all()


@needs_kernel
def test_declines_what_it_does_not_take(monkeypatch) -> None:
    x, weight = torch.randn(2, 64), torch.randn(64)
    qkv = torch.randn(2, 6 * 8)
    q, k = qkv[:, :32].view(2, 4, 8), qkv[:, 32:40].view(2, 1, 8)
    cos, sin = torch.ones(2, 8), torch.zeros(2, 8)
    assert cpu_layer_ops.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5) is None  # bf16 rows: TorchOps rounds them
    assert cpu_layer_ops.rms_norm(x.t().contiguous().t(), weight, 1e-5) is None  # not contiguous
    assert cpu_layer_ops.rms_norm(x, weight, 1e-5, torch.randn(1, 64)) is None  # a residual of another shape
    assert cpu_layer_ops.silu_mul(torch.randn(2, 7)) is None  # odd width
    assert not cpu_layer_ops.rotary_(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16())
    strided = torch.randn(2, 8, 4).transpose(1, 2)  # heads not one after another
    before = strided.clone()
    assert not cpu_layer_ops.rotary_(strided, k, cos, sin) and torch.equal(strided, before)
    monkeypatch.setattr(cpu_layer_ops.cpu_lowbit, "library", lambda: None)  # no AVX2 build
    assert cpu_layer_ops.rms_norm(x, weight, 1e-5) is None and cpu_layer_ops.silu_mul(qkv) is None
    assert not cpu_layer_ops.rotary_(q, k, cos, sin)


def test_cpu_ops_fall_through_to_torchops_for_bf16_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(3, 64, generator=gen).bfloat16() for _ in range(3))
    weight = weight[0]
    for got, want in zip(CpuOps.rms_norm(x, weight, 1e-6, residual), TorchOps.rms_norm(x, weight, 1e-6, residual), strict=True):
        assert torch.equal(got, want)
    gate_up = torch.randn(3, 32, generator=gen).bfloat16()
    assert torch.equal(CpuOps.act_mul(gate_up, "silu"), TorchOps.act_mul(gate_up, "silu"))
    assert torch.equal(CpuOps.act_mul(gate_up, "gelu_tanh"), TorchOps.act_mul(gate_up, "gelu_tanh"))


@needs_kernel
def test_the_engine_on_cpu_runs_them_and_decodes_as_torchops(stories_dir) -> None:
    """The same greedy tokens from the CPU engine with CpuOps (its default) and with TorchOps put back, on the real
    stories260K (a prompt and a batch of two; 40 tokens each)."""
    from optcli.engine import Engine, SamplingParams

    engine = Engine(str(stories_dir), device="cpu", dtype="float32", enable_prefix_caching=False, max_model_len=256)
    assert engine.model.ops is CpuOps
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = ["Once upon a time, there was a little girl", "The dog ran to the park and"]
    fused = [o.token_ids for o in engine.generate(prompts, params)]
    engine.model.ops = TorchOps
    assert [o.token_ids for o in engine.generate(prompts, params)] == fused
