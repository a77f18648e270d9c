"""Next-token sampling and logprobs for the engine.

Logits processing runs batched over the rows that ask for it, in vLLM's order: the token mask (a grammar's
bitmask), `allowed_token_ids`, `min_tokens` (EOS and stop tokens suppressed), `logit_bias`, then the
penalties (repetition over prompt + output, frequency and presence over the output). Greedy rows take the
argmax of the processed logits. Filtering (temperature, min-p, top-k, top-p) runs batched over all sampling
rows at once because each row carries its own settings; only the final draw loops, so that a seeded request
consumes exactly one draw per step from its own generator and gets the same tokens whatever else shares the
batch.
"""

from __future__ import annotations

import math

import torch

from optcli.engine.sampling_params import SamplingParams

# Temperatures below this are treated as greedy: dividing by them overflows float32 and turns softmax into NaN.
_MIN_TEMPERATURE = 1e-5
# token_logprobs works on this many rows at a time, so a long echoed prompt does not materialize a second
# float32 copy of the whole [N, V] logits.
_LOGPROB_CHUNK = 512
# Top-k/top-p thresholds are searched among this many highest logits first (see _filter_logits).
_CANDIDATES = 256


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded for one request, or None to use the global RNG (unseeded requests)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _nucleus_size(sorted_x: torch.Tensor, log_norm: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many leading sorted positions the nucleus needs: those whose mass strictly before them is < top_p.

    Position 0 always qualifies (mass 0 < top_p), so at least the top token survives. The result depends only on
    the row's own prefix, so it is the same whether the row was truncated to candidates or fully sorted.
    """
    probs = (sorted_x - log_norm).exp()
    mass_before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=1)
    return (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(min=1)


def _filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``x`` (scaled float32 logits) with everything outside each row's top-k and top-p set at -inf.

    Both cuts become a per-row logit threshold (keep x >= threshold), so tokens tied with the last kept one stay
    and the result does not depend on how equal values get ordered. A full vocabulary sort costs ~10x a small
    topk on CPU, so the thresholds are found among the top ``_CANDIDATES`` (or max k) tokens, and only top-p rows
    whose nucleus is wider than that fall back to a full sort.
    """
    vocab = x.shape[1]
    cut_k = (top_k > 0) & (top_k < vocab)
    cut_p = top_p < 1
    if not bool((cut_k | cut_p).any()):
        return x
    width = min(vocab, max(_CANDIDATES, int(top_k[cut_k].max()) if bool(cut_k.any()) else 0))
    cand = x.topk(width, dim=-1).values  # sorted, highest first
    no_cut = torch.full_like(cand[:, :1], -math.inf)
    k_thr = torch.where(cut_k.unsqueeze(1), cand.gather(1, (top_k.clamp(1, width) - 1).unsqueeze(1)), no_cut)
    threshold = k_thr
    if bool(cut_p.any()):
        # The nucleus is taken over the top-k survivors, so normalize over those only.
        log_norm = x.masked_fill(x < k_thr, -math.inf).logsumexp(dim=-1, keepdim=True)
        n_keep = _nucleus_size(cand.masked_fill(cand < k_thr, -math.inf), log_norm, top_p)
        p_thr = cand.gather(1, n_keep - 1)
        # A k cut bounds the nucleus inside the candidates; without one it may run past them.
        wide = (cut_p & ~cut_k & (n_keep.squeeze(1) == width)).nonzero().squeeze(1)
        if width < vocab and wide.numel():
            full = x[wide].sort(dim=-1, descending=True).values
            p_thr[wide] = full.gather(1, _nucleus_size(full, log_norm[wide], top_p[wide]) - 1)
        threshold = torch.maximum(k_thr, torch.where(cut_p.unsqueeze(1), p_thr, no_cut))
    return x.masked_fill(x < threshold, -math.inf)


class TokenHistory:
    """One sequence's tokens as the penalties need them, kept incrementally (O(1) per new token): which
    tokens the prompt or the output contains (repetition_penalty) and how often each occurs in the output
    (presence and frequency penalties)."""

    def __init__(self, prompt_ids: list[int], vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [t for t in prompt_ids if 0 <= t < vocab_size]
        if ids:
            self.seen[torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def append(self, token: int) -> None:
        if 0 <= token < self.counts.numel():
            self.counts[token] += 1
            self.seen[token] = True


def _rows_tensor(rows: list[int], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _check_ids(name: str, ids: list[int], vocab: int) -> None:
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"{name} token ids must be in [0, {vocab})")


def _apply_token_mask(x: torch.Tensor, token_mask: tuple[list[int], torch.Tensor]) -> None:
    rows, allowed = token_mask
    if allowed.shape != (len(rows), x.shape[1]):
        raise ValueError(f"token_mask must be [{len(rows)}, {x.shape[1]}] (got {tuple(allowed.shape)})")
    r = _rows_tensor(list(rows), x.device)
    x[r] = x[r].masked_fill(~allowed.to(x.device), -math.inf)


def _apply_allowed_ids(x: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    vocab, device = x.shape[1], x.device
    allowed = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    rr, tt = [], []
    for j, i in enumerate(rows):
        ids = list(params[i].allowed_token_ids)
        _check_ids("allowed_token_ids", ids, vocab)
        rr.extend([j] * len(ids))
        tt.extend(ids)
    allowed[_rows_tensor(rr, device), _rows_tensor(tt, device)] = True
    r = _rows_tensor(rows, device)
    x[r] = x[r].masked_fill(~allowed, -math.inf)


def _apply_min_tokens(x: torch.Tensor, params: list[SamplingParams], rows: list[int],
                      eos_token_ids: tuple[int, ...] | list[int] | set[int]) -> None:
    """EOS and stop tokens barred from `rows`, unless that would leave a row nothing to sample."""
    vocab, device = x.shape[1], x.device
    rr, tt = [], []
    for j, i in enumerate(rows):
        ids = [t for t in sorted({*eos_token_ids, *params[i].stop_token_ids}) if 0 <= t < vocab]
        rr.extend([j] * len(ids))
        tt.extend(ids)
    if tt:
        r = _rows_tensor(rows, device)
        sub = x[r]
        sub[_rows_tensor(rr, device), _rows_tensor(tt, device)] = -math.inf
        keep = torch.isfinite(sub).any(dim=-1)  # something other than EOS / stop tokens is left
        x[r] = torch.where(keep.unsqueeze(1), sub, x[r])


def _apply_logit_bias(x: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    rr, tt, vv = [], [], []
    for i in rows:
        items = params[i].logit_bias.items()
        _check_ids("logit_bias", [t for t, _ in items], x.shape[1])
        for t, v in items:
            rr.append(i)
            tt.append(t)
            vv.append(float(v))
    x.index_put_((_rows_tensor(rr, x.device), _rows_tensor(tt, x.device)),
                 torch.tensor(vv, dtype=torch.float32, device=x.device), accumulate=True)


def _apply_penalties(x: torch.Tensor, params: list[SamplingParams], rows: list[int],
                     histories: list[TokenHistory | None] | None) -> None:
    """Repetition (scaled by sign), then frequency and presence penalties (subtracted), from each row's history."""
    if histories is None or any(histories[i] is None for i in rows):
        raise ValueError("penalties need each penalized row's TokenHistory")
    device = x.device
    r = _rows_tensor(rows, device)
    sub = x[r]
    hist = [histories[i] for i in rows]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], dtype=torch.float32, device=device)
    if bool((rep != 1).any()):
        seen = torch.stack([h.seen for h in hist]).to(device)
        rep = rep.unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=torch.float32, device=device)
    pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=torch.float32, device=device)
    if bool(((freq != 0) | (pres != 0)).any()):
        counts = torch.stack([h.counts for h in hist]).to(device)
        sub = sub - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).float()
    x[r] = sub


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    *,
    histories: list[TokenHistory | None] | None = None,
    num_output_tokens: list[int] | None = None,
    token_mask: tuple[list[int], torch.Tensor] | None = None,
    eos_token_ids: tuple[int, ...] | list[int] | set[int] = (),
) -> torch.Tensor | None:
    """Float32 logits with each row's processing applied, or None when no row asks for any.

    `histories[i]` is needed for rows with penalties, `num_output_tokens[i]` for rows with min_tokens,
    `token_mask` = (rows, allowed [len(rows), V] bool) restricts those rows to their allowed tokens.
    min_tokens never empties a row: where the mask leaves only EOS / stop tokens, they stay allowed.
    The steps run in this order (each one sees the previous ones' result): the grammar mask,
    allowed_token_ids, min_tokens, logit_bias, penalties.
    """
    min_rows = [
        i for i, p in enumerate(params)
        if p.min_tokens > 0 and (num_output_tokens is None or num_output_tokens[i] < p.min_tokens)
    ]
    bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
    allow_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    pen_rows = [i for i, p in enumerate(params) if p.penalized]
    has_mask = token_mask is not None and len(token_mask[0]) > 0
    if not (min_rows or bias_rows or allow_rows or pen_rows or has_mask):
        return None
    x = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    if has_mask:
        _apply_token_mask(x, token_mask)
    if allow_rows:
        _apply_allowed_ids(x, params, allow_rows)
    if min_rows:
        if num_output_tokens is None:
            raise ValueError("min_tokens needs num_output_tokens")
        _apply_min_tokens(x, params, min_rows, eos_token_ids)
    if bias_rows:
        _apply_logit_bias(x, params, bias_rows)
    if pen_rows:
        _apply_penalties(x, params, pen_rows, histories)
    return x


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, the same index in any float dtype (widening is exact, ties keep the first).
    On CPU torch's bf16/fp16 argmax is scalar code: [64, 128256] bf16 took 26 ms against 5.7 ms for a float32
    copy and its argmax, [1, 128256] 408 us against 81 (`benchmarks/cpu_step_ops.py`: 1 thread, CPU time,
    2-core Zen 5), so reduced-precision CPU logits are widened first. Elsewhere the argmax runs in place."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        return logits.float().argmax(dim=-1)
    return logits.argmax(dim=-1)


class Sampler:
    """Turns a batch of last-position logits into one token id per request."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        *,
        histories: list[TokenHistory | None] | None = None,
        num_output_tokens: list[int] | None = None,
        token_mask: tuple[list[int], torch.Tensor] | None = None,
        eos_token_ids: tuple[int, ...] | list[int] | set[int] = (),
    ) -> torch.Tensor:
        """Token ids [B] (int64) for logits [B, V]; ``generators[i]`` drives row i's draw when not None.
        The keyword arguments feed `process_logits` (penalties, min_tokens, a grammar's token mask)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab] (got shape {tuple(logits.shape)})")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"need one SamplingParams and one generator per row ({batch} rows, got {len(params)} and {len(generators)})"
            )
        for p in params:
            p.validate()  # the fields are mutable; SamplingParams holds the one copy of the limits

        processed = process_logits(logits, params, histories=histories, num_output_tokens=num_output_tokens,
                                   token_mask=token_mask, eos_token_ids=eos_token_ids)
        if processed is not None:
            logits = processed
        greedy = [p.temperature < _MIN_TEMPERATURE for p in params]
        out = greedy_argmax(logits)
        if all(greedy):
            return out
        rows = [i for i, g in enumerate(greedy) if not g]
        device = logits.device
        sel = [params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in sel], dtype=torch.float32, device=device)
        x = logits[rows].float() / temperature.unsqueeze(1)
        if any(p.min_p > 0 for p in sel):  # keep tokens at least min_p as likely as the top one
            min_p = torch.tensor([p.min_p for p in sel], dtype=torch.float32, device=device)
            floor = x.max(dim=-1, keepdim=True).values + min_p.log().unsqueeze(1)  # log(0) = -inf: no cut
            x = x.masked_fill(x < floor, -math.inf)
        probs = _filter_logits(
            x,
            torch.tensor([p.top_k for p in sel], dtype=torch.int64, device=device),
            torch.tensor([p.top_p for p in sel], dtype=torch.float32, device=device),
        ).softmax(dim=-1)

        drawn = torch.empty(len(rows), dtype=torch.int64, device=device)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:  # one call for every unseeded row: they all share the global RNG anyway
            drawn[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
        for j, i in enumerate(rows):
            gen = generators[i]
            if gen is not None:
                # Draw where the generator lives (a CPU generator cannot drive a CUDA draw).
                drawn[j] = torch.multinomial(probs[j].to(gen.device), 1, generator=gen).to(device)[0]
        out[rows] = drawn
        return out


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
) -> list[tuple[float, int, dict[int, float]]]:
    """Per row: (logprob of token_ids[row], its rank, {id: logprob} of the top_n tokens, most likely first).

    Logprobs come from log_softmax of the raw logits (no temperature or filtering, as vLLM and OpenAI report
    them). Rank is 1 + the number of tokens with a strictly greater logprob, so tied tokens share a rank.
    Serves both sampled tokens and echoed prompt tokens, hence batched over N rows.
    """
    if logits.dim() != 2 or token_ids.dim() != 1 or token_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"need logits [N, V] and token_ids [N] (got {tuple(logits.shape)} and {tuple(token_ids.shape)})"
        )
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0 (got {top_n})")
    vocab = logits.shape[1]
    top_n = min(top_n, vocab)
    ids_all = token_ids.to(device=logits.device, dtype=torch.int64)
    result: list[tuple[float, int, dict[int, float]]] = []
    for start in range(0, logits.shape[0], _LOGPROB_CHUNK):
        logp = logits[start : start + _LOGPROB_CHUNK].float().log_softmax(dim=-1)
        ids = ids_all[start : start + _LOGPROB_CHUNK].unsqueeze(1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab})")
        chosen = logp.gather(1, ids)
        ranks = (logp > chosen).sum(dim=-1) + 1
        # One .tolist() per tensor: per-element .item() calls dominate the cost for long prompts.
        chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
        if top_n:
            top = logp.topk(top_n, dim=-1)
            top_v, top_i = top.values.tolist(), top.indices.tolist()
            tops = [dict(zip(i_row, v_row, strict=True)) for i_row, v_row in zip(top_i, top_v, strict=True)]
        else:
            tops = [{} for _ in chosen_l]
        result.extend(zip(chosen_l, ranks_l, tops, strict=True))
    return result
