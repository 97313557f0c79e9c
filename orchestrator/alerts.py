"""The cycle's alerts: what the orchestrator records in its stages' transactions, and its delivery of them.

Each is recorded once (``store.alerts.record_alert``, by its dedupe key)
with the cycle's dashboard page as its link:

- ``stage_failed``: a stage failed for good (after its last retry), from
  ``orchestrator.cycle.fail_cycle``; key ``stage_failed:<cycle>:<stage>:<attempts>``,
  so a resumed cycle that fails again is heard of again;
- ``gate_refused``: the gate did not deploy the candidate, in the gate
  stage's commit; key ``gate_refused:<cycle>``;
- ``deadline``: gather or human_eval reached its deadline short of its
  minimum, in that stage's commit; key ``deadline:<cycle>:<stage>``;
- ``rater_flagged``: quality control flags a rater no operator has decided
  on, wherever the cycle computes the excluded raters (each gather and
  human_eval poll, the snapshot); key ``rater_flagged:<rater>:<gold|agreement>``.

Deploys and rollbacks are recorded by ``store.deployments`` itself. The
orchestrator delivers (``deliver``) after every stage commit, every poll of
a wait and a cycle's failure; delivery never raises.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.alerts import deliver_pending, record_alert
from store.cycles import cycle_label
from store.models import Cycle, StageRun
from store.policies import get_policy
from store.raters import QCPolicy, gold_flag, rater_stats
from store.settings import get_settings

if TYPE_CHECKING:
    from orchestrator.cycle import CycleContext, CycleEnv
    from orchestrator.outputs import GateOutputs

log = logging.getLogger("ratchet.cycle")


def deliver(env: CycleEnv) -> None:
    """Send the pending alerts to the channels of the ``RATCHET_ALERT_*`` settings (never raises)."""
    deliver_pending(env.database, get_settings())


def stage_failed(session: Session, *, cycle_id: int, stage: str, reason: str) -> None:
    """A stage failed for good and failed the cycle (``reason``: the stage and its error)."""
    reason = reason[:2000]
    week, target = session.execute(select(Cycle.week, Cycle.deploy_target).where(Cycle.id == cycle_id)).one()
    attempts = session.scalar(select(StageRun.attempts).where(StageRun.cycle_id == cycle_id, StageRun.stage == stage))
    record_alert(
        session,
        event="stage_failed",
        dedupe_key=f"stage_failed:{cycle_id}:{stage}:{attempts or 0}",
        text=f"Cycle {cycle_label(week, target)} failed: {reason} (after {attempts or 0} attempt(s))",
        cycle_id=cycle_id,
        payload={"stage": stage, "attempts": attempts or 0, "reason": reason},
    )


def gate_refused(session: Session, ctx: CycleContext, gate: GateOutputs) -> None:
    """The gate did not deploy the candidate: its reasons."""
    if gate.deploy:
        return
    candidate = get_policy(session, gate.candidate_policy_id)
    record_alert(
        session,
        event="gate_refused",
        dedupe_key=f"gate_refused:{ctx.cycle_id}",
        text=f"Cycle {ctx.label}: the gate refused {candidate.name} v{candidate.version}: " + "; ".join(gate.reasons),
        cycle_id=ctx.cycle_id,
        payload={"candidate_policy_id": candidate.id, "candidate": f"{candidate.name} v{candidate.version}",
                 "reasons": gate.reasons, "checks": gate.checks, "measures": gate.measures},
    )


def deadline_reached(session: Session, ctx: CycleContext, *, stage: str, outcome: str, answers: int, minimum: int,
                     what: str, deadline: str) -> None:
    """A wait for labelers (gather, human_eval) ended at its deadline with fewer than ``minimum`` answers."""
    if outcome != "deadline" or answers >= minimum:
        return
    record_alert(
        session,
        event="deadline",
        dedupe_key=f"deadline:{ctx.cycle_id}:{stage}",
        text=f"Cycle {ctx.label}: {stage} reached its deadline with {answers} of the {minimum} {what} it waits for",
        cycle_id=ctx.cycle_id,
        payload={"stage": stage, "answers": answers, "minimum": minimum, "deadline": deadline},
    )


def check_raters(session: Session, ctx: CycleContext, policy: QCPolicy) -> dict[str, str]:
    """rater -> why it is left out of comparison snapshots now (``store.raters.excluded_raters``), alerting
    once per rater and kind of flag (gold, agreement) on each flagged rater no operator has decided on."""
    excluded = {}
    for stats in rater_stats(session, policy, counts=False):
        if stats.excluded(policy):
            excluded[stats.rater_id] = stats.exclusion_reason()
        if stats.decision is not None:
            continue  # an operator has looked at this rater already
        gold = gold_flag(stats.gold_correct, stats.gold_answered, policy)
        for flag in stats.flags:
            kind = "gold" if flag == gold else "agreement"
            left_out = stats.excluded(policy)
            record_alert(
                session,
                event="rater_flagged",
                dedupe_key=f"rater_flagged:{stats.rater_id}:{kind}",
                text=(f"Rater {stats.rater_id} is flagged by quality control: {flag}; "
                      + ("its comparisons are left out of snapshots" if left_out else "it is not excluded "
                         "(qc.exclude_flagged is off)")),
                cycle_id=ctx.cycle_id,
                payload={"rater_id": stats.rater_id, "reason": kind, "flag": flag, "excluded": left_out,
                         "gold_answered": stats.gold_answered, "gold_correct": stats.gold_correct,
                         "kappa": stats.kappa, "agreement_pairs": stats.agreement_pairs},
            )
    return excluded
