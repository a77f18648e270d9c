"""`serve --kpi` wired into the app: the live watcher (`kpi_watch.py`) and the accuracy probe
(`kpi_probe.py`) behind one object the request path reports to, started and stopped with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from optcli.engine.async_engine import AsyncEngine
from optcli.kpi.live import LiveKpi
from optcli.serve.kpi_probe import AccuracyProbe, probe_set
from optcli.serve.kpi_watch import KpiWatcher

log = logging.getLogger("optcli.serve")


@dataclass(frozen=True)
class KpiOptions:
    live: LiveKpi
    eval_text: str  # the probe set's source (windows of it)
    baseline_report: dict | None = None  # a profile report.json: throughput to compare with
    gpu_hour_cost: float | None = None
    monthly_budget: float | None = None


class KpiMonitor:
    def __init__(self, options: KpiOptions, async_engine: AsyncEngine, registry: CollectorRegistry,
                 model_name: str) -> None:
        self.options = options
        self.watcher = KpiWatcher(options.live, registry, model_name, options.baseline_report, options.gpu_hour_cost,
                                  options.monthly_budget)
        self.probe = None
        if options.live.eval_frequency is not None:
            engine = async_engine.engine
            windows = probe_set(engine.tokenizer, options.eval_text, engine.max_model_len)
            self.probe = AccuracyProbe(async_engine, windows, options.live.eval_frequency, registry, model_name,
                                       self._accuracy)
        self._startup: asyncio.Task | None = None

    def _accuracy(self, ppl: float, reference: float | None) -> None:
        # the article's acceptable_drop as perplexity's relative increase over the start-up value
        self.watcher.accuracy_increase = ppl / reference - 1 if reference else None
        self.watcher.evaluate()

    def finished(self, start: float, end: float, ttft_s: float | None, output_tokens: int) -> None:
        """A request that finished normally (on the event loop)."""
        self.watcher.finished(start, end, ttft_s, output_tokens)
        if self.probe is not None:
            self.probe.request_done()

    def snapshot(self) -> dict:
        return {**self.watcher.snapshot(), "accuracy_probe": self.probe.as_dict() if self.probe else None}

    @contextlib.asynccontextmanager
    async def running(self):
        """The app's lifespan: ticker on, reference perplexity measured in the background (traffic is
        served meanwhile), everything stopped on shutdown."""
        self.watcher.start()
        if self.probe is not None:
            self._startup = asyncio.get_running_loop().create_task(self.probe.startup())
        try:
            yield
        finally:
            self.watcher.stop()
            if self._startup is not None and not self._startup.done():
                self._startup.cancel()
