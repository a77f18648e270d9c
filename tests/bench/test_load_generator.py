"""Online benchmarking: metric math by hand, AsyncEngine streaming/abort/shutdown/errors, run_load against
the in-process engine (closed loop and Poisson), and openai_sender against a fake streaming server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from helpers import serve_in_thread

from optcli.bench.load_generator import engine_sender, openai_sender, run_load
from optcli.bench.metrics import RequestTiming, percentiles, summarize
from optcli.engine import Engine, SamplingParams
from optcli.engine.async_engine import AsyncEngine

# --- metrics ------------------------------------------------------------------------------------


def test_percentiles_by_hand():
    p = percentiles([10, 1, 4, 3, 2])
    assert p["mean"] == pytest.approx(4.0)
    assert p["p50"] == pytest.approx(3.0)
    assert p["p95"] == pytest.approx(8.8)  # rank 0.95*4 = 3.8: 4 + 0.8*(10-4)
    assert p["p99"] == pytest.approx(9.76)  # rank 3.96: 4 + 0.96*6
    assert percentiles([]) == {"mean": None, "p50": None, "p95": None, "p99": None}
    assert percentiles([7]) == {"mean": 7.0, "p50": 7.0, "p95": 7.0, "p99": 7.0}


def test_summarize_by_hand():
    # A: sent at 0, tokens at 0.1, 0.2 and a 2-token chunk at 0.4 -> ITL 0.1, 0.1, 0.1; TPOT 0.3/3
    a = RequestTiming(start=0.0, first_token=0.1, token_times=[(0.1, 1), (0.2, 1), (0.4, 2)], end=0.4,
                      prompt_tokens=10, output_tokens=4)
    # B: sent at 1.0, one token at 1.5 -> no TPOT, no ITL
    b = RequestTiming(start=1.0, first_token=1.5, token_times=[(1.5, 1)], end=1.5, prompt_tokens=5, output_tokens=1)
    # C: failed
    c = RequestTiming(start=0.0, end=0.2, prompt_tokens=3, error="HTTP 500")
    s = summarize([a, b, c], wall_s=2.0, slo={"ttft_ms": 200, "e2e_ms": 450})
    lat = s["latency_ms"]
    assert lat["ttft"]["mean"] == pytest.approx(300.0)  # (100 + 500) / 2
    assert lat["ttft"]["p50"] == pytest.approx(300.0)
    assert lat["tpot"]["mean"] == pytest.approx(100.0)
    assert lat["itl"]["p99"] == pytest.approx(100.0)
    assert lat["e2e"]["mean"] == pytest.approx(450.0)  # (400 + 500) / 2
    assert lat["e2e"]["p95"] == pytest.approx(495.0)
    assert s["throughput"] == pytest.approx({"output_tok_s": 2.5, "total_tok_s": 10.0, "requests_s": 1.0})
    assert s["requests"] == {"completed": 2, "failed": 1}
    # only A meets TTFT <= 200 ms and E2E <= 450 ms
    assert s["goodput"] == pytest.approx({"requests_s": 0.5, "fraction": 1 / 3})
    assert summarize([a], 1.0)["goodput"] is None
    assert summarize([a, b], 1.0, slo={"tpot_ms": 99})["goodput"]["fraction"] == pytest.approx(0.5)  # B has no TPOT
    with pytest.raises(ValueError):
        summarize([a], 1.0, slo={"itl_ms": 5})


# --- AsyncEngine + run_load -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return Engine("builtin:tiny-llama", dtype="float32", max_num_seqs=8)


def _requests(n: int = 6) -> list[tuple[list[int], int]]:
    rng = random.Random(1)
    return [([rng.randrange(3, 200) for _ in range(3 + 5 * i)], 4 + 2 * i) for i in range(n)]


def _wait_idle(ae: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ae.stats()["num_requests"] or ae.stats()["num_running"] or ae.stats()["num_waiting"]:
        assert time.monotonic() < deadline, ae.stats()
        time.sleep(0.01)


def _check_completed(timings, reqs):
    for t, (prompt, n) in zip(timings, reqs, strict=True):
        assert t.error is None, t.error
        assert t.output_tokens == n and sum(k for _, k in t.token_times) == n
        assert t.prompt_tokens == len(prompt)
        assert t.start < t.first_token <= t.end
        assert t.e2e < 10


def test_run_load_concurrency(engine):
    ae = AsyncEngine(engine)
    send = engine_sender(ae)
    in_flight = peak = 0

    async def counted(prompt, n):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            async for k in send(prompt, n):
                yield k
        finally:
            in_flight -= 1

    reqs = _requests()
    try:
        timings, wall = asyncio.run(run_load(counted, reqs, concurrency=2))
        _check_completed(timings, reqs)
        assert peak == 2
        s = summarize(timings, wall)
        assert s["requests"] == {"completed": 6, "failed": 0}
        assert s["throughput"]["output_tok_s"] > 0 and s["latency_ms"]["itl"]["p50"] > 0
        assert 0 < wall < 30
        _wait_idle(ae)
        assert ae.is_alive() and ae.stats()["num_steps"] > 0
    finally:
        ae.shutdown()
    assert not ae.is_alive()
    engine.blocks.check_no_leaks()


def test_run_load_poisson(engine):
    ae = AsyncEngine(engine)
    reqs = _requests()
    try:
        timings, wall = asyncio.run(run_load(engine_sender(ae), reqs, rate=50, seed=7))
    finally:
        ae.shutdown()
    _check_completed(timings, reqs)
    rng = random.Random(7)
    expected = [0.0]
    for _ in range(len(reqs) - 1):
        expected.append(expected[-1] + rng.expovariate(50))
    for t, offset in zip(timings, expected, strict=True):  # sent no earlier than its seeded arrival
        assert t.start - timings[0].start >= offset - 0.005
    assert wall >= expected[-1] - 0.005
    engine.blocks.check_no_leaks()


def test_early_exit_aborts_and_frees_blocks(engine):
    ae = AsyncEngine(engine)
    params = SamplingParams(max_tokens=1500, ignore_eos=True)

    async def main():
        seen = []
        async with contextlib.aclosing(ae.generate(list(range(3, 40)), params, request_id="stop-early")) as gen:
            async for out in gen:
                seen.append(out)
                if len(seen) == 3:
                    break
        assert not seen[-1].finished and len(seen[-1].token_ids) == 3

        async def consume():  # cancelled mid-stream, like a client disconnect
            async for _ in ae.generate(list(range(5, 30)), params, request_id="cancelled"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        outs = [o async for o in ae.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))]
        assert outs[-1].finished and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 5

    try:
        asyncio.run(main())
        _wait_idle(ae)
        assert not engine.requests
        engine.blocks.check_no_leaks()  # the engine thread is idle on its Event here
    finally:
        ae.shutdown()
    engine.blocks.check_no_leaks()


def test_shutdown_aborts_pending(engine):
    ae = AsyncEngine(engine)

    async def main():
        outs = []
        params = SamplingParams(max_tokens=1500, ignore_eos=True)
        async for out in ae.generate([4, 5, 6, 7], params):
            outs.append(out)
            if len(outs) == 2:
                ae.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 1500
    engine.blocks.check_no_leaks()

    async def late():
        async for _ in ae.generate([1, 2], SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(late())


def test_bad_request_fails_alone(engine):
    ae = AsyncEngine(engine)

    async def collect(prompt):
        return [o async for o in ae.generate(prompt, SamplingParams(max_tokens=2))]

    try:
        with pytest.raises(ValueError, match="empty"):
            asyncio.run(collect([]))
        assert ae.is_alive()
        assert asyncio.run(collect([1, 2, 3]))[-1].finished
    finally:
        ae.shutdown()


class _BrokenEngine:
    requests: dict = {}

    def add_request(self, prompt, params, request_id):
        self.pending = True
        return request_id

    def has_unfinished(self):
        return getattr(self, "pending", False)

    def step(self):
        raise RuntimeError("kernel exploded")

    def abort(self, request_id):
        return False

    def stats(self):
        return {}


def test_engine_error_reaches_waiters():
    ae = AsyncEngine(_BrokenEngine())

    async def collect():
        return [o async for o in ae.generate([1, 2], SamplingParams(max_tokens=2))]

    with pytest.raises(RuntimeError, match="kernel exploded"):
        asyncio.run(collect())
    ae._thread.join(5)
    assert not ae.is_alive() and "kernel exploded" in ae.stats()["error"]
    with pytest.raises(RuntimeError, match="died"):
        asyncio.run(collect())
    ae.shutdown()


# --- openai_sender against a fake server ----------------------------------------------------------


def _fake_openai_app() -> FastAPI:  # module-level imports: FastAPI resolves the string annotations
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        assert body["stream"] is True and body["ignore_eos"] is True and body["model"] == "fake"
        assert body["stream_options"] == {"include_usage": True}
        mode, n = body["prompt"][0], body["max_tokens"]
        if mode == 2:
            return JSONResponse({"error": "boom"}, status_code=500)

        async def events():
            if mode == 0:  # one token per chunk; the second decodes to no text yet; usage at the end
                for i in range(n):
                    await asyncio.sleep(0.01)
                    choice = {"index": 0, "text": "" if i == 1 else f" t{i}", "finish_reason": None}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            else:  # two tokens per chunk, counted through logprobs.tokens; no usage
                for _ in range(0, n, 2):
                    await asyncio.sleep(0.01)
                    choice = {"index": 0, "text": "ab", "logprobs": {"tokens": ["a", "b"]}, "finish_reason": None}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    with serve_in_thread(_fake_openai_app()) as url:
        yield url


@pytest.mark.parametrize("transport", ["direct", "httpx"])  # httpx: where a proxy is set for the endpoint
def test_openai_sender(fake_server, transport):
    send = openai_sender(fake_server, "fake", api_key="k", timeout=10, transport=transport)
    reqs = [([0, 9, 9], 5), ([1, 9], 6), ([2], 4), ([0], 3)]
    timings, wall = asyncio.run(run_load(send, reqs, concurrency=3))
    by_text, by_logprobs, failed, small = timings
    assert by_text.error is None and by_text.output_tokens == 5  # 4 counted from text, usage says 5
    assert len(by_text.token_times) == 4
    assert by_logprobs.error is None and by_logprobs.output_tokens == 6 and len(by_logprobs.token_times) == 3
    assert small.output_tokens == 3
    for t in (by_text, by_logprobs, small):
        assert 0 < t.ttft < t.e2e
    assert failed.error is not None and "500" in failed.error
    s = summarize(timings, wall)
    assert s["requests"] == {"completed": 3, "failed": 1}
    assert s["latency_ms"]["itl"]["p50"] > 0


@pytest.mark.parametrize("transport", ["direct", "httpx"])
def test_openai_sender_unreachable(transport):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    send = openai_sender(f"http://127.0.0.1:{port}", "fake", timeout=2, transport=transport)
    timings, _ = asyncio.run(run_load(send, [([1], 2)]))
    assert timings[0].error and "Connect" in timings[0].error
