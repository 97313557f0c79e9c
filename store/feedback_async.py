"""Small feedback batches on PostgreSQL, written from the event loop.

A labeling tool posts many small batches (a few to a few hundred
comparisons). For those the API skips its worker thread and the ORM: the
whole batch is one SQL statement sent with asyncpg, which PostgreSQL runs as
one transaction (autocommit), so a batch is still written whole or not at all:

* the batch row goes in with ``ON CONFLICT (idempotency_key) DO NOTHING``;
* its comparisons go in from arrays (``unnest``), under the batch id the
  first insert returned.

Batches that answer comparison tasks do not come here: the lease rules
(``store.answers``) lock the tasks and check each answer, which the API does
on the ``store.feedback`` path.

No returned row means the idempotency key was taken: the first batch is read
back, a replay when the request hash matches, else ``Conflict``. Large batches and SQLite keep the COPY path in
``store.feedback`` (``BatchWriter``); both write the same rows and the same
content hash.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from store.errors import Conflict, DatabaseUnavailable, InvalidInput, StoreError
from store.feedback import ContentHash, NewComparison, comparison_metadata_json, encode_rows
from store.models import utcnow

WARM_CONNECTIONS = 4
ACQUIRE_TIMEOUT_S = 5.0
"""how long a request waits for a pooled connection (or a new one to open) by default (``RATCHET_DB_POOL_TIMEOUT_S``)"""

log = logging.getLogger(__name__)

_INSERT_BATCH = """
WITH batch AS (
    INSERT INTO feedback_batches (source, idempotency_key, request_sha256, content_sha256, comparison_count,
                                  cycle_id, api_key_id, metadata, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::json, $9)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
), inserted AS (
    INSERT INTO comparisons (batch_id, position, prompt, response_a, response_b, choice, rater_id, task_id, metadata,
                             strength)
    SELECT batch.id, r.ordinal - 1, r.prompt, r.response_a, r.response_b, r.choice, r.rater_id, r.task_id,
           r.metadata::json, r.strength
    FROM batch, unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::int[], $16::text[],
                       $17::float8[])
        WITH ORDINALITY AS r(prompt, response_a, response_b, choice, rater_id, task_id, metadata, strength, ordinal)
)
SELECT id FROM batch
"""

_BY_KEY = """
SELECT id, source, comparison_count, content_sha256, idempotency_key, cycle_id, created_at,
       metadata::text AS metadata, request_sha256
FROM feedback_batches WHERE idempotency_key = $1
"""

# Errors that mean the database could not be reached or dropped the connection.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


async def _keep_session(_: asyncpg.Connection) -> None:
    """Pool reset: nothing to undo. These connections only run single
    autocommit statements (no SET, LISTEN, cursors or advisory locks), so the
    default reset query would be a wasted round trip per request; asyncpg
    still rolls back any open transaction and drops a broken connection."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError):
        return "no connection to the database within the acquire timeout"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def asyncpg_dsn(url: str) -> str:
    """The asyncpg DSN of a SQLAlchemy PostgreSQL URL (``postgresql+psycopg2://…`` → ``postgresql://…``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise StoreError(f"the event-loop writer needs PostgreSQL, not {parsed.get_backend_name()}")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncFeedbackWriter:
    """An asyncpg pool that registers small batches in one statement each.

    Create it inside the event loop that will use it (the app's lifespan);
    the pool connects lazily, so a database that is down at start-up is a 503
    on the first request, not a server that will not start. A request waits
    at most ``acquire_timeout_s`` for a connection (a new one included), then
    ``DatabaseUnavailable``.
    """

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S):
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @classmethod
    async def open(cls, url: str, *, max_size: int, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S) -> AsyncFeedbackWriter:
        pool = await asyncpg.create_pool(
            asyncpg_dsn(url), min_size=0, max_size=max_size, reset=_keep_session, timeout=acquire_timeout_s
        )
        return cls(pool, acquire_timeout_s=acquire_timeout_s)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close the pool: gracefully, or by terminating its connections after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout_s)
        except TimeoutError:
            log.warning("the small-batch pool did not close within %.0f s; terminating its connections", timeout_s)
            self._pool.terminate()

    async def warm(self, connections: int = WARM_CONNECTIONS) -> int:
        """Open ``connections`` pooled connections now, so the first requests after a start do not
        all wait for one (16 at once took ~180 ms on 2 cores). Returns how many opened; a database
        that cannot be reached is logged and left to the first request. Cancelling it (a server
        that stops while it runs) releases whatever it acquired."""
        connections = min(connections, self._pool.get_max_size())
        pending = [asyncio.ensure_future(self._pool.acquire()) for _ in range(connections)]
        try:
            await asyncio.wait(pending)
        finally:
            for task in pending:
                task.cancel()
            # The release runs in a task of its own and is waited for whole: a cancel that lands after the
            # wait above returned arrives at the next await, and must not leave the connections acquired.
            release = asyncio.ensure_future(self._release_opened(pending))
            cancelled = False
            while not release.done():
                try:
                    await asyncio.shield(release)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError
            opened = release.result()
        failures = [t.exception() for t in pending if not t.cancelled() and t.exception() is not None]
        if failures:
            log.warning("opened %d of %d database connections for small feedback batches: %s",
                        len(opened), connections, failures[0])
        return len(opened)

    async def _release_opened(self, pending: list[asyncio.Future]) -> list:
        """Wait for the cancelled acquires to settle, release the connections they got; returns those."""
        await asyncio.gather(*pending, return_exceptions=True)
        opened = [t.result() for t in pending if not t.cancelled() and t.exception() is None]
        for conn in opened:
            await self._pool.release(conn)
        return opened

    async def register(
        self,
        *,
        source: str,
        comparisons: Sequence[NewComparison],
        idempotency_key: str | None,
        request_sha256: str,
        api_key_id: int | None = None,
        cycle_id: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Register a validated batch that answers no task; returns (batch row as a dict, created).

        Raises ``Conflict`` when the key was used for another request,
        ``DatabaseUnavailable`` when the database cannot be reached.
        """
        if not comparisons:
            raise InvalidInput("a feedback batch needs at least one comparison", [])
        if any(c.task_id is not None for c in comparisons):
            raise StoreError("a batch that answers tasks is registered through store.feedback (the lease rules)")
        content = ContentHash()
        content.update(encode_rows(comparisons))
        created_at = utcnow()
        meta = metadata or {}
        row = {
            "source": source,
            "comparison_count": len(comparisons),
            "content_sha256": content.hexdigest(),
            "idempotency_key": idempotency_key,
            "cycle_id": cycle_id,
            "created_at": created_at,
            "meta": meta,
        }
        columns = (
            [c.prompt for c in comparisons],
            [c.response_a for c in comparisons],
            [c.response_b for c in comparisons],
            [c.choice for c in comparisons],
            [c.rater_id for c in comparisons],
            [c.task_id for c in comparisons],
            [comparison_metadata_json(c) for c in comparisons],
            [c.strength for c in comparisons],
        )
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                batch_id = await conn.fetchval(
                    _INSERT_BATCH,
                    source, idempotency_key, request_sha256, row["content_sha256"], len(comparisons),
                    cycle_id, api_key_id, json.dumps(meta), created_at, *columns,
                )
                if batch_id is not None:
                    return {"id": batch_id, **row}, True
                first = await self._find(conn, idempotency_key, request_sha256)
                if first is None:
                    raise StoreError(f"feedback batch with idempotency key {idempotency_key!r} vanished")
                return first, False
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    async def find_replay(self, idempotency_key: str, request_sha256: str) -> dict[str, Any] | None:
        """The batch first registered under ``idempotency_key`` (None if none); ``Conflict``
        when it was registered for another request."""
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                return await self._find(conn, idempotency_key, request_sha256)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    @staticmethod
    async def _find(conn: asyncpg.Connection, idempotency_key: str | None, request_sha256: str) -> dict[str, Any] | None:
        if idempotency_key is None:
            return None
        record = await conn.fetchrow(_BY_KEY, idempotency_key)
        if record is None:
            return None
        if record["request_sha256"] != request_sha256:
            raise Conflict(f"idempotency key {idempotency_key!r} was used for a different request")
        first = dict(record)
        first.pop("request_sha256")
        first["meta"] = json.loads(first.pop("metadata"))
        return first
