"""The one place where errors become HTTP responses.

Every error body is ``{"error": {"type": ..., "message": ..., "param": ..., "code": ...}}``,
OpenAI's shape: ``code`` repeats ``type`` (clients branch on either), ``param`` names the
offending request field where one is known, else null. Domain errors
(:mod:`metarlhf.errors`) map by class, never by message text:

=====================  ======  ==============================================
error                  status  when
=====================  ======  ==============================================
ConfigError            400     invalid generation parameters, prompt too long
DataError              422     malformed feedback, Idempotency-Key body mismatch
AdapterError           422     an adapter that cannot be used
NotFoundError          404     unknown user, completion, job or version (also
                               another tenant's: tenants are invisible)
ModelError             500     model files missing or broken
request validation     422     ``invalid_request`` (pydantic, unknown fields);
                       400     on the OpenAI routes (OPENAI_PATHS), as OpenAI
ApiError               any     401 auth, 413 body too large, 429 overloaded
any other exception    500     ``internal_error`` (a bug; logged with its traceback)
=====================  ======  ==============================================
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metarlhf.errors import AdapterError, ConfigError, DataError, MetaRLHFError, ModelError, NotFoundError

log = logging.getLogger(__name__)

STATUS: dict[type[MetaRLHFError], int] = {
    ConfigError: 400,
    DataError: 422,
    AdapterError: 422,
    NotFoundError: 404,
    ModelError: 500,
}


class ApiError(Exception):
    """An HTTP-level error that is not a domain error (auth, limits, overload)."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}


#: Routes that answer as OpenAI's API does: a request that fails validation is a 400 there.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


def error_body(type_: str, message: str, param: str | None = None) -> dict:
    return {"error": {"type": type_, "message": message, "param": param, "code": type_}}


def status_of(e: MetaRLHFError) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def internal_error(e: BaseException) -> ApiError:
    """A non-domain exception as a typed 500 (the message names the exception class only)."""
    return ApiError(500, "internal_error", f"internal server error ({type(e).__name__})")


def typed(e: BaseException) -> ApiError:
    """Any exception as an :class:`ApiError`: domain errors by class, others as ``internal_error``."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, MetaRLHFError):
        return ApiError(status_of(e), e.type, str(e))
    return internal_error(e)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param), status_code=status, headers=headers)


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err.get("loc", ()) if x != "body")


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = _loc(err)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _validation_param(e: RequestValidationError) -> str | None:
    """The first failing field (``messages.0.role``), or None for a whole-body error."""
    errors = e.errors()
    return (_loc(errors[0]) or None) if errors else None


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(MetaRLHFError)
    async def _domain(request: Request, e: MetaRLHFError) -> JSONResponse:
        status = status_of(e)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e)
        return error_response(status, e.type, str(e))

    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.type, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        status = 400 if request.url.path.endswith(OPENAI_PATHS) else 422  # also under a --root-path
        return error_response(status, "invalid_request", _validation_message(e), param=_validation_param(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, type_, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        # last resort (Starlette's ServerErrorMiddleware): a typed JSON body, never text/plain
        log.error("%s %s: unhandled %s", request.method, request.url.path, type(e).__name__, exc_info=e)
        err = internal_error(e)
        return error_response(err.status, err.type, err.message)
