"""SQLAlchemy ORM models: the tables and nothing else.

Registry functions that read and write these live in the entity modules of
``store`` (``datasets``, ``feedback``, ...). Rows of ``VersionRow`` subclasses
are immutable versions: the ORM refuses to flush a change to one, and the
migrations install a database trigger that refuses an UPDATE from any client.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256_LEN = 64
NAME_LEN = 200

DATASET_KINDS = ("prompts", "samples", "comparisons")
CHOICES = ("a", "b", "tie")
ROLES = ("labeler", "operator", "admin")
PM_ROLES = ("train", "test")
CYCLE_STATUSES = ("running", "succeeded", "failed", "cancelled")
STAGE_STATUSES = ("running", "succeeded", "failed", "skipped")
TASK_STATUSES = ("open", "done", "closed")
TASK_KINDS = ("train", "eval", "gold")
DEPLOY_ACTIONS = ("deploy", "rollback")
ALERT_STATUSES = ("pending", "delivered", "failed")


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite keeps no zone; Postgres keeps ``timestamptz``. Both read back UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class VersionRow:
    """Marker mixin: rows of these tables are never updated once written."""

    __immutable__ = True


# Tables whose rows are immutable; the migrations put an UPDATE trigger on each.
IMMUTABLE_TABLES = (
    "artifacts",
    "datasets",
    "dataset_batches",
    "feedback_batches",
    "comparisons",
    "preference_models",
    "policies",
    "deployments",
)


class Artifact(VersionRow, Base):
    """A file or directory in the artifact store, with its checksum."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    uri: Mapped[str] = mapped_column(String(1000), unique=True)
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    is_dir: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


dataset_batches = Table(
    "dataset_batches",
    Base.metadata,
    Column("dataset_id", ForeignKey("datasets.id"), primary_key=True),
    Column("batch_id", ForeignKey("feedback_batches.id"), primary_key=True),
    Index("ix_dataset_batches_batch_id", "batch_id"),
)


class Dataset(VersionRow, Base):
    """A versioned dataset: a prompt set, a set of samples or a comparison snapshot."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        UniqueConstraint("name", "content_sha256"),
        CheckConstraint(_check_in("kind", DATASET_KINDS), name="kind"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int]
    kind: Mapped[str] = mapped_column(String(20))
    content_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    row_count: Mapped[int]
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    source_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    artifact: Mapped[Artifact | None] = relationship()
    batches: Mapped[list[FeedbackBatch]] = relationship(
        secondary=dataset_batches, order_by="FeedbackBatch.id", viewonly=True
    )


class FeedbackBatch(VersionRow, Base):
    """One registered batch of comparisons, written whole or not at all."""

    __tablename__ = "feedback_batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(NAME_LEN))
    idempotency_key: Mapped[str | None] = mapped_column(String(NAME_LEN), unique=True)
    request_sha256: Mapped[str | None] = mapped_column(String(SHA256_LEN))
    content_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    comparison_count: Mapped[int]
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Comparison(VersionRow, Base):
    """One human judgement: which of two responses to a prompt is better."""

    __tablename__ = "comparisons"
    __table_args__ = (
        UniqueConstraint("batch_id", "position"),
        CheckConstraint(_check_in("choice", CHOICES), name="choice"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # Deferred: a streamed import writes its comparisons first and its batch
    # row (with the final count and hash) last, in the same transaction.
    batch_id: Mapped[int] = mapped_column(ForeignKey("feedback_batches.id", deferrable=True, initially="DEFERRED"))
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[str] = mapped_column(String(3))
    rater_id: Mapped[str] = mapped_column(String(NAME_LEN))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("comparison_tasks.id"), index=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    strength: Mapped[float | None]
    """how much better the chosen response is, on the labeling scale (0: about the same; default scale 1
    slightly, 2 better, 3 much better); None when the rater gave none"""


class ComparisonTask(Base):
    """A pair of responses waiting for labelers; open until answered by enough raters, then done, or closed
    (its cycle ended).

    Tasks are work items, not versions: their status and answer count change.
    A ``train`` task pairs samples of the deployed policy (its answers train
    the PMs); an ``eval`` task pairs the cycle's candidate with the deployed
    policy on a held-out prompt, in an order only the server knows
    (``candidate_side``), for the human A/B evaluation before the gate; a
    ``gold`` task is a honeypot handed to one rater, a registered comparison
    with a known answer (``expected_choice``, as shown). Who holds a task is
    in ``TaskLease``: an overlap task (``answers_needed`` > 1) is held and
    answered by several raters.
    """

    __tablename__ = "comparison_tasks"
    __table_args__ = (
        CheckConstraint(_check_in("status", TASK_STATUSES), name="status"),
        CheckConstraint(_check_in("kind", TASK_KINDS), name="kind"),
        CheckConstraint("candidate_side IS NULL OR candidate_side IN ('a', 'b')", name="candidate_side"),
        CheckConstraint("expected_choice IS NULL OR expected_choice IN ('a', 'b', 'tie')", name="expected_choice"),
        CheckConstraint("answers_needed >= 1", name="answers_needed"),
        Index("ix_comparison_tasks_open", "cycle_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    samples_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    prompt_id: Mapped[str | None] = mapped_column(String(NAME_LEN))
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    kind: Mapped[str] = mapped_column(String(10), default="train", server_default="train")
    candidate_side: Mapped[str | None] = mapped_column(String(1))
    """eval tasks: which response (a or b) is the candidate's; never shown to labelers"""
    gold_id: Mapped[int | None] = mapped_column(ForeignKey("gold_comparisons.id"))
    """gold tasks: the registered comparison this one shows"""
    expected_choice: Mapped[str | None] = mapped_column(String(3))
    """gold tasks: the known answer, as the responses are shown; never shown to labelers"""
    answers_needed: Mapped[int] = mapped_column(default=1, server_default="1")
    """how many distinct raters answer it before it is done (more than 1: an overlap task)"""
    answers: Mapped[int] = mapped_column(default=0, server_default="0")
    """how many raters have answered it"""
    status: Mapped[str] = mapped_column(String(10), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]


class TaskLease(Base):
    """One rater's hold on one task: live until ``leased_until`` unless answered or released.

    One row per (task, rater): a lease that ran out is taken again by
    updating it; an answered or released one is never handed back to the
    same rater (skipping a task means not wanting it again). The rater is
    ``rater_id`` under the API key that leased it: only that key may answer
    as that rater.
    """

    __tablename__ = "task_leases"
    __table_args__ = (
        UniqueConstraint("task_id", "rater_id"),
        Index("ix_task_leases_rater", "rater_id", "answered_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("comparison_tasks.id"))
    rater_id: Mapped[str] = mapped_column(String(NAME_LEN))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    leased_at: Mapped[datetime] = mapped_column(default=utcnow)
    """when it was (last) taken: the start of the rater's time on the task"""
    leased_until: Mapped[datetime]
    answered_at: Mapped[datetime | None]
    released_at: Mapped[datetime | None]

    task: Mapped[ComparisonTask] = relationship()


class GoldComparison(Base):
    """A comparison with a known answer, registered by an operator, shown to raters as gold tasks.

    Retired gold is no longer handed out; its answers keep counting.
    """

    __tablename__ = "gold_comparisons"
    __table_args__ = (CheckConstraint(_check_in("choice", CHOICES), name="choice"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[str] = mapped_column(String(3))
    """the known answer"""
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_by: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None]


RATER_DECISIONS = ("include", "exclude")


class RaterDecision(Base):
    """An operator's decision on a rater, over what quality control says: ``include`` undoes a flag,
    ``exclude`` leaves the rater out whatever the numbers. The newest row per rater holds; a row
    with ``cleared_at`` set no longer does."""

    __tablename__ = "rater_decisions"
    __table_args__ = (CheckConstraint(_check_in("decision", RATER_DECISIONS), name="decision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    decision: Mapped[str] = mapped_column(String(10))
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None]


class PreferenceModel(VersionRow, Base):
    """A trained preference model (PM), with the dataset it learned from."""

    __tablename__ = "preference_models"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint(_check_in("role", PM_ROLES), name="role"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int]
    role: Mapped[str] = mapped_column(String(10), default="train")
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(1000))
    init_pm_id: Mapped[int | None] = mapped_column(ForeignKey("preference_models.id"))
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    dataset: Mapped[Dataset] = relationship()
    artifact: Mapped[Artifact | None] = relationship()


class Policy(VersionRow, Base):
    """A policy version: its init, its reference policy and the PM it was trained against."""

    __tablename__ = "policies"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int]
    base_model: Mapped[str] = mapped_column(String(1000))
    init_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    reference_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    pm_id: Mapped[int | None] = mapped_column(ForeignKey("preference_models.id"), index=True)
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    artifact: Mapped[Artifact | None] = relationship()


class Deployment(VersionRow, Base):
    """An append-only deployment log per target name; the newest row is active.

    ``previous_id`` is the deployment that was active before this one, so a
    rollback can restore it; a rollback row names what it rolled back.
    """

    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint(_check_in("action", DEPLOY_ACTIONS), name="action"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int]
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("deployments.id"))
    rolled_back_id: Mapped[int | None] = mapped_column(ForeignKey("deployments.id"))
    action: Mapped[str] = mapped_column(String(10), default="deploy")
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    policy: Mapped[Policy] = relationship()


class Cycle(Base):
    """One iteration of the loop for one deployment target, keyed by (target, ISO week); its status changes as it
    runs. Two targets (two products, each with its own deployed policy) each run their own cycle of a week."""

    __tablename__ = "cycles"
    __table_args__ = (
        UniqueConstraint("deploy_target", "week"),
        CheckConstraint(_check_in("status", CYCLE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    week: Mapped[str] = mapped_column(String(20))
    deploy_target: Mapped[str] = mapped_column(String(NAME_LEN), default="default", server_default="default")
    """the deployment target (``deployments.name``) the cycle samples from and deploys to"""
    status: Mapped[str] = mapped_column(String(20), default="running")
    trigger: Mapped[str] = mapped_column(String(40), default="manual")
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    stages: Mapped[list[StageRun]] = relationship(order_by="StageRun.id", back_populates="cycle")
    attempts: Mapped[list[CycleAttempt]] = relationship(order_by="CycleAttempt.number", viewonly=True)


class StageRun(Base):
    """One stage of a cycle; unique per (cycle, stage) so a re-run skips finished work."""

    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("cycle_id", "stage"),
        CheckConstraint(_check_in("status", STAGE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"))
    stage: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="running")
    attempts: Mapped[int] = mapped_column(default=1)
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    compute_s: Mapped[float | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    cycle: Mapped[Cycle] = relationship(back_populates="stages")


class CycleAttempt(Base):
    """One attempt at a cycle: the first (the params it was opened with) and each operator's re-run, with
    the params it ran with, the settings it changed against the attempt before, which stages it kept and
    which it ran again, and the outputs of the stages it ran again as they stood (the stage rows hold only
    the newest). Numbered from 1 per cycle."""

    __tablename__ = "cycle_attempts"
    __table_args__ = (UniqueConstraint("cycle_id", "number"), CheckConstraint("number >= 1", name="number_positive"))

    id: Mapped[int] = mapped_column(primary_key=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    number: Mapped[int]
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    changed: Mapped[list[str]] = mapped_column(JSON, default=list)
    kept: Mapped[list[str]] = mapped_column(JSON, default=list)
    rerun: Mapped[list[str]] = mapped_column(JSON, default=list)
    discarded: Mapped[dict[str, Any]] = mapped_column(default=dict)
    eval_task_floor: Mapped[int | None]
    """eval tasks with this id or lower belong to earlier attempts (a re-run's human evaluation makes its own)"""
    actor: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OperatorAction(Base):
    """What an operator (or admin) did, whichever way they did it (dashboard, API, CLI), and with which key:
    started, cancelled or re-ran a cycle, rolled a deployment back, included or excluded a rater."""

    __tablename__ = "operator_actions"
    __table_args__ = (Index("ix_operator_actions_subject", "subject_kind", "subject_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str] = mapped_column(String(40))
    subject_kind: Mapped[str] = mapped_column(String(40))
    subject_id: Mapped[str] = mapped_column(String(NAME_LEN))
    actor: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    via: Mapped[str] = mapped_column(String(20), default="api")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alert(Base):
    """An event someone should hear of (a stage failed for good, the gate refused, a wait ran out short, a
    rater was flagged, a deploy or a rollback), recorded once per ``dedupe_key`` in the transaction that
    made it happen, then delivered (webhook, command) with retries: ``status``, ``attempts`` and the last
    error say how that went."""

    __tablename__ = "alerts"
    __table_args__ = (CheckConstraint(_check_in("status", ALERT_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    event: Mapped[str] = mapped_column(String(40))
    dedupe_key: Mapped[str] = mapped_column(String(400), unique=True)
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    link: Mapped[str | None] = mapped_column(String(1000))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class ApiKey(Base):
    """A bearer API key: only the sha256 of the token is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(_check_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    token_sha256: Mapped[str] = mapped_column(String(SHA256_LEN), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class DashboardSession(Base):
    """A browser's sign-in to the dashboard: only the sha256 of its random id is stored.

    It ends at ``expires_at`` (a fixed lifetime from sign-in), after an idle
    timeout counted from ``last_seen_at``, at sign-out (``revoked_at``), or
    when its API key is revoked.
    """

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(SHA256_LEN), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None]


# -- aggregates kept when a cycle closes (store.aggregates) -------------------------------------

PAIR_COLUMNS = ("a_a", "a_b", "a_tie", "b_a", "b_b", "b_tie", "tie_a", "tie_b", "tie_tie")
"""the 3x3 counts of (this rater's choice, the other rater's choice) on overlap tasks, as column names"""


class PairCounts:
    """Mixin: the nine counts of ``PAIR_COLUMNS``."""

    a_a: Mapped[int] = mapped_column(default=0)
    a_b: Mapped[int] = mapped_column(default=0)
    a_tie: Mapped[int] = mapped_column(default=0)
    b_a: Mapped[int] = mapped_column(default=0)
    b_b: Mapped[int] = mapped_column(default=0)
    b_tie: Mapped[int] = mapped_column(default=0)
    tie_a: Mapped[int] = mapped_column(default=0)
    tie_b: Mapped[int] = mapped_column(default=0)
    tie_tie: Mapped[int] = mapped_column(default=0)


class CycleAggregate(Base):
    """A closed cycle's numbers, kept when it closed (``store.aggregates.close_cycle``): what the dashboard's
    feedback table (``comparisons``, ``batches`` and the agreement of the batches registered while it ran) and
    ``cycle_agreement`` (Krippendorff's alpha) show. They hold while the cycle's ``status`` and ``finished_at``
    are still the ones recorded here (a re-run clears ``finished_at``); the numbers of its tasks (alpha, and
    the per-rater rows) also need ``open_tasks`` 0, as a failed cycle's open tasks may still be answered."""

    __tablename__ = "cycle_aggregates"

    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(20))
    finished_at: Mapped[datetime]
    open_tasks: Mapped[int]
    """the cycle's open tasks when it closed"""
    comparisons: Mapped[int]
    """comparisons in the batches registered while it ran (from its start to its end)"""
    batches: Mapped[int]
    pairs_with_multiple_raters: Mapped[int]
    rater_pairs: Mapped[int]
    agreement: Mapped[float | None]
    """``store.feedback.rater_agreement`` of those batches"""
    overlap_tasks: Mapped[int]
    overlap_raters: Mapped[int]
    alpha: Mapped[float | None]
    """Krippendorff's alpha over its tasks answered by two or more distinct raters"""
    in_totals: Mapped[bool] = mapped_column(default=False)
    """whether its per-rater rows are counted in ``RaterTotal`` and ``RaterPairTotal``"""
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class CycleRaterAggregate(Base):
    """One rater's numbers over the tasks of one closed cycle, as ``store.raters.rater_stats`` counts them."""

    __tablename__ = "cycle_rater_aggregates"

    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), primary_key=True)
    rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    answered: Mapped[int] = mapped_column(default=0)
    gold_answered: Mapped[int] = mapped_column(default=0)
    """first answers per (task, rater) to gold tasks"""
    gold_correct: Mapped[int] = mapped_column(default=0)
    timed: Mapped[int] = mapped_column(default=0)
    """answered leases"""
    seconds: Mapped[list[int]] = mapped_column(JSON, default=list)
    """their lease-to-answer seconds as a histogram: ``[first bucket, its count, the next one's, ...]``
    (``store.aggregates.dense``)"""


class CycleRaterPair(PairCounts, Base):
    """On one closed cycle's overlap tasks, the counts of (``rater_id``'s first answer, ``other_rater_id``'s)."""

    __tablename__ = "cycle_rater_pairs"

    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), primary_key=True)
    rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    other_rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)


class RaterTotal(PairCounts, Base):
    """A rater's ``CycleRaterAggregate`` rows summed over the cycles counted in the totals
    (``CycleAggregate.in_totals``); its pair counts are against every other rater."""

    __tablename__ = "rater_totals"

    rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    answered: Mapped[int] = mapped_column(default=0)
    gold_answered: Mapped[int] = mapped_column(default=0)
    gold_correct: Mapped[int] = mapped_column(default=0)
    timed: Mapped[int] = mapped_column(default=0)
    seconds: Mapped[list[int]] = mapped_column(JSON, default=list)


class RaterPairTotal(PairCounts, Base):
    """``CycleRaterPair`` rows summed over the cycles counted in the totals."""

    __tablename__ = "rater_pair_totals"
    __table_args__ = (Index("ix_rater_pair_totals_other", "other_rater_id"),)

    rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    other_rater_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)


Index("ix_feedback_batches_created_at", FeedbackBatch.created_at)
"""the batches registered in a cycle's time window (``store.aggregates.window_numbers``): the label page
registers a batch per answer, so a year can hold a million"""
