"""Exceptions raised by the store. Routes and the CLI translate them."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store error."""


class NotFound(StoreError):
    """A row named by id or (name, version) does not exist."""


class Conflict(StoreError):
    """A write collided with an existing row (unique key, idempotency key)."""


class RaterExcluded(StoreError):
    """Quality control (or an operator) leaves this rater out: it is handed no more tasks (answered 403)."""


class ImmutableVersion(StoreError):
    """An update of an immutable version row was attempted."""


class InvalidInput(StoreError):
    """Input failed validation; ``errors`` lists each bad record and field."""

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.errors = errors or []


class SchemaNotAtHead(StoreError):
    """The database schema is not at the migrations' head revision."""


class ServiceUnavailable(StoreError):
    """Something the service depends on cannot be reached right now (answered 503)."""


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not be reached."""


class ArtifactError(StoreError):
    """Base class of artifact store errors."""


class ChecksumMismatch(ArtifactError):
    """An artifact's bytes do not match the sha256 recorded for it."""


class UriOutsideRoot(ArtifactError):
    """An artifact URI points outside the configured artifact root."""
