"""`create_app(async_engine, served_model_name)`: an OpenAI-compatible FastAPI app around `AsyncEngine`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
Models without a chat template get a fallback prompt: one "<role>: <content>\\n" line per message,
then "assistant:" (a warning is logged once, at app creation).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from optcli.engine.async_engine import AsyncEngine
from optcli.engine.engine import RequestOutput
from optcli.engine.sampling_params import SamplingParams
from optcli.serve.metrics import ServerMetrics
from optcli.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
)

logger = logging.getLogger("optcli.serve")

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status)


def _validation_error(errors) -> APIError:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return APIError(400, f"invalid value for {param!r}: {msg}" if param else msg, param=param)


def _fallback_chat_prompt(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


class _Detokenizer:
    """Streaming text deltas: decode the growing token list and emit its new suffix, holding back an
    incomplete UTF-8 tail and any tail that could start a stop string; the final delta makes the
    concatenation equal the engine's final text."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.sent = tokenizer, stop, ""

    def delta(self, out: RequestOutput) -> str:
        if out.finished:
            text = out.text if out.finish_reason != "abort" else self._decode(out.token_ids)
        else:
            text = self._decode(out.token_ids)
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold]
        if not text.startswith(self.sent):  # the decoded prefix changed (rare); never resend text
            return ""
        d = text[len(self.sent):]
        self.sent = text
        return d

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _json_body(model) -> dict:
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


def create_app(
    async_engine: AsyncEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int = 256,
    max_request_bytes: int = 1_000_000,
    request_timeout_s: float = 600,
) -> FastAPI:
    engine = async_engine.engine
    tokenizer = engine.tokenizer
    max_model_len = engine.max_model_len
    max_in_flight = getattr(engine, "max_num_seqs", 0) + max_waiting
    metrics = ServerMetrics(served_model_name)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        logger.warning("tokenizer of %s has no chat template; chat uses the fallback '<role>: content' "
                       "template ending in 'assistant:'", served_model_name)
    state = {"in_flight": 0}
    app = FastAPI(title="optcli", docs_url=None, redoc_url=None, openapi_url="/openapi.json")  # schema, no UI

    # --- error handling -------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = e.detail if isinstance(e.detail, str) else "request failed"
        return JSONResponse(error_body(e.status_code, msg), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    # --- helpers --------------------------------------------------------------------------------
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise APIError(413, f"request body exceeds {max_request_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise APIError(413, f"request body exceeds {max_request_bytes} bytes")
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
            raise _validation_error(e.errors()) from None

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def check_common(req) -> None:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.temperature is not None and not (0 <= req.temperature <= 2):
            raise APIError(400, "temperature must be in [0, 2]", param="temperature")
        if req.top_p is not None and not (0 < req.top_p <= 1):
            raise APIError(400, "top_p must be in (0, 1]", param="top_p")
        if req.top_k is not None and req.top_k < 0:
            raise APIError(400, "top_k must be >= 0", param="top_k")

    def check_length(prompt_len: int, max_tokens: int, param: str) -> None:
        if prompt_len == 0:
            raise APIError(400, "prompt is empty", param="prompt")
        if prompt_len + max_tokens > max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
                param=param, code="context_length_exceeded",
            )

    def make_params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    class _Admission:
        def __enter__(self):
            if state["in_flight"] >= max_in_flight:
                raise APIError(429, "server is overloaded: too many requests waiting; retry later",
                               code="too_many_requests")
            state["in_flight"] += 1

        def __exit__(self, *exc):
            state["in_flight"] -= 1

    async def run_one(prompt_ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one prompt, recording metrics; closing it aborts the request."""
        if not async_engine.is_alive():
            raise APIError(503, "engine is not running")
        start = last = time.monotonic()
        first = True
        async for out in async_engine.generate(prompt_ids, params, rid):
            now = time.monotonic()
            if out.new_token_ids:
                (metrics.first_token if first else metrics.inter_token)(now - last)
                first, last = False, now
            if out.finished:
                metrics.finished(len(prompt_ids), len(out.token_ids), out.finish_reason, now - start)
            yield out

    async def collect(prompts: list[list[int]], params: SamplingParams, rid: str) -> list[RequestOutput]:
        async def one(i: int) -> RequestOutput:
            final = None
            async for out in run_one(prompts[i], params, f"{rid}-{i}"):
                final = out
            return final

        try:
            async with asyncio.timeout(request_timeout_s):
                return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        except TimeoutError:
            raise APIError(408, f"request timed out after {request_timeout_s}s") from None
        except ValueError as e:  # the engine rejected the request
            raise APIError(400, str(e)) from None

    async def merged(prompts: list[list[int]], params: SamplingParams, rid: str):
        """(index, output) of all prompts' streams as they come; closing it cancels (aborts) them all."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in run_one(prompts[i], params, f"{rid}-{i}"):
                    q.put_nowait((i, out))
                q.put_nowait((i, None))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                q.put_nowait((i, e))
                if isinstance(e, asyncio.CancelledError):
                    raise

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        remaining = len(tasks)
        try:
            async with asyncio.timeout(request_timeout_s):
                while remaining:
                    i, item = await q.get()
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def sse(obj: BaseModel | dict) -> str:
        data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
        return f"data: {data}\n\n"

    def sse_error(e: BaseException) -> str:
        if isinstance(e, APIError):
            return sse(error_body(e.status, e.message, e.param, e.code, e.type))
        if isinstance(e, TimeoutError):
            return sse(error_body(408, f"request timed out after {request_timeout_s}s"))
        if isinstance(e, ValueError):
            return sse(error_body(400, str(e)))
        logger.exception("error while streaming", exc_info=e)
        return sse(error_body(500, "internal server error"))

    def streaming(gen: AsyncIterator[str], admission: _Admission) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
                yield sse_error(e)
            finally:
                await gen.aclose()
                admission.__exit__()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def token_str(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False)

    # --- completions logprobs -------------------------------------------------------------------
    def completion_logprobs(ids: list[int], entries: list, offset: int, first_null: bool = False) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for j, tid in enumerate(ids):
            tok = token_str(tid)
            entry = None
            if first_null and j == 0:
                entry = None
            else:
                k = j - 1 if first_null else j
                entry = entries[k] if k < len(entries) else None
            lp.tokens.append(tok)
            lp.text_offset.append(offset)
            offset += len(tok)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                logprob, _, top = entry
                lp.token_logprobs.append(float(logprob))
                tops: dict[str, float] = {}
                for t, v in top.items():
                    tops.setdefault(token_str(t), float(v))
                lp.top_logprobs.append(tops)
        return lp

    def merge_lp(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                                  top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)

    def chat_logprobs(ids: list[int], entries: list) -> ChatLogprobs:
        content = []
        for tid, entry in zip(ids, entries, strict=False):
            logprob, _, top = entry
            tok = token_str(tid)
            content.append(ChatTokenLogprob(
                token=tok, logprob=float(logprob), bytes=list(tok.encode()),
                top_logprobs=[TopLogprob(token=token_str(t), logprob=float(v), bytes=list(token_str(t).encode()))
                              for t, v in top.items()],
            ))
        return ChatLogprobs(content=content)

    # --- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_alive():
            return Response(status_code=200)
        return JSONResponse(error_body(503, "engine is not running"), status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        check_auth(request)
        metrics.refresh(async_engine.stats())
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        check_auth(request)
        card = ModelCard(id=served_model_name, max_model_len=max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request):
        check_auth(request)
        req: CompletionRequest = await parse_body(request, CompletionRequest)
        check_model(req.model)
        check_common(req)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens <= 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        p = req.prompt
        if isinstance(p, str):
            raw = [p]
        elif p and all(isinstance(x, int) for x in p):
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
            check_length(len(ids), max_tokens, "max_tokens")
        prompt_texts = [x if isinstance(x, str) else tokenizer.decode(ids, skip_special_tokens=True)
                        for x, ids in zip(raw, prompts, strict=True)]
        want_lp = req.logprobs
        params = make_params(req, max_tokens, want_lp, want_lp if (req.echo and want_lp is not None) else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        admission = _Admission()
        admission.__enter__()
        if not req.stream:
            try:
                finals = await collect(prompts, params, rid)
            finally:
                admission.__exit__()
            choices = []
            for i, out in enumerate(finals):
                text = (prompt_texts[i] if req.echo else "") + out.text
                lp = None
                if want_lp is not None:
                    gen_offset = len(prompt_texts[i]) if req.echo else 0
                    lp = completion_logprobs(out.token_ids, out.logprobs or [], gen_offset)
                    if req.echo:
                        lp = merge_lp(completion_logprobs(prompts[i], out.prompt_logprobs or [], 0, True), lp)
                choices.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=out.finish_reason))
            ptoks = sum(len(x) for x in prompts)
            ctoks = sum(len(o.token_ids) for o in finals)
            usage = UsageInfo(prompt_tokens=ptoks, completion_tokens=ctoks, total_tokens=ptoks + ctoks)
            return JSONResponse(CompletionResponse(id=rid, model=served_model_name, choices=choices,
                                                   usage=usage).model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def gen():
            detoks = [_Detokenizer(tokenizer, params.stop) for _ in prompts]
            lp_sent = [0] * len(prompts)
            echoed = [False] * len(prompts)
            ctoks = [0] * len(prompts)
            created = int(time.time())
            async for i, out in merged(prompts, params, rid):
                text = ""
                lp = None
                if req.echo and not echoed[i]:
                    echoed[i] = True
                    text = prompt_texts[i]
                    if want_lp is not None:
                        lp = completion_logprobs(prompts[i], out.prompt_logprobs or [], 0, True)
                offset = len(detoks[i].sent) + (len(prompt_texts[i]) if req.echo else 0)
                delta = detoks[i].delta(out)
                text += delta
                ctoks[i] = len(out.token_ids)
                if want_lp is not None:
                    new_ids = out.token_ids[lp_sent[i]:]
                    new_lp = completion_logprobs(new_ids, (out.logprobs or [])[lp_sent[i]:], offset)
                    lp_sent[i] = len(out.token_ids)
                    lp = merge_lp(lp, new_lp) if lp else new_lp
                if not text and not out.finished and not (lp and lp.tokens):
                    continue
                choice = CompletionChoice(index=i, text=text, logprobs=lp,
                                          finish_reason=out.finish_reason if out.finished else None)
                yield sse(CompletionResponse(id=rid, created=created, model=served_model_name, choices=[choice]))
            if include_usage:
                ptoks = sum(len(x) for x in prompts)
                usage = UsageInfo(prompt_tokens=ptoks, completion_tokens=sum(ctoks), total_tokens=ptoks + sum(ctoks))
                yield sse(CompletionResponse(id=rid, created=created, model=served_model_name, choices=[],
                                             usage=usage))

        return streaming(gen(), admission)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        check_auth(request)
        req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        check_model(req.model)
        check_common(req)
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in req.messages]
        if has_template:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - a template that rejects these messages
                raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(_fallback_chat_prompt(messages)).input_ids
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = max(max_model_len - len(ids), 1)
        if max_tokens <= 0:
            raise APIError(400, f"{param} must be at least 1", param=param)
        check_length(len(ids), max_tokens, param)
        want_lp = (req.top_logprobs or 0) if req.logprobs else None
        params = make_params(req, max_tokens, want_lp, None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        admission = _Admission()
        admission.__enter__()
        if not req.stream:
            try:
                (out,) = await collect([ids], params, rid)
            finally:
                admission.__exit__()
            lp = chat_logprobs(out.token_ids, out.logprobs or []) if want_lp is not None else None
            choice = ChatCompletionChoice(index=0, message=ChatResponseMessage(content=out.text), logprobs=lp,
                                          finish_reason=out.finish_reason)
            n = len(out.token_ids)
            usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
            return JSONResponse(ChatCompletionResponse(id=rid, model=served_model_name, choices=[choice],
                                                       usage=usage).model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def gen():
            created = int(time.time())
            detok = _Detokenizer(tokenizer, params.stop)
            first = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
            yield sse(ChatCompletionChunk(id=rid, created=created, model=served_model_name, choices=[first]))
            lp_sent = 0
            n = 0
            async for _, out in merged([ids], params, rid):
                delta = detok.delta(out)
                n = len(out.token_ids)
                lp = None
                if want_lp is not None:
                    lp = chat_logprobs(out.token_ids[lp_sent:], (out.logprobs or [])[lp_sent:])
                    lp_sent = n
                if not delta and not out.finished and not (lp and lp.content):
                    continue
                choice = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content=delta), logprobs=lp,
                                                    finish_reason=out.finish_reason if out.finished else None)
                yield sse(ChatCompletionChunk(id=rid, created=created, model=served_model_name, choices=[choice]))
            if include_usage:
                usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
                yield sse(ChatCompletionChunk(id=rid, created=created, model=served_model_name, choices=[],
                                              usage=usage))

        return streaming(gen(), admission)

    app.state.metrics = metrics
    app.state.async_engine = async_engine
    return app
