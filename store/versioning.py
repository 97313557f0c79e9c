"""Per-name version numbers, assigned inside the caller's transaction.

The next version is ``max(version) + 1`` for the name, inserted under a
SAVEPOINT; the table's unique (name, version) constraint catches a
concurrent writer that took the same number, and we retry with the new
maximum. Sixteen writers of one name get 1..16 with no duplicates and no
gaps, since a number is only taken by a row that commits.
"""

from __future__ import annotations

import random
import time
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.errors import Conflict, NotFound

T = TypeVar("T")

MAX_ATTEMPTS = 64


def _is_version_clash(exc: IntegrityError, table: str) -> bool:
    text = str(exc.orig).lower()
    return f"uq_{table}_name_version" in text or f"{table}.name, {table}.version" in text


def create_version(session: Session, model: type[T], *, name: str, **fields) -> T:
    """Insert a new version of ``name`` in ``model``'s table and return the row."""
    table = model.__tablename__
    for attempt in range(MAX_ATTEMPTS):
        latest = session.scalar(select(func.max(model.version)).where(model.name == name))
        row = model(name=name, version=(latest or 0) + 1, **fields)
        try:
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError as exc:
            if not _is_version_clash(exc, table):
                raise
            # Another transaction committed this number first: back off, re-read.
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
    raise Conflict(f"could not number a new version of {table} {name!r} after {MAX_ATTEMPTS} attempts")


def latest_version(session: Session, model: type[T], *, name: str) -> T | None:
    """The newest version of ``name``, or None."""
    return session.scalar(select(model).where(model.name == name).order_by(model.version.desc()).limit(1))


def get_row(session: Session, model: type[T], row_id: int, *, label: str) -> T:
    """The row ``row_id`` of ``model``, or ``NotFound`` naming ``label``."""
    row = session.get(model, row_id)
    if row is None:
        raise NotFound(f"{label} {row_id} does not exist")
    return row


def get_named_version(session: Session, model: type[T], *, name: str, version: int | None, label: str) -> T:
    """Version ``version`` of ``name`` (the newest when None), or ``NotFound``."""
    query = select(model).where(model.name == name)
    query = query.where(model.version == version) if version else query.order_by(model.version.desc())
    row = session.scalar(query.limit(1))
    if row is None:
        raise NotFound(f"{label} {name!r} version {version or 'latest'} does not exist")
    return row


def list_rows(session: Session, model: type[T], *, limit: int = 50, after_id: int | None = None, **equal) -> list[T]:
    """Rows in id order, ``limit`` at a time after ``after_id`` (keyset paging),
    filtered on columns equal to the given values (None values are ignored)."""
    query = select(model).order_by(model.id).limit(limit)
    for column, value in equal.items():
        if value is not None:
            query = query.where(getattr(model, column) == value)
    if after_id is not None:
        query = query.where(model.id > after_id)
    return list(session.scalars(query))
