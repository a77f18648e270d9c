"""The HTTP client `profile --endpoint` measures a server through, built so the client does not measure itself.

Each body piece is time-stamped in `data_received`, the moment the event loop reads it from the socket; the
only other work done there is the HTTP/1.1 framing needed to know where a response ends. Everything else
(splitting server-sent events, JSON parsing, counting tokens) happens after the response has ended
(`sse_events`), so it never sits between a byte's arrival and its time stamp. Connections are kept alive and
reused, as a production client's are; a request's clock starts when its bytes are written (as GuideLLM's
does), so opening a connection is not counted in its time to first token.

Measured on this 2-core machine against GuideLLM's mock server (TTFT 200 ms, ITL 20 ms;
`benchmarks/endpoint_vs_guidellm.py`), the httpx client this replaces (a new `AsyncClient`, so a new TLS
context, per request; a JSON parse per chunk before the next chunk was read) put TTFT p50 at 310 ms with 8
requests in flight and 817 ms with 64, against GuideLLM's 204 and 211.

Where the environment routes the endpoint through an HTTP proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
NO_PROXY, as httpx reads them), the same exchange goes through one shared httpx client instead: the pieces
are stamped as httpx yields them, and still parsed after the response ends.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 10.0  # opening a connection (capped by the request timeout); a refused one fails at once
MAX_HEAD_BYTES = 64 * 1024


class RequestTimeout(Exception):
    """The server sent nothing for the request timeout (before its response, or within it)."""


class ConnectTimeout(ConnectionError):
    """No connection could be opened in time (a server that accepts none, or a host that drops the packets)."""


@dataclass
class Exchange:
    """One request as it went: when its bytes were written, the response's status and headers, each body
    piece with the time it arrived (time.perf_counter), and when its last byte arrived."""

    sent: float | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    ended: float | None = None

    def body(self) -> bytes:
        return b"".join(piece for _, piece in self.pieces)


def sse_events(pieces: list[tuple[float, bytes]]) -> Iterator[tuple[float, str]]:
    """The `data` of each server-sent event with the arrival time of the piece that completed it."""
    buffer, split_crlf = b"", False
    for t, piece in pieces:
        if split_crlf and piece.startswith(b"\n"):  # the LF of a CRLF split across two pieces
            piece = piece[1:]
        split_crlf = piece.endswith(b"\r")
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer += piece
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2:]
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield t, b"\n".join(data).decode("utf-8", errors="replace")


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one exchange at a time."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.exchange: Exchange | None = None
        self.done: asyncio.Future | None = None
        self.last = 0.0  # when the current exchange last heard from the server (or was written)

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.last = now
        if self.exchange is None:  # bytes nobody asked for: this connection's framing is no longer trusted
            self.reusable = False
            return
        try:
            if self._head is not None:
                self._head += data
                while True:
                    end = self._head.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self._head) > MAX_HEAD_BYTES:
                            raise ConnectionError(f"response headers over {MAX_HEAD_BYTES} bytes")
                        return
                    head, data = bytes(self._head[:end]), bytes(self._head[end + 4:])
                    if self._parse_head(head):
                        break
                    self._head = bytearray(data)  # an interim response (100 Continue): the real one follows
                self._head = None
                if self._left == 0 and self._mode == "length":
                    self._finish(now)
                    return
            if data:
                self._body(now, data)
        except (ValueError, ConnectionError) as exc:
            self._fail(exc if isinstance(exc, ConnectionError) else ConnectionError(f"bad HTTP response: {exc}"))

    def eof_received(self) -> bool:
        self._lost(None)
        return False

    def connection_lost(self, exc) -> None:
        self._lost(exc)

    # -- one exchange -----------------------------------------------------------------------------------------
    def start(self, request: bytes, exchange: Exchange, timeout: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.exchange, self.done = exchange, loop.create_future()
        self._head: bytearray | None = bytearray()
        self._mode, self._left, self._crlf, self._line, self._trailer = "close", -1, 0, b"", False
        self._timeout = timeout
        exchange.sent = self.last = time.perf_counter()
        self.transport.write(request)
        # one timer per exchange, re-armed only when it fires: the hot path never touches it
        self._timer = loop.call_later(timeout, self._check_idle)
        return self.done

    def _check_idle(self) -> None:
        if self.exchange is None:
            return
        idle = time.perf_counter() - self.last
        if idle < self._timeout:
            self._timer = asyncio.get_running_loop().call_later(self._timeout - idle, self._check_idle)
            return
        what = "no response" if self.exchange.status is None else "the response stalled"
        self._fail(RequestTimeout(f"{what}: nothing from the server for {self._timeout:g} s (--request-timeout)"))

    def _parse_head(self, head: bytes) -> bool:
        """Read a response's status line and headers; False for an interim (1xx) response."""
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(rest.split(" ", 1)[0])
        if 100 <= status < 200:
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.exchange.status, self.exchange.headers = status, headers
        self.client.responded = True
        if status in (204, 304):
            self._mode, self._left = "length", 0
            return True
        if "close" in headers.get("connection", "").lower() or version == "HTTP/1.0":
            self.reusable = False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode, self._left = "chunked", 0
        elif "content-length" in headers:
            self._mode, self._left = "length", int(headers["content-length"])
        else:  # delimited by the server closing the connection
            self._mode, self.reusable = "close", False
        return True

    def _body(self, now: float, data: bytes) -> None:
        pieces = self.exchange.pieces
        if self._mode == "close":
            pieces.append((now, data))
            return
        if self._mode == "length":
            if len(data) >= self._left:
                if len(data) > self._left:
                    self.reusable = False
                pieces.append((now, data[: self._left]))
                self._finish(now)
            else:
                pieces.append((now, data))
                self._left -= len(data)
            return
        pos, n = 0, len(data)
        while pos < n:
            if self._left > 0:  # inside a chunk's data
                take = min(self._left, n - pos)
                pieces.append((now, data if take == n else data[pos:pos + take]))
                pos += take
                self._left -= take
                if self._left == 0:
                    self._crlf = 2
            elif self._crlf:  # the CRLF after a chunk's data
                take = min(self._crlf, n - pos)
                pos += take
                self._crlf -= take
            else:  # a chunk-size line (or, after the last chunk, a trailer line)
                end = data.find(b"\n", pos)
                if end < 0:
                    self._line += data[pos:]
                    return
                line, self._line, pos = self._line + data[pos:end], b"", end + 1
                if self._trailer:
                    if not line.strip():
                        if pos < n:
                            self.reusable = False
                        self._finish(now)
                        return
                    continue
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    self._trailer = True
                else:
                    self._left = size

    def _finish(self, now: float) -> None:
        exchange, done = self.exchange, self.done
        exchange.ended = now
        self.exchange = self.done = None
        self._timer.cancel()
        if done is not None and not done.done():
            done.set_result(exchange)
        if self.reusable and not self.closed:
            self.client._idle.append(self)

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        done = self.done
        self.exchange = self.done = None
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
        if done is not None and not done.done():
            done.set_exception(exc)
        self.close()

    def _lost(self, exc) -> None:
        if self.closed:
            return
        self.closed, self.reusable = True, False
        if self.exchange is not None:
            if self._head is None and self._mode == "close":
                self._finish(time.perf_counter())
            else:
                why = "before responding" if self.exchange.status is None else "before the response ended"
                self._fail(ConnectionError(f"the server closed the connection {why}"
                                           + (f" ({exc})" if exc else "")))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class StreamClient:
    """POSTs to one server over kept-alive connections, each exchange stamped as it arrives (see the module)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 600.0,
                 transport: str | None = None) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.scheme, self.host = parts.scheme, parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.netloc = parts.netloc.rsplit("@", 1)[-1]
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.transport = transport or ("httpx" if proxied(base_url) else "direct")
        self.responded = False  # whether this server has answered any request yet (a status line)
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self.scheme == "https" else None
        self._httpx = None

    async def post(self, path: str, body: bytes) -> Exchange:
        """POST `body` (JSON) to `base_url + path`; returns the whole exchange once the response has ended."""
        if self.transport == "httpx":
            return await self._post_httpx(path, body)
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.netloc}\r\nUser-Agent: optcli\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream, application/json\r\n"
                f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n").encode("latin-1")
        request = head + body
        while True:
            conn, reused = await self._connection()
            exchange = Exchange()
            try:
                return await conn.start(request, exchange, self.timeout)
            except ConnectionError:
                # a kept-alive connection the server closed while it sat idle: the request never reached it
                if reused and exchange.status is None:
                    continue
                raise
            except asyncio.CancelledError:
                conn.close()
                raise

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        kwargs = {"ssl": self._ssl, "server_hostname": self.host} if self._ssl else {}
        limit = min(CONNECT_TIMEOUT_S, self.timeout)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, **kwargs), limit)
        except TimeoutError:
            raise ConnectTimeout(f"could not connect to {self.netloc} within {limit:g} s") from None
        return conn, False

    async def _post_httpx(self, path: str, body: bytes) -> Exchange:
        import httpx

        if self._httpx is None:
            self._httpx = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT_S,
                                                                                               self.timeout)),
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        exchange = Exchange()

        async def trace(event: str, info: dict) -> None:  # the clock starts as the request is written
            if event.endswith("send_request_headers.started") and exchange.sent is None:
                exchange.sent = time.perf_counter()

        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **self.headers}
        try:
            async with self._httpx.stream("POST", self.base_url + path, content=body, headers=headers,
                                          extensions={"trace": trace}) as response:
                exchange.status, exchange.headers = response.status_code, dict(response.headers)
                self.responded = True
                async for piece in response.aiter_raw():
                    exchange.pieces.append((time.perf_counter(), piece))
        except httpx.ConnectTimeout:
            raise ConnectTimeout(f"could not connect to {self.netloc} within {min(CONNECT_TIMEOUT_S, self.timeout):g} s"
                                 ) from None
        except httpx.TimeoutException as exc:
            what = "no response" if exchange.status is None else "the response stalled"
            raise RequestTimeout(f"{what}: nothing from the server for {self.timeout:g} s (--request-timeout)") from exc
        exchange.ended = time.perf_counter()
        return exchange

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        if self._httpx is not None:
            await self._httpx.aclose()
            self._httpx = None


def proxied(url: str) -> bool:
    """Whether the environment sends requests to `url` through a proxy (as httpx's trust_env reads it)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)


def json_events(exchange: Exchange) -> Iterator[tuple[float, dict]]:
    """The JSON objects a streamed response carried, each with its arrival time, up to `data: [DONE]`."""
    for t, data in sse_events(exchange.pieces):
        if data.strip() == "[DONE]":
            return
        yield t, json.loads(data)
