"""The operators' actions, recorded with the key that did them, whichever way they came (dashboard, API, CLI).

``record_action`` is called in the transaction of the action itself, so an
action is recorded exactly when it happened: a cycle started, cancelled or
re-run, a deployment rolled back, a rater included or excluded.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import OperatorAction

VIAS = ("api", "dashboard", "cli")
"""the ways an action comes in"""


def record_action(
    session: Session, *, action: str, subject_kind: str, subject_id: str | int, actor: str,
    api_key_id: int | None = None, via: str = "api", detail: dict[str, Any] | None = None,
) -> OperatorAction:
    """One action on one subject (``cycle`` 12, ``deployment`` default, ``rater`` r1) by ``actor``."""
    row = OperatorAction(action=action, subject_kind=subject_kind, subject_id=str(subject_id), actor=actor,
                         api_key_id=api_key_id, via=via, detail=detail or {})
    session.add(row)
    session.flush()
    return row


def actions_on(session: Session, *, subject_kind: str, subject_id: str | int) -> list[OperatorAction]:
    """The actions on one subject, oldest first."""
    query = select(OperatorAction).where(OperatorAction.subject_kind == subject_kind,
                                         OperatorAction.subject_id == str(subject_id))
    return list(session.scalars(query.order_by(OperatorAction.id)))
