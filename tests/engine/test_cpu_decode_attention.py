"""The CPU decode path (query heads of a KV head as rows of one query block) computes attention over the paged
cache: compared with a float64 reference per sequence, for sequences of different lengths in one step."""

import pytest
import torch

from optcli.engine.attention.cpu import build_gather_metadata, paged_attention
from optcli.engine.attention.layout import StepLayout

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 16, 4


def reference(q, keys, values):
    """float64 softmax attention of one query [H, D] over keys/values [N, KV, D] (GQA by repetition)."""
    group = HEADS // KV_HEADS
    k = keys.double().repeat_interleave(group, 1).transpose(0, 1)  # [H, N, D]
    v = values.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = (q.double()[:, None, :] @ k.transpose(1, 2))[:, 0] * DIM ** -0.5  # [H, N]
    return (scores.softmax(-1)[:, None, :] @ v)[:, 0]  # [H, D]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_a_float64_reference(dtype, tol) -> None:
    gen = torch.Generator().manual_seed(0)
    lens = [5, 9, 13]  # context after this step, the new token included
    tables = [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    slots_total = 9 * BLOCK
    k_cache = torch.zeros(slots_total, KV_HEADS, DIM, dtype=dtype)
    v_cache = torch.zeros(slots_total, KV_HEADS, DIM, dtype=dtype)
    history = []
    for table, n in zip(tables, lens, strict=True):
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
        k = torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype)
        v = torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype)
        k_cache[slots[:-1]], v_cache[slots[:-1]] = k[:-1], v[:-1]
        history.append((slots[-1], k, v))
    q = torch.randn(len(lens), HEADS, DIM, generator=gen).to(dtype)
    layout = StepLayout([h[0] for h in history], [range(i, i + 1) for i in range(len(lens))],
                        [[n - 1] for n in lens], lens, tables, BLOCK)
    meta = build_gather_metadata(layout, "cpu")
    new_k = torch.stack([h[1][-1] for h in history])
    new_v = torch.stack([h[2][-1] for h in history])
    out = paged_attention(q, new_k, new_v, (k_cache, v_cache), meta, window=None)
    assert out.shape == q.shape and out.dtype == dtype
    for i, (_, k, v) in enumerate(history):
        torch.testing.assert_close(out[i].double(), reference(q[i], k, v), atol=tol, rtol=tol)
