"""Servers for the endpoint client's tests, stdlib only.

`silent_server()`: accepts connections, reads, and never answers.

A streaming OpenAI-compatible mock with a known time to first token and inter-token latency, run as a script
(its own process, as a real server is): `python mock_servers.py --ttft-ms 200 --itl-ms 20` prints
`port N` once it listens. POST /v1/completions and /v1/chat/completions stream `max_tokens` one-token chunks
over kept-alive HTTP/1.1 connections (chunked, headers sent at once, as vLLM does), the first `ttft` after the
request arrived and each next one `itl` later, on a schedule fixed from the arrival (so one late wake-up does not
shift the rest), then `usage` when `stream_options.include_usage` asks for it, then `data: [DONE]`. With
`--log FILE` it appends one JSON line per request: its prompt, when it arrived and when each token chunk was
written (time.monotonic, the clock time.perf_counter reads on Linux): what the server really did, to hold a
client's figures against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading


@contextlib.contextmanager
def silent_server():
    """Accepts every connection, reads what it is sent, and never writes a byte; yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ttft: float, itl: float,
                     log) -> bool:
    """One request on a connection; False when the client is gone."""
    loop = asyncio.get_running_loop()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    arrived = loop.time()
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
    chat = path.endswith("/chat/completions")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    n = int(body.get("max_tokens") or 16)
    writes = []
    for i in range(n):
        delay = arrived + ttft + i * itl - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writes.append(loop.time())
        choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
        choice["finish_reason"] = "length" if i == n - 1 else None
        writer.write(_chunk(b"data: " + json.dumps({"object": "chunk", "choices": [choice]}).encode() + b"\n\n"))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        writer.write(_chunk(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"))
    if log is not None:  # before the response ends: once a client has it all, the log has it too
        log.write(json.dumps({"prompt": body.get("prompt"), "arrived": arrived, "writes": writes}) + "\n")
        log.flush()
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return True


async def main(ttft: float, itl: float, port: int, log_path: str | None) -> None:
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - open while serving

    async def handle(reader, writer):
        try:
            while await _serve_one(reader, writer, ttft, itl, log):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", help="append one JSON line per request served (prompt, arrival, writes)")
    args = parser.parse_args()
    asyncio.run(main(args.ttft_ms / 1000, args.itl_ms / 1000, args.port, args.log))
