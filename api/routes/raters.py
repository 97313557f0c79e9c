"""Raters and quality control (operators): per-rater numbers and flags, decisions, gold comparisons."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import select

from api.deps import Operator, QCPolicyDep, SessionDep
from api.errors import responses
from api.schemas.common import NO_NUL
from api.schemas.raters import (
    CycleAgreementPublic,
    GoldBatchCreate,
    GoldBatchPublic,
    GoldRetire,
    RaterDecisionCreate,
    RaterDecisionPublic,
    RaterList,
    RaterPublic,
)
from store.errors import NotFound
from store.models import Cycle, utcnow
from store.raters import QCPolicy, RaterStats, cycle_agreement, decide, gold_counts, rater_stats, register_gold, retire_gold

router = APIRouter(tags=["raters"])

RaterPath = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_NUL)]


def rater_public(s: RaterStats, policy: QCPolicy) -> RaterPublic:
    return RaterPublic(
        rater_id=s.rater_id, answered=s.answered, gold_answered=s.gold_answered, gold_accuracy=s.gold_accuracy,
        agreement_pairs=s.agreement_pairs, kappa=s.kappa, median_seconds=s.median_seconds, flagged=s.flagged,
        flags=s.flags, decision=s.decision, decision_reason=s.decision_reason, excluded=s.excluded(policy),
    )


@router.get("/v1/raters", response_model=RaterList, responses=responses(401, 403, 422))
def list_raters(
    _: Operator, session: SessionDep, policy: QCPolicyDep,
    cycles: Annotated[int, Query(ge=0, le=100, description="how many recent cycles' agreement to include")] = 10,
) -> Any:
    """Every rater that gave a comparison: answered, gold accuracy, agreement with other raters (Cohen's
    kappa on overlap tasks), median seconds per task, flags, and whether snapshots leave it out; with the
    QC policy in force and each recent cycle's agreement (Krippendorff's alpha)."""
    stats = rater_stats(session, policy)
    recent = session.scalars(select(Cycle).order_by(Cycle.id.desc()).limit(cycles)).all()
    return RaterList(
        data=[rater_public(s, policy) for s in stats], count=len(stats), policy=policy, gold=gold_counts(session),
        cycles=[CycleAgreementPublic(cycle_id=c.id, week=c.week, **cycle_agreement(session, cycle_id=c.id))
                for c in recent],
    )


@router.get("/v1/raters/{rater_id}", response_model=RaterPublic, responses=responses(401, 403, 404, 422))
def read_rater(rater_id: RaterPath, _: Operator, session: SessionDep, policy: QCPolicyDep) -> Any:
    found = rater_stats(session, policy, rater_ids=[rater_id])
    if not found:
        raise NotFound(f"rater {rater_id!r} gave no comparison")
    return rater_public(found[0], policy)


@router.put("/v1/raters/{rater_id}/decision", response_model=RaterDecisionPublic, responses=responses(401, 403, 422))
def set_decision(rater_id: RaterPath, body: RaterDecisionCreate, key: Operator, session: SessionDep) -> Any:
    """Decide over quality control: ``include`` a flagged rater again (its comparisons go back into the
    next snapshot), ``exclude`` a rater whatever its numbers, or ``null`` to clear the decision in force; recorded
    as an operator's action with the key (``store.raters.decide``)."""
    row = decide(session, rater_id=rater_id, decision=body.decision, reason=body.reason, actor=key.name,
                 api_key_id=key.id, via="api")
    return RaterDecisionPublic(rater_id=rater_id, decision=body.decision, reason=body.reason, actor=key.name,
                               at=row.created_at if row is not None else utcnow())


@router.post("/v1/gold-comparisons", status_code=201, response_model=GoldBatchPublic, responses=responses(401, 403, 422))
def add_gold(body: GoldBatchCreate, key: Operator, session: SessionDep) -> Any:
    """Register comparisons with a known answer; a share of the tasks raters are handed are made from them
    (each shown once to a rater, A and B in a random order), and each rater's gold accuracy is kept."""
    rows = register_gold(session, items=[c.model_dump() for c in body.comparisons], created_by=key.name)
    return GoldBatchPublic(ids=[r.id for r in rows], count=len(rows), gold=gold_counts(session))


@router.post("/v1/gold-comparisons/retire", response_model=GoldBatchPublic, responses=responses(401, 403, 422))
def retire(body: GoldRetire, _: Operator, session: SessionDep) -> Any:
    """Stop handing these gold comparisons out (answers already given keep counting)."""
    retire_gold(session, gold_ids=body.ids)
    return GoldBatchPublic(ids=body.ids, count=len(body.ids), gold=gold_counts(session))
