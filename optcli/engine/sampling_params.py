"""Per-request generation settings (the engine's public contract, mirrored on vLLM's)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# torch.Generator.manual_seed takes any integer in [-2**63, 2**64); outside it raises OverflowError.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_BEST_OF = 128  # completions generated for one prompt


class SamplingParamsError(ValueError):
    """A sampling limit is out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k cut
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    stop: list[str] | str | None = None  # stop strings; the returned text never includes them
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs for each generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    # --- as vLLM's SamplingParams (neutral defaults: a request that sets none is unchanged) ---------
    n: int = 1  # completions returned per prompt (Engine.generate: RequestOutput.outputs)
    best_of: int | None = None  # completions generated per prompt; the n of highest cumulative logprob are kept
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt + output tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens
    logit_bias: dict[int, float] | None = None  # token id → added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # only these tokens can be sampled
    json_schema: dict[str, Any] | None = None  # output constrained to JSON matching it (llguidance grammar)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    def validate(self) -> None:
        """The one check of every sampling limit (run at construction; the sampler re-runs it, since
        the fields stay mutable). Raises `SamplingParamsError` naming the bad field."""
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be at least 1 (got {self.max_tokens})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingParamsError("temperature", f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise SamplingParamsError("top_k", f"top_k must be >= 0 (got {self.top_k})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SamplingParamsError(name, f"{name} must be >= 0 (got {value})")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SamplingParamsError("seed", f"seed must be an integer in [-2**63, 2**64) (got {self.seed})")
        if not 1 <= self.n <= MAX_BEST_OF:
            raise SamplingParamsError("n", f"n must be in [1, {MAX_BEST_OF}] (got {self.n})")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_BEST_OF:
            raise SamplingParamsError("best_of", f"best_of must be in [n, {MAX_BEST_OF}] (n={self.n}, got {self.best_of})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise SamplingParamsError(name, f"{name} must be in [-2, 2] (got {value})")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 100):
            raise SamplingParamsError("repetition_penalty", f"repetition_penalty must be in (0, 100] (got {self.repetition_penalty})")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1] (got {self.min_p})")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}] (got {self.min_tokens})")
        for tid, bias in (self.logit_bias or {}).items():
            if not isinstance(tid, int) or tid < 0:
                raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids >= 0 (got {tid!r})")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise SamplingParamsError("logit_bias", f"logit_bias values must be in [-100, 100] (got {bias} for {tid})")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise SamplingParamsError("allowed_token_ids", "allowed_token_ids must not be empty")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise SamplingParamsError("allowed_token_ids", "allowed_token_ids must be token ids >= 0")
        for tid in self.stop_token_ids:
            if not isinstance(tid, int) or tid < 0:
                raise SamplingParamsError("stop_token_ids", f"stop_token_ids must be token ids >= 0 (got {tid!r})")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise SamplingParamsError("json_schema", "json_schema must be a JSON schema object (a dict)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_generated(self) -> int:
        """Completions generated per prompt (best_of, or n)."""
        return self.best_of or self.n

    @property
    def penalized(self) -> bool:
        """Whether the sampler needs this request's token history."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def children(self) -> list[SamplingParams]:
        """One single-completion SamplingParams per generated completion (n / best_of fan-out).

        Child j of a seeded request is seeded seed + j (the first keeps the request's seed, so n=1 is
        unchanged). When best_of ranks completions, children compute logprobs (0 top entries at least)
        for the cumulative logprob; `Engine.select_best` strips what the caller did not ask for."""
        count = self.num_generated
        if count == 1:
            return [self]
        rank = self.best_of is not None and self.best_of > self.n
        out = []
        for j in range(count):
            seed = None if self.seed is None else (self.seed if j == 0 else (self.seed + j) % 2**64)
            logprobs = self.logprobs if not rank or self.logprobs is not None else 0
            out.append(dataclasses.replace(self, n=1, best_of=None, seed=seed, logprobs=logprobs))
        return out
