"""What the engine returns for a request (`RequestOutput`), and which of a prompt's completions a
`best_of` request keeps (`select_best`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from optcli.engine.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far (the stop token included, as vLLM does)
    new_token_ids: list[int] = field(default_factory=list)  # generated in the step that made this
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (when logprobs are computed)
    index: int = 0  # which of the prompt's n completions this is (best first when best_of ranks them)
    siblings: list[RequestOutput] = field(default_factory=list, repr=False, compare=False)  # completions 2..n

    @property
    def outputs(self) -> list[RequestOutput]:
        """All n completions of the prompt (`SamplingParams.n`), this one first."""
        return [self, *self.siblings]


def select_best(outputs: list[RequestOutput], params: SamplingParams) -> list[RequestOutput]:
    """The n completions to return from the `params.children()` outputs of one prompt: with best_of > n,
    the n of highest cumulative logprob (as OpenAI and vLLM rank them), else all in order. Logprobs
    computed only for the ranking are dropped; `index` numbers the result."""
    chosen = list(outputs)
    if params.best_of is not None and params.best_of > params.n:
        chosen = sorted(chosen, key=lambda o: -(o.cumulative_logprob if o.cumulative_logprob is not None else -math.inf))
        chosen = chosen[: params.n]
    result = []
    for j, out in enumerate(chosen):
        if params.logprobs is None:
            out = dataclasses.replace(out, logprobs=None, cumulative_logprob=None)
        else:
            out = dataclasses.replace(out)
        out.index, out.siblings = j, []
        result.append(out)
    return result
