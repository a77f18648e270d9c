"""Request checks shared by the generation routes: auth, body parsing with size limits, model name,
lengths, and building `SamplingParams` (whose own checks are the sampling limits)."""

from __future__ import annotations

import asyncio
import hmac
import json
import re

from fastapi import Request
from pydantic import BaseModel, ValidationError

from optcli.engine.sampling_params import SamplingParams, SamplingParamsError
from optcli.serve.api_errors import APIError, validation_error
from optcli.serve.state import ServeState

_MAX_API_TEMPERATURE = 2  # the OpenAI API's range, narrower than the engine's


def check_auth(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")


_MAX_JSON_DEPTH = 64  # deeper bodies are refused before pydantic or the grammar compiler walk them
_TOKEN_ID = re.compile(r"[0-9]{1,19}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(obj) -> None:
    """400 for a body nested deeper than _MAX_JSON_DEPTH or holding a string that is not valid Unicode
    (a lone surrogate such as "\\ud800", which JSON escapes allow and tokenizers reject)."""
    stack = [(obj, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= _MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {_MAX_JSON_DEPTH} levels",
                           param=".".join(map(str, path[:3])) or None)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if isinstance(k, str) and not _valid_unicode(k):
                raise APIError(400, "request body holds a key that is not valid Unicode (a lone surrogate)",
                               param=".".join(map(str, path)) or None)
            if isinstance(v, str):  # leaves are checked here, so only containers go on the stack
                if not _valid_unicode(v):
                    param = ".".join(map(str, (*path, k)))
                    raise APIError(400, f"{param} is not valid Unicode: it holds a lone surrogate (e.g. \\ud800)",
                                   param=param)
            elif isinstance(v, dict | list):
                stack.append((v, (*path, k)))


def _valid_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def parse_body(state: ServeState, request: Request, model: type[BaseModel]) -> BaseModel:
    limit = state.max_request_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {_MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_tree(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _neutral_only(req) -> None:
    """400 naming any declared-but-unimplemented parameter sent with a value that would mean something."""
    for name, allowed in req.NEUTRAL_ONLY.items():
        value = req
        for part in name.split("."):
            value = getattr(value, part, None) if value is not None else None
        if value is None and None not in allowed and "." in name:
            continue  # the parent object is absent
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise APIError(400, f"{name}={value!r} is not supported by this server (only {allowed[0]!r})",
                           param=name, code="unsupported_parameter")


async def parse_request(state: ServeState, request: Request, model: type[BaseModel]):
    """Auth, body, model name and the API-level checks of a generation request: the temperature range,
    n / best_of, streaming options, and every unimplemented parameter at its neutral value."""
    check_auth(state, request)
    req = await parse_body(state, request, model)
    if req.model != state.served_model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
    _neutral_only(req)
    if req.temperature is not None and not 0 <= req.temperature <= _MAX_API_TEMPERATURE:
        raise APIError(400, f"temperature must be in [0, {_MAX_API_TEMPERATURE}]", param="temperature")
    if req.best_of is not None and req.best_of < req.n:
        raise APIError(400, f"best_of must be >= n (got best_of={req.best_of}, n={req.n})", param="best_of")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise APIError(400, "best_of > n cannot be streamed: the best completions are known only at the end",
                       param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream=true", param="stream_options")
    return req


def check_fan_out(state: ServeState, num_prompts: int, params: SamplingParams) -> None:
    """A request may not queue more sequences than the server admits requests (prompts x best_of / n)."""
    total = num_prompts * params.num_generated
    if total > state.admission.limit:
        param = "best_of" if params.best_of else "n"
        raise APIError(400, f"{num_prompts} prompt(s) x {params.num_generated} completions = {total} sequences; "
                            f"this server takes at most {state.admission.limit} per request", param=param)


def check_length(state: ServeState, prompt_len: int, max_tokens: int, param: str) -> None:
    max_model_len = state.max_model_len
    if prompt_len == 0:
        raise APIError(400, "prompt is empty", param="prompt")
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            param=param, code="context_length_exceeded",
        )


def json_constraint(req) -> tuple[dict | None, str | None]:
    """The JSON schema a request constrains its output to (response_format or vLLM's guided_json), and
    the parameter that asked for it."""
    schema, param = None, None
    fmt = req.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            schema, param = {"type": "object"}, "response_format"
        elif fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            schema, param = fmt.json_schema.schema_, "response_format"
        elif fmt.type != "text":
            raise APIError(400, f"response_format type {fmt.type!r} is not supported (text, json_object, json_schema)",
                           param="response_format.type")
    if req.guided_json is not None:
        if schema is not None:
            raise APIError(400, "guided_json and response_format both constrain the output; send one",
                           param="guided_json")
        value = req.guided_json
        if isinstance(value, str):
            try:
                value = json.loads(value, parse_constant=_reject_constant)
            except (ValueError, RecursionError):
                raise APIError(400, "guided_json is not a valid JSON schema", param="guided_json") from None
            if not isinstance(value, dict):
                raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
            _check_tree(value)
        schema, param = value, "guided_json"
    return schema, param


def _logit_bias(req) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    out = {}
    for key, value in req.logit_bias.items():
        if not _TOKEN_ID.fullmatch(key):
            raise APIError(400, f"logit_bias keys must be token ids (got {key[:40]!r})", param="logit_bias")
        out[int(key)] = value
    return out


def make_params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                max_tokens_param: str = "max_tokens", json_schema: dict | None = None,
                json_param: str = "response_format") -> SamplingParams:
    """SamplingParams for a request; its out-of-range fields become a 400 naming the request's field."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
            seed=req.seed, stop=req.stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            n=req.n, best_of=req.best_of,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            min_tokens=req.min_tokens, logit_bias=_logit_bias(req),
            allowed_token_ids=None if req.allowed_token_ids is None else list(req.allowed_token_ids),
            json_schema=json_schema,
        )
    except SamplingParamsError as e:
        raise params_error(e, max_tokens_param, json_param) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


def params_error(e: SamplingParamsError, max_tokens_param: str = "max_tokens",
                 json_param: str = "response_format") -> APIError:
    """The 400 for an engine-side complaint, naming the request's field."""
    if e.param == "max_tokens":
        return APIError(400, str(e).replace("max_tokens", max_tokens_param, 1), param=max_tokens_param)
    if e.param == "json_schema":
        return APIError(400, f"{json_param}: {e}", param=json_param)
    return APIError(400, str(e), param=e.param)


async def check_engine_params(state: ServeState, params: SamplingParams, max_tokens_param: str = "max_tokens",
                              json_param: str = "response_format") -> None:
    """The model-dependent checks (vocabulary, the grammar) before any response starts, so that a
    streaming request gets its 400 as a status, not in-band. Compiling a grammar runs off the event loop."""
    engine = state.async_engine.engine
    try:
        if params.json_schema is not None:
            await asyncio.to_thread(engine.check_params, params)
        else:
            engine.check_params(params)
    except SamplingParamsError as e:
        raise params_error(e, max_tokens_param, json_param) from None


def json_body(model) -> dict:
    """OpenAPI request body for a route that parses its JSON itself (so it can answer 400/413 its own
    way), with pydantic's $defs inlined so the schema stands alone (clients, schemathesis)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
