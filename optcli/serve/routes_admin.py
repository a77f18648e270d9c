"""GET /health, GET /metrics and GET /v1/models."""

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
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = serve_state(request)
    check_auth(state, request)
    card = ModelCard(id=state.served_model_name, max_model_len=state.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())
