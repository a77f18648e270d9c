"""Accuracy of a model against its baseline: perplexity, KL divergence, top-1 agreement.

Perplexity alone hides errors that cancel out; llama.cpp's perplexity tool made KL divergence of
the next-token distributions and top-1 agreement the standard companions, so we report all three
on the same scored tokens. Windows overlap by half and only their second half is scored, so every
scored token sees at least ctx/2 tokens of context.

`profile` scores both models through the engine that serves them (`EngineLM`, `evaluate_in_turn`:
one model resident at a time); `evaluate` takes any causal LM (transformers' models, the
`--accuracy-backend transformers` cross-check).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from optcli.util.fs import scratch_directory

# Baseline log-probs kept in memory up to this many bytes, then spilled to a temporary directory: a
# 128k vocabulary is 0.5 MB a token in fp32, so a long eval text would not fit beside the candidate.
SPILL_BYTES = 256 << 20


@dataclass
class AccuracyReport:
    ppl: float
    baseline_ppl: float | None
    ppl_ratio: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None
    tokens_scored: int
    context: int

    def as_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: list[int], ctx: int) -> list[tuple[list[int], int]]:
    """(window, first scored position) pairs; the first window is scored from position 1."""
    stride = ctx // 2
    windows = []
    start = 0
    while True:
        window = ids[start : start + ctx]
        if len(window) < 2:
            break
        first = 0 if start == 0 else ctx - stride
        windows.append((window, first))
        if start + ctx >= len(ids):
            break
        start += stride
    return windows


class EngineLM:
    """The built-in engine seen as a causal LM by `evaluate`: logits of one [1, T] window through the
    engine's paged forward (`Engine.score`), so what is scored is what the engine serves."""

    def __init__(self, engine, chunk: int | None = None) -> None:
        self.engine = engine
        self.chunk = chunk  # tokens a step (`Engine.score`): 1 scores decode steps, each reading the cache

    def parameters(self):
        yield torch.empty(0)  # windows are built on the CPU; score() takes a list of ids

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.engine.score(ids[0].tolist(), self.chunk)[None])


@torch.no_grad()
def _logprobs(model, window: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(torch.tensor([window], device=device)).logits[0].float()
    return F.log_softmax(logits, dim=-1).cpu()


def _scored(model, windows: list[tuple[list[int], int]]) -> Iterator[torch.Tensor]:
    """Log-probs [scored positions, V] of each window's scored part."""
    for window, first in windows:
        yield _logprobs(model, window)[first:-1]


def _summarize(windows, candidate: Iterator[torch.Tensor], baseline: Iterator[torch.Tensor] | None,
               ctx: int) -> AccuracyReport:
    nll, base_nll, klds, agree = [], [], [], []
    for (window, first), lp in zip(windows, candidate, strict=True):
        targets = torch.tensor(window[first + 1 :])
        nll.append(-lp.gather(1, targets[:, None]).squeeze(1))
        if baseline is not None:
            blp = next(baseline)
            base_nll.append(-blp.gather(1, targets[:, None]).squeeze(1))
            # KL(baseline || model), per token, in nats.
            klds.append((blp.exp() * (blp - lp)).sum(-1).clamp_min(0))
            agree.append(lp.argmax(-1) == blp.argmax(-1))
    if not nll:
        raise ValueError("evaluation text is too short: need at least 2 tokens")
    nll_t = torch.cat(nll)
    ppl = math.exp(nll_t.mean().item())
    if baseline is None:
        return AccuracyReport(ppl, None, None, None, None, None, len(nll_t), ctx)
    base_ppl = math.exp(torch.cat(base_nll).mean().item())
    kld = torch.cat(klds).double()
    return AccuracyReport(
        ppl=ppl,
        baseline_ppl=base_ppl,
        ppl_ratio=ppl / base_ppl,
        kld_mean=kld.mean().item(),
        kld_p99=torch.quantile(kld, 0.99).item(),
        top1_agreement=torch.cat(agree).float().mean().item(),
        tokens_scored=len(nll_t),
        context=ctx,
    )


@torch.no_grad()
def evaluate(model, ids: list[int], baseline=None, ctx: int = 256) -> AccuracyReport:
    """Score `model` (and `baseline` on the same tokens) over `ids` in overlapping windows."""
    windows = token_windows(ids, ctx)
    base = _scored(baseline, windows) if baseline is not None else None
    return _summarize(windows, _scored(model, windows), base, ctx)


class _KeptLogprobs:
    """The baseline's per-window log-probs: in memory up to SPILL_BYTES, then one file each in `spill`."""

    def __init__(self, spill: Path, budget: int = SPILL_BYTES) -> None:
        self.spill, self.budget, self.held = spill, budget, 0
        self.items: list[torch.Tensor | Path] = []

    def add(self, lp: torch.Tensor) -> None:
        nbytes = lp.numel() * lp.element_size()
        if self.held + nbytes <= self.budget:
            self.items.append(lp)
            self.held += nbytes
            return
        path = self.spill / f"{len(self.items)}.pt"
        torch.save(lp, path)
        self.items.append(path)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self.items:
            yield torch.load(item, weights_only=True) if isinstance(item, Path) else item


@torch.no_grad()
def evaluate_in_turn(candidate: Callable[[], object], baseline: Callable[[], object], ids: list[int],
                     ctx: int = 256, budget: int = SPILL_BYTES) -> AccuracyReport:
    """`evaluate` with one model resident at a time: `baseline()` builds the baseline, whose log-probs are
    kept (spilled to disk beyond `budget` bytes) before it is dropped; then `candidate()` is built and
    scored against them. Each callable returns a causal LM (e.g. an EngineLM) that nothing else holds."""
    windows = token_windows(ids, ctx)
    # owned by this process: what a killed run leaves behind, the next run removes
    with scratch_directory("optcli-logprobs-") as spill:
        kept = _KeptLogprobs(spill, budget)
        model = baseline()
        for lp in _scored(model, windows):
            kept.add(lp)
        del model
        gc.collect()  # the baseline's weights and KV cache go before the candidate's arrive
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = candidate()
        try:
            return _summarize(windows, _scored(model, windows), iter(kept), ctx)
        finally:
            del model
            gc.collect()
