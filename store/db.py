"""Engines, the managed session scope, and the schema-at-head check.

``Database(url).session()`` is the one way to talk to the database: it
commits on success, rolls back on any error, and translates database errors
into ``store.errors`` exceptions, so callers never see a driver exception.
"""

from __future__ import annotations

import logging
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
from sqlalchemy.orm import Session, sessionmaker

from store import errors
from store.models import VersionRow

log = logging.getLogger(__name__)

IMMUTABLE_MARKER = "ratchet: immutable version row"


def make_engine(url: str) -> Engine:
    """An engine for ``url``, set up for the store's concurrency needs.

    SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and
    ``BEGIN IMMEDIATE`` transactions: writers queue instead of failing, and
    SAVEPOINTs work (pysqlite's own transaction handling is switched off, as
    SQLAlchemy's SQLite documentation recommends). Postgres gets a pool with
    pre-ping so a restarted server does not fail the first request.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=16
        )

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

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=32)


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
    """An engine plus the managed session scope."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _refuse_version_updates)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except DBAPIError as exc:
            session.rollback()
            raise translate(exc) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


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


def open_database(url: str, *, require_head: bool = True) -> Database:
    """A ``Database`` for ``url``; by default refuses a schema that is not at head."""
    db = Database(url)
    if require_head:
        try:
            assert_schema_at_head(db.engine)
        except BaseException:
            db.dispose()
            raise
    return db
