"""Per-request generation settings (the engine's public contract, mirrored on vLLM's)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
