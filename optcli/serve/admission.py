"""Admission control: at most `limit` requests in flight; past that a request gets 429 before any
response starts.

`Admission.acquire()` takes a slot at once (or raises the 429) and returns it as a context manager
(`with` or `async with`) that gives the slot back when its block ends, so a streaming route can take
the slot before answering and release it when the stream's body finishes.
"""

from __future__ import annotations

from optcli.serve.api_errors import APIError


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> AdmissionSlot:
        if self.in_flight >= self.limit:
            raise APIError(429, "server is overloaded: too many requests waiting; retry later",
                           code="too_many_requests")
        self.in_flight += 1
        return AdmissionSlot(self)


class AdmissionSlot:
    """One taken slot; released once, when the `with` / `async with` block around it ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None

    def __enter__(self) -> AdmissionSlot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self) -> AdmissionSlot:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()
