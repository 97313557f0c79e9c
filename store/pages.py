"""What the dashboard's detail pages show, read from the store as plain values: one cycle, one version
with its lineage both ways, one target's deployment history.

Everything here reads; nothing writes. The functions take the caller's session and return dicts and
lists a template renders as they are. The versions a stage's outputs name (``*policy_id``,
``*pm_id``, ``*dataset_id`` and their plural lists) are found by their field names
(``orchestrator.outputs``) and labelled with the version's name, so a page can link them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from store.cycles import attempts_of
from store.errors import NotFound
from store.lineage import Lineage, lineage_back, lineage_forward
from store.models import (
    Alert,
    Artifact,
    Cycle,
    CycleAttempt,
    Dataset,
    Deployment,
    OperatorAction,
    Policy,
    PreferenceModel,
    StageRun,
)
from store.status import summarize_cycle

VERSIONS = {"policy": Policy, "pm": PreferenceModel, "dataset": Dataset}
"""the versions that have a page of their own, by lineage kind"""
KIND_NAMES = {"policy": "policy", "pm": "PM", "dataset": "dataset"}

REF_SUFFIXES = (("policy_id", "policy"), ("policy_ids", "policy"), ("pm_id", "pm"), ("pm_ids", "pm"),
                ("dataset_id", "dataset"))
"""how an output field that names versions ends, and the kind it names"""

ELSEWHERE = {("open", "settings"): "settings", ("evaluate", "metrics"): "evaluation"}
"""stage outputs shown in a section of their own (the id of that section), not in the outputs table"""

Ref = tuple[str, int]


# --- one cycle --------------------------------------------------------------------------------


def cycle_page(session: Session, *, cycle_id: int) -> dict[str, Any]:
    """Everything the cycle's page shows: its headline, each stage with its outputs, the settings it ran
    with, its attempts, the evaluation, the human A/B verdict, the gate's checks, the raters left out,
    the deployments it made, the operators' actions on it and its alerts. ``NotFound`` for an unknown id."""
    cycle = session.scalar(select(Cycle).options(selectinload(Cycle.stages)).where(Cycle.id == cycle_id))
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    outputs = {run.stage: dict(run.outputs or {}) for run in cycle.stages}
    labels = version_labels(session, {ref for stage, out in outputs.items() for ref in refs_in(out)})
    settings = outputs.get("open", {}).get("settings") or {}
    gate, human = outputs.get("gate", {}), outputs.get("human_eval", {})
    attempts = attempts_of(session, cycle.id)
    return {
        "summary": summarize_cycle(cycle),
        "stages": [stage_row(run, labels) for run in cycle.stages],
        "settings": flatten(settings),
        "settings_changed": {key: f"changed in attempt {a.number}" for a in attempts for key in a.changed},
        "attempts": attempt_rows(attempts, settings),
        "evaluation": evaluation(outputs.get("evaluate", {})),
        "human": human_verdict(human, gate),
        "gate": gate_summary(gate, human) if gate else None,
        "excluded": excluded_raters(outputs),
        "deployments": [deployment_row(d, week=cycle.week) for d in cycle_deployments(session, cycle_id=cycle.id)],
        "actions": [action_row(a) for a in cycle_actions(session, cycle_id=cycle.id)],
        "alerts": [alert_row(a) for a in cycle_alerts(session, cycle_id=cycle.id)],
    }


def stage_row(run: StageRun, labels: dict[Ref, str]) -> dict[str, Any]:
    """A stage's status, timing, error and outputs (as ``output_rows``)."""
    return {"stage": run.stage, "status": run.status, "started_at": run.started_at, "finished_at": run.finished_at,
            "attempts": run.attempts, "compute_s": run.compute_s, "error": run.error,
            "outputs": output_rows(run.stage, run.outputs or {}, labels)}


def output_rows(stage: str, outputs: dict[str, Any], labels: dict[Ref, str]) -> list[dict[str, Any]]:
    """A stage's outputs as dotted keys and values, each with the versions it names
    (``{kind, id, label}``); an output shown in a section of its own names that section (``see``)."""
    rows = []
    for key, value in outputs.items():
        if (stage, key) in ELSEWHERE:
            rows.append({"key": key, "value": None, "links": [], "see": ELSEWHERE[(stage, key)]})
            continue
        for dotted, leaf in flatten(value, key):
            links = [{"kind": k, "id": i, "label": labels.get((k, i))} for k, i in refs_of(dotted, leaf)]
            rows.append({"key": dotted, "value": leaf, "links": links, "see": None})
    return rows


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested dict as (dotted key, leaf value) pairs in order; a list and an empty dict under a key are
    leaves, and an empty dict (or no dict) at the top has none."""
    if isinstance(value, dict) and value:
        return [pair for key, item in value.items() for pair in flatten(item, f"{prefix}.{key}" if prefix else key)]
    return [(prefix, value)] if prefix else []


def ref_kind(key: str) -> str | None:
    """The kind of version an output field names (``candidate_policy_id`` -> policy), or None."""
    return next((kind for part in key.split(".") for suffix, kind in REF_SUFFIXES if part.endswith(suffix)), None)


def refs_of(key: str, value: Any) -> list[Ref]:
    """The versions a (dotted key, leaf value) output names: an id, or a list of ids."""
    kind = ref_kind(key)
    if kind is None:
        return []
    ids = value if isinstance(value, list) else [value]
    return [(kind, i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def refs_in(outputs: dict[str, Any]) -> set[Ref]:
    return {ref for key, value in flatten(outputs) for ref in refs_of(key, value)}


def version_labels(session: Session, refs: set[Ref]) -> dict[Ref, str]:
    """``name vN`` of each version in ``refs`` that exists."""
    out = {}
    for kind, model in VERSIONS.items():
        ids = sorted({i for k, i in refs if k == kind})
        if ids:
            for row in session.execute(select(model.id, model.name, model.version).where(model.id.in_(ids))):
                out[(kind, row.id)] = f"{row.name} v{row.version}"
    return out


def attempt_rows(attempts: list[CycleAttempt], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each attempt, with what it changed as ``{key, before, after}``: before from the settings it
    replaced (kept in its ``discarded``), after from those the next attempt replaced, or ``settings``
    (the open stage's now) for the newest."""
    out = []
    for n, attempt in enumerate(attempts):
        later = attempts[n + 1].discarded.get("open", {}).get("settings") if n + 1 < len(attempts) else settings
        before = dict(flatten(attempt.discarded.get("open", {}).get("settings") or {}))
        after = dict(flatten(later or {}))
        out.append({"number": attempt.number, "created_at": attempt.created_at, "actor": attempt.actor,
                    "reason": attempt.reason, "params": attempt.params, "kept": attempt.kept, "rerun": attempt.rerun,
                    "changed": [{"key": k, "before": before.get(k), "after": after.get(k)} for k in attempt.changed]})
    return out


def evaluation(outputs: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluate stage's metrics (dotted, sorted) and report, or None before it ran."""
    if not outputs:
        return None
    return {"metrics": sorted(flatten(outputs.get("metrics") or {})), "report_uri": outputs.get("report_uri")}


def human_verdict(human: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any] | None:
    """People's blinded A/B verdict on the candidate, with the gate's lower bound and bar; None before it ran."""
    if not human:
        return None
    measures = gate.get("measures", {})
    keys = ("enabled", "reason", "answers", "wins", "ties", "losses", "win_rate", "tasks", "min_comparisons",
            "outcome", "excluded_answers", "elo_candidate", "elo_baseline")
    return {**{k: human.get(k) for k in keys}, "lower_bound": measures.get("human_lower_bound"),
            "bar": measures.get("human_bar"), "confidence": measures.get("confidence"),
            "interval": measures.get("interval")}


def gate_summary(gate: dict[str, Any], human: dict[str, Any]) -> dict[str, Any]:
    """The gate's decision, its reasons, its checks (``gate_checks``) and its thresholds (dotted)."""
    return {"decision": gate.get("deploy"), "reasons": gate.get("reasons", []), "checks": gate_checks(gate, human),
            "thresholds": flatten(gate.get("thresholds", {}))}


def gate_checks(gate: dict[str, Any], human: dict[str, Any]) -> list[dict[str, Any]]:
    """Each check the gate made (``orchestrator.gate.decide``), passed or not, with the number it
    compared and the threshold it compared it with (None where the gate recorded none)."""
    measures, measured, thresholds = gate.get("measures", {}), gate.get("measured", {}), gate.get("thresholds", {})
    win_bar = 0.5 + thresholds["win_margin"] if "win_margin" in thresholds else None
    train, test = measured.get("win_rate_train_pm"), measured.get("win_rate_test_pm")
    gap = train - test if train is not None and test is not None else None
    known = {
        "enough_human_answers": ("human answers", measures.get("human_answers"), "≥", human.get("min_comparisons")),
        "people_prefer_candidate": ("lower bound of people's win rate", measures.get("human_lower_bound"), ">",
                                    measures.get("human_bar")),
        "train_pm_is_evidence": ("train PM held-out accuracy, lower bound",
                                 measures.get("train_pm_accuracy_lower_bound"), ">", thresholds.get("min_pm_accuracy")),
        "test_pm_is_evidence": ("test PM held-out accuracy, lower bound",
                                measures.get("test_pm_accuracy_lower_bound"), ">", thresholds.get("min_pm_accuracy")),
        "beats_deployed_under_test_pm": ("test-PM win rate", test, "≥", win_bar),
        "within_kl_budget": ("KL to the reference", measured.get("kl"), "≤", thresholds.get("kl_budget")),
        "pms_agree": ("train-PM minus test-PM win rate", gap, "≤", thresholds.get("max_pm_gap")),
    }
    rows = []
    for name, passed in gate.get("checks", {}).items():
        measure, value, op, threshold = known.get(name, (name.replace("_", " "), None, "", None))
        rows.append({"name": name, "passed": passed, "measure": measure, "value": value, "op": op,
                     "threshold": threshold})
    return rows


def excluded_raters(outputs: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The raters the snapshot left out (``{rater_id, reason, comparisons}``) and those whose answers the
    human evaluation did not count (``{rater_id, reason}``)."""
    snapshot = outputs.get("snapshot", {}).get("excluded_raters") or []
    human = outputs.get("human_eval", {}).get("excluded_raters") or {}
    return {"snapshot": [dict(r) for r in snapshot],
            "human_eval": [{"rater_id": rater, "reason": why} for rater, why in sorted(human.items())]}


def cycle_deployments(session: Session, *, cycle_id: int) -> list[Deployment]:
    query = select(Deployment).options(selectinload(Deployment.policy)).where(Deployment.cycle_id == cycle_id)
    return list(session.scalars(query.order_by(Deployment.id)))


def cycle_actions(session: Session, *, cycle_id: int) -> list[OperatorAction]:
    """The operators' actions on the cycle, oldest first."""
    query = select(OperatorAction).where(OperatorAction.subject_kind == "cycle",
                                         OperatorAction.subject_id == str(cycle_id))
    return list(session.scalars(query.order_by(OperatorAction.id)))


def cycle_alerts(session: Session, *, cycle_id: int) -> list[Alert]:
    """The cycle's alerts, oldest first."""
    return list(session.scalars(select(Alert).where(Alert.cycle_id == cycle_id).order_by(Alert.id)))


def action_row(action: OperatorAction) -> dict[str, Any]:
    return {"created_at": action.created_at, "action": action.action, "actor": action.actor, "via": action.via,
            "detail": flatten(action.detail or {})}


def alert_row(alert: Alert) -> dict[str, Any]:
    return {"created_at": alert.created_at, "event": alert.event, "text": alert.text, "status": alert.status,
            "attempts": alert.attempts, "last_error": alert.last_error, "delivered_at": alert.delivered_at}


# --- one version ------------------------------------------------------------------------------


def version_page(session: Session, *, kind: str, id: int) -> dict[str, Any]:
    """A policy, PM or dataset: its fields, config and metrics (dotted), its artifact, the cycle that made
    it, what it was made from and what was made from it (directly, and all the way up and down), and for a
    policy its deployments. ``NotFound`` for an unknown id."""
    model = VERSIONS[kind]
    row = session.get(model, id)
    if row is None:
        raise NotFound(f"{KIND_NAMES[kind]} {id} does not exist")
    back, forward = lineage_back(session, kind=kind, id=id), lineage_forward(session, kind=kind, id=id)
    week = session.scalar(select(Cycle.week).where(Cycle.id == row.cycle_id)) if row.cycle_id is not None else None
    return {
        "kind": kind, "id": row.id, "name": row.name, "version": row.version, "created_at": row.created_at,
        "cycle": {"id": row.cycle_id, "week": week} if row.cycle_id is not None else None,
        "fields": version_fields(kind, row),
        "tables": version_tables(kind, row),
        "artifact": artifact_row(session.get(Artifact, row.artifact_id)) if row.artifact_id is not None else None,
        "parents": [edge_row(back, e.parent, e.relation) for e in back.edges
                    if e.child == back.root and e.parent[0] in VERSIONS],
        "batches": [edge_row(back, e.parent, e.relation) for e in back.edges
                    if e.child == back.root and e.parent[0] == "feedback_batch"],
        "children": [edge_row(forward, e.child, e.relation) for e in forward.edges if e.parent == forward.root],
        "ancestors": reached(back),
        "descendants": reached(forward),
        "deployments": policy_deployments(session, policy_id=id) if kind == "policy" else [],
    }


def version_fields(kind: str, row: Policy | PreferenceModel | Dataset) -> list[tuple[str, Any]]:
    """The row's own columns worth reading, as (label, value)."""
    if kind == "dataset":
        return [("kind", row.kind), ("rows", row.row_count), ("content sha256", row.content_sha256)]
    fields = [("base model", row.base_model)]
    if kind == "pm":
        fields.insert(0, ("role", row.role))
    return fields


def version_tables(kind: str, row: Policy | PreferenceModel | Dataset) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The row's JSON columns, dotted: config and metrics, or a dataset's metadata."""
    if kind == "dataset":
        return [("metadata", flatten(row.meta or {}))]
    return [("config", flatten(row.config or {})), ("metrics", flatten(row.metrics or {}))]


def artifact_row(artifact: Artifact | None) -> dict[str, Any] | None:
    if artifact is None:
        return None
    return {"uri": artifact.uri, "sha256": artifact.sha256, "size_bytes": artifact.size_bytes,
            "is_dir": artifact.is_dir}


def edge_row(graph: Lineage, key: Ref, relation: str) -> dict[str, Any]:
    node = graph.nodes[key]
    return {"kind": node.kind, "id": node.id, "name": node.name, "version": node.version, "relation": relation}


def reached(graph: Lineage) -> dict[str, list[dict[str, Any]]]:
    """The versions a lineage walk reached, less its root, by kind, in id order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key in sorted(graph.nodes):
        if key != graph.root:
            node = graph.nodes[key]
            out[node.kind].append({"id": node.id, "name": node.name, "version": node.version})
    return dict(out)


def policy_deployments(session: Session, *, policy_id: int) -> list[dict[str, Any]]:
    """The deployments (any target) that made the policy the active one, oldest first."""
    rows = session.scalars(select(Deployment).where(Deployment.policy_id == policy_id).order_by(Deployment.id))
    return [{"target": d.name, "version": d.version, "action": d.action, "created_at": d.created_at} for d in rows]


# --- one target's deployments -----------------------------------------------------------------


def deployment_history(session: Session, *, target: str) -> list[dict[str, Any]]:
    """Every deployment of ``target``, newest first (the first is the active one), with its policy and cycle."""
    query = (select(Deployment).options(selectinload(Deployment.policy)).where(Deployment.name == target)
             .order_by(Deployment.version.desc()))
    rows = list(session.scalars(query))
    cycle_ids = {d.cycle_id for d in rows if d.cycle_id is not None}
    weeks = dict(session.execute(select(Cycle.id, Cycle.week).where(Cycle.id.in_(cycle_ids))).all())
    versions = {d.id: d.version for d in rows}
    return [deployment_row(d, week=weeks.get(d.cycle_id), undone=versions.get(d.rolled_back_id)) for d in rows]


def deployment_row(deployment: Deployment, *, week: str | None, undone: int | None = None) -> dict[str, Any]:
    policy = deployment.policy
    return {"id": deployment.id, "target": deployment.name, "version": deployment.version, "action": deployment.action,
            "policy": {"id": policy.id, "name": policy.name, "version": policy.version},
            "actor": deployment.actor, "created_at": deployment.created_at, "reason": deployment.reason,
            "cycle": {"id": deployment.cycle_id, "week": week} if deployment.cycle_id is not None else None,
            "undone_version": undone}


def deployment_targets(session: Session) -> list[str]:
    """Every target that has been deployed to, by name."""
    return list(session.scalars(select(Deployment.name).distinct().order_by(Deployment.name)))


def known_targets(session: Session) -> list[str]:
    """Every target deployed to or with a cycle, by name (the dashboard's target switcher)."""
    cycles = set(session.scalars(select(Cycle.deploy_target).distinct()))
    return sorted(cycles | set(deployment_targets(session)))



# --- live refresh ---------------------------------------------------------------------------------


def _version(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def live_cycle_state(session: Session, *, cycle_id: int) -> dict[str, Any]:
    """What a cycle's page watches while the cycle runs (``live``: running, or re-run and not yet started): its
    status and a ``version`` that changes whenever
    the cycle or a stage changes status, a stage finishes or is tried again, or an attempt, an operator's
    action or an alert is added (not on every answer: the page reloads on what changes its sections)."""
    cycle = session.get(Cycle, cycle_id)
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    stages = session.execute(select(StageRun.stage, StageRun.status, StageRun.attempts, StageRun.finished_at)
                             .where(StageRun.cycle_id == cycle_id).order_by(StageRun.id)).all()
    counts = [session.scalar(select(func.count()).select_from(model).where(where)) for model, where in (
        (CycleAttempt, CycleAttempt.cycle_id == cycle_id), (Alert, Alert.cycle_id == cycle_id),
        (OperatorAction, (OperatorAction.subject_kind == "cycle") & (OperatorAction.subject_id == str(cycle_id))))]
    # a re-run readies a failed or cancelled cycle as failed with no end time, until its flow claims it
    live = cycle.status == "running" or (cycle.status == "failed" and cycle.finished_at is None)
    return {"status": cycle.status, "live": live,
            "version": _version([cycle.status, cycle.reason, [tuple(s) for s in stages], counts])}


def dashboard_state(session: Session, *, cycle_ids: list[int], target: str) -> dict[str, Any]:
    """What the dashboard watches while a cycle it shows runs: ``version`` changes when a cycle of the target
    is opened, a shown cycle or one of its stages changes status, or the target's deployment changes."""
    newest = session.scalar(select(func.max(Cycle.id)).where(Cycle.deploy_target == target))
    cycles = session.execute(select(Cycle.id, Cycle.status).where(Cycle.id.in_(cycle_ids)).order_by(Cycle.id)).all()
    stages = session.execute(select(StageRun.cycle_id, StageRun.stage, StageRun.status)
                             .where(StageRun.cycle_id.in_(cycle_ids)).order_by(StageRun.id)).all()
    deployment = session.scalar(select(func.max(Deployment.id)).where(Deployment.name == target))
    return {"live": any(status == "running" for _, status in cycles),
            "version": _version([newest, [tuple(c) for c in cycles], [tuple(s) for s in stages], deployment])}
