"""Dependencies: the request's database session, auth, paging, the idempotency key."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.schemas.common import NO_NUL
from store.artifacts import ArtifactStore
from store.db import Database
from store.errors import InvalidInput
from store.keys import authenticate, hash_token
from store.raters import QCPolicy, current_policy, default_policy
from store.settings import Settings

MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="row id")]
"""An id in a path: a positive 32-bit integer (anything else is 422, not a database error)."""

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="Retry-safe key: a replay returns the first answer; the same key with another body is 409",
    ),
]
"""The ``Idempotency-Key`` header of the routes that register feedback batches."""

ROLE_RANK = {"labeler": 0, "operator": 1, "admin": 2}


# Plain lookups are ``async def`` so FastAPI runs them on the event loop
# instead of sending each through the thread pool.
async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """The request's session: committed when the route returns, before the
    response is sent (scope="function"), so a 2xx answer means committed."""
    with database.session() as session:
        yield session


def server_qc_default(app: FastAPI) -> QCPolicy:
    """The ``qc`` of the server's default cycle settings (``store.raters.default_policy`` of
    ``RATCHET_CYCLE_CONFIG``), read once per app."""
    default = getattr(app.state, "qc_default", None)
    if default is None:
        default = app.state.qc_default = default_policy(app.state.settings.cycle_config)
    return default


def get_qc_policy(request: Request, session: Annotated[Session, Depends(get_session, scope="function")]) -> QCPolicy:
    """The QC policy in force (``store.raters.current_policy``): the running or newest cycle's, else the
    ``qc`` of the server's default cycle settings (``server_qc_default``)."""
    return current_policy(session, server_qc_default(request.app))


DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
QCPolicyDep = Annotated[QCPolicy, Depends(get_qc_policy)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]

bearer = HTTPBearer(auto_error=False, description="An API key from `ratchet keys create`")


@dataclass(frozen=True)
class Caller:
    """The API key a request came with (a snapshot: id, name and role)."""

    id: int
    name: str
    role: str


class KeyCache:
    """Authenticated keys, remembered for ``ttl_s`` seconds.

    A hit costs no database round trip. Revoking a key through this server
    drops it at once; a revocation made elsewhere (the CLI, another server)
    takes effect within ``ttl_s`` (``RATCHET_AUTH_CACHE_S``; 0 turns the
    cache off). Unknown and revoked tokens are never cached.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Caller, float]] = {}

    def get(self, token_sha256: str) -> Caller | None:
        entry = self._entries.get(token_sha256)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token_sha256: str, caller: Caller) -> None:
        if self.ttl_s > 0:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[token_sha256] = (caller, time.monotonic() + self.ttl_s)

    def drop(self, key_id: int) -> None:
        for sha, (caller, _) in list(self._entries.items()):
            if caller.id == key_id:
                self._entries.pop(sha, None)


def _lookup(database: Database, token: str) -> Caller | None:
    with database.session() as session:
        key = authenticate(session, token)
        return None if key is None else Caller(id=key.id, name=key.name, role=key.role)


async def caller_of(request: Request, token: str) -> Caller | None:
    """The live key behind ``token`` (None for an unknown or revoked one), from the
    app's key cache or the database."""
    cache: KeyCache = request.app.state.key_cache
    digest = hash_token(token)
    caller = cache.get(digest)
    if caller is None:
        caller = await run_in_threadpool(_lookup, request.app.state.database, token)
        if caller is not None:
            cache.put(digest, caller)
    return caller


def require_role(role: str):
    """A dependency that admits keys of ``role`` or a higher one (labeler < operator < admin)."""

    async def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Caller:
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                401, "missing API key: send `Authorization: Bearer <token>`", {"WWW-Authenticate": "Bearer"}
            )
        caller = await caller_of(request, credentials.credentials)
        if caller is None:
            raise HTTPException(401, "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
        if ROLE_RANK[caller.role] < ROLE_RANK[role]:
            raise HTTPException(403, f"this needs the {role} role; key {caller.name!r} is a {caller.role}")
        return caller

    return check


Labeler = Annotated[Caller, Depends(require_role("labeler"))]
Operator = Annotated[Caller, Depends(require_role("operator"))]
Admin = Annotated[Caller, Depends(require_role("admin"))]


# --- paging ----------------------------------------------------------------------


def encode_cursor(last_id: int) -> str:
    """The opaque cursor that continues after row ``last_id``."""
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The row id a cursor continues after (422 for a cursor we did not issue)."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        if prefix != "id" or not value.isdigit():
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("invalid cursor", [{"field": "cursor", "message": "not a cursor this API issued"}]) from None


class Paging:
    """``limit`` and ``cursor`` query parameters of every list endpoint."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 50,
        cursor: Annotated[str | None, Query(max_length=64, description="from the previous page's next_cursor")] = None,
    ):
        self.limit = limit
        self.after_id = decode_cursor(cursor)

    def page(self, rows: list, convert) -> dict:
        """A page body: ``data``, ``count`` and ``next_cursor`` (None on the last page)."""
        data = [convert(r) for r in rows]
        next_cursor = encode_cursor(rows[-1].id) if len(rows) == self.limit else None
        return {"data": data, "count": len(data), "next_cursor": next_cursor}


PagingDep = Annotated[Paging, Depends()]
