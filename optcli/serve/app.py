"""`create_app(async_engine, served_model_name)`: an OpenAI-compatible FastAPI app around `AsyncEngine`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
GET /kpi (with `kpi`: the live KPI gates, `serve --kpi`).
Models without a chat template get a fallback prompt: one "<role>: <content>\\n" line per message,
then "assistant:" (a warning is logged once, at app creation).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from optcli.engine.async_engine import AsyncEngine
from optcli.serve import routes_admin, routes_chat, routes_completions
from optcli.serve.admission import Admission
from optcli.serve.api_errors import APIError, error_body, install_error_handlers
from optcli.serve.kpi_monitor import KpiMonitor, KpiOptions
from optcli.serve.metrics import ServerMetrics
from optcli.serve.state import ServeState

__all__ = ["APIError", "create_app", "error_body"]

logger = logging.getLogger("optcli.serve")


def create_app(
    async_engine: AsyncEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int = 256,
    max_request_bytes: int = 1_000_000,
    request_timeout_s: float = 600,
    kpi: KpiOptions | None = None,
) -> FastAPI:
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass a key, or None to serve without one")
    engine = async_engine.engine
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    if not has_template:
        logger.warning("tokenizer of %s has no chat template; chat uses the fallback '<role>: content' "
                       "template ending in 'assistant:'", served_model_name)
    state = ServeState(
        async_engine=async_engine, served_model_name=served_model_name, api_key=api_key,
        max_request_bytes=max_request_bytes, request_timeout_s=request_timeout_s,
        metrics=ServerMetrics(served_model_name),
        admission=Admission(getattr(engine, "max_num_seqs", 0) + max_waiting), has_template=has_template,
    )
    if kpi is not None:
        state.kpi = KpiMonitor(kpi, async_engine, state.metrics.registry, served_model_name)
    app = FastAPI(title="optcli", docs_url=None, redoc_url=None, openapi_url="/openapi.json",  # schema, no UI
                  lifespan=(lambda _app: state.kpi.running()) if state.kpi is not None else None)
    install_error_handlers(app)
    for module in (routes_admin, routes_completions, routes_chat):
        app.include_router(module.router)
    app.state.serve = state
    app.state.metrics = state.metrics
    app.state.async_engine = async_engine
    return app
