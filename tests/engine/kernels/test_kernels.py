"""Triton paged-KV kernels vs their torch references and an independent naive loop.

Without CUDA the kernels run on Triton's CPU interpreter, which must be enabled before triton (and
the kernels, whose @triton.jit picks interpreted vs compiled at import) are first imported. The
interpreter is slow, so shapes are tiny; small tile sizes (16) make the tiny shapes still cross
tile, split and cache-block boundaries.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from optcli.engine.kernels import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
    triton_available,
)
from optcli.engine.kernels.decode_attention import (  # noqa: E402
    default_num_splits,
    paged_decode_attention_reference,
)
from optcli.engine.kernels.prefill_attention import paged_prefill_attention_reference  # noqa: E402
from optcli.engine.kernels.store_kv import store_kv_reference  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1"),
    # The interpreter computes with numpy: a NaN/inf slip in masked lanes warns even when not stored.
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 8
NUM_BLOCKS = 40
SCALE = 0.35
# context 1, an exact multiple of the block size, one spanning many blocks, padded (0), odd lengths
DECODE_CTX = [1, 16, 37, 0, 23, 5]
# (cached prefix + new, new): whole prompt, chunk after a prefix, 1-token, empty, block multiple
PREFILL_SEQS = [(11, 11), (37, 26), (9, 1), (20, 0), (8, 8), (3, 2)]


def tols(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def make_cache(kv_heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random caches whose last slot of every block is NaN: stale slots must never leak into outputs."""
    shape = (NUM_BLOCKS * BLOCK_SIZE, kv_heads, dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape, generator=gen)
        cache.view(NUM_BLOCKS, BLOCK_SIZE, kv_heads, dim)[:, -1] = float("nan")
        caches.append(cache.to(dtype))
    return caches[0], caches[1]


def make_tables(ctx_lens: list[int], gen: torch.Generator) -> torch.Tensor:
    """Shuffled, non-contiguous block tables; entries past each context hold garbage (-1 or huge)."""
    width = max(-(-c // BLOCK_SIZE) for c in ctx_lens) + 1
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    table = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    table[:, -1] = 1 << 30
    for b, ctx in enumerate(ctx_lens):
        used = -(-ctx // BLOCK_SIZE)
        table[b, :used] = torch.tensor([perm.pop() for _ in range(used)], dtype=torch.int32)
    return table


def fill_valid_slots(k_cache, v_cache, table, ctx_lens, gen) -> None:
    """Overwrite the NaN tail slot of each position a context covers with real values."""
    for b, ctx in enumerate(ctx_lens):
        for j in range(ctx):
            slot = int(table[b, j // BLOCK_SIZE]) * BLOCK_SIZE + j % BLOCK_SIZE
            k_cache[slot] = torch.randn(k_cache.shape[1:], generator=gen).to(k_cache.dtype)
            v_cache[slot] = torch.randn(v_cache.shape[1:], generator=gen).to(v_cache.dtype)


def naive_attend(q_vec, k_cache, v_cache, table_row, pos, kv_head, window, softcap=None):
    """One query head at position `pos`, straight from the definition, in float64."""
    keys = [j for j in range(pos + 1) if window is None or j > pos - window]
    if not keys:
        return torch.zeros_like(q_vec, dtype=torch.float64)
    slots = [int(table_row[j // BLOCK_SIZE]) * BLOCK_SIZE + j % BLOCK_SIZE for j in keys]
    k = k_cache[slots, kv_head].double()
    v = v_cache[slots, kv_head].double()
    scores = (k @ q_vec.double()) * SCALE
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    w = torch.softmax(scores, dim=0)
    return w @ v


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


# ---------------------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv(dtype: torch.dtype, slot_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, kv_heads, dim = 7, 2, 32
    fused = torch.randn(tokens, 3 * kv_heads, dim, generator=gen).to(dtype)
    k, v = fused[:, kv_heads : 2 * kv_heads], fused[:, 2 * kv_heads :]  # strided views, like a QKV split
    slots = torch.tensor([5, -1, 17, 0, 63, -1, 30], dtype=slot_dtype)
    k_cache, v_cache = make_cache(kv_heads, dim, dtype, gen)
    k_cache, v_cache = k_cache.nan_to_num(7.0), v_cache.nan_to_num(7.0)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive_k, naive_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            naive_k[s], naive_v[s] = k[t], v[t]

    k_d, v_d, kc, vc, sl = to_device(k, v, k_cache, v_cache, slots)
    store_kv(k_d, v_d, kc, vc, sl)
    store_kv_reference(k, v, ref_k, ref_v, slots)
    for got, ref, naive in ((kc, ref_k, naive_k), (vc, ref_v, naive_v)):
        assert torch.equal(got.cpu(), ref) and torch.equal(got.cpu(), naive)


# -------------------------------------------------------------------------------------- decode


def decode_case(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = make_cache(kv_heads, dim, dtype, gen)
    table = make_tables(DECODE_CTX, gen)
    fill_valid_slots(k_cache, v_cache, table, DECODE_CTX, gen)
    q = torch.randn(len(DECODE_CTX), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(DECODE_CTX, dtype=torch.int32)


def naive_decode(q, k_cache, v_cache, table, ctx_lens, window, softcap=None):
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, ctx in enumerate(ctx_lens.tolist()):
        for h in range(q.shape[1]):
            if ctx > 0:
                out[b, h] = naive_attend(q[b, h], k_cache, v_cache, table[b], ctx - 1, h // group, window, softcap)
    return out


def run_decode(q, k_cache, v_cache, table, ctx, window, num_splits, block_n=16, softcap=None):
    args = to_device(q, k_cache, v_cache, table, ctx)
    out = paged_decode_attention(*args, BLOCK_SIZE, SCALE, window, num_splits, block_n=block_n, softcap=softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    return out.cpu()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (6, 2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_fp32(heads: int, kv_heads: int, window: int | None, num_splits: int) -> None:
    q, k_cache, v_cache, table, ctx = decode_case(heads, kv_heads, 32, torch.float32)
    out = run_decode(q, k_cache, v_cache, table, ctx, window, num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, BLOCK_SIZE, SCALE, window)
    naive = naive_decode(q, k_cache, v_cache, table, ctx, window)
    assert not out.isnan().any()
    assert (out[ctx == 0] == 0).all()  # padded rows
    torch.testing.assert_close(out, ref, **tols(torch.float32))
    torch.testing.assert_close(out.double(), naive, **tols(torch.float32))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_soft_capped_scores(window: int | None, num_splits: int) -> None:
    """Gemma 2's tanh soft-cap (low enough here to change every row) vs the reference and the definition."""
    q, k_cache, v_cache, table, ctx = decode_case(4, 2, 32, torch.float32)
    out = run_decode(q, k_cache, v_cache, table, ctx, window, num_splits, softcap=1.5)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, BLOCK_SIZE, SCALE, window, softcap=1.5)
    torch.testing.assert_close(out, ref, **tols(torch.float32))
    torch.testing.assert_close(out.double(), naive_decode(q, k_cache, v_cache, table, ctx, window, 1.5),
                               **tols(torch.float32))
    uncapped = run_decode(q, k_cache, v_cache, table, ctx, window, num_splits)
    assert (out - uncapped)[ctx > 1].abs().max() > 0.05


def test_decode_split_k_matches_single_pass_and_default_tiles() -> None:
    q, k_cache, v_cache, table, ctx = decode_case(4, 2, 32, torch.float32, seed=1)
    single = run_decode(q, k_cache, v_cache, table, ctx, None, 1, block_n=64)
    auto = run_decode(q, k_cache, v_cache, table, ctx, None, None, block_n=64)  # short contexts: 1 split
    for splits in (2, 3, 8):  # 8 splits of a 37-token context leaves some splits empty
        torch.testing.assert_close(
            run_decode(q, k_cache, v_cache, table, ctx, None, splits), single, **tols(torch.float32)
        )
    torch.testing.assert_close(auto, single, atol=0, rtol=0)


def test_decode_auto_splits_follow_table_width() -> None:
    """A wide block table (as in a CUDA graph sized for max_model_len) makes num_splits=None split."""
    q, k_cache, v_cache, table, ctx = decode_case(4, 2, 32, torch.float32, seed=4)
    wide = torch.cat([table, torch.full((table.shape[0], 40 - table.shape[1]), 1 << 30, dtype=torch.int32)], 1)
    assert default_num_splits(wide.shape[1] * BLOCK_SIZE, q.shape[0], 2, torch.device(DEVICE)) > 1
    out = run_decode(q, k_cache, v_cache, wide, ctx, None, None)
    torch.testing.assert_close(out.double(), naive_decode(q, k_cache, v_cache, table, ctx, None), **tols(torch.float32))


def test_default_num_splits() -> None:
    cpu = torch.device("cpu")
    assert default_num_splits(40, 8, 2, cpu) == 1
    assert default_num_splits(256, 1, 1, cpu) == 1
    assert 1 < default_num_splits(4096, 1, 2, cpu) <= 16
    assert default_num_splits(4096, 512, 8, cpu) == 1  # batch already fills the device


@pytest.mark.parametrize("dim", [64, 80])
def test_decode_head_dims(dim: int) -> None:
    """80 is padded to a 128-wide tile: the extra lanes must be masked."""
    q, k_cache, v_cache, table, ctx = decode_case(4, 2, dim, torch.float32, seed=2)
    out = run_decode(q, k_cache, v_cache, table, ctx, 7, 3)
    torch.testing.assert_close(out.double(), naive_decode(q, k_cache, v_cache, table, ctx, 7), **tols(torch.float32))


def interpreter_handles(dtype: torch.dtype) -> bool:
    """Whether this Triton can load/store `dtype` (the CPU interpreter lacks some 16-bit types)."""
    k = torch.randn(3, 1, 16).to(dtype)
    cache = torch.zeros(4, 1, 16, dtype=dtype)
    try:
        k_d, c_d, s_d = to_device(k, cache, torch.tensor([0, 2, 3]))
        store_kv(k_d, k_d, c_d, c_d.clone(), s_d)
    except Exception:  # any failure means "unsupported here"
        return False
    return torch.equal(c_d.cpu()[[0, 2, 3]], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half(dtype: torch.dtype) -> None:
    if not interpreter_handles(dtype):
        pytest.skip(f"Triton here cannot run {dtype}")
    q, k_cache, v_cache, table, ctx = decode_case(4, 2, 32, dtype, seed=3)
    for splits in (1, 3):
        out = run_decode(q, k_cache, v_cache, table, ctx, 5, splits)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, BLOCK_SIZE, SCALE, 5)
        torch.testing.assert_close(out.float(), ref.float(), **tols(dtype))
        naive = naive_decode(q, k_cache, v_cache, table, ctx, 5)
        torch.testing.assert_close(out.double(), naive, **tols(dtype))


# ------------------------------------------------------------------------------------- prefill


def prefill_case(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [c for c, _ in PREFILL_SEQS]
    k_cache, v_cache = make_cache(kv_heads, dim, dtype, gen)
    table = make_tables(ctx_lens, gen)
    fill_valid_slots(k_cache, v_cache, table, ctx_lens, gen)
    q_lens = torch.tensor([n for _, n in PREFILL_SEQS])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(starts[-1]), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, starts, torch.tensor(ctx_lens, dtype=torch.int32)


def naive_prefill(q, k_cache, v_cache, table, starts, ctx_lens, window, softcap=None):
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        b = max(i for i in range(len(ctx_lens)) if starts[i] <= t)  # the sequence owning token t
        pos = int(ctx_lens[b]) - int(starts[b + 1] - starts[b]) + (t - int(starts[b]))
        for h in range(q.shape[1]):
            out[t, h] = naive_attend(q[t, h], k_cache, v_cache, table[b], pos, h // group, window, softcap)
    return out


def run_prefill(q, k_cache, v_cache, table, starts, ctx, window, **tiles):
    args = to_device(q, k_cache, v_cache, table, starts, ctx)
    out = paged_prefill_attention(*args, BLOCK_SIZE, SCALE, window, **tiles)
    assert out.dtype == q.dtype and out.shape == q.shape
    return out.cpu()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (6, 2)])
@pytest.mark.parametrize("window", [None, 5])
# 32x16 tiles with H == KV: a query tile spans more positions than a key tile plus the window, so
# some rows see nothing in the first key tile (the online softmax must not produce inf - inf).
@pytest.mark.parametrize(
    "tiles", [{"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 16}, {}], ids=["m16n16", "m32n16", "default"]
)
def test_prefill_fp32(heads: int, kv_heads: int, window: int | None, tiles: dict) -> None:
    q, k_cache, v_cache, table, starts, ctx = prefill_case(heads, kv_heads, 32, torch.float32)
    out = run_prefill(q, k_cache, v_cache, table, starts, ctx, window, **tiles)
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, table, starts, ctx, BLOCK_SIZE, SCALE, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tols(torch.float32))
    torch.testing.assert_close(
        out.double(), naive_prefill(q, k_cache, v_cache, table, starts, ctx, window), **tols(torch.float32)
    )


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_soft_capped_scores(window: int | None) -> None:
    q, k_cache, v_cache, table, starts, ctx = prefill_case(4, 2, 32, torch.float32)
    out = run_prefill(q, k_cache, v_cache, table, starts, ctx, window, block_m=16, block_n=16, softcap=1.5)
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, table, starts, ctx, BLOCK_SIZE, SCALE, window,
                                            softcap=1.5)
    torch.testing.assert_close(out, ref, **tols(torch.float32))
    torch.testing.assert_close(out.double(), naive_prefill(q, k_cache, v_cache, table, starts, ctx, window, 1.5),
                               **tols(torch.float32))
    assert (out - run_prefill(q, k_cache, v_cache, table, starts, ctx, window)).abs().max() > 0.05


def test_prefill_padded_head_dim() -> None:
    q, k_cache, v_cache, table, starts, ctx = prefill_case(4, 2, 80, torch.float32, seed=1)
    out = run_prefill(q, k_cache, v_cache, table, starts, ctx, 7, block_m=16, block_n=16)
    naive = naive_prefill(q, k_cache, v_cache, table, starts, ctx, 7)
    torch.testing.assert_close(out.double(), naive, **tols(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half(dtype: torch.dtype) -> None:
    if not interpreter_handles(dtype):
        pytest.skip(f"Triton here cannot run {dtype}")
    q, k_cache, v_cache, table, starts, ctx = prefill_case(4, 2, 32, dtype, seed=2)
    out = run_prefill(q, k_cache, v_cache, table, starts, ctx, None, block_m=16, block_n=16)
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, table, starts, ctx, BLOCK_SIZE, SCALE)
    torch.testing.assert_close(out.float(), ref.float(), **tols(dtype))
    naive = naive_prefill(q, k_cache, v_cache, table, starts, ctx, None)
    torch.testing.assert_close(out.double(), naive, **tols(dtype))


# ------------------------------------------------------------------------------ compiled path

# The body of a tests/engine/kernels/sm90_compile.py script: build() and bf come from its prelude.
COMPILE_SCRIPT = """
io = dict(q_ptr=bf, k_cache_ptr=bf, v_cache_ptr=bf, out_ptr=bf, block_tables_ptr="*i32", context_lens_ptr="*i32",
          qk_scale="fp32", mid_m_ptr="*fp32", mid_l_ptr="*fp32", mid_acc_ptr="*fp32", query_start_loc_ptr="*i32",
          k_scale_ptr="*fp32", v_scale_ptr="*fp32", centre_ptr="*fp32", rope_ptr=bf)
tiles = dict(GROUP=4, HEAD_DIM=80, BLOCK_SIZE=16, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32", UPCAST_DOT=False,
             KV_SCALED=False, CENTRED=False)
build("store_kv", "_store_kv_kernel", dict(k_ptr=bf, v_ptr=bf, k_cache_ptr=bf, v_cache_ptr=bf, slot_ptr="*i64",
                                           k_scale_ptr="*fp32", v_scale_ptr="*fp32"),
      dict(NUM_HEADS=8, HEAD_DIM=80, BLOCK_H=8, BLOCK_D=128, QUANT=0))
for direct in (True, False):
    build("decode_attention", "_decode_split_kernel", io, dict(tiles, BLOCK_G=16, DIRECT=direct))
build("decode_attention", "_decode_reduce_kernel", io, dict(HEAD_DIM=80, BLOCK_S=4, BLOCK_D=128))
build("prefill_attention", "_prefill_kernel", io, dict(tiles, BLOCK_M=64, BLOCK_Q=16))
"""


def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the compiler rejects (and vice versa): lower the bf16 kernels
    through Triton's real pipeline down to an sm_90 cubin, which needs no GPU, only the bundled ptxas."""
    from sm90_compile import compile_for_sm90

    compile_for_sm90(COMPILE_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")
