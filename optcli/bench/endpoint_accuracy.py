"""Accuracy of a served model from what an OpenAI-compatible server returns for its prompt: the log-prob
of every prompt token and the top-k at every position (`/v1/completions` with `echo` and `logprobs`,
as vLLM and `optcli serve` give them), against a baseline seen the same way (another endpoint, or a
local model through our engine, cut to the same top-k).

Perplexity uses the log-prob each side gives the actual next token: exact. KLD and top-1 agreement
see only the top-k (k = TOP_K, vLLM's default maximum), so KLD is computed on a coarser distribution:
the baseline's top-k tokens one by one plus one bucket for all other tokens. Merging tokens can only
lower a KL divergence; a token of the baseline's top-k that the candidate's top-k lacks is given the
candidate's k-th (smallest) log-prob, the most it can have, which lowers the figure further. So the
endpoint KLD is a lower estimate of the full-vocabulary one, close to it when the top-k holds most of
the mass (on stories260K, k = 20 of 512 tokens: within 10% of the engine's full KLD, tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import httpx
import torch

from optcli.bench.accuracy import token_windows
from optcli.bench.load_generator import api_base_url
from optcli.errors import UsageError

TOP_K = 20

# What one side returns for a window: per position j >= 1, (log-prob of token j, top-k {token: log-prob})
# of the distribution that predicts token j.
Scored = list[tuple[float, dict[str, float]]]


def endpoint_scorer(url: str, model: str, k: int = TOP_K, timeout_s: float = 600.0,
                    headers: dict | None = None) -> Callable[[list[int]], Scored]:
    """Score token windows through a server: one completion per window, prompt as token ids, echo on."""
    client = httpx.Client(base_url=api_base_url(url), timeout=timeout_s, headers=headers)

    def score(window: list[int]) -> Scored:
        body = {"model": model, "prompt": window, "max_tokens": 1, "echo": True, "logprobs": k, "temperature": 0.0}
        try:
            r = client.post("/completions", json=body)
        except httpx.HTTPError as e:
            raise UsageError(f"{url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise UsageError(f"{url}: HTTP {r.status_code} for an echo + logprobs completion: {r.text[:200]}")
        lp = (r.json()["choices"][0].get("logprobs") or {})
        tokens, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        if len(tokens) < len(window) or len(tops) < len(window):
            raise UsageError(f"{url}: the server returned no prompt log-probs (it needs `echo` with `logprobs`, "
                             "as vLLM and optcli serve give them)")
        return [(float(tokens[j]), dict(tops[j])) for j in range(1, len(window))]

    return score


def engine_scorer(engine, k: int = TOP_K) -> Callable[[list[int]], Scored]:
    """The same view of a local model through our engine: its full distribution cut to the top-k, tokens
    named as a server names them (`tokenizer.decode([id])`, special tokens kept)."""
    tokenizer = engine.tokenizer
    names: dict[int, str] = {}

    def name(tid: int) -> str:
        if tid not in names:
            names[tid] = tokenizer.decode([tid], skip_special_tokens=False)
        return names[tid]

    def score(window: list[int]) -> Scored:
        lp = engine.score(window).float().log_softmax(-1)
        values, ids = lp[:-1].topk(k, dim=-1)
        out = []
        for j in range(1, len(window)):
            top: dict[str, float] = {}
            for v, t in zip(values[j - 1].tolist(), ids[j - 1].tolist(), strict=True):
                top.setdefault(name(t), v)
            out.append((lp[j - 1, window[j]].item(), top))
        return out

    return score


def topk_kld(base: dict[str, float], cand: dict[str, float]) -> float:
    """KL(baseline || candidate) over the baseline's top-k tokens plus one bucket for the rest (see above)."""
    floor = min(cand.values())
    kl, base_mass, cand_mass = 0.0, 0.0, 0.0
    for tok, lb in base.items():
        lc = cand.get(tok, floor)
        pb = math.exp(lb)
        kl += pb * (lb - lc)
        base_mass += pb
        cand_mass += math.exp(lc)
    rest_b, rest_c = max(0.0, 1.0 - base_mass), max(1e-12, 1.0 - cand_mass)
    if rest_b > 0:
        kl += rest_b * math.log(rest_b / rest_c)
    return max(kl, 0.0)


def _argmax(top: dict[str, float]) -> str:
    return max(top, key=top.get)


def endpoint_accuracy(candidate: Callable[[list[int]], Scored], baseline: Callable[[list[int]], Scored],
                      ids: list[int], ctx: int = 256, k: int = TOP_K) -> dict:
    """The accuracy fields of report.json from two scorers over the same overlapping windows as `evaluate`."""
    nll, base_nll, klds, agree = [], [], [], []
    for window, first in token_windows(ids, ctx):
        cand, base = candidate(window)[first:], baseline(window)[first:]
        for (lc, tc), (lb, tb) in zip(cand, base, strict=True):
            nll.append(-lc)
            base_nll.append(-lb)
            klds.append(topk_kld(tb, tc))
            agree.append(_argmax(tc) == _argmax(tb))
    if not nll:
        raise UsageError("evaluation text is too short: need at least 2 tokens")
    kld = torch.tensor(klds, dtype=torch.float64)
    ppl, base_ppl = math.exp(sum(nll) / len(nll)), math.exp(sum(base_nll) / len(base_nll))
    return {"ppl": ppl, "baseline_ppl": base_ppl, "ppl_ratio": ppl / base_ppl, "kld_mean": kld.mean().item(),
            "kld_p99": torch.quantile(kld, 0.99).item(), "top1_agreement": sum(agree) / len(agree),
            "tokens_scored": len(nll), "context": ctx, "top_k": k}
