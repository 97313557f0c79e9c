"""Imports of preference pairs: a streamed import's transaction (comparisons written as they arrive, the batch
row last), and ``PreferenceImport``, what an import does with each parsed line, for the API's import route and
``ratchet feedback import`` alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from store.db import Database
from store.errors import InvalidInput
from store.feedback import BatchWriter, IdempotentReplay, NewComparison, comparison_problems, find_replay, get_feedback_batch
from store.models import NAME_LEN, FeedbackBatch

IMPORT_CHUNK_RECORDS = 2_000
"""comparisons held back before they are written in one go"""
MAX_SKIPPED_REPORTED = 1_000
"""skipped lines an import keeps with their reasons (all of them are counted)"""
SKIPPED_KEPT_WITH_BATCH = 100
"""skipped lines (with their reasons) kept in the batch's metadata"""


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


# -- what an import does with its lines -----------------------------------------------------------------------


class SkippedLine(NamedTuple):
    """A line of an import that did not become a comparison."""

    line: int
    """1-based line number in the decoded file"""
    reason: str


class ParsedPair(Protocol):
    """One parsed line of an import (``api.formats.ParsedLine``): a preference pair, or ``error`` saying why not."""

    line: int
    prompt: str | None
    chosen: str | None
    rejected: str | None
    error: str | None
    strength: float | None
    messages: Sequence[dict[str, str]] | None


class LineParser(Protocol):
    """A streamed file's parser (``api.formats.JsonlImportParser``)."""

    def feed_pieces(self, chunk: bytes) -> Iterator[Sequence[ParsedPair]]: ...

    def close(self) -> Sequence[ParsedPair]: ...


class TooManyComparisons(InvalidInput):
    """An import with more comparisons than one feedback batch may hold (the API answers 413)."""


class PreferenceImport:
    """One import of a file of preference pairs into one feedback batch: every parsed line becomes a comparison
    (A the chosen response, B the rejected one, choice ``a``) written to an ``ImportSession`` as the file
    arrives, or a skipped line with its reason.

    A line that cannot be used is skipped and the rest imported (the first
    ``MAX_SKIPPED_REPORTED`` skipped lines are kept with their reasons, the
    first ``SKIPPED_KEPT_WITH_BATCH`` in the batch's metadata beside the
    counts); with ``strict`` a single skipped line writes nothing, and so
    does a file with no usable line. The API's import route and ``ratchet
    feedback import`` both import through this class, so a file imports the
    same either way. Its methods block (the route calls them from a worker
    thread); after an error, ``abort`` rolls back.
    """

    def __init__(
        self,
        database: Database,
        parser: LineParser,
        *,
        fmt: str,
        max_records: int,
        source: str | None = None,
        rater_id: str | None = None,
        api_key_id: int | None = None,
    ):
        self.source = source or f"import:{fmt}"
        """the batch's source (default ``import:<format>``)"""
        self.rater_id = rater_id or self.source
        """every comparison's rater id (default: the source)"""
        for name in ("source", "rater_id"):
            value = getattr(self, name)
            if len(value) > NAME_LEN or "\x00" in value:
                raise InvalidInput(f"{name} must be at most {NAME_LEN} characters without a NUL character",
                                   [{"field": name, "message": f"{len(value)} characters"}])
        self.parser = parser
        self.max_records = max_records
        self.skipped: list[SkippedLine] = []
        """the first ``MAX_SKIPPED_REPORTED`` skipped lines"""
        self.skipped_count = 0
        self.transaction = ImportSession(database, source=self.source, api_key_id=api_key_id,
                                         metadata={"import_format": fmt})

    @property
    def imported(self) -> int:
        """Comparisons taken so far."""
        return self.transaction.count

    def consume(self, chunk: bytes) -> None:
        """Parse the next chunk of the file, piece by decoded piece, writing as the lines come."""
        for lines in self.parser.feed_pieces(chunk):
            self.take(lines)

    def end(self) -> None:
        """Take the file's last line (one without a newline)."""
        self.take(self.parser.close())

    def take(self, lines: Iterable[ParsedPair]) -> None:
        """Validate parsed lines (``comparison_problems``) and write the good ones; count and keep the others."""
        accepted: list[NewComparison] = []
        for parsed in lines:
            if parsed.error is None:
                comp = NewComparison(
                    prompt=parsed.prompt, response_a=parsed.chosen, response_b=parsed.rejected,
                    choice="a", rater_id=self.rater_id, strength=parsed.strength,
                    metadata={"messages": list(parsed.messages)} if parsed.messages else None,
                )
                problems = comparison_problems(comp, parsed.line)
                if not problems:
                    accepted.append(comp)
                    if self.transaction.count + len(accepted) > self.max_records:
                        raise TooManyComparisons(
                            f"the import has more than {self.max_records} comparisons (at line {parsed.line}):"
                            f" over the limit of {self.max_records} per batch"
                        )
                    continue
                reason = "; ".join(p["message"] for p in problems)
            else:
                reason = parsed.error
            self.skipped_count += 1
            if len(self.skipped) < MAX_SKIPPED_REPORTED:
                self.skipped.append(SkippedLine(parsed.line, reason))
        self.transaction.add(accepted)

    def finish(self, *, strict: bool, idempotency_key: str | None, request_sha256: str) -> FeedbackBatch:
        """Write the batch row, with the counts and the first skipped lines in its metadata, and commit.

        ``InvalidInput`` listing the skipped lines when ``strict`` and a line
        was skipped, or when no line could be imported (the caller aborts);
        ``IdempotentReplay`` as ``ImportSession.finish``."""
        problems = [{"index": s.line, "field": "line", "message": s.reason} for s in self.skipped]
        if strict and self.skipped_count:
            raise InvalidInput(
                f"{self.skipped_count} line(s) could not be imported (strict mode): nothing was written", problems
            )
        if self.transaction.count == 0:
            raise InvalidInput(f"no line could be imported ({self.skipped_count} skipped)", problems)
        report = {
            "imported": self.transaction.count,
            "skipped": self.skipped_count,
            "skipped_lines": [s._asdict() for s in self.skipped[:SKIPPED_KEPT_WITH_BATCH]],
        }
        return self.transaction.finish(idempotency_key=idempotency_key, request_sha256=request_sha256, metadata=report)

    def abort(self, exc: BaseException) -> BaseException:
        """Roll back; the error to raise (``ImportSession.abort``)."""
        return self.transaction.abort(exc)


class ImportCounts(NamedTuple):
    """What an import registered, read back from its batch (a replay's too)."""

    imported: int
    skipped: int
    skipped_lines: list[SkippedLine]
    """the first ``SKIPPED_KEPT_WITH_BATCH`` skipped lines"""


def import_counts(batch: FeedbackBatch) -> ImportCounts:
    """The counts ``PreferenceImport.finish`` kept in ``batch``'s metadata."""
    meta = batch.meta or {}
    return ImportCounts(
        imported=meta.get("imported", batch.comparison_count),
        skipped=meta.get("skipped", 0),
        skipped_lines=[SkippedLine(s["line"], s["reason"]) for s in meta.get("skipped_lines", [])],
    )
