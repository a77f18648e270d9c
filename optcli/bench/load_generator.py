"""Online load generation, like `vllm bench serve` / GuideLLM: Poisson, constant or closed-loop arrivals
against a streaming sender, one `RequestTiming` per request.

A sender is `send(prompt, max_tokens)` (prompt: token ids, text, or a `Chat`), an async iterator yielding the
number of new tokens in each streamed chunk. It may also yield a `Total(n)`, the server's own count of
generated tokens, which replaces the sum, and a `PromptTotal(n)`, its count of prompt tokens. A sender whose
transport time-stamps what arrives (`openai_sender`) yields `Stamp(t, n)` instead of `n`, and `Sent(t)` /
`Ended(t)` for when the request was written and its response ended: then its own parsing, done after the
response, is in no measured span.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from optcli.bench.metrics import RequestTiming
from optcli.bench.stream_client import RequestTimeout, StreamClient, json_events
from optcli.config import REQUEST_TIMEOUT_S as DEFAULT_REQUEST_TIMEOUT_S
from optcli.errors import UsageError


@dataclass(frozen=True)
class Server:
    """An OpenAI-compatible server to load: its base URL, the model name it serves, how to reach it."""

    url: str
    model: str
    api_key: str | None = None  # sent as a bearer token
    request_timeout: float | None = None  # s, the longest wait for the server's next byte

    @property
    def timeout_s(self) -> float:
        return self.request_timeout or DEFAULT_REQUEST_TIMEOUT_S


class Chat(tuple):
    """A chat prompt: OpenAI messages ({"role", "content"} dicts), sent to `/v1/chat/completions`."""


Prompt = list[int] | str | Chat
Sender = Callable[[Prompt, int], AsyncIterator[int]]


class Total(int):
    """The authoritative output-token count of a request (e.g. OpenAI `usage.completion_tokens`)."""


class PromptTotal(int):
    """The server's prompt-token count of a request (`usage.prompt_tokens`): text prompts are tokenized there."""


class Stamp(NamedTuple):
    """`tokens` new tokens that arrived at `t` (time.perf_counter), stamped by the transport on arrival."""

    t: float
    tokens: int


class Sent(float):
    """When the request's bytes were written (time.perf_counter): its clock starts there."""


class Ended(float):
    """When the last byte of its response arrived (time.perf_counter)."""


class LoadAborted(Exception):
    """The run cannot go on (a server that accepted requests and never answered): not one failed request, so it
    ends the whole run instead of being counted."""


def api_base_url(url: str) -> str:
    """The API root for `/v1/...` routes from what people type: `http://host:8000`, `.../v1` (the openai
    SDK's base_url) or either with a trailing slash all give `http://host:8000/v1`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1 (got '{url}')")
    path = parts.path.rstrip("/")
    for suffix in ("/completions", "/chat/completions"):  # a full route pasted in: keep its root
        if path.endswith("/v1" + suffix):
            path = path[: -len(suffix)]
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}, FastAPI's {"detail"}), else the text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:200]
        if isinstance(error, str):
            return error[:200]
        if data.get("detail"):
            return str(data["detail"])[:200]
    return body.strip()[:200]


def failure_summary(timings: list[RequestTiming]) -> dict:
    """How many requests failed and why (the distinct errors with their counts, most common first)."""
    reasons = Counter(t.error for t in timings if t.error is not None)
    return {"failed": sum(reasons.values()), "total": len(timings),
            "reasons": [{"error": error, "count": n} for error, n in reasons.most_common()]}


async def run_load(
    send: Sender,
    requests: list[tuple[Prompt, int]],
    rate: float | None = None,
    concurrency: int | None = None,
    seed: int = 0,
    arrivals: str = "poisson",
    max_seconds: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
    progress_interval_s: float = 0.5,
    rampup_s: float = 0.0,
) -> tuple[list[RequestTiming], float]:
    """Send (prompt, max_tokens) requests: at `rate` req/s when given (Poisson or `constant` arrivals, on a
    schedule fixed from the start, so a slow send does not lower the rate), else all at once; at most
    `concurrency` in flight when given; none starts after `max_seconds` (those in flight finish). Returns
    the timings of the requests sent (in request order) and the wall time in seconds. A request's clock
    starts when it is sent (after waiting for a slot). `on_progress` gets {"done", "failed", "in_flight",
    "total", "oldest_s" (the longest a request in flight has waited, None when none is)} every
    `progress_interval_s`, from the event loop; a `send` with an `aclose()` is closed at the end. Without a
    rate, `rampup_s` > 0 spreads the first `concurrency` (or all) starts evenly over that many seconds
    (GuideLLM's rampup): a burst of 64 at once is a load pattern of its own, which some servers meet slower."""
    _check_schedule(rate, concurrency, arrivals)
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    # a text prompt's token count is the server's (PromptTotal); until it says, none is known
    timings = [RequestTiming(start=0.0, prompt_tokens=len(p) if isinstance(p, list) else 0) for p, _ in requests]
    in_flight: dict[int, float] = {}  # id(timing) -> when it was sent, for the progress line
    t0 = time.perf_counter()
    deadline = t0 + max_seconds if max_seconds is not None else None

    async def measure(timing: RequestTiming, prompt: Prompt, max_tokens: int) -> None:
        in_flight[id(timing)] = time.perf_counter()
        try:
            await _measure(send, timing, prompt, max_tokens)
        finally:
            del in_flight[id(timing)]

    async def one(timing: RequestTiming, prompt: Prompt, max_tokens: int) -> None:
        if slots is None:
            await measure(timing, prompt, max_tokens)
            return
        async with slots:
            if deadline is None or time.perf_counter() < deadline:  # else never sent
                await measure(timing, prompt, max_tokens)

    # Objects alive now (a loaded tokenizer, torch, transformers: millions) are left out of garbage collection
    # until the run ends: a full collection over them stalls the event loop for tens of ms, inside the spans.
    gc.freeze()
    ticker = (asyncio.create_task(_report_progress(on_progress, progress_interval_s, timings, in_flight))
              if on_progress is not None else None)
    tasks = []
    try:
        due, ramped = t0, concurrency or len(requests)
        for i, ((prompt, max_tokens), timing) in enumerate(zip(requests, timings, strict=True)):
            if (rate is not None and i > 0) or (rate is None and rampup_s > 0 and 0 < i < ramped):
                due = (t0 + rampup_s * i / ramped if rate is None else
                       due + (1.0 / rate if arrivals == "constant" else rng.expovariate(rate)))
                if deadline is not None and due >= deadline:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if deadline is not None and time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(timing, prompt, max_tokens)))
        await asyncio.gather(*tasks)
    finally:
        for task in [*tasks, *([ticker] if ticker else [])]:
            task.cancel()
        await asyncio.gather(*tasks, *([ticker] if ticker else []), return_exceptions=True)
        if (close := getattr(send, "aclose", None)) is not None:
            await close()
        gc.unfreeze()
    return [t for t in timings if t.end is not None], time.perf_counter() - t0


def _check_schedule(rate: float | None, concurrency: int | None, arrivals: str) -> None:
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 (got {concurrency})")
    if arrivals not in ("poisson", "constant"):
        raise ValueError(f"arrivals must be poisson or constant (got {arrivals!r})")


async def _report_progress(on_progress: Callable[[dict], None], interval_s: float, timings: list[RequestTiming],
                           in_flight: dict[int, float]) -> None:
    """`run_load`'s progress state every `interval_s`, until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        now = time.perf_counter()
        ended = [t for t in timings if t.end is not None]
        on_progress({"done": len(ended), "failed": sum(t.error is not None for t in ended),
                     "in_flight": len(in_flight), "total": len(timings),
                     "oldest_s": now - min(in_flight.values()) if in_flight else None})


async def _measure(send: Sender, timing: RequestTiming, prompt: Prompt, max_tokens: int) -> None:
    timing.start = time.perf_counter()
    total = end = None
    try:
        async for k in send(prompt, max_tokens):
            if isinstance(k, Sent):
                timing.start = float(k)
                continue
            if isinstance(k, Ended):
                end = float(k)
                continue
            if isinstance(k, PromptTotal):
                timing.prompt_tokens = int(k)
                continue
            if isinstance(k, Total):
                total = int(k)
                continue
            now, k = (k.t, k.tokens) if isinstance(k, Stamp) else (time.perf_counter(), k)
            if k <= 0:
                continue
            if timing.first_token is None:
                timing.first_token = now
            timing.token_times.append((now, int(k)))
            timing.output_tokens += int(k)
        if total is not None:
            timing.output_tokens = total
        if timing.first_token is None:
            timing.error = "no tokens received"
    except LoadAborted:
        raise
    except Exception as e:  # a failed request is data, not a crash
        timing.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    timing.end = end if end is not None else time.perf_counter()


def engine_sender(async_engine) -> Sender:
    """A sender driving an `AsyncEngine` in process (ignore_eos, so every request runs to max_tokens)."""
    from optcli.engine.sampling_params import SamplingParams  # the engine (torch) only when sending to it

    async def send(prompt: Prompt, max_tokens: int) -> AsyncIterator[int]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        first = True
        async for out in async_engine.generate(prompt, params):
            if first and isinstance(prompt, str):
                yield PromptTotal(len(out.prompt_token_ids))
            first = False
            if out.new_token_ids:
                yield len(out.new_token_ids)
            if out.finish_reason == "abort":
                raise RuntimeError("request aborted")

    return send


class openai_sender:  # noqa: N801 - used as the function it was
    """A sender streaming an OpenAI-compatible server (vLLM, optcli): `POST {base}/v1/completions` for a
    text or token-id prompt, `/v1/chat/completions` for a `Chat`; `base_url` with or without `/v1`.
    Tokens per chunk: the length of the chunk's logprobs when sent, else 1 per chunk with text; the final
    `usage` (stream_options.include_usage) gives the totals when the server sends it. Requests go through
    one `StreamClient` (kept-alive connections, each chunk stamped on arrival, parsed after the response);
    `timeout`: the longest wait for the server's next byte. A server that never answers a first request
    within it ends the run (`LoadAborted`); later timeouts are failed requests."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = DEFAULT_REQUEST_TIMEOUT_S, transport: str | None = None) -> None:
        self.base = api_base_url(base_url)
        self.model, self.timeout, self.transport = model, timeout, transport
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: StreamClient | None = None

    async def __call__(self, prompt: Prompt, max_tokens: int) -> AsyncIterator[int]:
        chat = isinstance(prompt, Chat)
        body = {
            "model": self.model,
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        if chat:
            body["messages"] = list(prompt)
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        route = "/chat/completions" if chat else "/completions"
        if self._client is None:  # made on the running loop, which its connections belong to
            self._client = StreamClient(self.base, self.headers, self.timeout, self.transport)
        try:
            exchange = await self._client.post(route, json.dumps(body).encode())
        except RequestTimeout:
            if not self._client.responded:
                raise LoadAborted(f"{self.base}{route} sent no response within {self.timeout:g} s "
                                  f"(--request-timeout {self.timeout:g}): the server accepted the request but never "
                                  "answered") from None
            raise
        if exchange.sent is not None:
            yield Sent(exchange.sent)
        if exchange.status != 200:
            text = exchange.body().decode(errors="replace")
            raise RuntimeError(f"HTTP {exchange.status}: {_error_message(text)}")
        usage = prompt_usage = None
        for t, chunk in json_events(exchange):
            if chunk.get("error"):
                raise RuntimeError(f"server error: {chunk['error']}")
            if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                usage = int(chunk["usage"]["completion_tokens"])
                prompt_usage = chunk["usage"].get("prompt_tokens")
            choices = chunk.get("choices") or []
            if choices and (k := _chunk_tokens(choices[0], chat)):
                yield Stamp(t, k)
        if exchange.ended is not None:
            yield Ended(exchange.ended)
        if prompt_usage is not None:
            yield PromptTotal(int(prompt_usage))
        if usage is not None:
            yield Total(usage)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _chunk_tokens(choice: dict, chat: bool) -> int:
    """New tokens in one streamed choice: its logprobs' count when given, else 1 when it carries text."""
    logprobs = choice.get("logprobs") or {}
    if chat:
        if logprobs.get("content") is not None:
            return len(logprobs["content"])
        return 1 if (choice.get("delta") or {}).get("content") else 0
    if logprobs.get("tokens") is not None:
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0
