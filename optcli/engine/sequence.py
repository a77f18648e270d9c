"""One request's state as the engine moves it through waiting → running → finished."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from optcli.engine.sampling_params import SamplingParams

_arrivals = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    generator: torch.Generator | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))  # fairness: oldest first
    queued_at: float | None = None  # the scheduler's clock when first queued (static batching's wait)
    token_ids: list[int] = field(init=False)  # prompt + generated
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full blocks computed so far
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    logprobs: list = field(default_factory=list)  # per generated token: (logprob, rank, {id: logprob})
    prompt_logprobs: list = field(default_factory=list)  # per prompt token after the first
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    cumulative_logprob: float = 0.0  # of the sampled tokens, summed where logprobs are computed
    history: Any = field(default=None, repr=False, compare=False)  # sampler.TokenHistory when penalties apply
    matcher: Any = field(default=None, repr=False, compare=False)  # llguidance matcher of a JSON-schema request
    detokenizer: Any = field(default=None, repr=False, compare=False)  # the engine's IncrementalDetokenizer, made on the first stop-string check

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
