"""`serve --kpi`: the KPI file's gates watched live over a sliding window of finished requests.

Every finished request adds (start, end, TTFT, TPOT, tokens) to the window; a ticker thread (and every
/metrics or /kpi read) drops what is older than `alert_window`, recomputes each gate's figure, sets its
three gauges (`optcli:kpi_value`, `optcli:kpi_threshold`, `optcli:kpi_breached`, label `kpi`) and logs one
line when a gate starts breaching and one when it recovers, never once per tick.

Throughput is output tokens over the *busy* seconds of the window's requests (the union of their lifetimes), so an
idle server is not reported as a slow one, and a window with no request has no figure (no breach).
Cost budget share is what this process has cost since the month began (or since it started, if later):
GPU-hour price x hours / monthly budget.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from datetime import UTC, datetime

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from optcli.kpi.live import LIVE_METRICS, LiveGate, LiveKpi

log = logging.getLogger("optcli.serve")
_QUANTILES = (0.5, 0.95, 0.99)


class KpiWatcher:
    def __init__(self, live: LiveKpi, registry: CollectorRegistry, model_name: str, baseline: dict | None = None,
                 gpu_hour_cost: float | None = None, monthly_budget: float | None = None, clock=time.monotonic,
                 wall=time.time) -> None:
        self.live, self._clock, self._wall = live, clock, wall
        self.gpu_hour_cost, self.monthly_budget = gpu_hour_cost, monthly_budget
        tp = (baseline or {}).get("throughput") or {}
        # the profile's served (online) throughput where it has one: serving is online
        self.baseline_tok_s = tp.get("online_output_tok_s") or tp.get("output_tok_s")
        self.accuracy_increase: float | None = None  # set by the accuracy probe
        self._samples: deque = deque()  # (end, start, e2e_s, ttft_s, tpot_s | None, output tokens)
        self._lock = threading.Lock()
        self._breached = {g.name: False for g in live.gates}
        self._started = wall()
        self._last: dict = {}
        labels = ["model_name", "kpi"]
        self._labels = {"model_name": model_name}
        self.value = Gauge("optcli:kpi_value", "A KPI's figure over the alert window (NaN: no data).", labels,
                           registry=registry)
        self.threshold = Gauge("optcli:kpi_threshold", "A KPI's threshold from the KPI file.", labels, registry=registry)
        self.breached_gauge = Gauge("optcli:kpi_breached", "1 while a KPI is breached.", labels, registry=registry)
        self.window_latency = Gauge("optcli:kpi_window_latency_ms", "Latency percentiles over the alert window (ms).",
                                    ["model_name", "metric", "quantile"], registry=registry)
        for g in live.gates:
            self.threshold.labels(**self._labels, kpi=g.name).set(g.threshold)
            self.breached_gauge.labels(**self._labels, kpi=g.name).set(0)
            self.value.labels(**self._labels, kpi=g.name).set(math.nan)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- input ------------------------------------------------------------------------------------
    def finished(self, start: float, end: float, ttft_s: float | None, output_tokens: int) -> None:
        """One request that finished normally (times from `clock`)."""
        tpot = (end - start - ttft_s) / (output_tokens - 1) if ttft_s is not None and output_tokens > 1 else None
        with self._lock:
            self._samples.append((end, start, end - start, ttft_s, tpot, output_tokens))

    # --- figures ----------------------------------------------------------------------------------
    def _window(self, now: float) -> list[tuple]:
        with self._lock:
            while self._samples and self._samples[0][0] < now - self.live.window_s:
                self._samples.popleft()
            return list(self._samples)

    def latency(self, samples: list[tuple]) -> dict[str, dict]:
        """Per metric: p50/p95/p99 (ms) and the requests they are over; ITL live is a request's mean gap (TPOT)."""
        out = {}
        for metric in LIVE_METRICS:
            col = {"e2e": 2, "ttft": 3, "tpot": 4, "itl": 4}[metric]
            values = [s[col] * 1e3 for s in samples if s[col] is not None]
            pcts = np.percentile(values, [q * 100 for q in _QUANTILES]).tolist() if values else [None] * 3
            out[metric] = {"requests": len(values), **{f"p{round(q * 100)}": v for q, v in zip(_QUANTILES, pcts,
                                                                                                  strict=True)}}
        return out

    @staticmethod
    def _busy_s(samples: list[tuple]) -> float:
        """The union of the window's requests' whole lifetimes (not clipped to the window: their tokens all count)."""
        busy, cursor = 0.0, -math.inf
        for start, end in sorted((s[1], s[0]) for s in samples):
            start = max(start, cursor)
            if end > start:
                busy, cursor = busy + end - start, end
        return busy

    def figures(self, now: float | None = None) -> dict[str, float | None]:
        now = self._clock() if now is None else now
        samples = self._window(now)
        latency = self.latency(samples)
        busy = self._busy_s(samples)
        tok_s = sum(s[5] for s in samples) / busy if busy > 0 else None
        price = self.gpu_hour_cost
        figures: dict[str, float | None] = {}
        for g in self.live.gates:
            if g.metric is not None:
                figures[g.name] = latency[g.metric][f"p{round(g.quantile * 100)}"]
            elif g.name == "throughput_output_tok_s":
                figures[g.name] = tok_s
            elif g.name == "throughput_vs_baseline":
                figures[g.name] = tok_s / self.baseline_tok_s if tok_s is not None and self.baseline_tok_s else None
            elif g.name == "cost_usd_per_1k_tokens":  # on output tokens: the only ones the window counts
                figures[g.name] = price / (tok_s * 3.6) if tok_s and price is not None else None
            elif g.name == "cost_vs_baseline":  # same GPU, same price: cost per token is 1 / throughput
                figures[g.name] = self.baseline_tok_s / tok_s if tok_s and self.baseline_tok_s else None
            elif g.name == "cost_budget_share":
                figures[g.name] = self._budget_share()
            elif g.name == "accuracy_ppl_increase":
                figures[g.name] = self.accuracy_increase
        self._last = {"latency": latency, "output_tok_s": tok_s, "busy_s": busy, "requests": len(samples)}
        for metric, row in latency.items():
            for q in _QUANTILES:
                v = row[f"p{round(q * 100)}"]
                self.window_latency.labels(**self._labels, metric=metric, quantile=str(q)).set(math.nan if v is None else v)
        return figures

    def _budget_share(self) -> float | None:
        if self.gpu_hour_cost is None or not self.monthly_budget:
            return None
        now = self._wall()
        month = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        hours = (now - max(self._started, month.timestamp())) / 3600
        return self.gpu_hour_cost * hours / self.monthly_budget

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        """Each gate's row (value, threshold, breached); gauges set; one log line per change of state."""
        figures = self.figures()
        rows = []
        for g in self.live.gates:
            value = figures.get(g.name)
            breached = g.breached(value)
            self.value.labels(**self._labels, kpi=g.name).set(math.nan if value is None else value)
            self.breached_gauge.labels(**self._labels, kpi=g.name).set(int(breached))
            with self._lock:
                changed = breached != self._breached[g.name]
                self._breached[g.name] = breached
            if changed:
                self._log(g, value, breached)
            rows.append({"kpi": g.name, "key": g.key, "value": value, "threshold": g.threshold, "op": g.op,
                         "unit": g.unit, "breached": breached})
        return rows

    def _log(self, g: LiveGate, value: float | None, breached: bool) -> None:
        shown = "no data" if value is None else f"{value:.4g} {g.unit}"
        if breached:
            log.warning("KPI %s breached: %s, must be %s %g (%s, over the last %g s)", g.name, shown, g.op,
                        g.threshold, g.key, self.live.window_s)
        else:
            log.warning("KPI %s recovered: %s, %s %g (%s, over the last %g s)", g.name, shown, g.op, g.threshold,
                        g.key, self.live.window_s)

    def snapshot(self) -> dict:
        """What GET /kpi returns."""
        rows = self.evaluate()
        return {"window_s": self.live.window_s, "window_source": self.live.window_source,
                "breached": [r["kpi"] for r in rows if r["breached"]], "kpis": rows,
                "window": self._last, "gpu_hour_cost_usd": self.gpu_hour_cost, "monthly_budget_usd": self.monthly_budget,
                "baseline_output_tok_s": self.baseline_tok_s,
                "not_watched": [{"key": k, "why": w} for k, w in self.live.not_watched]}

    # --- ticker -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Evaluate on a ticker too, so a breach is logged (and recovers) with nobody scraping."""
        tick = max(0.2, min(1.0, self.live.window_s / 10))

        def run() -> None:
            while not self._stop.wait(tick):
                try:
                    self.evaluate()
                except Exception:  # noqa: BLE001 - a watcher bug must not take the server down
                    log.exception("KPI evaluation failed")

        self._thread = threading.Thread(target=run, name="optcli-kpi", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
