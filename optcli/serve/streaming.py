"""Running requests on the engine for a route: one prompt's stream with metrics (`run_one`), all
prompts' final outputs (`collect`) or their merged streams (`merged`), text deltas (`StreamText`),
and the SSE response that reports late errors in-band (`sse_response`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from optcli.engine.detokenizer import IncrementalDetokenizer, stop_prefix_len
from optcli.engine.outputs import RequestOutput
from optcli.engine.sampling_params import SamplingParams
from optcli.serve.admission import AdmissionSlot
from optcli.serve.api_errors import APIError, api_error_body, error_body
from optcli.serve.state import ServeState

logger = logging.getLogger("optcli.serve")


class StreamText:
    """Streaming text deltas, decoded incrementally after the prompt's last tokens (so the first token
    keeps its leading space): emits new text, holding back what may still change (an incomplete UTF-8
    character, an unterminated byte-fallback run) and any tail that could start a stop string; the
    final delta makes the concatenation equal the engine's final text. `token_texts` holds each output
    token's share of the text (`detokenizer.token_texts`), for logprobs' tokens and offsets."""

    def __init__(self, tokenizer, stop: list[str], prompt_ids: list[int]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop, self.sent = stop, ""
        self.token_texts: list[str] = []

    def delta(self, out: RequestOutput) -> str:
        for tid in out.token_ids[len(self.token_texts) :]:  # one at a time: each token's own text
            self.token_texts.append(self.detok.add([tid]))
        if out.finished and self.token_texts:  # what was still pending belongs to the last token
            self.token_texts[-1] += self.detok.pending
        if out.finished:
            text = out.text if out.finish_reason != "abort" else self.detok.full_text
            if not text.startswith(self.sent):  # a safeguard: committed text never changes; never resend
                return ""
            end = len(text)
        else:
            text = self.detok.text  # committed text only grows, so it starts with what was sent
            end = len(text) - stop_prefix_len(text, self.stop)
            if end <= len(self.sent):
                return ""
        d = text[len(self.sent) : end]
        self.sent += d
        return d


async def run_one(state: ServeState, prompt_ids: list[int], params: SamplingParams,
                  rid: str) -> AsyncIterator[RequestOutput]:
    """The engine's stream for one prompt, recording metrics; closing it aborts the request."""
    if not state.async_engine.is_alive():
        raise APIError(503, "engine is not running")
    metrics = state.metrics
    start = last = time.monotonic()
    first, ttft = True, None
    async for out in state.async_engine.generate(prompt_ids, params, rid):
        now = time.monotonic()
        if out.new_token_ids:
            (metrics.first_token if first else metrics.inter_token)(now - last)
            ttft = now - start if first else ttft
            first, last = False, now
        if out.finished:
            metrics.finished(len(prompt_ids), len(out.token_ids), out.finish_reason, now - start)
            if state.kpi is not None and out.finish_reason in ("stop", "length"):
                state.kpi.finished(start, now, ttft, len(out.token_ids))
        yield out


def _per_prompt(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    return params if isinstance(params, list) else [params] * n


async def collect(state: ServeState, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                  rid: str) -> list[RequestOutput]:
    """Final outputs of all prompts; `params` is one for all or one per prompt."""
    per = _per_prompt(params, len(prompts))

    async def one(i: int) -> RequestOutput:
        final = None
        async for out in run_one(state, prompts[i], per[i], f"{rid}-{i}"):
            final = out
        return final

    try:
        async with asyncio.timeout(state.request_timeout_s):
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
    except TimeoutError:
        raise APIError(408, f"request timed out after {state.request_timeout_s}s") from None
    except ValueError as e:  # the engine rejected the request
        raise APIError(400, str(e)) from None


async def merged(state: ServeState, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 rid: str):
    """(index, output) of all prompts' streams as they come; closing it cancels (aborts) them all.
    `params` is one for all prompts or one per prompt."""
    q: asyncio.Queue = asyncio.Queue()
    per = _per_prompt(params, len(prompts))

    async def pump(i: int) -> None:
        try:
            async for out in run_one(state, prompts[i], per[i], f"{rid}-{i}"):
                q.put_nowait((i, out))
            q.put_nowait((i, None))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            q.put_nowait((i, e))
            if isinstance(e, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    remaining = len(tasks)
    try:
        async with asyncio.timeout(state.request_timeout_s):
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


def _sse_error(state: ServeState, e: BaseException) -> str:
    if isinstance(e, APIError):
        return sse(api_error_body(e))
    if isinstance(e, TimeoutError):
        return sse(error_body(408, f"request timed out after {state.request_timeout_s}s"))
    if isinstance(e, ValueError):
        return sse(error_body(400, str(e)))
    logger.exception("error while streaming", exc_info=e)
    return sse(error_body(500, "internal server error"))


def sse_response(state: ServeState, gen: AsyncIterator[str], slot: AdmissionSlot) -> StreamingResponse:
    """`gen`'s chunks as server-sent events ending in [DONE]; the admission slot is released when the
    body ends."""
    async def body():
        async with slot:
            try:
                async for chunk in gen:
                    yield chunk
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
                yield _sse_error(state, e)
            finally:
                await gen.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

