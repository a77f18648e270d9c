"""POST /v1/chat/completions: the tokenizer's chat template (or the "<role>: content" fallback), n / best_of
completions, logprobs, a JSON constraint (response_format, guided_json), forced tool calls, streaming.

Tools: a forced `tool_choice` (a named function, or "required") is honoured with constrained decoding,
the output held to the function's parameters schema (named) or to a list of calls to the given tools
(required); the JSON becomes `message.tool_calls`. `tool_choice: "none"` generates plain text without
showing the tools to the model. "auto" (the default when tools are given) is refused: deciding whether
the model's free text is a tool call needs a model-specific tool-call parser, which this server lacks.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from optcli.engine.detokenizer import token_texts
from optcli.engine.outputs import RequestOutput, select_best
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
    NamedToolChoice,
    UsageInfo,
)
from optcli.serve.requests import (
    check_engine_params,
    check_fan_out,
    check_length,
    json_body,
    json_constraint,
    make_params,
    parse_request,
)
from optcli.serve.state import ServeState, serve_state
from optcli.serve.streaming import StreamText, collect, merged, sse, sse_response

router = APIRouter()


def fallback_chat_prompt(messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt of a model without a chat template: one "<role>: content" line per message (the tools
    a forced tool_choice may call first, as JSON)."""
    lines = [f"tools: {json.dumps(tools)}\n"] if tools else []
    for m in messages:
        who = f"{m['role']} ({m['name']})" if m.get("name") else m["role"]
        content = m.get("content") or ""
        if m.get("tool_calls"):
            content += json.dumps([c["function"] for c in m["tool_calls"]])
        lines.append(f"{who}: {content}\n")
    return "".join(lines)


def _message_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part type {part.type!r} is not supported: this server takes text only",
                           param=f"messages.{i}.content.{j}.type")
        for name in ("image_url", "input_audio", "file", "refusal"):
            if getattr(part, name) is not None:
                raise APIError(400, f"a text content part cannot carry {name}", param=f"messages.{i}.content.{j}.{name}")
        parts.append(part.text)
    return "".join(parts)


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if m.refusal is not None:
            raise APIError(400, "message refusal is not supported", param=f"messages.{i}.refusal")
        msg: dict = {"role": m.role, "content": _message_text(m.content, i)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _prompt_ids(state: ServeState, req: ChatCompletionRequest, tools: list[dict] | None) -> list[int]:
    tokenizer = state.tokenizer
    messages = _messages(req)
    if not state.has_template:
        text = fallback_chat_prompt(messages, tools) + ("assistant:" if req.add_generation_prompt else "")
        return tokenizer(text).input_ids
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _tool_plan(req: ChatCompletionRequest) -> tuple[str, dict | None, list[dict] | None]:
    """(mode, JSON schema of the output, tools shown to the template); mode is "none", "named" or "required"."""
    choice, tools = req.tool_choice, req.tools
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return "none", None, None
    if choice is None or choice == "auto":
        raise APIError(400, 'tool_choice "auto" is not supported: this server has no tool-call parser; '
                            'use "required", a named function, or "none"', param="tool_choice")
    if choice == "none":
        return "none", None, None
    shown = [t.model_dump(exclude_none=True) for t in tools]
    params_of = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in params_of:
            raise APIError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice")
        return "named", params_of[name], shown
    call = [{"type": "object", "properties": {"name": {"const": n}, "parameters": s}, "required": ["name", "parameters"],
             "additionalProperties": False} for n, s in params_of.items()]
    schema = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return "required", schema, shown


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_message(mode: str, req: ChatCompletionRequest, out: RequestOutput) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message and finish reason of one completion under a tool plan."""
    if mode == "none":
        return ChatResponseMessage(content=out.text), out.finish_reason
    if mode == "named":
        calls = [_call(req.tool_choice.function.name, out.text)]
        return ChatResponseMessage(content=None, tool_calls=calls), out.finish_reason
    try:
        parsed = json.loads(out.text)
    except ValueError:  # cut short by max_tokens: the calls are incomplete, so say what came out
        return ChatResponseMessage(content=out.text), out.finish_reason
    calls = [_call(c["name"], json.dumps(c["parameters"])) for c in parsed]
    return ChatResponseMessage(content=None, tool_calls=calls), "tool_calls" if out.finish_reason == "stop" else out.finish_reason


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    state = serve_state(request)
    req: ChatCompletionRequest = await parse_request(state, request, ChatCompletionRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    mode, tool_schema, shown_tools = _tool_plan(req)
    schema, json_param = json_constraint(req)
    if tool_schema is not None:
        if schema is not None:
            raise APIError(400, f"{json_param} and a forced tool_choice both constrain the output; send one",
                           param=json_param)
        schema, json_param = tool_schema, "tools"
    ids = _prompt_ids(state, req, shown_tools)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = max(state.max_model_len - len(ids), 1)
    want_lp = (req.top_logprobs or 0) if req.logprobs else None
    json_param = json_param or "response_format"
    params = make_params(req, max_tokens, want_lp, None, max_tokens_param=param, json_schema=schema,
                         json_param=json_param)
    check_length(state, len(ids), max_tokens, param)
    check_fan_out(state, 1, params)
    await check_engine_params(state, params, max_tokens_param=param, json_param=json_param)
    children = params.children()
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    slot = state.admission.acquire()
    if req.stream:
        return sse_response(state, _stream(state, req, children, ids, rid, mode), slot)
    with slot:
        finals = await collect(state, [ids] * len(children), children, rid)
    choices = []
    returned = select_best(finals, params)
    for out in returned:
        lp = chat_logprobs(state, token_texts(state.tokenizer, ids, out.token_ids), out.logprobs or []) if want_lp is not None else None
        message, finish = _tool_message(mode, req, out)
        choices.append(ChatCompletionChoice(index=out.index, message=message, logprobs=lp, finish_reason=finish))
    n = sum(len(o.token_ids) for o in returned)
    usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
    return JSONResponse(ChatCompletionResponse(id=rid, model=state.served_model_name, choices=choices,
                                               usage=usage).model_dump())


async def _stream(state: ServeState, req: ChatCompletionRequest, children: list, ids: list[int], rid: str,
                  mode: str):
    """One stream per choice (best_of > n is refused with stream, so children are the n choices). A named
    tool's arguments stream as they come; "required" calls are parsed and sent when the choice ends."""
    want_lp = (req.top_logprobs or 0) if req.logprobs else None
    name = state.served_model_name
    created = int(time.time())
    k = len(children)
    texts = [StreamText(state.tokenizer, p.stop, ids) for p in children]
    for i in range(k):
        first = ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
        if mode == "named":
            call = _call(req.tool_choice.function.name, "")
            first = ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", tool_calls=[
                {"index": 0, **call}]))
        yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[first]))
    lp_sent = [0] * k
    ntoks = [0] * k
    async for i, out in merged(state, [ids] * k, children, rid):
        delta = texts[i].delta(out)
        ntoks[i] = len(out.token_ids)
        lp = None
        if want_lp is not None:
            lp = chat_logprobs(state, texts[i].token_texts[lp_sent[i]:ntoks[i]], (out.logprobs or [])[lp_sent[i]:])
            lp_sent[i] = ntoks[i]
        if not delta and not out.finished and not (lp and lp.content):
            continue
        finish = out.finish_reason if out.finished else None
        if mode == "named":
            message = DeltaMessage(tool_calls=[{"index": 0, "function": {"arguments": delta}}] if delta else None)
        elif mode == "required":
            message = DeltaMessage()
            if out.finished:
                full, finish = _tool_message(mode, req, RequestOutput(
                    request_id=out.request_id, prompt=None, prompt_token_ids=[], token_ids=out.token_ids,
                    text=texts[i].sent, finished=True, finish_reason=out.finish_reason))
                message = DeltaMessage(content=full.content, tool_calls=[
                    {"index": j, **c} for j, c in enumerate(full.tool_calls or [])] or None)
        else:
            message = DeltaMessage(content=delta)
        choice = ChatCompletionStreamChoice(index=i, delta=message, logprobs=lp, finish_reason=finish)
        yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice]))
    if req.stream_options and req.stream_options.include_usage:
        n = sum(ntoks)
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
        yield sse(ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage))
