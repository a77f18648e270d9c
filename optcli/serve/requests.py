"""Request checks shared by the generation routes: auth, body parsing with size limits, model name,
lengths, and building `SamplingParams` (whose own checks are the sampling limits)."""

from __future__ import annotations

import hmac
import json

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
        obj = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


async def parse_request(state: ServeState, request: Request, model: type[BaseModel]):
    """Auth, body, model name and the API-level checks (n, the temperature range) of a generation request."""
    check_auth(state, request)
    req = await parse_body(state, request, model)
    if req.model != state.served_model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if req.temperature is not None and req.temperature > _MAX_API_TEMPERATURE:
        raise APIError(400, f"temperature must be in [0, {_MAX_API_TEMPERATURE}]", param="temperature")
    return req


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


def make_params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                max_tokens_param: str = "max_tokens") -> SamplingParams:
    """SamplingParams for a request; its out-of-range fields become a 400 naming the request's field."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
    except SamplingParamsError as e:
        param = max_tokens_param if e.param == "max_tokens" else e.param
        message = str(e).replace("max_tokens", max_tokens_param, 1) if e.param == "max_tokens" else str(e)
        raise APIError(400, message, param=param) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


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
