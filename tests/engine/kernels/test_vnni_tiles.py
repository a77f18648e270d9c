"""The AVX-512 VNNI / BF16 kernels (cpu_vnni.c, cpu_amx_fp8.c) give a row the same bits whatever else is in its
batch: their batched register tiles (four or two blocks of 16 columns at once) compute each output in the same
order as the one-row and one-block forms. Integer sums make W4A16 and W8A8 exact at every M; FP8's fp32 sums
match a call with the same row tile (8 rows, then the remainder)."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_amx

pytestmark = pytest.mark.skipif(cpu_amx.vnni_library() is None, reason="no AVX-512 VNNI + BF16 CPU here")

# N: whole groups of four blocks, and a remainder of one or two blocks; M: 4-row tiles and a partial one
SHAPES = [(64, 128), (80, 256), (96, 192), (128, 512)]


def _rows(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 2).bfloat16()


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_w8a8_rows_are_the_same_alone_or_batched(n, k) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed, colsum, scales = cpu_amx.pack_q8(w), w.sum(1, dtype=torch.int32), torch.rand(n, generator=g) + 0.01
    x = _rows(70, k, seed=k)
    batched = cpu_amx.vnni_q8_gemm(x, packed, colsum, scales, n)
    alone = torch.cat([cpu_amx.vnni_q8_gemm(x[i:i + 1], packed, colsum, scales, n) for i in range(70)])
    assert torch.equal(batched, alone)
    assert torch.equal(cpu_amx.vnni_q8_gemm(x[:6], packed, colsum, scales, n), batched[:6])
    want = (x.float() @ w.float().t()) * scales
    torch.testing.assert_close(batched.float(), want, rtol=0, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize(("n", "k", "group"), [(64, 128, 64), (80, 256, 32), (96, 192, 64), (128, 512, 128)])
def test_w4a16_rows_are_the_same_alone_or_batched(n, k, group, zero_points) -> None:
    g = torch.Generator().manual_seed(n + k + group)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01 + 1e-3
    zeros = torch.randn(n, k // group, generator=g) * 0.01 if zero_points else None
    args = (cpu_amx.pack_q4(q), cpu_amx.vnni_block_scales(scales),
            None if zeros is None else cpu_amx.vnni_block_scales(zeros), group, n)
    x = _rows(70, k, seed=group)
    batched = cpu_amx.vnni_q4_gemm(x, *args)
    alone = torch.cat([cpu_amx.vnni_q4_gemm(x[i:i + 1], *args) for i in range(70)])
    assert torch.equal(batched, alone)
    statement = cpu_amx.reference_q4_gemm(x, q, scales, zeros, group)
    torch.testing.assert_close(batched.float(), statement, rtol=8e-3, atol=8e-3 * statement.abs().max().item())


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_fp8_row_tiles_are_the_same_in_a_wider_batch(n, k) -> None:
    """Rows 0-7 and 64-69 of a 70-row call (two blocks a step) against 8- and 6-row calls (one block, widened as
    it streams): the same sums in the same order."""
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.float8_e4m3fn)
    packed, post_n = cpu_amx.pack_fp8(w), torch.rand(n, generator=g) + 0.01
    x = _rows(70, k, seed=n)
    batched = cpu_amx.vnni_fp8_gemm(x, packed, post_n, None, n)
    assert torch.equal(cpu_amx.vnni_fp8_gemm(x[:8], packed, post_n, None, n), batched[:8])
    assert torch.equal(cpu_amx.vnni_fp8_gemm(x[64:], packed, post_n, None, n), batched[64:])
    want = (x.float() @ w.float().t()) * post_n
    torch.testing.assert_close(batched.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
