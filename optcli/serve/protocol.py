"""Pydantic models of the OpenAI `/v1/completions`, `/v1/chat/completions` and `/v1/models` wire format.

Every request parameter is honoured or refused with a 400 that names it; none is ignored. Unknown
fields are refused (as the OpenAI API does: "Unrecognized request argument"). Parameters of OpenAI or
vLLM that this server does not implement are declared, so that their neutral value (null, false, the
default) is accepted, and listed in `NEUTRAL_ONLY`: any other value is refused by name. Labels that do
not change the output (`user`, `safety_identifier`, `prompt_cache_key`, `metadata`) are accepted.
vLLM extensions honoured: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `stop_token_ids`,
`allowed_token_ids`, `ignore_eos`, `best_of`, `guided_json`, `response_format` on completions.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from optcli.engine.sampling_params import MAX_BEST_OF, SEED_MAX, SEED_MIN

_MAX_INT = 2**63 - 1  # integer fields beyond int64 are refused by name (torch and tokenizers overflow)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors -------------------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# --- shared -------------------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM; neutral only


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the grammar enforces the schema whatever strict says


class ResponseFormat(_Request):
    type: str  # "text" | "json_object" | "json_schema"; others are refused by name
    json_schema: JsonSchemaFormat | None = None


# Sampling fields both routes share, OpenAI's and vLLM's, each honoured.
class _Sampling(_Request):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, le=_MAX_INT)  # vLLM; -1 or 0: no cut
    min_p: float | None = None  # vLLM
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM
    n: int = Field(default=1, ge=1, le=MAX_BEST_OF)
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM
    min_tokens: int = Field(default=0, ge=0, le=_MAX_INT)  # vLLM
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM
    ignore_eos: bool = False  # vLLM
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older name for a JSON-schema constraint
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # a label
    # --- declared but not implemented: accepted only at the neutral value (NEUTRAL_ONLY) -----------
    use_beam_search: bool = False
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None
    logits_processors: list[Any] | None = None
    priority: int = 0
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None


# field → the values a request may send without it meaning anything this server would ignore
_NEUTRAL_SHARED: dict[str, tuple] = {
    "use_beam_search": (False,), "length_penalty": (1.0,), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,), "bad_words": (None, []), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,), "logits_processors": (None, []), "priority": (0,), "request_id": (None,),
    "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False), "cache_salt": (None,),
    "kv_transfer_params": (None,), "vllm_xargs": (None,), "stream_options.continuous_usage_stats": (False,),
}


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# --- /v1/completions ----------------------------------------------------------------------------
class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, le=_MAX_INT)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None  # neutral only
    add_special_tokens: bool = True  # vLLM; neutral only
    prompt_embeds: Any = None  # vLLM; neutral only

    NEUTRAL_ONLY: ClassVar[dict[str, tuple]] = {**_NEUTRAL_SHARED, "suffix": (None,), "add_special_tokens": (True,), "prompt_embeds": (None,)}


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# --- /v1/chat/completions -----------------------------------------------------------------------
class ContentPart(_Request):
    type: str  # "text" is honoured; images, audio and files are refused by name (a text-only server)
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, given to the chat template
    tool_call_id: str | None = None  # a tool result's call id, given to the chat template
    refusal: str | None = None  # neutral only


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the grammar enforces the parameters whatever strict says


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, le=_MAX_INT)
    max_completion_tokens: int | None = Field(default=None, le=_MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True  # vLLM
    safety_identifier: str | None = None  # a label
    prompt_cache_key: str | None = None  # a hint; prefix caching is automatic
    metadata: dict[str, str] | None = None  # a label
    # --- neutral only ---------------------------------------------------------------------------------
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    echo: bool = False  # vLLM
    continue_final_message: bool = False  # vLLM
    add_special_tokens: bool = False  # vLLM
    documents: list[Any] | None = None  # vLLM
    chat_template: str | None = None  # vLLM
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM

    NEUTRAL_ONLY: ClassVar[dict[str, tuple]] = {
        **_NEUTRAL_SHARED, "store": (None, False), "service_tier": (None, "auto", "default"),
        "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
        "verbosity": (None,), "web_search_options": (None,), "functions": (None,), "function_call": (None,),
        "echo": (False,), "continue_final_message": (False,), "add_special_tokens": (False,), "documents": (None,),
        "chat_template": (None,), "chat_template_kwargs": (None, {}), "mm_processor_kwargs": (None, {}),
    }


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# --- /v1/models ---------------------------------------------------------------------------------
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "optcli"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
