"""Prometheus metrics (vLLM-style names) in a registry of their own, one per app."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.num_requests_running = Gauge("optcli:num_requests_running", "Requests in the running batch.", labels, registry=r)
        self.num_requests_waiting = Gauge("optcli:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r)
        self.kv_cache_usage_perc = Gauge("optcli:kv_cache_usage_perc", "KV-cache usage (1 = full).", labels, registry=r)
        self.prompt_tokens = Counter("optcli:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("optcli:generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter(
            "optcli:request_success", "Requests finished normally.", labels + ["finished_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "optcli:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "optcli:inter_token_latency_seconds", "Time between output steps.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e_request_latency = Histogram(
            "optcli:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self._labels = {"model_name": model_name}

    def refresh(self, stats: dict) -> None:
        """Set the gauges from `AsyncEngine.stats()` (called at scrape time)."""
        self.num_requests_running.labels(**self._labels).set(stats.get("num_running", 0) or 0)
        self.num_requests_waiting.labels(**self._labels).set(stats.get("num_waiting", 0) or 0)
        self.kv_cache_usage_perc.labels(**self._labels).set(stats.get("kv_cache_usage", 0.0) or 0.0)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(**self._labels).observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.inter_token_latency.labels(**self._labels).observe(seconds)

    def finished(self, prompt_tokens: int, generation_tokens: int, finish_reason: str | None, e2e_s: float) -> None:
        self.prompt_tokens.labels(**self._labels).inc(prompt_tokens)
        self.generation_tokens.labels(**self._labels).inc(generation_tokens)
        if finish_reason in ("stop", "length"):
            self.request_success.labels(**self._labels, finished_reason=finish_reason).inc()
            self.e2e_request_latency.labels(**self._labels).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
