"""Summaries of what the store holds: counts for ``ratchet status`` and the health check,
a cycle's headline numbers for its report and the dashboard, the raters' quality control."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from store.aggregates import held_aggregates, window_numbers
from store.cycles import get_cycle
from store.db import Database
from store.deployments import active_deployment
from store.lineage import lineage_back
from store.models import (
    ApiKey,
    Artifact,
    Comparison,
    ComparisonTask,
    Cycle,
    Dataset,
    Deployment,
    FeedbackBatch,
    Policy,
    PreferenceModel,
    utcnow,
)
from store.raters import QCPolicy, current_policy, cycle_agreements, gold_counts, rater_stats

COUNTED = {
    "datasets": Dataset,
    "feedback_batches": FeedbackBatch,
    "comparisons": Comparison,
    "comparison_tasks": ComparisonTask,
    "preference_models": PreferenceModel,
    "policies": Policy,
    "deployments": Deployment,
    "cycles": Cycle,
    "artifacts": Artifact,
    "api_keys": ApiKey,
}


def store_counts(session: Session) -> dict[str, Any]:
    """Row counts per entity and the active deployment."""
    counts = {name: session.scalar(select(func.count()).select_from(model)) for name, model in COUNTED.items()}
    active = active_deployment(session)
    counts["active_deployment"] = (
        None
        if active is None
        else {"version": active.version, "policy_id": active.policy_id, "action": active.action}
    )
    return counts


def cycle_summary(database: Database, cycle_id: int) -> dict[str, Any]:
    """The cycle's headline numbers from its stage outputs (None where a stage has not finished)."""
    with database.session() as session:
        return summarize_cycle(get_cycle(session, cycle_id))


def summarize_cycle(cycle: Cycle) -> dict[str, Any]:
    """``cycle_summary`` of a loaded cycle (its stages are read; call inside its session)."""
    stages = {run.stage: run for run in cycle.stages}
    out: dict[str, Any] = {
        "cycle_id": cycle.id,
        "week": cycle.week,
        "deploy_target": cycle.deploy_target,
        "status": cycle.status,
        "reason": cycle.reason,
        "trigger": cycle.trigger,
        "flow_run_id": cycle.flow_run_id,
        "started_at": cycle.created_at,
        "finished_at": cycle.finished_at,
        "stages": {
            name: {"status": run.status, "attempts": run.attempts, "compute_s": run.compute_s, "error": run.error}
            for name, run in stages.items()
        },
    }
    outputs = {name: dict(run.outputs) for name, run in stages.items() if run.status in ("succeeded", "skipped")}
    pm = outputs.get("train_pm", {})
    improve = outputs.get("improve", {})
    metrics = outputs.get("evaluate", {}).get("metrics", {})
    gate = outputs.get("gate", {})
    human = outputs.get("human_eval", {})
    measures = gate.get("measures", {})
    sample = outputs.get("sample", {})
    deploy = outputs.get("deploy", {})
    deployed = deploy.get("deployed") if deploy else None
    gold_key = "eval/gold_candidate" if deployed else "eval/gold_baseline"
    out.update(
        {
            "comparisons": outputs.get("snapshot", {}).get("rows"),
            "new_comparisons": outputs.get("gather", {}).get("comparisons"),
            "gather_outcome": outputs.get("gather", {}).get("outcome"),
            "tasks": sample.get("tasks"),
            "top_up_rounds": sample.get("top_up_rounds"),
            "halt": next((o["halt"] for o in outputs.values() if o.get("halt")), None),
            "pm_version": pm.get("pm_version"),
            "pm_accuracy": pm.get("heldout_accuracy"),
            "pm_ece": pm.get("heldout_ece"),
            "test_pm_accuracy": pm.get("test_pm_heldout_accuracy"),
            "method": improve.get("method"),
            "policy_version": improve.get("policy_version"),
            "policy_reward": improve.get("reward"),
            "policy_reward_test_pm": improve.get("reward_test_pm"),
            "policy_reward_spread": improve.get("reward_spread"),
            "pm_ensemble_size": pm.get("ensemble_size"),
            "pm_ensemble_spread": pm.get("ensemble_spread"),
            "kl": improve.get("kl"),
            "eval_kl": metrics.get("eval/kl"),
            "win_rate": metrics.get("eval/win_rate_test_pm"),
            "win_rate_train_pm": metrics.get("eval/win_rate_train_pm"),
            "human_eval": "off" if human.get("enabled") is False else ("on" if human else None),
            "human_answers": human.get("answers"),
            "human_win_rate": human.get("win_rate"),
            "human_lower_bound": measures.get("human_lower_bound"),
            "human_bar": measures.get("human_bar"),
            "elo_candidate": human.get("elo_candidate"),
            "elo_baseline": human.get("elo_baseline"),
            "elo": human.get("elo"),
            # the Elo of the policy deployed at the end of the cycle (P0 = 0), as of this cycle's evaluation
            "elo_deployed": human.get("elo_candidate") if deployed else human.get("elo_baseline"),
            "deployed": deployed,
            "gate_reasons": gate.get("reasons"),
            "required_win_rate": 0.5 + gate["thresholds"]["win_margin"] if gate.get("thresholds") else None,
            "gold_candidate": metrics.get("eval/gold_candidate"),
            "gold_baseline": metrics.get("eval/gold_baseline"),
            # the gold score of the policy deployed at the end of the cycle
            "gold_score": metrics.get(gold_key) if deployed is not None else None,
        }
    )
    return out


def recent_cycles(session: Session, *, limit: int, target: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` cycles (of deployment ``target``, or of every target), summarised, oldest first."""
    query = select(Cycle).options(selectinload(Cycle.stages)).order_by(Cycle.id.desc()).limit(limit)
    if target is not None:
        query = query.where(Cycle.deploy_target == target)
    rows = session.scalars(query).all()
    return [summarize_cycle(row) for row in reversed(rows)]


def deployed_lineage(session: Session, *, target: str) -> dict[str, Any] | None:
    """The active deployment of ``target`` and the lineage chain behind it (policy <- PM <- dataset), or None."""
    deployment = active_deployment(session, name=target)
    if deployment is None:
        return None
    graph = lineage_back(session, kind="policy", id=deployment.policy_id)
    by_kind: dict[str, int] = defaultdict(int)
    for kind, _ in graph.nodes:
        by_kind[kind] += 1
    chain, key = [], ("policy", deployment.policy_id)
    while key is not None:  # policy -> its PM -> that PM's dataset (the "trained on" edges)
        node = graph.nodes[key]
        chain.append({"kind": node.kind, "name": node.name, "version": node.version, "id": node.id})
        key = next((e.parent for e in graph.edges if e.child == key and e.parent[0] in ("pm", "dataset")), None)
    return {
        "target": target,
        "version": deployment.version,
        "action": deployment.action,
        "since": deployment.created_at,
        "reason": deployment.reason,
        "chain": chain,
        "feedback_batches": by_kind.get("feedback_batch", 0),
        "policies_before": by_kind.get("policy", 1) - 1,
    }


def feedback_by_cycle(session: Session, cycles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cycle: the comparisons registered while it ran (from its start to its end, or
    now) and the rater agreement among those batches (``store.feedback.rater_agreement``); as kept
    when the cycle closed (``store.aggregates``), else counted now."""
    kept = held_aggregates(session, [c["cycle_id"] for c in cycles], tasks=False)
    now = utcnow()
    out = []
    for c in cycles:
        row = kept.get(c["cycle_id"])
        if row is not None:
            numbers = {"comparisons": row.comparisons, "batches": row.batches,
                       "pairs_with_multiple_raters": row.pairs_with_multiple_raters, "rater_pairs": row.rater_pairs,
                       "agreement": row.agreement}
        else:
            numbers = window_numbers(session, start=c["started_at"], end=c["finished_at"] or now)
        out.append({"week": c["week"], **numbers})
    return out


def rater_overview(session: Session, *, default: QCPolicy, cycles: list[dict[str, Any]]) -> dict[str, Any]:
    """The raters' quality control as plain values: the QC policy in force (``current_policy``, else
    ``default``), the gold comparisons' counts, each rater's numbers, flags and whether snapshots leave
    it out (``rater_stats``), and the agreement of each of ``cycles`` (``recent_cycles`` rows):
    Krippendorff's alpha over its tasks answered by two or more raters."""
    policy = current_policy(session, default)
    raters = [
        {**asdict(s), "gold_accuracy": s.gold_accuracy, "flagged": s.flagged, "excluded": s.excluded(policy),
         "exclusion_reason": s.exclusion_reason() if s.excluded(policy) else None}
        for s in rater_stats(session, policy)
    ]
    by_cycle = cycle_agreements(session, cycle_ids=[c["cycle_id"] for c in cycles])
    agreement = [{"week": c["week"], "cycle_id": c["cycle_id"], **by_cycle[c["cycle_id"]]} for c in cycles]
    return {"policy": policy.model_dump(), "gold": gold_counts(session), "raters": raters, "agreement": agreement}
