"""API keys: bearer tokens with a role; only the token's sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import Conflict, InvalidInput, NotFound
from store.models import ROLES, ApiKey, utcnow
from store.sessions import revoke_key_sessions
from store.versioning import list_rows

TOKEN_PREFIX = "rk_"


def hash_token(token: str) -> str:
    """The sha256 under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(session: Session, *, name: str, role: str) -> tuple[ApiKey, str]:
    """A new key; returns (row, token). The token is shown once and never stored."""
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(ROLES)}")
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise Conflict(f"an API key named {name!r} already exists")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, role=role, token_sha256=hash_token(token), prefix=token[:10])
    session.add(key)
    session.flush()
    return key, token


def authenticate(session: Session, token: str) -> ApiKey | None:
    """The live key for ``token``, or None if unknown or revoked."""
    key = session.scalar(select(ApiKey).where(ApiKey.token_sha256 == hash_token(token)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def revoke_api_key(session: Session, *, name: str) -> ApiKey:
    """Revoke the key ``name`` (idempotent), and end its dashboard sessions."""
    key = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None:
        raise NotFound(f"no API key named {name!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        revoke_key_sessions(session, api_key_id=key.id)
    return key


def list_api_keys(session: Session, *, limit: int = 100, after_id: int | None = None) -> list[ApiKey]:
    """Keys in id order (their hashes, never tokens)."""
    return list_rows(session, ApiKey, limit=limit, after_id=after_id)
