"""POST /v1/completions: one or many prompts (text or token ids), n / best_of completions each, echo,
logprobs, a JSON constraint (response_format, guided_json), streaming."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from optcli.engine.detokenizer import decode, token_texts
from optcli.engine.outputs import select_best
from optcli.serve.api_errors import APIError
from optcli.serve.logprobs import completion_logprobs, merge_lp
from optcli.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
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


def _prompts(state: ServeState, req: CompletionRequest, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and text, checked against the vocabulary and the context length."""
    tokenizer = state.tokenizer
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise APIError(400, "prompt is empty", param="prompt")
    prompts = [tokenizer(x).input_ids if isinstance(x, str) else [int(t) for t in x] for x in raw]
    vocab = len(tokenizer)
    for ids in prompts:
        if any(t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        check_length(state, len(ids), max_tokens, "max_tokens")
    texts = [x if isinstance(x, str) else decode(tokenizer, ids) for x, ids in zip(raw, prompts, strict=True)]
    return prompts, texts


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    state = serve_state(request)
    req: CompletionRequest = await parse_request(state, request, CompletionRequest)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    want_lp = req.logprobs
    schema, json_param = json_constraint(req)
    json_param = json_param or "response_format"
    params = make_params(req, max_tokens, want_lp, want_lp if (req.echo and want_lp is not None) else None,
                         json_schema=schema, json_param=json_param)
    prompts, prompt_texts = _prompts(state, req, max_tokens)
    check_fan_out(state, len(prompts), params)
    await check_engine_params(state, params, json_param=json_param)
    children = params.children()
    k = len(children)
    jobs = [ids for ids in prompts for _ in children]  # prompt-major: job i * k + j is prompt i's child j
    rid = f"cmpl-{uuid.uuid4().hex}"
    slot = state.admission.acquire()
    if req.stream:  # k == n here (best_of > n is not streamed)
        return sse_response(state, _stream(state, req, children * len(prompts), jobs, prompt_texts, rid), slot)
    with slot:
        finals = await collect(state, jobs, children * len(prompts), rid)
    choices = []
    returned = []
    for i in range(len(prompts)):
        for out in select_best(finals[i * k : (i + 1) * k], params):
            returned.append(out)
            text = (prompt_texts[i] if req.echo else "") + out.text
            lp = None
            if want_lp is not None:
                gen_offset = len(prompt_texts[i]) if req.echo else 0
                lp = completion_logprobs(state, token_texts(state.tokenizer, prompts[i], out.token_ids),
                                         out.logprobs or [], gen_offset)
                if req.echo:
                    lp = merge_lp(_prompt_logprobs(state, prompts[i], out), lp)
            choices.append(CompletionChoice(index=i * params.n + out.index, text=text, logprobs=lp,
                                            finish_reason=out.finish_reason))
    ptoks = sum(len(x) for x in prompts)
    ctoks = sum(len(o.token_ids) for o in returned)
    usage = UsageInfo(prompt_tokens=ptoks, completion_tokens=ctoks, total_tokens=ptoks + ctoks)
    return JSONResponse(CompletionResponse(id=rid, model=state.served_model_name, choices=choices,
                                           usage=usage).model_dump())


def _prompt_logprobs(state: ServeState, prompt_ids: list[int], out):
    """An echoed prompt's logprobs: its tokens' shares of decode(prompt), offsets from 0."""
    return completion_logprobs(state, token_texts(state.tokenizer, [], prompt_ids), out.prompt_logprobs or [], 0,
                               first_null=True)


async def _stream(state: ServeState, req: CompletionRequest, params: list, prompts: list[list[int]],
                  prompt_texts: list[str], rid: str):
    """`prompts` / `params`: one per choice (n per prompt, prompt-major); `prompt_texts`: one per prompt."""
    want_lp = req.logprobs
    prompt_texts = [prompt_texts[i // req.n] for i in range(len(prompts))]
    name = state.served_model_name
    texts = [StreamText(state.tokenizer, p.stop, ids) for p, ids in zip(params, prompts, strict=True)]
    lp_sent = [0] * len(prompts)
    lp_chars = [len(t) if req.echo else 0 for t in prompt_texts]  # where the next token's text starts
    echoed = [False] * len(prompts)
    ctoks = [0] * len(prompts)
    created = int(time.time())
    async for i, out in merged(state, prompts, params, rid):
        text = ""
        lp = None
        if req.echo and not echoed[i]:
            echoed[i] = True
            text = prompt_texts[i]
            if want_lp is not None:
                lp = _prompt_logprobs(state, prompts[i], out)
        text += texts[i].delta(out)
        ctoks[i] = len(out.token_ids)
        if want_lp is not None:
            new_texts = texts[i].token_texts[lp_sent[i]:len(out.token_ids)]
            new_lp = completion_logprobs(state, new_texts, (out.logprobs or [])[lp_sent[i]:], lp_chars[i])
            lp_chars[i] += sum(len(t) for t in new_texts)
            lp_sent[i] = len(out.token_ids)
            lp = merge_lp(lp, new_lp) if lp else new_lp
        if not text and not out.finished and not (lp and lp.tokens):
            continue
        choice = CompletionChoice(index=i, text=text, logprobs=lp,
                                  finish_reason=out.finish_reason if out.finished else None)
        yield sse(CompletionResponse(id=rid, created=created, model=name, choices=[choice]))
    if req.stream_options and req.stream_options.include_usage:
        ptoks = sum(len(x) for x in prompts[:: req.n])
        usage = UsageInfo(prompt_tokens=ptoks, completion_tokens=sum(ctoks), total_tokens=ptoks + sum(ctoks))
        yield sse(CompletionResponse(id=rid, created=created, model=name, choices=[], usage=usage))
