"""Health and API keys."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Admin, DatabaseDep, SessionDep
from api.errors import RETRY_AFTER_S, responses
from api.schemas.common import NO_NUL, Public
from store import errors
from store.db import assert_schema_at_head
from store.keys import create_api_key, list_api_keys, revoke_api_key

log = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    backend: str
    """the kind of database: postgresql or sqlite"""
    database: Literal["ok", "unreachable", "schema_not_at_head"]


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
def healthz(database: DatabaseDep) -> Any:
    """Ready when the database answers and its schema is at this code's head.

    Unauthenticated, so it says no more than that: the backend's kind and its
    state, never its address, user or the driver's message (those are logged).
    The check opens its own connection instead of waiting for the request
    pool, so a server whose pool is exhausted still answers it at once.
    """
    backend = database.engine.dialect.name
    try:
        assert_schema_at_head(database.probe_engine)
    except errors.StoreError as exc:
        kind = "schema_not_at_head" if isinstance(exc, errors.SchemaNotAtHead) else "unreachable"
        log.error("health check failed (%s): %s", kind, exc)
        body = Health(status="unavailable", backend=backend, database=kind)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return Health(status="ok", backend=backend, database="ok")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")
    role: str = Field(pattern="^(labeler|operator|admin)$")


class ApiKeyPublic(Public):
    id: int
    name: str
    role: str
    prefix: str
    """the token's first characters, to recognise it"""
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(BaseModel):
    key: ApiKeyPublic
    token: str
    """the bearer token: shown this once, only its hash is kept"""


@router.post("/v1/api-keys", status_code=201, response_model=ApiKeyCreated, responses=responses(401, 403, 409, 422))
def create_key(body: ApiKeyCreate, _: Admin, session: SessionDep) -> Any:
    key, token = create_api_key(session, name=body.name, role=body.role)
    return ApiKeyCreated(key=ApiKeyPublic.model_validate(key), token=token)


@router.get("/v1/api-keys", response_model=list[ApiKeyPublic], responses=responses(401, 403))
def keys(_: Admin, session: SessionDep) -> Any:
    return list_api_keys(session, limit=10_000)


@router.post("/v1/api-keys/{name}/revoke", response_model=ApiKeyPublic, responses=responses(401, 403, 404, 422))
def revoke_key(name: Annotated[str, Path(pattern=NO_NUL)], _: Admin, session: SessionDep, request: Request) -> Any:
    key = revoke_api_key(session, name=name)
    request.app.state.key_cache.drop(key.id)
    return key
