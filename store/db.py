"""Engines, the managed session scope, and the schema-at-head check.

``Database(url).session()`` is the one way to talk to the database: it
commits on success, rolls back on any error, and translates database errors
into ``store.errors`` exceptions, so callers never see a driver exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from store import errors
from store.models import VersionRow

log = logging.getLogger(__name__)

IMMUTABLE_MARKER = "ratchet: immutable version row"
POOL_TIMEOUT_S = 5.0
"""how long a checkout waits for a free pooled connection by default (``RATCHET_DB_POOL_TIMEOUT_S``)"""


def make_engine(
    url: str, *, pool_size: int | None = None, max_overflow: int | None = None, pool_timeout_s: float = POOL_TIMEOUT_S
) -> Engine:
    """An engine for ``url``, set up for the store's concurrency needs.

    SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and
    ``BEGIN IMMEDIATE`` transactions: writers queue instead of failing, and
    SAVEPOINTs work (pysqlite's own transaction handling is switched off, as
    SQLAlchemy's SQLite documentation recommends). Postgres gets a pool with
    pre-ping so a restarted server does not fail the first request, and a
    connect timeout as short as the pool timeout (at least libpq's 2 s).
    A checkout waits at most ``pool_timeout_s`` for a free connection, then
    ``DatabaseUnavailable`` (a 503 in the API) instead of a request that hangs.
    ``pool_size`` and ``max_overflow`` default to 8 + 16 (SQLite) and 16 + 32.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8 if pool_size is None else pool_size,
            max_overflow=16 if max_overflow is None else max_overflow,
            pool_timeout=pool_timeout_s,
        )
        _sqlite_setup(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=16 if pool_size is None else pool_size,
        max_overflow=32 if max_overflow is None else max_overflow,
        pool_timeout=pool_timeout_s,
        connect_args=_connect_timeout(parsed, pool_timeout_s),
    )


def _connect_timeout(parsed, timeout_s: float) -> dict:
    if parsed.get_driver_name() in ("psycopg2", "psycopg"):
        return {"connect_timeout": max(2, math.ceil(timeout_s))}
    return {}


def _sqlite_setup(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout and BEGIN IMMEDIATE on every SQLite connection."""
    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn, _record):  # pragma: no cover - driver hook
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):  # pragma: no cover - driver hook
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _refuse_version_updates(session: Session, _ctx, _instances) -> None:
    for obj in session.dirty:
        if isinstance(obj, VersionRow) and session.is_modified(obj, include_collections=False):
            raise errors.ImmutableVersion(
                f"{type(obj).__name__} id={getattr(obj, 'id', None)} is an immutable version; "
                "write a new version instead of updating it"
            )


def translate(exc: DBAPIError) -> errors.StoreError:
    """The store error for a driver error (immutability, conflict, connectivity)."""
    text = str(exc.orig) if exc.orig is not None else str(exc)
    if IMMUTABLE_MARKER in text:
        return errors.ImmutableVersion(text.strip().splitlines()[0])
    if isinstance(exc, IntegrityError):
        return errors.Conflict(text.strip().splitlines()[0])
    if isinstance(exc, OperationalError):
        return errors.DatabaseUnavailable(text.strip().splitlines()[0])
    return errors.StoreError(text.strip().splitlines()[0])


class Database:
    """An engine plus the managed session scope.

    ``pool_timeout_s``, ``pool_size`` and ``max_overflow`` go to ``make_engine``.
    """

    def __init__(self, url: str, *, pool_timeout_s: float = POOL_TIMEOUT_S, pool_size: int | None = None,
                 max_overflow: int | None = None):
        self.url = url
        self.pool_timeout_s = pool_timeout_s
        self.engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout_s=pool_timeout_s)
        self._driver_error = self.engine.dialect.dbapi.Error
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._probe: Engine | None = None
        event.listen(self._sessions, "before_flush", _refuse_version_updates)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error.

        Database errors leave it as ``store.errors`` exceptions: those raised
        through SQLAlchemy, those of the driver used directly (COPY), and a
        pool with no free connection within ``pool_timeout_s``
        (``DatabaseUnavailable``). A rollback that fails too (the connection
        is gone) is logged; the first error is the one raised.
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException as exc:
            _rollback(session)
            translated = self.translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            session.close()

    def translate(self, exc: BaseException) -> BaseException:
        """The store error for a database error raised in this database's sessions; ``exc`` itself otherwise."""
        if isinstance(exc, DBAPIError):
            return translate(exc)
        if isinstance(exc, self._driver_error):
            return translate(DBAPIError.instance(None, None, exc, self._driver_error))
        if isinstance(exc, PoolTimeout):
            pool = self.engine.pool
            return errors.DatabaseUnavailable(
                f"no database connection was free within {self.pool_timeout_s:g} s "
                f"(all {pool.size()} pooled and {pool.overflow()} overflow connections are in use)"
            )
        return exc

    @property
    def probe_engine(self) -> Engine:
        """An engine without a pool, for health checks: each check opens its own
        connection (with the connect timeout), so it never queues behind a busy pool."""
        if self._probe is None:
            self._probe = _without_pool(self.url, self.pool_timeout_s)
        return self._probe

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        if self._probe is not None:
            self._probe.dispose()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception as exc:  # noqa: BLE001 - the error that made us roll back is what the caller hears
        log.warning("rollback failed too (the connection is probably gone): %s", str(exc).splitlines()[0] if str(exc) else exc)


def _without_pool(url: str, timeout_s: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout_s, "check_same_thread": False})
        _sqlite_setup(engine)
        return engine
    return create_engine(url, poolclass=NullPool, connect_args=_connect_timeout(parsed, timeout_s))


# --- migrations -------------------------------------------------------------


def migrations_dir() -> Path:
    """The folder of the Alembic scripts (the ``migrations`` package)."""
    return Path(str(resources.files("migrations")))


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that does not depend on the working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = url
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The head revision of the migrations shipped with this code (read once per process)."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise errors.StoreError(f"migrations have {len(heads)} heads ({heads}); merge them")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise errors.DatabaseUnavailable(f"cannot reach the database at {_safe(engine)}: {exc.orig}") from exc


def upgrade(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the database at ``url`` to ``revision``; returns (before, after)."""
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        command.upgrade(alembic_config(url), revision)
        return before, current_revision(engine) or ""
    finally:
        engine.dispose()


def assert_schema_at_head(engine: Engine) -> str:
    """Raise ``SchemaNotAtHead`` unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise errors.SchemaNotAtHead(
            f"the database at {_safe(engine)} is at schema revision {current or '(empty)'}, "
            f"this code needs {head}: run `ratchet db upgrade`"
        )
    return current


def _safe(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def open_database(url: str, *, require_head: bool = True, pool_timeout_s: float = POOL_TIMEOUT_S) -> Database:
    """A ``Database`` for ``url``; by default refuses a schema that is not at head."""
    db = Database(url, pool_timeout_s=pool_timeout_s)
    if require_head:
        try:
            assert_schema_at_head(db.engine)
        except BaseException:
            db.dispose()
            raise
    return db
