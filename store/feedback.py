"""Feedback batches and their comparisons: registered whole or not at all.

A comparison of a chat prompt keeps the prompt's HH-RLHF text as its
``prompt`` and the prompt's message list in its metadata (``messages``),
or, when it answers a comparison task, finds it in the task's metadata
(``prompt_messages``); the message rules are ``formats.chat``'s
(standard library only).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from formats.chat import message_problems
from store.answers import Answer, Claimed, claim_answers
from store.db import Database
from store.errors import Conflict, InvalidInput
from store.models import CHOICES, Comparison, ComparisonTask, Cycle, FeedbackBatch, utcnow
from store.versioning import get_row, list_rows


@dataclass(frozen=True)
class NewComparison:
    """One comparison to register (already validated for shape by the caller)."""

    prompt: str
    response_a: str
    response_b: str
    choice: str
    rater_id: str
    task_id: int | None = None
    metadata: dict[str, Any] | None = None
    strength: float | None = None


MAX_STRENGTH = 10.0
"""the largest strength a comparison may carry (the default labeling scale goes to 3)"""


def _escape(text: str) -> str:
    # PostgreSQL COPY text format: backslash, newline, carriage return and tab are escaped.
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def comparison_metadata_json(c: NewComparison) -> str | None:
    """A comparison's metadata as stored: canonical JSON (sorted keys), or None."""
    return None if c.metadata is None else json.dumps(c.metadata, sort_keys=True, ensure_ascii=False)


def encode_rows(comparisons: Sequence[NewComparison]) -> list[str]:
    """Each comparison's content as one line of PostgreSQL COPY text format:
    prompt, response_a, response_b, choice, rater_id, task_id, metadata, strength
    (tab-separated, escaped, ``\\N`` for NULL; metadata as canonical JSON; strength as ``repr``
    of the float).

    The same lines feed the COPY (the fast insert path) and the content hash,
    so a batch is serialised once. The encoding is injective: escaping leaves
    no raw tab or newline inside a field.
    """
    lines = []
    for c in comparisons:
        meta_json = comparison_metadata_json(c)
        meta = "\\N" if meta_json is None else _escape(meta_json)
        task = "\\N" if c.task_id is None else str(c.task_id)
        strength = "\\N" if c.strength is None else repr(float(c.strength))
        texts = _escape(f"{c.prompt}\x00{c.response_a}\x00{c.response_b}\x00{c.choice}\x00{c.rater_id}")
        lines.append(f"{texts.replace(chr(0), chr(9))}\t{task}\t{meta}\t{strength}")
    return lines


class ContentHash:
    """The running sha256 of a batch's comparisons, in order (over ``encode_rows`` lines):
    a batch's content address, whatever the JSON it arrived as."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, lines: Sequence[str]) -> None:
        self.update_encoded([line.encode() for line in lines])

    def update_encoded(self, lines: Sequence[bytes]) -> None:
        self._digest.update(b"".join(line + b"\n" for line in lines))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def comparison_problems(c: NewComparison, index: int) -> list[dict]:
    """The store's rules for one comparison, as ``{index, field, message}`` dicts.

    A non-empty prompt, a known choice, a rater id, identical responses only
    with a tie, and text PostgreSQL can hold (no NUL character). An empty
    response is valid: saying nothing is sometimes the preferred, harmless reply.
    """
    out = []
    if not c.prompt.strip():
        out.append({"index": index, "field": "prompt", "message": "prompt is empty"})
    if c.choice not in CHOICES:
        out.append({"index": index, "field": "choice", "message": f"choice {c.choice!r} is not one of {', '.join(CHOICES)}"})
    elif c.response_a == c.response_b and c.choice != "tie":
        out.append({
            "index": index,
            "field": "choice",
            "message": f"response_a and response_b are identical, so choice must be 'tie', not {c.choice!r}",
        })
    if not c.rater_id.strip():
        out.append({"index": index, "field": "rater_id", "message": "rater_id is empty"})
    problem = strength_problem(c.choice, c.strength)
    if problem:
        out.append({"index": index, "field": "strength", "message": problem})
    for name in ("prompt", "response_a", "response_b", "rater_id"):
        if "\x00" in getattr(c, name):
            out.append({"index": index, "field": name, "message": f"{name} contains a NUL character"})
    return out


def strength_problem(choice: str, strength: float | None) -> str | None:
    """What is wrong with a comparison's strength (None: nothing): a number from 0 to ``MAX_STRENGTH``,
    0 exactly for a tie ("about the same") and above 0 for a choice of A or B."""
    if strength is None:
        return None
    if not math.isfinite(strength) or not 0 <= strength <= MAX_STRENGTH:
        return f"strength {strength!r} is not a number from 0 to {MAX_STRENGTH:g}"
    if choice == "tie" and strength != 0:
        return f"a tie has strength 0 (about the same), not {strength!r}"
    if choice in ("a", "b") and strength == 0:
        return f"choice {choice!r} needs a strength above 0 (0 is a tie)"
    return None


def check_comparisons(comparisons: Sequence[NewComparison], *, offset: int = 0, max_errors: int = 100) -> None:
    """Raise ``InvalidInput`` naming each bad record by index and field (up to ``max_errors``)."""
    problems: list[dict] = []
    for i, comp in enumerate(comparisons):
        problems.extend(comparison_problems(comp, offset + i))
        if len(problems) >= max_errors:
            break
    if problems:
        raise InvalidInput(f"{len(problems)} invalid comparison field(s)", problems[:max_errors])


def unknown_task_problems(comparisons: Sequence[NewComparison], known: set[int], *, offset: int = 0) -> list[dict]:
    """``{index, field, message}`` for each comparison whose task id is not in ``known``."""
    return [
        {"index": offset + i, "field": "task_id", "message": f"comparison task {c.task_id} does not exist"}
        for i, c in enumerate(comparisons)
        if c.task_id is not None and c.task_id not in known
    ]


def find_replay(session: Session, *, idempotency_key: str, request_sha256: str | None) -> FeedbackBatch | None:
    """The batch first registered under ``idempotency_key``, or None.

    Raises ``Conflict`` when the key was used for a different request.
    """
    first = session.scalar(select(FeedbackBatch).where(FeedbackBatch.idempotency_key == idempotency_key))
    if first is not None and request_sha256 is not None and first.request_sha256 != request_sha256:
        raise Conflict(f"idempotency key {idempotency_key!r} was used for a different request")
    return first


class IdempotentReplay(Exception):
    """Raised by ``BatchWriter.finish`` when a concurrent request with the same
    key committed first; the caller rolls back and answers with ``batch``."""

    def __init__(self, batch_id: int):
        super().__init__(f"feedback batch {batch_id} was registered first under this idempotency key")
        self.batch_id = batch_id


class BatchWriter:
    """Writes one feedback batch inside the caller's transaction, in chunks.

    Comparisons go in first (their foreign key to the batch is deferred to
    commit), then ``finish`` writes the batch row with the final count and
    content hash. Everything is one transaction: a crash or an error at any
    point leaves nothing behind. Comparisons that answer tasks must keep the
    lease rules (``store.answers``): checked, with the task rows locked,
    before they are written, and recorded by ``finish``.
    """

    def __init__(self, session: Session, *, source: str, api_key_id: int | None = None,
                 cycle_id: int | None = None, metadata: dict[str, Any] | None = None):
        self.session = session
        self.batch_id = _allocate_batch_id(session)
        self.count = 0
        self._hash = ContentHash()
        self._claimed: list[Claimed] = []
        self._fields = {"source": source, "api_key_id": api_key_id, "cycle_id": cycle_id, "meta": metadata or {}}

    def add(
        self, comparisons: Sequence[NewComparison], *, prevalidated: bool = False, task_ids: set[int] | None = None
    ) -> None:
        """Validate and insert the next comparisons (indices continue across calls).

        ``prevalidated=True`` skips the per-record rules when the caller has
        already applied them (the API's request models do; a sequence may
        also validate its records as they are read and raise then). Task ids
        are always checked against the database; ``task_ids`` gives them when
        the caller knows them without reading every record.
        """
        if not comparisons:
            return
        if not prevalidated:
            check_comparisons(comparisons, offset=self.count)
        if task_ids is None:
            task_ids = {c.task_id for c in comparisons if c.task_id is not None}
        if task_ids:
            known = set(self.session.scalars(select(ComparisonTask.id).where(ComparisonTask.id.in_(task_ids))))
            unknown = unknown_task_problems(comparisons, known, offset=self.count)
            if unknown:
                raise InvalidInput(f"{len(unknown)} comparison(s) name unknown tasks", unknown[:100])
            answers = [
                Answer(self.count + i, c.task_id, c.rater_id, c.prompt, c.response_a, c.response_b)
                for i, c in enumerate(comparisons) if c.task_id is not None
            ]
            self._claimed.append(claim_answers(self.session, answers, api_key_id=self._fields["api_key_id"]))
        _insert_comparisons(self.session, self.batch_id, comparisons, self._hash, start=self.count)
        self.count += len(comparisons)

    def finish(
        self,
        *,
        idempotency_key: str | None = None,
        request_sha256: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> FeedbackBatch:
        """Write the batch row (``metadata`` merged into the batch's) and close the tasks it answers."""
        if metadata:
            self._fields["meta"] = {**self._fields["meta"], **metadata}
        if self.count == 0:
            raise InvalidInput("a feedback batch needs at least one comparison", [])
        values = {
            "id": self.batch_id,
            "idempotency_key": idempotency_key,
            "request_sha256": request_sha256,
            "content_sha256": self._hash.hexdigest(),
            "comparison_count": self.count,
            "created_at": utcnow(),
            **self._fields,
        }
        # A Core insert on the table (not the ORM entity): a batch row is never
        # changed after this, so the ORM's bulk machinery would only add cost.
        row = {("metadata" if k == "meta" else k): v for k, v in values.items()}
        statement = insert(FeedbackBatch.__table__).values(**row)
        if idempotency_key is None:
            self.session.execute(statement)
        else:
            # Under a SAVEPOINT: a concurrent request with the same key that
            # commits first makes this insert fail; answer with its batch.
            try:
                with self.session.begin_nested():
                    self.session.execute(statement)
            except IntegrityError:
                first = find_replay(self.session, idempotency_key=idempotency_key, request_sha256=request_sha256)
                if first is None:
                    raise
                raise IdempotentReplay(first.id) from None
        for claimed in self._claimed:
            claimed.record(self.session)
        return FeedbackBatch(**values)


_NEXT_BATCH_ID = text("SELECT nextval(pg_get_serial_sequence('feedback_batches', 'id'))")


def _allocate_batch_id(session: Session) -> int:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        return session.scalar(_NEXT_BATCH_ID)
    # SQLite: the transaction holds the write lock (BEGIN IMMEDIATE), so
    # max + 1 cannot be taken by anyone else before we commit.
    return (session.scalar(select(func.max(FeedbackBatch.id))) or 0) + 1


def create_feedback_batch(
    session: Session,
    *,
    source: str,
    comparisons: Sequence[NewComparison],
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    api_key_id: int | None = None,
    cycle_id: int | None = None,
    metadata: dict[str, Any] | None = None,
    prevalidated: bool = False,
    task_ids: set[int] | None = None,
) -> tuple[FeedbackBatch, bool]:
    """Register a whole batch in the caller's transaction; returns (batch, created).

    A replay with the same idempotency key and request hash returns the first
    batch with ``created=False``; the same key with another request raises
    ``Conflict``. Task ids must name existing tasks, and their answers keep
    the lease rules (``store.answers``); a task answered by enough raters is done.
    A concurrent replay that commits first raises ``IdempotentReplay``: roll
    back and answer with that batch.
    """
    if idempotency_key is not None:
        first = find_replay(session, idempotency_key=idempotency_key, request_sha256=request_sha256)
        if first is not None:
            return first, False
    if not comparisons:
        raise InvalidInput("a feedback batch needs at least one comparison", [])
    writer = BatchWriter(session, source=source, api_key_id=api_key_id, cycle_id=cycle_id, metadata=metadata)
    try:
        writer.add(comparisons, prevalidated=prevalidated, task_ids=task_ids)
    except Conflict:
        # The same request, sent twice at once: the first took the leases and committed while this
        # one waited for the task rows. It is a replay, not a second answer.
        first = None if idempotency_key is None else find_replay(
            session, idempotency_key=idempotency_key, request_sha256=request_sha256)
        if first is None:
            raise
        raise IdempotentReplay(first.id) from None
    return writer.finish(idempotency_key=idempotency_key, request_sha256=request_sha256), True


_COPY_COLUMNS = "batch_id, position, prompt, response_a, response_b, choice, rater_id, task_id, metadata, strength"


class _CopySource:
    """A file-like source for COPY that encodes comparisons as it is read.

    psycopg2 reads it chunk by chunk, so PostgreSQL parses and inserts one
    chunk while Python encodes the next (two processes, two cores); the
    bytes sent are hashed on the way.
    """

    ROWS_PER_READ = 500

    def __init__(self, batch_id: int, comparisons: Sequence[NewComparison], start: int, content_hash: ContentHash):
        self.batch_id, self.comparisons, self.start, self.hash = batch_id, comparisons, start, content_hash
        self.offset = 0
        self.error: BaseException | None = None
        """what reading the comparisons raised (psycopg2 reports only its text)"""

    def read(self, size: int = -1) -> bytes:
        try:
            return self._next_chunk()
        except BaseException as exc:
            self.error = exc
            raise

    def _next_chunk(self) -> bytes:
        chunk = self.comparisons[self.offset : self.offset + self.ROWS_PER_READ]
        if not chunk:
            return b""
        lines = [line.encode() for line in encode_rows(chunk)]
        self.hash.update_encoded(lines)
        first = self.start + self.offset
        self.offset += len(chunk)
        return b"".join(b"%d\t%d\t%b\n" % (self.batch_id, first + i, line) for i, line in enumerate(lines))

    readline = read


def _insert_comparisons(
    session: Session,
    batch_id: int,
    comparisons: Sequence[NewComparison],
    content_hash: ContentHash,
    *,
    start: int = 0,
) -> None:
    """Insert a batch's comparisons and add them to ``content_hash``: a streamed
    COPY on PostgreSQL (the fast path), executemany elsewhere."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        cursor = connection.connection.dbapi_connection.cursor()
        source = _CopySource(batch_id, comparisons, start, content_hash)
        try:
            cursor.copy_expert(f"COPY comparisons ({_COPY_COLUMNS}) FROM STDIN", source, size=1 << 20)
        except Exception:
            if source.error is not None:
                raise source.error from None
            raise
        finally:
            cursor.close()
        return
    comparisons = list(comparisons)  # read once: a lazy sequence validates as it is read
    content_hash.update(encode_rows(comparisons))
    session.execute(
        insert(Comparison),
        [
            {
                "batch_id": batch_id,
                "position": start + i,
                "prompt": c.prompt,
                "response_a": c.response_a,
                "response_b": c.response_b,
                "choice": c.choice,
                "rater_id": c.rater_id,
                "task_id": c.task_id,
                "meta": c.metadata,
                "strength": c.strength,
            }
            for i, c in enumerate(comparisons)
        ],
    )


def get_feedback_batch(session: Session, batch_id: int) -> FeedbackBatch:
    """The batch ``batch_id``."""
    return get_row(session, FeedbackBatch, batch_id, label="feedback batch")


def list_feedback_batches(session: Session, *, limit: int = 50, after_id: int | None = None) -> list[FeedbackBatch]:
    """Batches in id order, ``limit`` at a time after ``after_id`` (keyset paging)."""
    return list_rows(session, FeedbackBatch, limit=limit, after_id=after_id)


def comparisons_of(session: Session, batch_ids: Sequence[int]) -> list[Comparison]:
    """The comparisons of these batches, in (batch, position) order."""
    return list(
        session.scalars(
            select(Comparison)
            .where(Comparison.batch_id.in_(list(batch_ids)))
            .order_by(Comparison.batch_id, Comparison.position)
        )
    )


def count_comparisons(
    session: Session, *, since: datetime | None = None, cycle_id: int | None = None, training_only: bool = False,
    targets: Sequence[str] | None = None,
) -> int:
    """How many comparisons were registered (optionally since a time or for a cycle).

    ``training_only`` leaves out answers to eval tasks (the human A/B
    evaluations of candidates), which no training snapshot takes by default,
    and to gold tasks (quality control), which none takes. ``targets`` (a
    cycle's own deployment target and those it takes feedback from) leaves
    out answers to the tasks of other targets' cycles, as that cycle's
    snapshot does (``store.datasets.excluded_target_positions``); answers to
    no task, or to a task of no cycle, count for every target.
    """
    query = select(func.coalesce(func.sum(FeedbackBatch.comparison_count), 0))
    if since is not None:
        query = query.where(FeedbackBatch.created_at >= since)
    if cycle_id is not None:
        query = query.where(FeedbackBatch.cycle_id == cycle_id)
    total = int(session.scalar(query))
    left_out = [ComparisonTask.kind.in_(("eval", "gold"))] if training_only else []
    if targets is not None:
        left_out.append(Cycle.deploy_target.not_in(list(targets)))
    if not left_out or total == 0:
        return total
    uncounted = (
        select(func.count())
        .select_from(Comparison)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .join(FeedbackBatch, FeedbackBatch.id == Comparison.batch_id)
        .outerjoin(Cycle, Cycle.id == ComparisonTask.cycle_id)
        .where(or_(*left_out))
    )
    if since is not None:
        uncounted = uncounted.where(FeedbackBatch.created_at >= since)
    if cycle_id is not None:
        uncounted = uncounted.where(FeedbackBatch.cycle_id == cycle_id)
    return total - int(session.scalar(uncounted))


def rater_agreement(session: Session, batch_ids: Sequence[int]) -> dict[str, float | int | None]:
    """Agreement among raters who judged the same pair, over these batches (``agreement_of``)."""
    return agreement_of(comparisons_of(session, batch_ids))


def agreement_of(comparisons: Iterable[Comparison]) -> dict[str, float | int | None]:
    """Agreement among raters who judged the same (prompt, response pair).

    A pair counts when two or more raters judged it; responses are compared
    regardless of order (a pair shown as b/a is the same pair). Agreement is
    the fraction of rater pairs on the same pair that gave the same verdict.
    """
    groups: dict[tuple[str, str, str], list[str]] = {}
    for comp in comparisons:
        lo, hi = sorted((comp.response_a, comp.response_b))
        verdict = comp.choice
        if comp.response_a != lo and verdict != "tie":
            verdict = "a" if verdict == "b" else "b"
        groups.setdefault((comp.prompt, lo, hi), []).append(verdict)
    agree = total = shared = 0
    for verdicts in groups.values():
        if len(verdicts) < 2:
            continue
        shared += 1
        for i in range(len(verdicts)):
            for j in range(i + 1, len(verdicts)):
                total += 1
                agree += verdicts[i] == verdicts[j]
    return {"pairs_with_multiple_raters": shared, "rater_pairs": total, "agreement": agree / total if total else None}


# -- chat prompts ------------------------------------------------------------------------------

CONVERSATION_READ_ROWS = 1000
"""rows fetched from the database at a time while a conversational export streams"""


def prompt_messages(*metadata: dict[str, Any] | None) -> tuple[list[dict[str, str]] | None, str | None]:
    """A comparison's prompt messages: ``(messages, None)`` from the first of ``metadata`` (the comparison's
    own, then its task's) that has ``messages``; ``(None, why)`` when those are no valid prompt
    (``formats.chat.message_problems``); ``(None, None)`` when none has any."""
    for meta in metadata:
        if isinstance(meta, dict) and "messages" in meta:
            problems = message_problems(meta["messages"], field="metadata.messages")
            return (None, problems[0]) if problems else (meta["messages"], None)
    return None, None


@dataclass(frozen=True)
class ConversationPair:
    """A preference pair with its prompt's messages (None: a plain-text prompt, or messages that are no valid
    prompt), for TRL's conversational format."""

    prompt: str
    chosen: str
    rejected: str
    strength: float | None
    messages: list[dict[str, str]] | None


def conversation_pairs(database: Database, *, batch_ids: Sequence[int]) -> Iterator[ConversationPair]:
    """The non-tie comparisons of these batches as pairs with their prompt messages (``prompt_messages``),
    in (batch, position) order; read like ``store.exports.preference_pairs``, ``CONVERSATION_READ_ROWS``
    rows at a time in a session of its own (a stream outlives the request that started it)."""
    query = (
        select(Comparison.prompt, Comparison.response_a, Comparison.response_b, Comparison.choice,
               Comparison.strength, Comparison.meta, ComparisonTask.meta)
        .outerjoin(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(Comparison.batch_id.in_(list(batch_ids)), Comparison.choice != "tie")
        .order_by(Comparison.batch_id, Comparison.position)
        .execution_options(yield_per=CONVERSATION_READ_ROWS)
    )
    with database.session() as session:
        for prompt, a, b, choice, strength, meta, task_meta in session.execute(query):
            chosen, rejected = (a, b) if choice == "a" else (b, a)
            yield ConversationPair(prompt, chosen, rejected, strength, prompt_messages(meta, task_meta)[0])
