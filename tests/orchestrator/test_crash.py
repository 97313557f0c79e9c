"""Crash tests: the orchestrator process is SIGKILLed inside each stage in turn.

Each run of the child process dies at the next kill point (the stage is
running; the step ran and its outputs are uploaded; the eval tasks were
created; inside the transaction that registers its versions; the deployment
committed before its hook); the
next run resumes the same cycle. After the last run finishes it, the store
holds exactly one version of each output, the tasks were created once, and
no acknowledged comparison was lost.
"""

from __future__ import annotations

import json
import signal

from sqlalchemy import func, select

from store.models import (
    Comparison,
    ComparisonTask,
    Cycle,
    Dataset,
    Deployment,
    FeedbackBatch,
    Policy,
    PreferenceModel,
    dataset_batches,
)
from tests.orchestrator import crash_child
from tests.orchestrator.fakes import fake_world

WEEK = "2026-W20"

KILL_POINTS = [
    "open:in_commit",
    "sample:ran",
    "sample:in_commit",
    "gather:in_commit",
    "snapshot:in_commit",
    "train_pm:in_commit",
    "improve:in_step",
    "improve:in_commit",
    "evaluate:ran",
    "human_eval:started",
    "human_eval:tasks",
    "human_eval:in_commit",
    "gate:in_commit",
    "deploy:deployed",
    "deploy:in_commit",
]


def _child(pg_url, artifacts, work_dir, tmp_path, prefect_api, kill_at=None) -> tuple[int, str]:
    """One run of the child, forked from the fork server; its exit code and the end of its output."""
    args = [pg_url, artifacts.root_url, str(work_dir), WEEK, str(tmp_path / "acks"), str(tmp_path / "hook.log")]
    log = tmp_path / f"child-{kill_at or 'last'}.log"
    process = crash_child.start(args, kill_at=kill_at, prefect_api=prefect_api, log=log)
    process.join(timeout=120)
    if process.exitcode is None:
        process.kill()
        process.join()
    output = log.read_text(errors="replace") if log.exists() else ""
    return process.exitcode, output[-3000:]


def test_killed_inside_each_stage_the_reruns_finish_the_cycle_with_one_version_of_everything(
    prefect_api, pg_db, pg_url, artifacts, work_dir, tmp_path
):
    fake_world(pg_db, artifacts, work_dir)
    for point in KILL_POINTS:
        code, output = _child(pg_url, artifacts, work_dir, tmp_path, prefect_api, kill_at=point)
        assert code == -signal.SIGKILL, f"{point}: expected a SIGKILL, got {code}\n{output}"
    code, output = _child(pg_url, artifacts, work_dir, tmp_path, prefect_api)
    assert code == 0, output

    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        assert s.scalar(select(func.count()).select_from(Cycle)) == 1
        assert cycle.status == "succeeded"
        runs = {r.stage: r for r in cycle.stages}
        assert all(r.status == "succeeded" for r in runs.values())
        # every stage was interrupted at least once, so none finished on its first attempt
        assert all(runs[point.split(":")[0]].attempts >= 2 for point in KILL_POINTS)
        # exactly one version of each output
        assert s.scalar(select(func.count()).select_from(Dataset).where(Dataset.kind == "samples")) == 1
        assert s.scalar(select(func.count()).select_from(Dataset).where(Dataset.kind == "comparisons")) == 1
        assert s.scalar(select(func.count()).select_from(PreferenceModel)) == 2
        assert s.scalar(select(func.count()).select_from(Policy)) == 2
        assert s.scalar(select(func.count()).select_from(Deployment).where(Deployment.cycle_id == cycle.id)) == 1
        tasks = s.scalar(select(func.count()).select_from(ComparisonTask).where(ComparisonTask.cycle_id == cycle.id))
        # the training tasks and the eval tasks were each created once
        assert tasks == runs["sample"].outputs["tasks"] + runs["human_eval"].outputs["tasks"]
        assert runs["human_eval"].outputs["tasks"] > 0 and runs["human_eval"].outputs["answers"] >= 3
        # no lost comparisons: every batch the labeler saw committed is in the store, none answers a task twice
        acked = {int(line) for line in (tmp_path / "acks").read_text().split()}
        stored = set(s.scalars(select(FeedbackBatch.id)))
        assert acked and acked <= stored
        answered = list(s.scalars(select(Comparison.task_id).where(Comparison.task_id.is_not(None))))
        assert len(answered) == len(set(answered)) == tasks
        snapshot = s.get(Dataset, runs["snapshot"].outputs["dataset_id"])
        in_snapshot = set(s.scalars(select(dataset_batches.c.batch_id).where(dataset_batches.c.dataset_id == snapshot.id)))
        assert in_snapshot <= stored
        assert snapshot.row_count == s.scalar(
            select(func.sum(FeedbackBatch.comparison_count)).where(FeedbackBatch.id.in_(in_snapshot)))
        assert runs["gather"].outputs["comparisons"] <= snapshot.row_count
    # the deploy hook was called (again) after the kill between the deployment and the hook
    events = [json.loads(line) for line in (tmp_path / "hook.log").read_text().splitlines() if line.strip()]
    assert events and {e["deployment"]["id"] for e in events} == {runs["deploy"].outputs["deployment_id"]}
