"""The MoE grouped GEMM (kernels/moe_gemm.py) against its torch reference and an independent per-expert
loop, the routing plan's invariants, and SparseMoE on the Triton backend against its CPU loop.

Without CUDA the kernel runs on Triton's CPU interpreter, enabled before triton is first imported.
Shapes are tiny, with 16-wide tiles so they still cross M, N and K tile boundaries; expert loads are
uneven (one expert fills more than a block, one gets no tokens).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch import nn  # noqa: E402

from optcli.engine.kernels import triton_available  # noqa: E402
from optcli.engine.kernels.moe_gemm import (  # noqa: E402
    block_m_for,
    grouped_gemm,
    grouped_gemm_reference,
    moe_align,
)
from optcli.engine.kernels.split_k import TileConfig  # noqa: E402
from optcli.engine.models.layer_ops import FusedOps, TorchOps  # noqa: E402
from optcli.engine.models.llama import Dense, LlamaForCausalLM  # noqa: E402
from optcli.engine.models.moe import MoESpec, SparseMoE, grouped_experts  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("error::RuntimeWarning"),  # a NaN/inf from a masked lane
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = TileConfig(16, 16, 16, 1)
# expert 0 takes most pairs (more than one 16-row block), the last expert none
LOAD = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])


def uneven_ids(tokens: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token (as top-k gives), drawn with the skewed LOAD."""
    return torch.multinomial(LOAD.expand(tokens, -1), top_k, replacement=False, generator=gen).to(DEVICE)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 to rounding; bf16 at most an ulp apart, and on few elements: only the fp32 accumulation order
    may differ, which rarely moves a rounding (here on the interpreter none does)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2**-7)
    assert (got != want).float().mean() <= 0.01, f"{int((got != want).sum())} of {got.numel()} values differ"


def naive(x, w, ids, row_scale=None) -> torch.Tensor:
    """Per-expert loop straight from the ids (no plan): [T * top_k, N] in pair order."""
    flat = ids.reshape(-1)
    per_token = x.shape[0] != flat.numel()
    out = torch.zeros((flat.numel(), w.shape[1]), dtype=x.dtype, device=x.device)
    for e in range(w.shape[0]):
        pairs = (flat == e).nonzero().flatten()
        rows = x[pairs // ids.shape[1]] if per_token else x[pairs]
        y = (rows.float() @ w[e].float().T).to(x.dtype)
        if row_scale is not None:
            y = (y.float() * row_scale[pairs, None].float()).to(x.dtype)
        out[pairs] = y
    return out


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_align_groups_every_pair_once_by_expert(top_k: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(top_k)
    ids = uneven_ids(37, top_k, gen)
    num_experts = len(LOAD)
    plan = moe_align(ids, num_experts, block_m)
    rows, experts = plan.sorted_rows.cpu().long(), plan.block_expert.cpu().long()
    pairs = ids.numel()
    assert plan.num_pairs == pairs and plan.top_k == top_k and rows.numel() == experts.numel() * block_m
    assert plan.sorted_rows.dtype == plan.block_expert.dtype == torch.int32
    real = rows[rows < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # each pair exactly once; the rest is the sentinel
    assert ((rows == pairs) | (rows < pairs)).all()
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    used = experts >= 0
    assert used.sum() == sum(-(-c // block_m) for c in counts.tolist())  # each run padded to whole blocks
    assert not used[used.sum():].any()  # unused blocks only at the end, holding only padding
    assert (rows.view(-1, block_m)[~used] == pairs).all()
    assert torch.equal(experts[used], torch.sort(experts[used]).values)  # blocks in expert order
    assert (counts[-1] == 0) and (experts != num_experts - 1).all()  # the idle expert has no block
    by_block = rows.view(-1, block_m)[used]
    for block, expert in zip(by_block, experts[used].tolist(), strict=True):
        members = block[block < pairs]
        assert (flat[members] == expert).all()
    for e in range(num_experts):  # stable: an expert's pairs in token order, packed at its run's start
        run = by_block[experts[used] == e].flatten()
        assert run[: counts[e]].tolist() == (flat == e).nonzero().flatten().tolist()
        assert (run[counts[e]:] == pairs).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("per_pair", [False, True])  # x one row per token (gate_up) or per pair (down)
def test_grouped_gemm_matches_reference_and_naive_loop(dtype, top_k: int, per_pair: bool) -> None:
    gen = torch.Generator().manual_seed(7 * top_k + per_pair)
    tokens, k_dim, n_dim = 23, 40, 36  # K and N not multiples of the 16-wide tiles
    ids = uneven_ids(tokens, top_k, gen)
    x = torch.randn(tokens * top_k if per_pair else tokens, k_dim, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(len(LOAD), n_dim, k_dim, generator=gen) / 6).to(DEVICE, dtype)
    scale = torch.rand(tokens * top_k, generator=gen).to(DEVICE) if per_pair else None  # fp32 weights
    plan = moe_align(ids, len(LOAD), 16)
    got = grouped_gemm(x, w, plan, scale, config=SMALL)
    assert got.shape == (tokens * top_k, n_dim) and got.dtype == dtype
    close(got, grouped_gemm_reference(x, w, plan, scale))
    close(got, naive(x, w, ids, scale))
    close(grouped_gemm(x, w, plan, scale), got)  # the default (heuristic) tiling, wider than these shapes


def test_grouped_gemm_of_no_tokens() -> None:
    ids = torch.empty((0, 2), dtype=torch.long, device=DEVICE)
    plan = moe_align(ids, 4, 16)
    out = grouped_gemm(torch.empty(0, 32, device=DEVICE), torch.randn(4, 16, 32, device=DEVICE), plan, config=SMALL)
    assert out.shape == (0, 16) and plan.block_expert.numel() == 0


def moe_block(hidden: int, inter: int, top_k: int, weights_in_fp32: bool, dtype: torch.dtype, seed: int) -> SparseMoE:
    """A SparseMoE with random Dense experts set directly (Dense.load would pack fp32 for oneDNN)."""
    gen = torch.Generator().manual_seed(seed)
    spec = MoESpec(len(LOAD), top_k, inter, True, weights_in_fp32, [True], "mlp.", ("w1", "w3", "w2"))
    block = SparseMoE(hidden, spec, Dense).to(DEVICE)

    def rand(*shape, scale):
        return nn.Parameter((torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype), requires_grad=False)

    block.gate = rand(len(LOAD), hidden, scale=1.0)
    for e in range(len(LOAD)):
        block.gate_up[e].weight = rand(2 * inter, hidden, scale=hidden**-0.5)
        block.down[e].weight = rand(hidden, inter, scale=inter**-0.5)
    return block


@pytest.mark.parametrize(("dtype", "top_k", "weights_in_fp32"),
                         [(torch.float32, 2, True), (torch.bfloat16, 2, True), (torch.bfloat16, 3, False)])
def test_sparse_moe_on_triton_matches_the_cpu_loop(dtype, top_k: int, weights_in_fp32: bool) -> None:
    hidden, inter = 32, 24
    block = moe_block(hidden, inter, top_k, weights_in_fp32, dtype, seed=top_k)
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(19, hidden, generator=gen).to(DEVICE, dtype)
    before = LlamaForCausalLM.weight_bytes(None, block)  # `self` is only the default part
    with torch.inference_mode():
        want = block(h, TorchOps)
        assert block._stacks is None  # the torch path never stacks
        got = block(h, FusedOps)
    gate_up, down = block._stacks
    assert gate_up.shape == (len(LOAD), 2 * inter, hidden) and down.shape == (len(LOAD), hidden, inter)
    assert not gate_up.is_inference()
    for e in range(len(LOAD)):  # the stack is the experts' only copy ...
        assert block.gate_up[e].weight.data_ptr() == gate_up[e].data_ptr()
        assert block.down[e].weight.data_ptr() == down[e].data_ptr()
    assert LlamaForCausalLM.weight_bytes(None, block) == before  # ... and counted once
    # bf16 values that differ at all differ after a GEMM (an ulp), so further ones compound: a loose bound
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got, want, **tol)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        assert (got != want).float().mean() <= 0.05  # on the interpreter, against torch's CPU GEMMs: equal
    with torch.inference_mode():
        assert torch.equal(block(h, TorchOps), want)  # the views compute what the old weights did

        # the slots' sum is the loop's: each expert's rows added into zeros in expert order, in `dtype`
        weights, ids = block.route(h)
        plan = moe_align(ids, len(LOAD), block_m_for(ids.numel(), len(LOAD)))
        act = FusedOps.silu_mul(grouped_gemm(h, gate_up, plan))
        y = grouped_gemm(act, down, plan, row_scale=weights.reshape(-1))
        summed = torch.zeros_like(h)
        for e in range(len(LOAD)):
            pairs = (ids.reshape(-1) == e).nonzero().flatten()
            summed.index_add_(0, pairs // top_k, y[pairs])
        assert torch.equal(grouped_experts(h, weights, ids, block._stacks, FusedOps), summed)
        assert torch.equal(got, summed)

        # moved weights (`.to()` swaps parameter data) are stacked again, not read from a stale stack
        block.gate_up[0].weight.data = block.gate_up[0].weight.data.clone()
        assert block.expert_stacks(h)[0].data_ptr() == block.gate_up[0].weight.data_ptr()
        assert torch.equal(block(h, FusedOps), got)


def test_sparse_moe_on_triton_keeps_the_loop_for_packed_experts() -> None:
    """fp32 Dense.load on a CPU packs weights for oneDNN (`.weight` emptied): no stack, the loop runs."""
    block = moe_block(32, 24, 2, True, torch.float32, seed=5)
    for layer in (*block.gate_up, *block.down):
        layer.load(layer.weight.detach().clone())
    h = torch.randn(9, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.inference_mode():
        want = block(h, TorchOps)
        got = block(h, FusedOps)
    if DEVICE == "cpu" and block.gate_up[0].packed is not None:
        assert block._stacks == ()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
