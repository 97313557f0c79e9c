"""Dashboard sessions: a browser's sign-in, held on the server.

The browser keeps a random id (``secrets.token_urlsafe(32)``); the store
keeps its sha256, the API key it belongs to and its times. A session is good
until the first of: its lifetime from sign-in (``expires_at``), an idle
timeout after it was last used, sign-out, or the revocation of its key.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from store.models import ApiKey, DashboardSession, utcnow

MAX_ID_LEN = 100
"""longer ids are never looked up (``token_urlsafe(32)`` gives 43 characters)"""


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def create_session(session: Session, *, api_key_id: int, lifetime_s: int) -> tuple[DashboardSession, str]:
    """A new session of key ``api_key_id`` that lasts ``lifetime_s`` at most; returns (row, id).
    The id goes to the browser and is never stored."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    row = DashboardSession(token_sha256=_digest(session_id), api_key_id=api_key_id, created_at=now,
                           last_seen_at=now, expires_at=now + timedelta(seconds=lifetime_s))
    session.add(row)
    session.flush()
    return row, session_id


def resolve_session(session: Session, *, session_id: str, idle_s: int) -> ApiKey | None:
    """The live key behind ``session_id``, noting the session as used now; None when the
    session is unknown, expired, idle for ``idle_s`` or more, signed out, or its key revoked."""
    if not session_id or len(session_id) > MAX_ID_LEN:
        return None
    found = session.execute(
        select(DashboardSession, ApiKey).join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .where(DashboardSession.token_sha256 == _digest(session_id))
    ).one_or_none()
    if found is None:
        return None
    row, key = found
    now = utcnow()
    if (row.revoked_at is not None or key.revoked_at is not None or row.expires_at <= now
            or row.last_seen_at + timedelta(seconds=idle_s) <= now):
        return None
    row.last_seen_at = now
    return key


def revoke_session(session: Session, *, session_id: str) -> bool:
    """End the session ``session_id`` (sign-out); False when there was no live one."""
    if not session_id or len(session_id) > MAX_ID_LEN:
        return False
    ended = session.execute(
        update(DashboardSession)
        .where(DashboardSession.token_sha256 == _digest(session_id), DashboardSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return ended.rowcount > 0


def revoke_key_sessions(session: Session, *, api_key_id: int) -> int:
    """End every live session of key ``api_key_id``; returns how many."""
    ended = session.execute(
        update(DashboardSession)
        .where(DashboardSession.api_key_id == api_key_id, DashboardSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return ended.rowcount


def purge_sessions(session: Session, *, idle_s: int) -> int:
    """Delete the sessions that can no longer be used (expired, idle for ``idle_s``, signed
    out); returns how many."""
    now = utcnow()
    gone = session.execute(
        delete(DashboardSession).where(or_(
            DashboardSession.expires_at <= now,
            DashboardSession.last_seen_at <= now - timedelta(seconds=idle_s),
            DashboardSession.revoked_at.is_not(None),
        ))
    )
    return gone.rowcount
