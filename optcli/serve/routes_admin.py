"""GET /health, GET /metrics, GET /kpi and GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from optcli.serve.api_errors import error_body
from optcli.serve.protocol import ModelCard, ModelList
from optcli.serve.requests import check_auth
from optcli.serve.state import serve_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    if serve_state(request).async_engine.is_alive():
        return Response(status_code=200)
    return JSONResponse(error_body(503, "engine is not running"), status_code=503)


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    state = serve_state(request)
    check_auth(state, request)
    state.metrics.refresh(state.async_engine.stats())
    if state.kpi is not None:
        state.kpi.watcher.evaluate()  # the scrape sees the window as of now
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/kpi")
async def kpi_endpoint(request: Request) -> JSONResponse:
    """The live KPI gates (`serve --kpi`): each figure over the alert window, its threshold, breached or not."""
    state = serve_state(request)
    check_auth(state, request)
    if state.kpi is None:
        return JSONResponse(error_body(404, "no KPI file: start the server with --kpi FILE"), status_code=404)
    return JSONResponse(state.kpi.snapshot())


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = serve_state(request)
    check_auth(state, request)
    card = ModelCard(id=state.served_model_name, max_model_len=state.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())
