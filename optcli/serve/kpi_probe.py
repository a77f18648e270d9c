"""The live accuracy probe of `serve --kpi`: every `eval_frequency` finished requests, score a fixed probe
set (the first windows of the eval text) through the serving engine and compare its perplexity with
the value measured at start-up, which catches a numerics regression (a kernel, a dtype, a corrupted
weight) that latency gauges never see.

Low priority: the windows go through the engine one at a time as ordinary one-token requests with prompt
log-probs (which bypass the prefix cache, so each is scored in full), so the probe holds at most one
batch slot and runs between the steps of the traffic it shares the engine with; it never goes through
admission, so it can never cause a client's 429. Probes that come due while one runs queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from optcli.engine.async_engine import AsyncEngine
from optcli.engine.sampling_params import SamplingParams

log = logging.getLogger("optcli.serve")
PROBE_WINDOWS = 4
PROBE_WINDOW_TOKENS = 64


def probe_set(tokenizer, text: str, max_model_len: int, windows: int = PROBE_WINDOWS,
              length: int = PROBE_WINDOW_TOKENS) -> list[list[int]]:
    """The first `windows` windows of `length` tokens of `text` (shorter if the model's context is)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    length = max(2, min(length, max_model_len - 1))
    sets = [ids[i : i + length] for i in range(0, len(ids), length)][:windows]
    sets = [w for w in sets if len(w) >= 2]
    if not sets:
        raise ValueError("the eval text is too short for a probe window (needs 2 tokens)")
    return sets


class AccuracyProbe:
    def __init__(self, async_engine: AsyncEngine, windows: list[list[int]], every: int, registry: CollectorRegistry,
                 model_name: str, on_result) -> None:
        self.engine, self.windows, self.every = async_engine, windows, every
        self.on_result = on_result  # called with (ppl, reference ppl)
        self.reference: float | None = None
        self.last: float | None = None
        self._finished = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._labels = {"model_name": model_name}
        self.probes = Counter("optcli:kpi_accuracy_probes", "Accuracy probes run (every eval_frequency requests).",
                              ["model_name"], registry=registry)
        self.failures = Counter("optcli:kpi_accuracy_probe_failures", "Accuracy probes that failed.", ["model_name"],
                                registry=registry)
        self.ppl = Gauge("optcli:kpi_accuracy_probe_ppl", "Perplexity of the probe set, last probe.", ["model_name"],
                         registry=registry)
        self.reference_ppl = Gauge("optcli:kpi_accuracy_reference_ppl", "Perplexity of the probe set at start-up.",
                                   ["model_name"], registry=registry)
        self.probes.labels(**self._labels)
        self.failures.labels(**self._labels)

    async def score(self) -> float:
        """Perplexity over the probe windows (every token after each window's first)."""
        nll, count = 0.0, 0
        for i, ids in enumerate(self.windows):
            params = SamplingParams(max_tokens=1, prompt_logprobs=0)
            final = None
            async for out in self.engine.generate(ids, params, f"kpi-probe-{id(self)}-{i}"):
                final = out
            nll -= sum(entry[0] for entry in final.prompt_logprobs)
            count += len(final.prompt_logprobs)
        return math.exp(nll / count)

    async def startup(self) -> None:
        """The reference perplexity, measured once before the first periodic probe compares with it."""
        async with self._lock:
            if self.reference is None:
                self.reference = await self.score()
                self.reference_ppl.labels(**self._labels).set(self.reference)
                log.warning("KPI accuracy probe: reference perplexity %.4f over %d windows of the eval text",
                            self.reference, len(self.windows))

    def request_done(self) -> None:
        """Count a finished request (on the event loop); every `every`-th schedules a probe."""
        self._finished += 1
        if self._finished % self.every == 0:
            task = asyncio.get_running_loop().create_task(self._probe())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        await self.startup()
        async with self._lock:
            try:
                ppl = await self.score()
            except Exception as e:  # noqa: BLE001 - a failed probe is counted and logged; traffic goes on
                self.failures.labels(**self._labels).inc()
                log.warning("KPI accuracy probe failed: %s", e)
                return
            self.last = ppl
            self.ppl.labels(**self._labels).set(ppl)
            self.probes.labels(**self._labels).inc()
            self.on_result(ppl, self.reference)

    def as_dict(self) -> dict:
        return {"eval_frequency": self.every, "windows": len(self.windows),
                "window_tokens": [len(w) for w in self.windows], "requests_counted": self._finished,
                "reference_ppl": self.reference, "last_ppl": self.last,
                "probes": self.probes.labels(**self._labels)._value.get()}
