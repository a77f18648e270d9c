"""The endpoint client's transport (optcli.bench.stream_client): HTTP/1.1 as servers really split it, kept-alive
connections, server-sent events stamped with the arrival of the bytes that completed them, and what a silent or
stalled server does to a run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest
from mock_servers import silent_server

from optcli.bench.load_generator import LoadAborted, openai_sender, run_load
from optcli.bench.stream_client import Exchange, StreamClient, json_events, proxied, sse_events


def _events(n: int) -> bytes:
    return b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}).encode() + b"\n\n"
                    for i in range(n)) + b"data: [DONE]\n\n"


def _chunked(payload: bytes, size: int) -> bytes:
    parts = [payload[i:i + size] for i in range(0, len(payload), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"


@contextlib.contextmanager
def scripted_server(responses: list[bytes], split: int, close_after: bool = False, linger: float = 0.0):
    """Answers each request on a connection with the next scripted response, written `split` bytes at a time
    (so headers, chunk-size lines and CRLFs fall across reads), then holds the connection `linger` s before
    closing it (`close_after`: after the first response); records how many connections it saw."""
    seen = {"connections": 0}

    async def handle(reader, writer):
        seen["connections"] += 1
        for response in responses:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length")))
            await reader.readexactly(length)
            for i in range(0, len(response), split):
                writer.write(response[i:i + split])
                await writer.drain()
                await asyncio.sleep(0.001)
            if close_after:
                break
        await asyncio.sleep(linger)
        writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    async def shutdown() -> None:
        server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


OK_CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_chunked_responses_split_anywhere_are_read_whole_over_one_connection(split):
    response = OK_CHUNKED + _chunked(_events(5), 13)
    with scripted_server([response, response], split) as (url, seen):
        async def go():
            client = StreamClient(url + "/v1")
            try:
                return [await client.post("/completions", b"{}") for _ in range(2)]
            finally:
                await client.aclose()

        exchanges = asyncio.run(go())
    assert seen["connections"] == 1  # kept alive and reused
    for exchange in exchanges:
        assert exchange.status == 200
        assert [c["choices"][0]["text"] for _, c in json_events(exchange)] == [f"t{i}" for i in range(5)]
        assert exchange.sent < exchange.pieces[0][0] <= exchange.ended


def test_content_length_close_delimited_interim_and_error_bodies():
    error = json.dumps({"error": {"message": "no such model"}}).encode()
    by_length = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(error), error)
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK_CHUNKED + _chunked(_events(2), 1000)
    with scripted_server([by_length, interim], 5) as (url, seen):
        async def go():
            client = StreamClient(url + "/v1")
            try:
                return await client.post("/completions", b"{}"), await client.post("/completions", b"{}")
            finally:
                await client.aclose()

        missing, continued = asyncio.run(go())
    assert missing.status == 404 and json.loads(missing.body()) == {"error": {"message": "no such model"}}
    assert continued.status == 200 and len(list(json_events(continued))) == 2
    assert seen["connections"] == 1

    close_delimited = b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + _events(3)
    with scripted_server([close_delimited], 9, close_after=True) as (url, _):
        async def one():
            client = StreamClient(url)
            try:
                return await client.post("/v1/completions", b"{}")
            finally:
                await client.aclose()

        exchange = asyncio.run(one())
    assert len(list(json_events(exchange))) == 3


def test_a_kept_alive_connection_the_server_closed_is_replaced():
    response = OK_CHUNKED + _chunked(_events(1), 100)
    with scripted_server([response], 4096, close_after=True) as (url, seen):
        async def go():
            client = StreamClient(url)
            try:
                first = await client.post("/v1/completions", b"{}")
                await asyncio.sleep(0.05)  # the server has closed it by now; the client still holds it idle
                return first, await client.post("/v1/completions", b"{}")
            finally:
                await client.aclose()

        first, second = asyncio.run(go())
    assert first.status == second.status == 200 and seen["connections"] == 2


def test_sse_events_are_stamped_with_the_piece_that_completed_them():
    pieces = [(1.0, b"data: {\"a\""), (2.0, b": 1}\r"), (3.0, b"\n\r\ndata: {\"b\": 2}\n\n: comment\n\ndata: [DO"),
              (4.0, b"NE]\n\n")]
    assert list(sse_events(pieces)) == [(3.0, '{"a": 1}'), (3.0, '{"b": 2}'), (4.0, "[DONE]")]
    assert [(t, c) for t, c in json_events(Exchange(pieces=pieces))] == [(3.0, {"a": 1}), (3.0, {"b": 2})]


def test_a_silent_server_aborts_the_run_but_a_stalled_stream_is_one_failed_request():
    with silent_server() as url:
        with pytest.raises(LoadAborted, match="sent no response within 0.5 s"):
            asyncio.run(run_load(openai_sender(url, "m", timeout=0.5), [([1], 2)] * 4, concurrency=2))
    # answers the first request, then stalls mid-stream on the second: a failure counted, not an abort
    stalled = OK_CHUNKED + b"%x\r\n%s\r\n" % (len(_events(1)[:30]), _events(1)[:30])
    good = OK_CHUNKED + _chunked(_events(2), 100)
    with scripted_server([good, stalled], 4096, linger=5) as (url, _):
        timings, _ = asyncio.run(run_load(openai_sender(url, "m", timeout=0.5), [([1], 2), ([1], 2)],
                                          concurrency=1))
    assert timings[0].error is None and timings[0].output_tokens == 2
    assert "stalled" in timings[1].error and "0.5 s" in timings[1].error


def test_a_proxied_endpoint_goes_through_httpx(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not proxied("http://gpu-box:8000/v1")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert proxied("http://gpu-box:8000/v1") and StreamClient("http://gpu-box:8000/v1").transport == "httpx"
    assert not proxied("http://127.0.0.1:8000/v1") and StreamClient("http://127.0.0.1:8000").transport == "direct"
