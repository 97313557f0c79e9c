"""A streamed import's transaction: comparisons written as they arrive, the batch row last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from store.db import Database
from store.feedback import BatchWriter, IdempotentReplay, NewComparison, find_replay, get_feedback_batch
from store.models import FeedbackBatch

IMPORT_CHUNK_RECORDS = 2_000
"""comparisons held back before they are written in one go"""


class ImportSession:
    """One feedback batch written over a transaction held open while its source arrives.

    Comparisons are buffered and written ``chunk_records`` at a time; ``finish``
    writes the batch row and commits. Any error before that, a dropped
    connection or a killed server rolls the whole import back. Its methods
    block (call them from a worker thread); ``abort`` gives back the store
    error the session scope made of a database error.
    """

    def __init__(
        self,
        database: Database,
        *,
        source: str,
        api_key_id: int | None = None,
        metadata: dict[str, Any] | None = None,
        chunk_records: int = IMPORT_CHUNK_RECORDS,
    ):
        self._scope = database.session()
        session = self._scope.__enter__()
        self._open = True
        try:
            self._writer = BatchWriter(session, source=source, api_key_id=api_key_id, metadata=metadata)
        except BaseException as exc:
            raise self.abort(exc) from None
        self._chunk_records = chunk_records
        self._pending: list[NewComparison] = []

    @property
    def count(self) -> int:
        """Comparisons taken so far (written or still buffered)."""
        return self._writer.count + len(self._pending)

    def add(self, comparisons: Sequence[NewComparison]) -> None:
        """Take comparisons the caller has validated; a full buffer is written now."""
        self._pending.extend(comparisons)
        if len(self._pending) >= self._chunk_records:
            self._flush()

    def finish(
        self, *, idempotency_key: str | None, request_sha256: str, metadata: dict[str, Any] | None = None
    ) -> FeedbackBatch:
        """Write what is buffered and the batch row (``metadata`` merged into the batch's), and commit.

        A concurrent import under the same key that committed first raises
        ``IdempotentReplay``; a failed commit raises the translated store error."""
        self._flush()
        batch = self._writer.finish(idempotency_key=idempotency_key, request_sha256=request_sha256, metadata=metadata)
        self._open = False
        self._scope.__exit__(None, None, None)
        return batch

    def abort(self, exc: BaseException) -> BaseException:
        """Roll back (once); the error to answer with: the store error the scope made of ``exc``, or ``exc``."""
        if not self._open:
            return exc
        self._open = False
        try:
            self._scope.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as translated:  # noqa: BLE001 - returned for the caller to raise
            return translated
        return exc

    def _flush(self) -> None:
        self._writer.add(self._pending, prevalidated=True)
        self._pending = []


def replay_of(database: Database, *, idempotency_key: str, request_sha256: str | None = None) -> FeedbackBatch | None:
    """The batch first registered under ``idempotency_key`` (``find_replay``), in a session of its own."""
    with database.session() as session:
        return find_replay(session, idempotency_key=idempotency_key, request_sha256=request_sha256)


def replay_winner(database: Database, lost: IdempotentReplay) -> FeedbackBatch:
    """The answer to a request that lost an idempotency race (an import or a
    registration): the winner's batch, read after the loser rolled back."""
    with database.session() as session:
        return get_feedback_batch(session, lost.batch_id)
