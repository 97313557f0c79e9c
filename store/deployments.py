"""Deployments: an append-only log per target; the newest row is the active one.

A deploy records the deployment that was active before it (``previous_id``).
A rollback writes a new row that restores that previous deployment's policy
and inherits *its* ``previous_id``, so rolling back again goes one further
step back, like an undo stack; the rollback row names the deployment it
rolled back (``rolled_back_id``).

Deploys and rollbacks of one target are serialised: each reads the active
deployment and appends the next row while holding the target's lock, so
eight concurrent rollbacks walk back eight steps (or find nothing left and
get ``Conflict``) and eight concurrent deploys form one chain. On PostgreSQL
the lock is a transaction-scoped advisory lock,
``pg_advisory_xact_lock(<namespace>, hashtext(<target>))``: it needs no row
to exist before the first deploy, and it is released when the transaction
commits or rolls back, so a crashed caller never leaves it held. Two targets
whose names hash alike merely wait for each other. On SQLite there is
nothing to take: the store's engine begins every transaction with
``BEGIN IMMEDIATE``, so a transaction holds the database's only write lock
from its first statement, reads included, until it ends.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.actions import record_action
from store.alerts import deployment_alert
from store.errors import Conflict, NotFound
from store.models import Deployment
from store.versioning import create_version, get_row, latest_version, list_rows

DEFAULT_TARGET = "default"

LOCK_NAMESPACE = 0x52444550
"""first key of the targets' advisory locks (``RDEP``), so they cannot meet other advisory locks"""


def lock_target(session: Session, *, name: str) -> None:
    """Hold target ``name``'s deployment lock until the session's transaction ends (waiting for it if taken).

    Taking it again in the same transaction is free: PostgreSQL advisory locks are re-entrant.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, func.hashtext(name))))


def active_deployment(session: Session, *, name: str = DEFAULT_TARGET, lock: bool = False) -> Deployment | None:
    """The active deployment of target ``name``, or None before the first deploy.

    ``lock`` takes the target's lock first (``lock_target``): the answer then stays the active deployment
    until the transaction ends, for a caller that decides on it and then deploys.
    """
    if lock:
        lock_target(session, name=name)
    return latest_version(session, Deployment, name=name)


def deploy(
    session: Session,
    *,
    policy_id: int,
    name: str = DEFAULT_TARGET,
    reason: str = "",
    actor: str = "",
    cycle_id: int | None = None,
) -> Deployment:
    """Make ``policy_id`` the active policy of target ``name`` (under the target's lock)."""
    current = active_deployment(session, name=name, lock=True)
    row = create_version(
        session,
        Deployment,
        name=name,
        policy_id=policy_id,
        previous_id=current.id if current else None,
        action="deploy",
        reason=reason,
        actor=actor,
        cycle_id=cycle_id,
    )
    deployment_alert(session, row)  # in this transaction: the alert commits with the deployment
    return row


def rollback(
    session: Session, *, name: str = DEFAULT_TARGET, reason: str = "", actor: str = "", api_key_id: int | None = None,
    via: str = "api",
) -> Deployment:
    """Restore the deployment that was active before the current one (under the target's lock), recorded as an
    operator's action (``store.actions``) with the key that did it and the way it came (``via``)."""
    current = active_deployment(session, name=name, lock=True)
    if current is None:
        raise NotFound(f"deployment target {name!r} has never been deployed")
    if current.previous_id is None:
        raise Conflict(f"deployment {name!r} v{current.version} has no earlier deployment to roll back to")
    previous = get_row(session, Deployment, current.previous_id, label="deployment")
    row = create_version(
        session,
        Deployment,
        name=name,
        policy_id=previous.policy_id,
        previous_id=previous.previous_id,
        rolled_back_id=current.id,
        action="rollback",
        reason=reason,
        actor=actor,
    )
    deployment_alert(session, row)  # in this transaction: the alert commits with the rollback
    record_action(session, action="rollback", subject_kind="deployment", subject_id=name, actor=actor,
                  api_key_id=api_key_id, via=via,
                  detail={"reason": reason, "version": row.version, "policy_id": row.policy_id,
                          "rolled_back_version": current.version, "rolled_back_policy_id": current.policy_id})
    return row


def cycle_deployment(session: Session, *, cycle_id: int, name: str = DEFAULT_TARGET) -> Deployment | None:
    """The deploy a cycle made to target ``name``, or None (a cycle deploys at most once)."""
    return session.scalar(
        select(Deployment)
        .where(Deployment.name == name, Deployment.cycle_id == cycle_id, Deployment.action == "deploy")
        .order_by(Deployment.id)
        .limit(1)
    )


def deployed_policy_ids(session: Session, *, name: str = DEFAULT_TARGET, limit: int = 1) -> list[int]:
    """The policies most recently active on target ``name``, newest first, each once (at most ``limit``)."""
    out: list[int] = []
    query = select(Deployment.policy_id).where(Deployment.name == name).order_by(Deployment.version.desc())
    for policy_id in session.scalars(query.limit(max(limit, 1) * 20)):
        if policy_id not in out:
            out.append(policy_id)
            if len(out) == limit:
                break
    return out


def list_deployments(
    session: Session, *, name: str | None = None, limit: int = 50, after_id: int | None = None
) -> list[Deployment]:
    """Deployments in id order (keyset paging), optionally of one target."""
    return list_rows(session, Deployment, limit=limit, after_id=after_id, name=name)
