"""Error bodies, the store-error to HTTP mapping, and OpenAPI declarations.

Every error answer has the same shape, ``ErrorResponse``: a ``detail``
sentence and, for invalid input, one entry per bad record and field. Store
exceptions are mapped to status codes here, once, instead of in every route.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from store import errors

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 100
RETRY_AFTER_S = 5
"""the Retry-After of a 503 (database or dependency unavailable)"""


class FieldError(BaseModel):
    """One bad field of one record."""

    index: int | None = None
    """position of the record in the request (None for the request itself)"""
    field: str
    """the field, dotted for nested ones (``metadata.source``)"""
    message: str


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    detail: str
    errors: list[FieldError] = []


class PayloadTooLarge(Exception):
    """A request over a configured size limit (413)."""


class RequestTimedOut(Exception):
    """A request body that stopped arriving (408)."""


class TooManyRequests(Exception):
    """The caller already runs as many of these requests as it may (429, with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


DESCRIPTIONS = {
    401: "Missing, unknown or revoked API key",
    403: "The API key's role may not do this",
    404: "Not found",
    408: "The request body stopped arriving; nothing was written",
    409: "Conflict (idempotency key reused with another body, nothing to roll back, ...)",
    413: "Request over a size limit; the message names the limit",
    422: "Invalid input; each bad record is named by index and field",
    429: "The API key already runs as many of these requests as it may; retry after Retry-After seconds",
    503: "Database unreachable or busy, schema not at head, server at capacity, or no orchestrator configured;"
    " retry after Retry-After seconds",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for these error codes."""
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


def raw_body(content: dict[str, dict]) -> dict:
    """The ``openapi_extra`` of a route that reads its body raw (to hash and size-check it
    first): the body it requires, by media type."""
    return {"requestBody": {"required": True, "content": content}}


def _body(status: int, detail: str, field_errors: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    payload = ErrorResponse(detail=detail, errors=[FieldError(**e) for e in (field_errors or [])[:MAX_REPORTED_ERRORS]])
    return JSONResponse(payload.model_dump(), status_code=status, headers=headers)


def database_unavailable(exc: BaseException) -> JSONResponse:
    """The 503 for a database that cannot be reached or has no free connection.

    The driver's words (host, port, user) go to the log only: the key lookup
    that precedes authentication can fail this way too."""
    log.error("database unavailable: %s", exc)
    return _body(503, f"database unavailable; retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})


def pydantic_field_errors(
    exc: ValidationError | RequestValidationError, *, record_key: str | None = None, first_record: int | None = None
) -> list[dict]:
    """Pydantic errors as ``{index, field, message}``; ``record_key`` names the list of records
    (e.g. ``comparisons``) whose position becomes ``index``. ``first_record``: the value
    validated was itself a list of records, the first of them at that index."""
    out = []
    for err in exc.errors()[:MAX_REPORTED_ERRORS]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        index = None
        if record_key is not None and len(loc) >= 2 and loc[0] == record_key and isinstance(loc[1], int):
            index, loc = loc[1], loc[2:]
        elif first_record is not None and loc and isinstance(loc[0], int):
            index, loc = first_record + loc[0], loc[1:]
        message = err.get("msg", "invalid")
        if err.get("type") == "identical_responses":
            loc = [*loc, "choice"]
        elif err.get("type") == "strength":
            loc = [*loc, "strength"]
        out.append({"index": index, "field": ".".join(str(p) for p in loc) or "(body)", "message": message})
    return out


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a JSON body it could not decode (not UTF-8, nested too deep, an
            # integer too long for Python): invalid input like any other, so 422.
            reason = str(exc.__cause__) or type(exc.__cause__).__name__
            return _body(422, f"the body is not valid JSON: {reason}", [{"field": "(body)", "message": reason}])
        return _body(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = pydantic_field_errors(exc)
        return _body(422, f"{len(fields)} invalid field(s)", fields)

    @app.exception_handler(errors.InvalidInput)
    async def _invalid(_: Request, exc: errors.InvalidInput) -> JSONResponse:
        return _body(422, str(exc), exc.errors)

    @app.exception_handler(errors.NotFound)
    async def _not_found(_: Request, exc: errors.NotFound) -> JSONResponse:
        return _body(404, str(exc))

    @app.exception_handler(errors.Conflict)
    async def _conflict(_: Request, exc: errors.Conflict) -> JSONResponse:
        return _body(409, str(exc))

    @app.exception_handler(errors.RaterExcluded)
    async def _rater_excluded(_: Request, exc: errors.RaterExcluded) -> JSONResponse:
        return _body(403, str(exc))

    @app.exception_handler(errors.ImmutableVersion)
    async def _immutable(_: Request, exc: errors.ImmutableVersion) -> JSONResponse:
        return _body(409, str(exc))

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(_: Request, exc: PayloadTooLarge) -> JSONResponse:
        return _body(413, str(exc))

    @app.exception_handler(RequestTimedOut)
    async def _timed_out(_: Request, exc: RequestTimedOut) -> JSONResponse:
        return _body(408, str(exc), headers={"Connection": "close"})

    @app.exception_handler(TooManyRequests)
    async def _too_many(_: Request, exc: TooManyRequests) -> JSONResponse:
        return _body(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(errors.SchemaNotAtHead)
    async def _schema(_: Request, exc: errors.SchemaNotAtHead) -> JSONResponse:
        return _body(503, str(exc))

    @app.exception_handler(errors.ServiceUnavailable)
    async def _service_unavailable(_: Request, exc: errors.ServiceUnavailable) -> JSONResponse:
        log.error("service unavailable: %s", exc)
        return _body(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(errors.DatabaseUnavailable)
    async def _unavailable(_: Request, exc: errors.DatabaseUnavailable) -> JSONResponse:
        return database_unavailable(exc)

    # Connectivity errors that escaped a session scope (none should): still a 503, never a 500.
    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _unscoped(_: Request, exc: Exception) -> JSONResponse:
        log.warning("a database error was raised outside a session scope: %r", exc)
        return database_unavailable(exc)
