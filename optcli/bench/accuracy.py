"""Accuracy of a model against its baseline: perplexity, KL divergence, top-1 agreement.

Perplexity alone hides errors that cancel out; llama.cpp's perplexity tool made KL divergence of
the next-token distributions and top-1 agreement the standard companions, so we report all three
on the same scored tokens. Windows overlap by half and only their second half is scored, so every
scored token sees at least ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F


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

    def __init__(self, engine) -> None:
        self.engine = engine

    def parameters(self):
        yield torch.empty(0)  # windows are built on the CPU; score() takes a list of ids

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.engine.score(ids[0].tolist())[None])


@torch.no_grad()
def _logprobs(model, window: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(torch.tensor([window], device=device)).logits[0].float()
    return F.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def evaluate(model, ids: list[int], baseline=None, ctx: int = 256) -> AccuracyReport:
    """Score `model` (and `baseline` on the same tokens) over `ids` in overlapping windows."""
    nll, base_nll, klds, agree = [], [], [], []
    for window, first in token_windows(ids, ctx):
        targets = torch.tensor(window[first + 1 :])
        lp = _logprobs(model, window)[first:-1]
        nll.append(-lp.gather(1, targets[:, None]).squeeze(1))
        if baseline is not None:
            blp = _logprobs(baseline, window)[first:-1]
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
