"""`ServeState`: what every route shares (the engine, its tokenizer, the served name, limits, metrics,
admission), built once by `create_app` and kept on `app.state.serve`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from optcli.engine.async_engine import AsyncEngine
from optcli.serve.admission import Admission
from optcli.serve.kpi_monitor import KpiMonitor
from optcli.serve.metrics import ServerMetrics


@dataclass
class ServeState:
    async_engine: AsyncEngine
    served_model_name: str
    api_key: str | None
    max_request_bytes: int
    request_timeout_s: float
    metrics: ServerMetrics
    admission: Admission
    has_template: bool
    kpi: KpiMonitor | None = None  # serve --kpi: live KPI gates and the accuracy probe

    @property
    def tokenizer(self):
        return self.async_engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.async_engine.engine.max_model_len

    def token_str(self, tid: int) -> str:
        """One token as the logprobs report it (special tokens kept)."""
        return self.tokenizer.decode([tid], skip_special_tokens=False)


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve
