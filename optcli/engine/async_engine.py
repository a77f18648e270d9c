"""`AsyncEngine`: one background thread owns an `Engine` and steps it; asyncio callers stream outputs.

Every Engine call happens on that thread. Callers hand requests over through a thread-safe queue
and get each step's `RequestOutput` back on their own event loop (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from optcli.engine.engine import Engine, RequestOutput
from optcli.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids = itertools.count()
        self._closed = False
        self._error: BaseException | None = None
        self._stats: dict = {}
        self._publish_stats()
        self._thread = threading.Thread(target=self._loop, name="optcli-engine", daemon=True)
        self._thread.start()

    # --- caller side (any thread / event loop) --------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's output of every step until it finishes; stopping early aborts it."""
        request_id = request_id or f"areq-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._submit(("add", request_id, prompt, params or SamplingParams(), (asyncio.get_running_loop(), outputs)))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (on the engine thread, before its next step); its stream ends with "abort"."""
        try:
            self._submit(("abort", request_id))
        except RuntimeError:
            pass  # shut down or dead: every request is already over

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine thread; requests still pending finish with finish_reason "abort"."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._closed

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, alive=self.is_alive(), error=repr(self._error) if self._error else None)

    def _submit(self, command: tuple) -> None:
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"engine thread died: {self._error!r}") from self._error
            if self._closed:
                raise RuntimeError("engine is shut down")
            self._commands.put(command)
        self._wake.set()

    # --- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                self._drain()
                if self._closed:
                    break
                if not self.engine.has_unfinished():
                    self._publish_stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out, done=out.finished)
                self._publish_stats()
            self._drain()  # whatever slipped in before close: added, then aborted below
            for rid in list(self._sinks):
                self._abort(rid)
            self._publish_stats()
        except BaseException as e:  # noqa: BLE001 - the engine is dead; every waiter must hear why
            with self._lock:
                self._error = e
                pending = []
                while not self._commands.empty():
                    pending.append(self._commands.get())
            for cmd in pending:
                if cmd[0] == "add":
                    self._send(cmd[4], e)
            for rid in list(self._sinks):
                self._deliver(rid, e, done=True)

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                self._abort(cmd[1])
                continue
            _, rid, prompt, params, sink = cmd
            if rid in self._sinks:
                self._send(sink, ValueError(f"duplicate request id {rid}"))
                continue
            try:
                self.engine.add_request(prompt, params, rid)
            except Exception as e:  # a bad request fails alone
                self._send(sink, e)
                continue
            self._sinks[rid] = sink

    def _abort(self, rid: str) -> None:
        if rid not in self._sinks:
            return  # finished already (or never added)
        seq = self.engine.requests.get(rid)
        self.engine.abort(rid)
        out = RequestOutput(
            request_id=rid,
            prompt=seq.prompt if seq else None,
            prompt_token_ids=list(seq.prompt_token_ids) if seq else [],
            token_ids=seq.output_token_ids if seq else [],
            finished=True,
            finish_reason="abort",
        )
        self._deliver(rid, out, done=True)

    def _deliver(self, rid: str, item: RequestOutput | BaseException, done: bool) -> None:
        sink = self._sinks.pop(rid, None) if done else self._sinks.get(rid)
        if sink is not None:
            self._send(sink, item)

    @staticmethod
    def _send(sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
        loop, q = sink
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is closed; nobody is listening

    def _publish_stats(self) -> None:
        snapshot = self.engine.stats()
        snapshot["num_requests"] = len(self._sinks)
        with self._lock:
            self._stats = snapshot
