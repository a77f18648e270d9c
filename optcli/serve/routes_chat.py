"""POST /v1/chat/completions: the tokenizer's chat template (or the "<role>: content" fallback),
logprobs, streaming."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from optcli.engine.detokenizer import token_texts
from optcli.serve.api_errors import APIError
from optcli.serve.logprobs import chat_logprobs
from optcli.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from optcli.serve.requests import check_length, json_body, make_params, parse_request
from optcli.serve.state import ServeState, serve_state
from optcli.serve.streaming import StreamText, collect, merged, sse, sse_response

router = APIRouter()


def fallback_chat_prompt(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


def _prompt_ids(state: ServeState, req: ChatCompletionRequest) -> list[int]:
    tokenizer = state.tokenizer
    messages = [{"role": m.role, "content": _message_text(m.content)} for m in req.messages]
    if not state.has_template:
        return tokenizer(fallback_chat_prompt(messages)).input_ids
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    state = serve_state(request)
    req: ChatCompletionRequest = await parse_request(state, request, ChatCompletionRequest)
    ids = _prompt_ids(state, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = max(state.max_model_len - len(ids), 1)
    want_lp = (req.top_logprobs or 0) if req.logprobs else None
    params = make_params(req, max_tokens, want_lp, None, max_tokens_param=param)
    check_length(state, len(ids), max_tokens, param)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    slot = state.admission.acquire()
    if req.stream:
        return sse_response(state, _stream(state, req, params, ids, rid), slot)
    with slot:
        (out,) = await collect(state, [ids], params, rid)
    lp = None
    if want_lp is not None:
        lp = chat_logprobs(state, token_texts(state.tokenizer, ids, out.token_ids), out.logprobs or [])
    choice = ChatCompletionChoice(index=0, message=ChatResponseMessage(content=out.text), logprobs=lp,
                                  finish_reason=out.finish_reason)
    n = len(out.token_ids)
    usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
    return JSONResponse(ChatCompletionResponse(id=rid, model=state.served_model_name, choices=[choice],
                                               usage=usage).model_dump())


async def _stream(state: ServeState, req: ChatCompletionRequest, params, ids: list[int], rid: str):
    want_lp = (req.top_logprobs or 0) if req.logprobs else None
    name = state.served_model_name
    created = int(time.time())
    stream_text = StreamText(state.tokenizer, params.stop, ids)
    first = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
    yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[first]))
    lp_sent = 0
    n = 0
    async for _, out in merged(state, [ids], params, rid):
        delta = stream_text.delta(out)
        n = len(out.token_ids)
        lp = None
        if want_lp is not None:
            lp = chat_logprobs(state, stream_text.token_texts[lp_sent:n], (out.logprobs or [])[lp_sent:])
            lp_sent = n
        if not delta and not out.finished and not (lp and lp.content):
            continue
        choice = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content=delta), logprobs=lp,
                                            finish_reason=out.finish_reason if out.finished else None)
        yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice]))
    if req.stream_options and req.stream_options.include_usage:
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
        yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage))
