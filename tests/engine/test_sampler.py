"""Sampler: greedy, seeded reproducibility, top-k / top-p membership, temperature, logprobs, validation."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optcli.engine import sampler as sampler_module
from optcli.engine.sampler import Sampler, make_generator, token_logprobs
from optcli.engine.sampling_params import SamplingParams

sampler = Sampler()


def _logits(seed: int, batch: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _allowed(row: torch.Tensor, temperature: float, top_k: int, top_p: float, eps: float = 1e-4) -> set[int]:
    """Tokens the sampler may return, computed independently in float64 (loose at the top-p boundary)."""
    x = row.double() / temperature
    vocab = x.numel()
    if 0 < top_k < vocab:
        kth = x.sort(descending=True).values[top_k - 1]
        x = torch.where(x >= kth, x, torch.tensor(-math.inf, dtype=x.dtype))
    probs = x.softmax(-1)
    allowed = set()
    for t in range(vocab):
        if probs[t] == 0:
            continue
        mass_above = probs[probs > probs[t]].sum().item()  # tokens strictly more likely than t
        if mass_above < top_p + eps:
            allowed.add(t)
    return allowed


def test_greedy_is_argmax_in_any_dtype() -> None:
    logits = _logits(0, 8, 50)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # tie: lowest id wins
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = sampler(logits.to(dtype), [SamplingParams()] * 8, [None] * 8)
        assert out.dtype == torch.int64 and out.shape == (8,)
        assert torch.equal(out, logits.to(dtype).argmax(-1))
    assert out[3].item() == 7


def test_greedy_rows_in_a_mixed_batch_stay_argmax() -> None:
    logits = _logits(1, 4, 30)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.7)]
    out = sampler(logits, params, [None, make_generator(1), None, None])
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def _run_seeded(
    others: list[tuple[torch.Tensor, SamplingParams, int | None]], position: int, steps: int = 20
) -> list[int]:
    """Tokens of a seeded request (seed 1234) sampled `steps` times next to `others`, placed at `position`."""
    target_logits = _logits(99, 1, 64)[0]
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    gens = [make_generator(seed) for _, _, seed in others]
    target_gen = make_generator(target.seed)
    tokens = []
    for _ in range(steps):
        rows = [r for r, _, _ in others]
        params = [p for _, p, _ in others]
        g = list(gens)
        rows.insert(position, target_logits)
        params.insert(position, target)
        g.insert(position, target_gen)
        tokens.append(int(sampler(torch.stack(rows), params, g)[position]))
    return tokens


def test_seeded_row_is_independent_of_batch() -> None:
    alone = _run_seeded([], 0)
    assert alone == _run_seeded([], 0)
    assert len(set(alone)) > 1  # actually sampling, not degenerate
    others = [
        (_logits(2, 1, 64)[0], SamplingParams(temperature=1.5), None),
        (_logits(3, 1, 64)[0], SamplingParams(temperature=0.5, top_k=3, seed=7), 7),
        (_logits(4, 1, 64)[0], SamplingParams(), None),
        (_logits(5, 1, 64)[0], SamplingParams(temperature=1.0, top_p=0.3, seed=1234), 1234),
    ]
    for position in range(len(others) + 1):
        assert _run_seeded(others, position) == alone
    torch.manual_seed(0)
    a = _run_seeded(others[:2], 1)
    torch.manual_seed(1)  # a different global RNG state does not touch the seeded row
    assert _run_seeded(others[:2], 1) == a == alone


def test_seeded_row_with_wide_nucleus_is_independent_of_batch() -> None:
    """Large vocab, flat distribution: the nucleus outgrows the top-k candidates; a big-k neighbour widens them."""
    logits = _logits(12, 3, 3000, scale=0.3)
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    neighbours = [SamplingParams(temperature=1.0, top_k=2000, top_p=0.8), SamplingParams(temperature=0.5, top_k=2)]

    def tokens(batch: list[SamplingParams]) -> list[int]:
        gens = [make_generator(target.seed)] + [make_generator(i) for i in range(len(batch))]
        return [int(sampler(logits[: len(batch) + 1], [target, *batch], gens)[0]) for _ in range(15)]

    alone = tokens([])
    assert len(set(alone)) > 5
    assert tokens(neighbours) == tokens(neighbours[:1]) == tokens(neighbours[1:]) == alone


def test_unseeded_rows_follow_the_global_rng() -> None:
    logits = _logits(6, 3, 40, scale=0.5)
    params = [SamplingParams(temperature=1.0)] * 3
    torch.manual_seed(11)
    a = [sampler(logits, params, [None] * 3) for _ in range(5)]
    torch.manual_seed(11)
    b = [sampler(logits, params, [None] * 3) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 40),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    temperature=st.floats(0.05, 3.0),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    quantize=st.booleans(),
    candidates=st.sampled_from([1, 3, 8, 256]),
)
def test_samples_stay_in_top_k_and_nucleus(
    seed: int, vocab: int, top_k: int, top_p: float, temperature: float, scale: float, quantize: bool, candidates: int
) -> None:
    logits = _logits(seed, 1, vocab, scale)
    if quantize:  # many exact ties, to exercise tie handling at both cuts
        logits = logits.round()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    allowed = _allowed(logits[0], temperature, top_k, top_p)
    # Sample the same row many times in one call: a batch of identical rows, each with its own generator.
    n = 64
    gens = [make_generator(seed + i) for i in range(n)]
    # Few candidates force the full-sort fallback for wide nuclei.
    with mock.patch.object(sampler_module, "_CANDIDATES", candidates):
        out = sampler(logits.expand(n, vocab), [params] * n, gens)
    assert set(out.tolist()) <= allowed
    if 0 < top_k < vocab and not quantize:
        assert len(allowed) <= top_k


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 60),
    top_k=st.integers(0, 70),
    top_p=st.floats(0.01, 1.0),
    quantize=st.booleans(),
    candidates=st.sampled_from([1, 4, 256]),
)
def test_filter_keeps_exactly_the_allowed_set(
    seed: int, vocab: int, top_k: int, top_p: float, quantize: bool, candidates: int
) -> None:
    """Not just a subset: the kept set is the whole top-k/top-p set (up to rounding at the top-p boundary)."""
    logits = _logits(seed, 2, vocab)
    if quantize:
        logits = logits.round()
    with mock.patch.object(sampler_module, "_CANDIDATES", candidates):
        filtered = sampler_module._filter_logits(logits, torch.tensor([top_k, 0]), torch.tensor([top_p, 1.0]))
    kept = set(torch.isfinite(filtered[0]).nonzero().flatten().tolist())
    assert _allowed(logits[0], 1.0, top_k, top_p, eps=-1e-4) <= kept <= _allowed(logits[0], 1.0, top_k, top_p)
    assert torch.equal(filtered[1], logits[1])  # a row with no cuts is left alone


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 30), extra=st.integers(0, 10), top_p=st.floats(0.05, 1.0))
def test_top_k_at_or_above_vocab_is_no_cut(seed: int, vocab: int, extra: int, top_p: float) -> None:
    logits = _logits(seed, 1, vocab)
    draws = {}
    for k in (0, vocab + extra):
        params = SamplingParams(temperature=0.8, top_k=k, top_p=top_p)
        gen = make_generator(seed)
        draws[k] = [int(sampler(logits, [params], [gen])[0]) for _ in range(20)]
    assert draws[0] == draws[vocab + extra]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(8, 6, 100)
    for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        out = sampler(logits, [params] * 6, [make_generator(i) for i in range(6)])
        assert torch.equal(out, logits.argmax(-1))


def test_temperature_shapes_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20000

    def freq(temperature: float) -> torch.Tensor:
        torch.manual_seed(0)  # unseeded rows: one batched draw from the global RNG
        out = sampler(logits.expand(n, 4), [SamplingParams(temperature=temperature)] * n, [None] * n)
        return torch.bincount(out, minlength=4).double() / n

    for temperature in (0.5, 1.0, 2.0):
        expected = (logits[0].double() / temperature).softmax(-1)
        assert torch.allclose(freq(temperature), expected, atol=0.015)
    assert freq(0.5)[0] > freq(1.0)[0] > freq(2.0)[0]  # colder = more peaked


def test_token_logprobs_match_log_softmax_and_ranks() -> None:
    logits = _logits(9, 300, 50).to(torch.bfloat16)
    logits[0, :5] = 10.0  # five-way tie at the top
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1))
    ids[0] = 3
    ref = logits.float().log_softmax(-1)
    rows = token_logprobs(logits, ids, top_n=4)
    assert len(rows) == 300
    for r, (lp, rank, top) in enumerate(rows):
        t = int(ids[r])
        assert lp == pytest.approx(ref[r, t].item(), abs=1e-6)
        assert rank == 1 + int((ref[r] > ref[r, t]).sum())
        assert len(top) == 4
        assert list(top.values()) == sorted(top.values(), reverse=True)
        best = ref[r].topk(4).values
        assert torch.allclose(torch.tensor(list(top.values())), best)
        for tok, v in top.items():
            assert v == pytest.approx(ref[r, tok].item(), abs=1e-6)
    assert rows[0][1] == 1  # tied at the top: rank 1


def test_token_logprobs_edges() -> None:
    logits = _logits(10, 1100, 8)  # spans several internal chunks
    ids = logits.argmin(-1)
    rows = token_logprobs(logits, ids, top_n=0)
    assert all(top == {} and rank == 8 for _, rank, top in rows)
    assert len(token_logprobs(logits[:2], ids[:2], top_n=100)[0][2]) == 8  # top_n clamps to the vocab
    assert token_logprobs(logits[:0], ids[:0], top_n=3) == []
    with pytest.raises(ValueError):
        token_logprobs(logits[:2], torch.tensor([0, 8]), top_n=1)
    with pytest.raises(ValueError):
        token_logprobs(logits[:2], ids[:3], top_n=1)
    with pytest.raises(ValueError):
        token_logprobs(logits[:2], ids[:2], top_n=-1)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"logprobs": -1}, {"max_tokens": 0}],
)
def test_bad_sampling_params_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampler_rejects_bad_inputs() -> None:
    logits = _logits(11, 2, 10)
    with pytest.raises(ValueError):
        sampler(logits, [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sampler(logits[0], [SamplingParams()], [None])
    for temperature in (math.nan, math.inf):  # SamplingParams itself lets these through
        with pytest.raises(ValueError):
            sampler(logits, [SamplingParams(temperature=temperature)] * 2, [None, None])
    mutated = SamplingParams(temperature=1.0)
    mutated.top_p = 0.0
    with pytest.raises(ValueError):
        sampler(logits, [mutated] * 2, [None, None])
