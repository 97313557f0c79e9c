"""The stages of a weekly cycle, as plain functions over a ``CycleContext``.

    open -> sample -> gather -> snapshot -> train_pm -> improve -> evaluate -> human_eval -> gate -> deploy

Each stage reads what earlier stages recorded (``ctx.outputs(stage, Model)``,
the models of ``orchestrator.outputs``), does its work, and registers its
versions and its outputs in one transaction (``ctx.commit``). The protocol
that makes a stage idempotent on (cycle, stage) (skip what finished, record
a failure, commit once) is ``orchestrator.cycle``; the comparison tasks are
made by ``orchestrator.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from formats.chat import prompt_text
from orchestrator.alerts import check_raters, deadline_reached, gate_refused
from orchestrator.alerts import deliver as deliver_alerts
from orchestrator.cycle import (
    STAGES,
    CycleContext,
    CycleEnv,
    artifact_of,
    claim,
    jsonable,
    ref_of,
    run_stage,
    scalar_metrics,
)
from orchestrator.elo import Match, fit_elo
from orchestrator.faults import kill_point
from orchestrator.gate import GateConfig, GateInput, HumanVerdict, PMEvidence, decide
from orchestrator.hooks import deploy_event
from orchestrator.outputs import (
    DeployOutputs,
    EvaluateOutputs,
    GateOutputs,
    GatherOutputs,
    HumanEvalOutputs,
    ImproveOutputs,
    OpenOutputs,
    SampleOutputs,
    SnapshotOutputs,
    TrainPMOutputs,
)
from orchestrator.settings import CycleSettings, cycle_target, resolve
from orchestrator.tasks import eval_pairs, make_tasks, rank_prompts, storable, with_overlap
from store.artifacts import get_artifact, register_artifact
from store.cycles import DEFAULT_TARGET, finish_cycle, get_cycle, get_stage
from store.datasets import create_dataset, get_dataset, get_dataset_version, snapshot_comparisons
from store.deployments import active_deployment, cycle_deployment, deploy, deployed_policy_ids
from store.errors import InvalidInput, NotFound
from store.feedback import count_comparisons
from store.models import Cycle, PreferenceModel, StageRun
from store.pms import create_pm, get_pm, get_pm_version
from store.policies import create_policy, get_policy, get_policy_version
from store.tasks import create_tasks, eval_judgements, eval_tasks_of, task_counts

log = logging.getLogger("ratchet.cycle")


# -- open ------------------------------------------------------------------------------------


def open_stage(env: CycleEnv, *, week: str, params: dict[str, Any] | None, trigger: str, flow_run_id: str | None,
               target: str | None = None) -> CycleContext:
    """Open (or resume) the cycle of (target, week): claim it, then run its open stage (``stage_open``).

    ``target`` None: the deployment target the params and the server's defaults name (``cycle_target``); a
    resumed cycle (no params) of a target other than the defaults' must be given its target."""
    target = cycle_target(env.defaults, params, target)
    cycle_id = claim(env, week=week, params=params, trigger=trigger, flow_run_id=flow_run_id, target=target)
    ctx = CycleContext(env, cycle_id=cycle_id, week=week, target=target)
    run_stage(ctx, "open", stage_open)
    return ctx


def stage_open(ctx: CycleContext) -> dict[str, Any]:
    """Fix, once, what every later stage and every re-run uses: the resolved settings (for the cycle's
    deployment target, with its own names: ``orchestrator.settings.with_own_names``), the deployed (baseline)
    policy, the reference policy, the PMs' base and the prompt sets."""
    with ctx.db.session() as session:
        cycle = get_cycle(session, ctx.cycle_id)
        settings = resolve(ctx.env.defaults, cycle.params, trusted=cycle.trigger != "api", target=cycle.deploy_target)
    return ctx.commit("open", lambda session: _opened(session, settings, ctx.week, ctx.cycle_id))


def _opened(session: Session, settings: CycleSettings, week: str, cycle_id: int) -> OpenOutputs:
    active = active_deployment(session, name=settings.deploy_target)
    if active is None:
        raise InvalidInput(
            f"nothing is deployed on target {settings.deploy_target!r}: register and deploy an initial policy first "
            "(`ratchet demo` does this for the demo world)"
        )
    baseline = get_policy(session, active.policy_id)
    if settings.reference_policy:
        reference = _policy_named(session, settings.reference_policy)
    else:
        reference = get_policy(session, baseline.reference_policy_id) if baseline.reference_policy_id else baseline
    pm_base = _policy_named(session, settings.pm.base_policy) if settings.pm.base_policy else reference
    prompts = _prompt_set(session, settings)
    if prompts.kind != "prompts" or prompts.artifact_id is None:
        raise InvalidInput(f"dataset {prompts.name} v{prompts.version} is a {prompts.kind} dataset, not a prompt set")
    eval_prompts = prompts
    if settings.evaluate.prompt_set:
        try:
            eval_prompts = get_dataset_version(session, name=settings.evaluate.prompt_set)
        except NotFound:
            log.warning("no prompt set %r: evaluating on %r", settings.evaluate.prompt_set, settings.prompt_set)
    warm = {}
    if settings.pm.warm_start:
        for role, name in (("train", settings.pm.name), ("test", settings.pm.test_name)):
            try:
                warm[role] = get_pm_version(session, name=name).id
            except NotFound:
                pass
    for row, what in ((baseline, "deployed policy"), (reference, "reference policy"), (pm_base, "PM base policy")):
        artifact_of(session, row, what)
    snapshots, top_ups = settings.sample.snapshots, settings.sample.top_up_rounds
    return OpenOutputs(
        settings=settings,
        week=week,
        deployment_id=active.id,
        baseline_policy_id=baseline.id,
        reference_policy_id=reference.id,
        pm_base_policy_id=pm_base.id,
        policy_name=settings.policy_name or baseline.name,
        sample_policy_ids=deployed_policy_ids(session, name=settings.deploy_target, limit=snapshots),
        top_up_policy_ids=deployed_policy_ids(session, name=settings.deploy_target, limit=snapshots + top_ups)[snapshots:],
        prompt_dataset_id=prompts.id,
        eval_prompt_dataset_id=eval_prompts.id,
        warm_start_pm_ids=warm,
        opened_at=get_cycle(session, cycle_id).created_at.isoformat(),
    )


def _prompt_set(session: Session, settings: CycleSettings):
    """The newest version of the cycle's prompt set; ``NotFound`` says how a target other than the default one
    gets one (its own, ``<name>@<target>``, or a shared one named explicitly)."""
    try:
        return get_dataset_version(session, name=settings.prompt_set)
    except NotFound as exc:
        if settings.deploy_target == DEFAULT_TARGET:
            raise
        raise NotFound(f"{exc}: target {settings.deploy_target!r} samples its own prompt set by default; register "
                       f"{settings.prompt_set!r}, or set prompt_set to share another target's") from exc


def _policy_named(session: Session, ref: str):
    """The policy version ``"name:version"`` (``"name"``: the newest) names."""
    name, _, version = ref.partition(":")
    return get_policy_version(session, name=name, version=int(version.lstrip("v")) if version else None)


# -- sample ----------------------------------------------------------------------------------


def stage_sample(ctx: CycleContext) -> dict[str, Any]:
    """K responses per prompt from the deployed policy (or several recent ones); pairs become tasks.

    A policy that has collapsed to a few distinct responses makes few pairs.
    When the tasks fall short of what gather waits for, the stage samples
    again (``top_up_rounds`` at most), each round with more of this week's
    prompts, a hotter temperature and one more earlier deployed snapshot,
    and pairs the distinct responses of all rounds; if it still falls short,
    its outputs say why. A chat prompt (a prompt-set line with ``messages``)
    takes its messages into the step's prompt file (its text is theirs in
    HH-RLHF form when the line has no ``prompt``) and into its tasks'
    metadata (``with_messages``).
    """
    opened = ctx.outputs("open", OpenOutputs)
    sample = ctx.settings.sample
    step_config = ctx.settings.step_config("sample")
    num_samples, needed = step_config["num_samples"], ctx.settings.gather.min_comparisons
    with ctx.db.session() as session:
        prompts_ref = ref_of(get_artifact(session, get_dataset(session, opened.prompt_dataset_id).artifact_id))
        policies = {}
        for policy_id in opened.sample_policy_ids + opened.top_up_policy_ids:
            policy = get_policy(session, policy_id)
            policies[f"{policy.name}-v{policy.version}"] = artifact_of(session, policy, "policy")
    ranked = rank_prompts(ctx.read_jsonl(prompts_ref), week=ctx.week)
    first = sample.prompts_per_cycle or len(ranked)
    labels = list(policies)
    samples: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    compute_s = 0.0
    tasks: list[dict[str, Any]] = []
    for r in range(sample.top_up_rounds + 1):
        # Round r: the first (r + 1) blocks of this week's prompts, temperature raised r times, r earlier snapshots.
        chosen = ranked[: first * (r + 1)]
        used = labels[: len(opened.sample_policy_ids) + r]
        body = "".join(json.dumps(_prompt_line(p), ensure_ascii=False) + "\n" for p in chosen)
        suffix = "" if r == 0 else f"-r{r}"
        week_prompts = ctx.env.artifacts.put_bytes(f"{ctx.folder}/sample/prompts{suffix}.jsonl", body.encode("utf-8"))
        temperature = step_config["temperature"] + r * sample.top_up_temperature
        week_seed = _seed(ctx.week, "sample") if r == 0 else _seed(ctx.week, "sample", r)
        config = {**step_config, "temperature": temperature, "seed": sample.config.get("seed", week_seed)}
        request = ctx.step_request("sample", "sample", config, {"prompts_path": week_prompts}, ["samples"],
                                   input_sets={"policies": {label: policies[label] for label in used}},
                                   part=None if r == 0 else f"top-up-{r}")
        outcome = ctx.run_step("sample", request)
        compute_s += outcome.compute_s
        got = ctx.read_jsonl(outcome.outputs["samples"])
        # Each round's sample indices follow the last round's, so (policy, index) names one response.
        samples += [{**row, "sample_index": row["sample_index"] + r * num_samples, "round": r} for row in got]
        tasks = with_messages(make_tasks(samples, pairs_per_prompt=sample.pairs_per_prompt, week=ctx.week),
                              chat_messages(samples, id_key="prompt_id"))
        rounds.append({"chosen": chosen, "used": used, "round": r, "prompts": len(chosen), "policies": used,
                       "temperature": temperature, "responses": len(got), "tasks_so_far": len(tasks),
                       "outcome": outcome, "metrics": scalar_metrics(outcome.metrics)})
        if len(tasks) >= needed:
            break
    short = None
    if len(tasks) < needed:
        distinct = len({(row["prompt_id"], row["response"]) for row in samples})
        short = (
            f"only {len(tasks)} comparison tasks after {len(rounds) - 1} top-up round(s) ({distinct} distinct "
            f"responses to {len(rounds[-1]['chosen'])} prompts); gather.min_comparisons is {needed}, so gather "
            "ends when every task is answered"
        )
        log.warning("cycle %s: %s", ctx.label, short)
    if len(rounds) == 1:
        samples_ref = rounds[0]["outcome"].outputs["samples"]
    else:
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples)
        samples_ref = ctx.env.artifacts.put_bytes(f"{ctx.folder}/sample/samples-all.jsonl", body.encode("utf-8"))

    def register(session: Session) -> SampleOutputs:
        dataset, _ = create_dataset(
            session,
            name=own_name("samples", ctx.target),
            kind="samples",
            content_sha256=samples_ref.sha256,
            row_count=len(samples),
            artifact=samples_ref,
            source_dataset_id=opened.prompt_dataset_id,
            cycle_id=ctx.cycle_id,
            metadata={"week": ctx.week, "prompts": len(rounds[-1]["chosen"]), "num_samples": num_samples,
                      "policies": rounds[-1]["used"], "rounds": len(rounds)},
        )
        qc = ctx.settings.qc
        overlapped = with_overlap(tasks, share=qc.overlap_share, raters=qc.overlap_raters, week=ctx.week)
        rows = create_tasks(session, tasks=overlapped, cycle_id=ctx.cycle_id, samples_dataset_id=dataset.id)
        return SampleOutputs(
            samples_dataset_id=dataset.id,
            samples_version=dataset.version,
            prompts=len(rounds[-1]["chosen"]),
            responses=len(samples),
            tasks=len(rows),
            policies=rounds[-1]["used"],
            top_up_rounds=len(rounds) - 1,
            rounds=[{k: v for k, v in r_.items() if k not in ("chosen", "used", "outcome")} for r_ in rounds],
            short=short,
            # The last round sampled every prompt and policy the earlier ones did.
            prompts_cut=rounds[-1]["metrics"].get("samples/prompts_cut") or 0,
            metrics=rounds[0]["metrics"],
        )

    return ctx.commit("sample", register, compute_s=compute_s)


# -- gather ----------------------------------------------------------------------------------


def stage_gather(ctx: CycleContext) -> dict[str, Any]:
    """Wait until ``min_comparisons`` comparisons arrived since the cycle opened (and, with
    ``all_tasks``, every task of the cycle is answered), every task is answered, or the deadline.

    Counted: every comparison in a feedback batch registered since the cycle
    opened, whatever its source (answers to this cycle's tasks through the
    API, imports, other tools), except answers to eval tasks and to the tasks
    of other deployment targets' cycles (unless ``feedback_from`` names them):
    what the snapshot takes. Once every task of the cycle is answered the
    stage goes on even short of the minimum: waiting longer could only bring
    imports. The deadline runs from the end of sampling (when the tasks
    appeared), as recorded in the store, so a re-run after a crash keeps the
    same deadline; an operator's re-run counts it from its request.
    """
    gather = ctx.settings.gather
    with ctx.db.session() as session:
        opened_at = get_cycle(session, ctx.cycle_id).created_at
        sampled_at = get_stage(session, cycle_id=ctx.cycle_id, stage="sample").finished_at
    deadline = ctx.wait_from(sampled_at) + timedelta(seconds=gather.deadline_s)

    def count(session: Session) -> Arrivals:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="train")
        check_raters(session, ctx, ctx.settings.qc)  # a rater flagged while answering is heard of now, not days later
        # An overlap task answered once counts as answered: its second rater is for QC, not to wait on.
        return Arrivals(answers=count_comparisons(session, since=opened_at, training_only=True,
                                                  targets=ctx.settings.feedback_targets()),
                        open_tasks=tasks["unanswered"], tasks=sum(v for k, v in tasks.items() if k != "unanswered"))

    waited = wait_for_labelers(ctx, count, minimum=gather.min_comparisons, all_tasks=gather.all_tasks,
                               deadline=deadline, poll_interval_s=gather.poll_interval_s, what="comparisons")
    with ctx.db.session() as session:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="train")
    outputs = GatherOutputs(comparisons=waited.arrivals.answers, min_comparisons=gather.min_comparisons,
                            outcome=waited.outcome, deadline=deadline.isoformat(), tasks=tasks, waited_s=waited.seconds)

    def register(session: Session) -> GatherOutputs:
        deadline_reached(session, ctx, stage="gather", outcome=outputs.outcome, answers=outputs.comparisons,
                         minimum=outputs.min_comparisons, what="comparisons", deadline=outputs.deadline)
        return outputs

    # The wait is labelers' time, not the orchestrator's: it is the stage's own (compute) time.
    return ctx.commit("gather", register, compute_s=waited.seconds)


# -- snapshot --------------------------------------------------------------------------------


def stage_snapshot(ctx: CycleContext) -> dict[str, Any]:
    """D(k): every feedback batch so far, as a content-addressed comparisons dataset, less eval and gold
    answers and the comparisons of excluded raters (``qc``: flagged by quality control, or by an operator).

    Answers to eval tasks stay out: this cycle's always (they judge its own
    candidate), earlier cycles' unless ``human_eval.train_on``. So do the
    answers to other deployment targets' cycles' tasks, unless
    ``feedback_from`` names their targets; comparisons that answer no task
    (imports, direct posts) belong to every target. The dataset is named
    ``snapshot_name`` (``comparisons``; ``comparisons@<target>`` for another
    target unless set explicitly). When there is
    no feedback at all, or no comparison the PMs have not already been
    trained on (the snapshot is a version PMs were trained on), there is
    nothing to learn from: the stage halts the cycle with that reason, and
    the later stages are skipped.
    """
    pm_name = ctx.settings.pm.name

    def register(session: Session) -> SnapshotOutputs:
        try:
            dataset, created = snapshot_comparisons(
                session, artifacts=ctx.env.artifacts, name=ctx.settings.snapshot_name, cycle_id=ctx.cycle_id,
                include_eval=ctx.settings.human_eval.train_on,
                excluded_raters=check_raters(session, ctx, ctx.settings.qc),
                targets=ctx.settings.feedback_targets(),
            )
        except InvalidInput as exc:
            if not str(exc).startswith("there are no feedback batches"):
                raise
            return SnapshotOutputs(dataset_id=None, rows=0, new_version=False,
                                   halt="no feedback: there are no comparisons to train a PM on")
        trained = None if created else session.scalar(
            select(PreferenceModel).where(PreferenceModel.dataset_id == dataset.id, PreferenceModel.name == pm_name)
            .order_by(PreferenceModel.version.desc()).limit(1)
        )
        halt = {} if trained is None else {"halt": (
            f"no new feedback: {dataset.name} v{dataset.version} ({dataset.row_count} comparisons) is what "
            f"{trained.name} v{trained.version} was trained on; nothing to retrain"
        )}
        return SnapshotOutputs(
            dataset_id=dataset.id,
            version=dataset.version,
            rows=dataset.row_count,
            batches=dataset.meta.get("batch_count"),
            excluded_eval_comparisons=dataset.meta.get("excluded_eval_comparisons", 0),
            excluded_gold_comparisons=dataset.meta.get("excluded_gold_comparisons", 0),
            excluded_raters=dataset.meta.get("excluded_raters", []),
            new_version=created,
            **halt,
        )

    return ctx.commit("snapshot", register)


# -- train_pm --------------------------------------------------------------------------------


def stage_train_pm(ctx: CycleContext) -> dict[str, Any]:
    """M(k) and the test PM, on the two halves of D(k) (``TrainPMConfig.two_pms``)."""
    opened, snap = ctx.outputs("open", OpenOutputs), ctx.outputs("snapshot", SnapshotOutputs)
    pm_settings = ctx.settings.pm
    with ctx.db.session() as session:
        dataset = get_dataset(session, snap.dataset_id)
        base = get_policy(session, opened.pm_base_policy_id)
        inputs = {"model_path": artifact_of(session, base, "PM base policy"),
                  "dataset_path": ref_of(get_artifact(session, dataset.artifact_id))}
        base_name = f"{base.name}:v{base.version}"
        warm_id = opened.warm_start_pm_ids.get("train")
        if warm_id:
            inputs["warm_start_path"] = artifact_of(session, get_pm(session, warm_id), "warm-start PM")
    config = {**ctx.settings.step_config("pm"), "two_pms": True}
    request = ctx.step_request("train_pm", "train_pm", config, inputs, ["pm", "test_pm"])
    outcome = ctx.run_step("train_pm", request)
    metrics = jsonable(outcome.metrics)

    def register(session: Session) -> TrainPMOutputs:
        common = {"dataset_id": dataset.id, "base_model": base_name, "cycle_id": ctx.cycle_id,
                  "config": jsonable(request.recorded_config()), "init_pm_id": warm_id or None}
        pm = create_pm(session, name=pm_settings.name, role="train", artifact=outcome.outputs["pm"],
                       metrics=_split_metrics(metrics, ""), **common)
        test_pm = create_pm(session, name=pm_settings.test_name, role="test", artifact=outcome.outputs["test_pm"],
                            metrics=_split_metrics(metrics, "test_pm/"), **common)
        return TrainPMOutputs(
            pm_id=pm.id,
            pm_version=pm.version,
            test_pm_id=test_pm.id,
            test_pm_version=test_pm.version,
            dataset_id=dataset.id,
            heldout_accuracy=metrics.get("heldout/accuracy"),
            heldout_decisive=metrics.get("heldout/decisive", 0),
            heldout_ece=metrics.get("heldout/ece"),
            test_pm_heldout_accuracy=metrics.get("test_pm/heldout/accuracy"),
            test_pm_heldout_decisive=metrics.get("test_pm/heldout/decisive", 0),
            ensemble_size=config["ensemble_size"],
            ensemble_spread=metrics.get("ensemble/heldout_spread"),
            train_comparisons=metrics.get("data/train_comparisons"),
        )

    return ctx.commit("train_pm", register, compute_s=outcome.compute_s)


# -- improve -----------------------------------------------------------------------------------


def stage_improve(ctx: CycleContext) -> dict[str, Any]:
    """C(k): a candidate policy from the deployed policy (or the reference), by the cycle's method
    (``improve.method``), with the reference (``improve.kl_anchor: reference``) or the deployed policy
    (``deployed``) as its KL anchor.

    - ``ppo``, ``online_dpo``, ``rloo``, ``grpo`` and ``rejection_sampling``
      sample the policy on the prompt set and optimise against M(k), the
      test PM scored alongside;
    - ``dpo`` trains on D(k), the cycle's comparison snapshot, with no PM.

    Every method's candidate then faces the same evaluate, human_eval and
    gate. The candidate's lineage names the cycle's reference policy either way (P0: the root its KL budget
    and its PMs' base are measured from); the anchor its KL term pulled toward is in its config and the
    stage's outputs.
    """
    opened, pms = ctx.outputs("open", OpenOutputs), ctx.outputs("train_pm", TrainPMOutputs)
    improve = ctx.settings.improve
    method = improve.method
    snapshot_id = ctx.outputs("snapshot", SnapshotOutputs).dataset_id if method == "dpo" else None
    with ctx.db.session() as session:  # one session: a second one inside it would wait on this one (SQLite)
        init = get_policy(session, opened.baseline_policy_id if improve.init == "deployed" else opened.reference_policy_id)
        reference = get_policy(session, opened.reference_policy_id)
        anchor = get_policy(session, opened.baseline_policy_id) if improve.kl_anchor == "deployed" else reference
        if method == "dpo":
            snapshot = get_dataset(session, snapshot_id)
            inputs = {
                "model_path": artifact_of(session, init, "init policy"),
                "ref_model_path": artifact_of(session, anchor, "KL anchor policy"),
                "dataset_path": ref_of(get_artifact(session, snapshot.artifact_id)),
            }
        else:
            inputs = {
                "policy_path": artifact_of(session, init, "init policy"),
                "reference_path": artifact_of(session, anchor, "KL anchor policy"),
                "pm_path": artifact_of(session, get_pm(session, pms.pm_id), "PM"),
                "test_pm_path": artifact_of(session, get_pm(session, pms.test_pm_id), "test PM"),
                "prompts_path": ref_of(get_artifact(session, get_dataset(session, opened.prompt_dataset_id).artifact_id)),
            }
        base_model = init.base_model
    section = ctx.settings.method_section()
    step_config = ctx.settings.step_config(method)
    config = {**step_config, "seed": _seed(ctx.week, method, step_config["seed"])}
    request = ctx.step_request("improve", section.step, config, inputs, ["policy"])
    outcome = ctx.run_step("improve", request)
    metrics = scalar_metrics(outcome.metrics)

    def measured(name: str) -> Any:
        # the common keys every sampling method reports (workers.common.policy_step.policy_metrics); dpo has none
        return metrics.get(f"policy/{name}")

    def register(session: Session) -> ImproveOutputs:
        policy = create_policy(
            session,
            name=opened.policy_name,
            base_model=base_model,
            artifact=outcome.outputs["policy"],
            init_policy_id=init.id,
            reference_policy_id=reference.id,
            pm_id=pms.pm_id,
            cycle_id=ctx.cycle_id,
            config=jsonable({"method": method, **request.recorded_config()}),
            metrics=metrics,
        )
        return ImproveOutputs(
            method=method,
            policy_id=policy.id,
            policy_version=policy.version,
            init_policy_id=init.id,
            kl_anchor_policy_id=anchor.id,
            reward=measured("reward"),
            reward_test_pm=measured("reward_test_pm"),
            reward_spread=measured("reward_spread"),
            kl=measured("kl"),
            episodes=measured("episodes"),
        )

    return ctx.commit("improve", register, compute_s=outcome.compute_s)


# -- evaluate ----------------------------------------------------------------------------------


def stage_evaluate(ctx: CycleContext) -> dict[str, Any]:
    """The candidate against the deployed policy on held-out prompts, under both PMs (and gold, when known).

    The step's seed is the same every week: both policies answer with the same random numbers, and a policy
    evaluated in two cycles gets the same samples, so numbers compare across cycles.
    """
    opened = ctx.outputs("open", OpenOutputs)
    pms, candidate = ctx.outputs("train_pm", TrainPMOutputs), ctx.outputs("improve", ImproveOutputs)
    with ctx.db.session() as session:
        inputs = {
            "candidate_path": artifact_of(session, get_policy(session, candidate.policy_id), "candidate policy"),
            "baseline_path": artifact_of(session, get_policy(session, opened.baseline_policy_id), "deployed policy"),
            "reference_path": artifact_of(session, get_policy(session, opened.reference_policy_id), "reference policy"),
            "pm_path": artifact_of(session, get_pm(session, pms.pm_id), "PM"),
            "test_pm_path": artifact_of(session, get_pm(session, pms.test_pm_id), "test PM"),
            "prompts_path": ref_of(get_artifact(session, get_dataset(session, opened.eval_prompt_dataset_id).artifact_id)),
        }
    config = {**ctx.settings.step_config("evaluate"), "gold": ctx.settings.gold}
    outcome = ctx.run_step("evaluate", ctx.step_request("evaluate", "evaluate", config, inputs, ["report", "samples"]))
    metrics = scalar_metrics(outcome.metrics)

    def register(session: Session) -> EvaluateOutputs:
        report = register_artifact(session, outcome.outputs["report"])
        samples = register_artifact(session, outcome.outputs["samples"])
        return EvaluateOutputs(report_artifact_id=report.id, report_uri=report.uri, samples_artifact_id=samples.id,
                               candidate_policy_id=candidate.policy_id, metrics=metrics)

    return ctx.commit("evaluate", register, compute_s=outcome.compute_s)


# -- human_eval --------------------------------------------------------------------------------


def stage_human_eval(ctx: CycleContext) -> dict[str, Any]:
    """Blinded A/B comparisons of the candidate against the deployed policy by labelers, on held-out prompts.

    1. The eval tasks: the evaluate step's responses of both policies to the
       held-out prompts, paired, A/B order random per task (created once per
       cycle: a re-run finds them).
    2. Wait like gather: ``min_comparisons`` answers (and every task with
       ``all_tasks``), every task answered, or the deadline, counted from when
       the tasks appeared.
    3. The verdict: wins, ties and losses of the candidate (one answer per
       task and rater; answers of raters quality control leaves out of
       snapshots are not counted, here or while waiting), and Elo ratings
       of every policy evaluated so far.
    """
    human = ctx.settings.human_eval
    if not human.enabled:
        off = HumanEvalOutputs(enabled=False, reason="human evaluation is off (human_eval.enabled): the gate trusts the PMs")
        return ctx.commit("human_eval", lambda session: off, status="skipped")
    opened, evaluation = ctx.outputs("open", OpenOutputs), ctx.outputs("evaluate", EvaluateOutputs)

    # 1. The eval tasks, once (a re-run finds them; the stage row's lock keeps two runs from both creating them).
    with ctx.db.session() as session:
        samples_ref = ref_of(get_artifact(session, evaluation.samples_artifact_id))
        prompts_ref = ref_of(get_artifact(session, get_dataset(session, opened.eval_prompt_dataset_id).artifact_id))
        prompt_set = ctx.read_jsonl(prompts_ref)
        prompts = {json.dumps(p["id"]): prompt_text(p) for p in prompt_set}
        pairs, identical = eval_pairs(ctx.read_jsonl(samples_ref), prompts, week=ctx.week, max_tasks=human.max_tasks)
        pairs = with_messages(pairs, chat_messages(prompt_set, id_key="id"))
        get_stage(session, cycle_id=ctx.cycle_id, stage="human_eval", for_update=True)
        existing = eval_tasks_of(session, cycle_id=ctx.cycle_id, after_id=ctx.eval_task_floor)
        if not existing:
            existing = create_tasks(session, tasks=pairs, cycle_id=ctx.cycle_id, kind="eval")
        created_at = min((t.created_at for t in existing), default=ctx.env.clock())
        task_count = len(existing)
    kill_point("human_eval", "tasks")

    # 2. Wait for the labelers.
    deadline = ctx.wait_from(created_at) + timedelta(seconds=human.deadline_s)

    def counted(session: Session) -> tuple[list[float], dict[str, str]]:
        # Raters quality control leaves out of snapshots are left out of the verdict too.
        left_out = check_raters(session, ctx, ctx.settings.qc)
        judgements = eval_judgements(session, cycle_id=ctx.cycle_id, after_id=ctx.eval_task_floor)
        return [j.outcome for j in judgements if j.rater_id not in left_out], {
            r: why for r, why in left_out.items() if any(j.rater_id == r for j in judgements)}

    def count(session: Session) -> Arrivals:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="eval", after_id=ctx.eval_task_floor)
        return Arrivals(answers=len(counted(session)[0]), open_tasks=tasks["open"],
                        tasks=tasks["open"] + tasks["done"] + tasks["closed"])

    waited = wait_for_labelers(ctx, count, minimum=human.min_comparisons, all_tasks=human.all_tasks,
                               deadline=deadline, poll_interval_s=human.poll_interval_s, what="eval answers")

    # 3. The verdict and the Elo ratings.
    with ctx.db.session() as session:
        outcomes, left_out = counted(session)
        answered = len(eval_judgements(session, cycle_id=ctx.cycle_id, after_id=ctx.eval_task_floor))
        matches = human_matches(session, deploy_target=ctx.settings.deploy_target)
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    losses = len(outcomes) - wins - ties
    candidate_id, baseline_id = evaluation.candidate_policy_id, opened.baseline_policy_id
    if outcomes:
        matches.append(Match(a=candidate_id, b=baseline_id, wins_a=wins, ties=ties, wins_b=losses))
    played = {m.a for m in matches} | {m.b for m in matches}
    # P0 (the reference) at 0; if it never played, the earliest policy that did
    anchor = opened.reference_policy_id if opened.reference_policy_id in played else None
    elo = {str(k): round(v, 1) for k, v in sorted(fit_elo(matches, anchor=anchor).items())}
    verdict = HumanEvalOutputs(
        enabled=True,
        deploy_target=ctx.settings.deploy_target,
        candidate_policy_id=candidate_id,
        baseline_policy_id=baseline_id,
        tasks=task_count,
        identical_pairs=identical,
        answers=len(outcomes),
        excluded_answers=answered - len(outcomes),
        excluded_raters=left_out,
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=(wins + 0.5 * ties) / len(outcomes) if outcomes else None,
        min_comparisons=human.min_comparisons,
        outcome=waited.outcome,
        deadline=deadline.isoformat(),
        waited_s=waited.seconds,
        elo=elo,
        elo_candidate=elo.get(str(candidate_id)),
        elo_baseline=elo.get(str(baseline_id)),
    )

    def register(session: Session) -> HumanEvalOutputs:
        deadline_reached(session, ctx, stage="human_eval", outcome=verdict.outcome, answers=verdict.answers,
                         minimum=verdict.min_comparisons, what="eval answers", deadline=verdict.deadline)
        return verdict

    return ctx.commit("human_eval", register, compute_s=waited.seconds)


# -- gate --------------------------------------------------------------------------------------


def stage_gate(ctx: CycleContext) -> dict[str, Any]:
    """Deploy or reject the candidate, with every failed check's reason."""
    evaluation = ctx.outputs("evaluate", EvaluateOutputs)
    measured = gate_input(evaluation.metrics, ctx.outputs("human_eval", HumanEvalOutputs),
                          ctx.outputs("train_pm", TrainPMOutputs))
    scalars = {k: v for k, v in asdict(measured).items() if isinstance(v, float)}
    if any(math.isnan(v) for v in scalars.values()):
        raise InvalidInput(f"the evaluate step reported NaN measurements: {scalars}")
    config = GateConfig(**ctx.settings.gate.model_dump())
    decision = decide(measured, config)
    outputs = GateOutputs(**decision.as_dict(), measured=asdict(measured), thresholds=asdict(config),
                          candidate_policy_id=evaluation.candidate_policy_id)

    def register(session: Session) -> GateOutputs:
        gate_refused(session, ctx, outputs)  # an alert when the candidate is not deployed
        return outputs

    return ctx.commit("gate", register)


# -- deploy ------------------------------------------------------------------------------------


def stage_deploy(ctx: CycleContext) -> dict[str, Any]:
    """Deploy a candidate that passed the gate, then call the deploy hook.

    The deployment row is committed first (exactly once: a re-run finds the
    cycle's deployment), then the hook runs (at least once), then the stage
    is finished. Nothing is deployed when the gate rejected the candidate,
    or when the deployment changed while the cycle ran (a rollback or another
    deploy): the candidate was judged against a policy no longer serving.
    """
    opened, gate = ctx.outputs("open", OpenOutputs), ctx.outputs("gate", GateOutputs)
    target = ctx.settings.deploy_target
    if not gate.deploy:
        rejected = DeployOutputs(deployed=False, reasons=gate.reasons)
        return ctx.commit("deploy", lambda session: rejected, status="skipped")
    stale = None
    with ctx.db.session() as session:
        deployment = cycle_deployment(session, cycle_id=ctx.cycle_id, name=target)
        active = active_deployment(session, name=target, lock=True)  # held until this deploy commits
        if deployment is None and (active is None or active.id != opened.deployment_id):
            stale = (
                f"the deployment of {target!r} changed while the cycle ran (it was deployment "
                f"{opened.deployment_id}, now {active.id if active else 'none'}); the candidate was judged "
                "against a policy that no longer serves, so it is not deployed"
            )
        elif deployment is None:
            candidate = get_policy(session, gate.candidate_policy_id)
            deployment = deploy(
                session,
                policy_id=candidate.id,
                name=target,
                reason=f"cycle {ctx.label}: {candidate.name} v{candidate.version} passed the gate ({_evidence(gate)})",
                actor="orchestrator",
                cycle_id=ctx.cycle_id,
            )
        event = deploy_event(session, deployment) if stale is None else None
    if stale is not None:
        not_deployed = DeployOutputs(deployed=False, reasons=[stale])
        return ctx.commit("deploy", lambda session: not_deployed, status="skipped")
    kill_point("deploy", "deployed")
    hook = None
    if ctx.env.deploy_hook is not None:
        hook = ctx.env.deploy_hook(event)
    deployed = DeployOutputs(
        deployed=True,
        deployment_id=event["deployment"]["id"],
        deployment_version=event["deployment"]["version"],
        policy_id=event["policy"]["id"],
        policy_version=event["policy"]["version"],
        hook=hook,
    )
    return ctx.commit("deploy", lambda session: deployed)


STAGE_FUNCTIONS: dict[str, Callable[[CycleContext], dict[str, Any]]] = {
    "open": stage_open,
    "sample": stage_sample,
    "gather": stage_gather,
    "snapshot": stage_snapshot,
    "train_pm": stage_train_pm,
    "improve": stage_improve,
    "evaluate": stage_evaluate,
    "human_eval": stage_human_eval,
    "gate": stage_gate,
    "deploy": stage_deploy,
}
"""each stage's function, in the order of ``STAGES``"""


# -- finishing -----------------------------------------------------------------------------------


def finish(ctx: CycleContext) -> Cycle:
    """Mark the cycle succeeded (closing its open tasks); a halt or a rejected candidate's reasons become its reason."""
    with ctx.db.session() as session:
        runs = {r.stage: r for r in get_cycle(session, ctx.cycle_id).stages}
        halt = next((runs[st].outputs["halt"] for st in STAGES if st in runs and runs[st].outputs.get("halt")), None)
    reason = halt
    if halt is None:
        deployed = ctx.outputs("deploy", DeployOutputs)
        if not deployed.deployed:
            candidate = ctx.outputs("improve", ImproveOutputs)
            reason = (
                f"candidate policy {ctx.outputs('open', OpenOutputs).policy_name} v{candidate.policy_version} was not "
                "deployed: " + "; ".join(deployed.reasons)
            )
    with ctx.db.session() as session:
        cycle = get_cycle(session, ctx.cycle_id)
        if cycle.status == "running":
            cycle = finish_cycle(session, cycle_id=ctx.cycle_id, status="succeeded", reason=reason)
        return cycle


# -- what the stages share ---------------------------------------------------------------------


def own_name(name: str, target: str) -> str:
    """A name a cycle registers under without a setting for it (its samples): as it is for the default target,
    ``<name>@<target>`` for another, so two targets' versions never mix."""
    return name if target == DEFAULT_TARGET else f"{name}@{target}"


def _seed(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (the cycle's week and a stage's own seed)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big") >> 1


def _split_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    if prefix:
        return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return {k: v for k, v in metrics.items() if not k.startswith("test_pm/")}


def _prompt_line(record: dict[str, Any]) -> dict[str, Any]:
    """A prompt-set line as the sample step reads it: id and text, and a chat prompt's messages."""
    line = {"id": record["id"], "prompt": prompt_text(record)}
    if record.get("messages"):
        line["messages"] = record["messages"]
    return line


def chat_messages(records: list[dict[str, Any]], *, id_key: str) -> dict[tuple[str, str], list[dict[str, str]]]:
    """(prompt id, prompt text as stored) -> the prompt's messages, for the records (samples, prompt-set
    lines) of chat prompts; the key is what a task says of its prompt."""
    return {(str(r[id_key]), storable(prompt_text(r))): r["messages"] for r in records if r.get("messages")}


def with_messages(tasks: list[dict[str, Any]], messages: dict[tuple[str, str], list[dict[str, str]]]) -> list[dict[str, Any]]:
    """The tasks, a chat prompt's with its messages in ``metadata.messages``: what a rater answers is the
    HH-RLHF text, and the snapshot of the answers finds the messages there (``store.datasets``)."""
    if not messages:
        return tasks
    out = []
    for task in tasks:
        found = messages.get((task["prompt_id"], task["prompt"]))
        out.append(task if found is None else {**task, "metadata": {**task.get("metadata", {}), "messages": found}})
    return out


@dataclass(frozen=True)
class Arrivals:
    """What a waiting stage counts: answers so far and the tasks they answer."""

    answers: int
    """comparisons that count towards the minimum"""
    open_tasks: int
    """tasks of this cycle (of the kind waited on) still unanswered"""
    tasks: int
    """tasks of this cycle of that kind, in all"""


@dataclass(frozen=True)
class Waited:
    """How a wait for labelers ended."""

    outcome: str
    """enough (the minimum arrived, and every task with all_tasks), answered (every task answered, or none made,
    with fewer than the minimum: no more can come from this cycle's tasks), or deadline"""
    arrivals: Arrivals
    seconds: float


def wait_for_labelers(
    ctx: CycleContext, count: Callable[[Session], Arrivals], *, minimum: int, all_tasks: bool, deadline: datetime,
    poll_interval_s: float, what: str,
) -> Waited:
    """Poll ``count`` until the wait's outcome can no longer change: enough answers, every task answered, or
    the deadline (the env's clock and sleep, so tests need not wait). ``CycleNotRunning`` once an operator
    cancels the cycle."""
    t0 = time.perf_counter()
    while True:
        with ctx.db.session() as session:
            ctx.check_running(session)
            arrived = count(session)
        deliver_alerts(ctx.env)  # raters flagged while waiting (orchestrator.alerts); never raises
        if arrived.answers >= minimum and (not all_tasks or arrived.open_tasks == 0):
            outcome = "enough"
            break
        if arrived.open_tasks == 0:
            outcome = "answered"
            log.warning("cycle %s: every %s task is answered, with %d of the %d %s wanted; going on",
                        ctx.label, what, arrived.answers, minimum, what)
            break
        remaining = (deadline - ctx.env.clock()).total_seconds()
        if remaining <= 0:
            outcome = "deadline"
            log.warning("cycle %s: deadline reached with %d of %d %s", ctx.label, arrived.answers, minimum, what)
            break
        ctx.env.sleep(min(poll_interval_s, remaining))
    return Waited(outcome=outcome, arrivals=arrived, seconds=time.perf_counter() - t0)


def human_matches(session: Session, *, deploy_target: str) -> list[Match]:
    """Every finished human evaluation of the target's cycles, as Elo matches (candidate vs deployed policy)."""
    runs = session.scalars(select(StageRun).where(StageRun.stage == "human_eval", StageRun.status == "succeeded"))
    out = []
    for run in runs:
        verdict = HumanEvalOutputs.model_validate(run.outputs)
        if verdict.deploy_target == deploy_target and verdict.answers:
            out.append(Match(a=verdict.candidate_policy_id, b=verdict.baseline_policy_id, wins_a=verdict.wins,
                             ties=verdict.ties, wins_b=verdict.losses))
    return out


def gate_input(metrics: dict[str, Any], human: HumanEvalOutputs | None = None,
               pms: TrainPMOutputs | None = None) -> GateInput:
    """The gate's measurements: the evaluate step's metrics, the human verdict (None: off), the PMs' held-out accuracy."""
    names = {
        "win_rate_test_pm": "eval/win_rate_test_pm",
        "win_rate_train_pm": "eval/win_rate_train_pm",
        "kl": "eval/kl",
        "test_pm_delta": "eval/test_pm_delta",
        "train_pm_delta": "eval/train_pm_delta",
    }
    missing = [key for key in names.values() if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise InvalidInput(f"the evaluate step reported no {', '.join(missing)}; the gate cannot decide")
    extra: dict[str, Any] = {}
    if human is not None and human.enabled:
        extra["human"] = HumanVerdict(wins=human.wins, ties=human.ties, losses=human.losses,
                                      required=human.min_comparisons, tasks=human.tasks, outcome=human.outcome)
    if pms is not None:
        extra["train_pm"] = PMEvidence(accuracy=pms.heldout_accuracy, decisive=pms.heldout_decisive or 0)
        extra["test_pm"] = PMEvidence(accuracy=pms.test_pm_heldout_accuracy, decisive=pms.test_pm_heldout_decisive or 0)
    return GateInput(**{field: float(metrics[key]) for field, key in names.items()}, **extra)


def _evidence(gate: GateOutputs) -> str:
    """The gate's headline numbers, for a deployment's reason."""
    parts = []
    if gate.measures.get("human_win_rate") is not None:
        parts.append(f"human win rate {gate.measures['human_win_rate']:.3f}, "
                     f"lower bound {gate.measures['human_lower_bound']:.3f}")
    parts.append(f"test-PM win rate {gate.measured['win_rate_test_pm']:.3f}, KL {gate.measured['kl']:.4f}")
    return "; ".join(parts)
