"""OpenAI-style error bodies: `APIError` (raised by routes), `error_body`, and the app's exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from optcli.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("optcli.serve")

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def api_error_body(e: APIError) -> dict:
    return error_body(e.status, e.message, e.param, e.code, e.type)


def validation_error(errors) -> APIError:
    """The 400 for pydantic's first complaint, naming the field."""
    errors = list(errors or [])
    # an unknown field names itself best; otherwise pydantic's first complaint
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0] if errors else {})
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument {param!r}: this server does not implement it",
                        param=param, code="unsupported_parameter")
    return APIError(400, f"invalid value for {param!r}: {msg}" if param else msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answers with an OpenAI error body, never a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(api_error_body(e), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(e.errors())
        return JSONResponse(api_error_body(err), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = e.detail if isinstance(e.detail, str) else "request failed"
        return JSONResponse(error_body(e.status_code, msg), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return JSONResponse(error_body(500, "internal server error"), status_code=500)
