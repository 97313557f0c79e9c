"""Several deployment targets: a cycle per (target, week), on PostgreSQL under the session's Prefect harness.

Two targets ("default" and "b", each with its own deployed P0 and prompt sets) run the same week side by
side: two cycles, each deploying to its own target, with their own PMs (``pm``, ``pm@b``), snapshots
(``comparisons``, ``comparisons@b``) of disjoint task answers, step keys and artifact folders; a cancel of
one leaves the other running. The naming rule of ``resolve`` (a target's own names unless set explicitly),
the feedback rule of snapshots and of gather's count (own cycles' answers, answers to no task, and the
targets of ``feedback_from``), the launchers' keys and the API's ``target`` are checked by hand.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from orchestrator.flow import report_key, use_env, weekly_cycle
from orchestrator.launcher import DeploymentLauncher, ThreadLauncher, cycle_run_key
from orchestrator.operations import cancel, cancel_flow_runs, of_target
from orchestrator.runners import StepOutcome, StepRequest
from orchestrator.settings import CycleSettings, resolve
from store.artifacts import ArtifactStore
from store.cycles import find_cycle, open_cycle
from store.datasets import snapshot_comparisons
from store.deployments import active_deployment
from store.errors import InvalidInput
from store.feedback import count_comparisons, create_feedback_batch
from store.keys import create_api_key
from store.models import ComparisonTask, Cycle, Dataset, Policy, PreferenceModel
from store.settings import Settings, get_settings
from store.tasks import create_tasks, lease_tasks, rater_progress
from tests import builders
from tests.orchestrator.fakes import FakeRunner, StoreLabeler, fake_world, fast_settings, wait_for

WEEK = "2026-W36"


# -- the naming rule, by hand ------------------------------------------------------------------------


def test_a_targets_names_are_its_own_unless_set_explicitly():
    built_in = CycleSettings()
    own = resolve(built_in, None, target="b")
    assert (own.deploy_target, own.prompt_set, own.evaluate.prompt_set, own.pm.name, own.pm.test_name,
            own.snapshot_name) == ("b", "prompts@b", "eval-prompts@b", "pm@b", "test-pm@b", "comparisons@b")
    # set explicitly, by the trigger's params or in the server's file, a name is shared as given
    shared = resolve(CycleSettings.model_validate({"evaluate": {"prompt_set": "eval-prompts"}}),
                     {"deploy_target": "b", "pm": {"name": "pm"}, "snapshot_name": "comparisons"})
    assert (shared.prompt_set, shared.evaluate.prompt_set, shared.pm.name, shared.pm.test_name,
            shared.snapshot_name) == ("prompts@b", "eval-prompts", "pm", "test-pm@b", "comparisons")
    # the default target's names are as before; settings resolved again are not suffixed twice
    assert resolve(built_in, None) == built_in == resolve(built_in, None, target="default")
    assert resolve(own, None, target="b") == own
    assert resolve(CycleSettings(), {"evaluate": {"prompt_set": None}}, target="b").evaluate.prompt_set is None
    assert own.feedback_targets() == ["b"]
    assert resolve(built_in, {"feedback_from": ["default", "b"]}, target="b").feedback_targets() == ["b", "default"]


def test_a_target_and_a_params_deploy_target_that_differ_are_refused():
    with pytest.raises(InvalidInput, match="differ") as refused:
        resolve(CycleSettings(), {"deploy_target": "c"}, target="b")
    assert refused.value.errors[0]["field"] == "params.deploy_target"
    with pytest.raises(InvalidInput) as bad:
        resolve(CycleSettings(), {"deploy_target": "a/b"})
    assert bad.value.errors[0]["field"] == "params.deploy_target" and "'/'" in bad.value.errors[0]["message"]


def test_a_rerun_of_a_cycle_recorded_before_targets_sees_no_new_setting_changed():
    from orchestrator.cycle import jsonable
    from orchestrator.rerun import changed_settings
    from orchestrator.settings import with_later_fields

    new = jsonable(resolve(CycleSettings(), None).model_dump(mode="json"))
    old = {k: v for k, v in new.items() if k not in ("snapshot_name", "feedback_from")}
    assert changed_settings(old, new) == ["feedback_from", "snapshot_name"]
    assert changed_settings(with_later_fields(old), new) == []


def test_keys_of_the_default_target_are_as_before_and_another_targets_its_own():
    assert cycle_run_key("2026-W36") == "cycle:2026-W36" and cycle_run_key("2026-W36", "default", 2) == "cycle:2026-W36:a2"
    assert cycle_run_key("2026-W36", "b") == "cycle:b:2026-W36" and cycle_run_key("2026-W36", "b", 3) == "cycle:b:2026-W36:a3"
    assert report_key("2026-W36", "default") == "cycle-2026-w36" and report_key("2026-W36", "EU_prod") == "cycle-eu-prod-2026-w36"
    assert of_target(["ratchet", "week:W", "target:b", "stage:sample"], "W", "b")
    assert not of_target(["week:W", "target:b"], "W", "default")
    assert of_target(["week:W", "stage:sample"], "W", "default")  # a step run started before targets
    assert not of_target(["week:W", "stage:sample"], "W", "b")


# -- the feedback rule, on both backends -------------------------------------------------------------


def _tasks(session, cycle_id: int, n: int, start: int) -> list[ComparisonTask]:
    """``n`` train tasks of the cycle."""
    return create_tasks(session, cycle_id=cycle_id, tasks=[
        {"prompt": f"p{start + i}", "response_a": "x", "response_b": "y"} for i in range(n)])


def test_a_targets_snapshot_and_count_take_its_own_answers_answers_to_no_task_and_feedback_from(db, artifacts):
    from datetime import timedelta

    from store.feedback import NewComparison

    with db.session() as s:
        a, _ = open_cycle(s, week=WEEK)
        b, _ = open_cycle(s, week=WEEK, target="b")
        _tasks(s, a.id, 2, 0)
        _tasks(s, b.id, 3, 10)
        leased = [x.task for x in lease_tasks(s, rater_id="r", limit=10, lease=timedelta(minutes=5))]
        # one batch answers both cycles' tasks; another answers no task (an import)
        mixed, _ = create_feedback_batch(s, source="tool", comparisons=[
            NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b, choice="a",
                          rater_id="r", task_id=t.id) for t in leased])
        builders.batch(s, n=4, start=100)
        tasks_of = {t.id: t.cycle_id for t in leased}
        assert sorted(tasks_of.values()) == [a.id] * 2 + [b.id] * 3

        def snapshot(name, targets):
            dataset, _ = snapshot_comparisons(s, artifacts=artifacts, name=name, targets=targets)
            rows = [json.loads(line) for line in artifacts.read_bytes(dataset.artifact.uri, dataset.artifact.sha256)
                    .decode().splitlines()]
            return dataset, [tasks_of.get(r.get("task_id")) for r in rows]

        everything, _ = snapshot("comparisons", None)
        own_a, cycles_a = snapshot("comparisons-a", ["default"])
        own_b, cycles_b = snapshot("comparisons@b", ["b"])
        both, cycles_both = snapshot("comparisons@c", ["b", "default"])
        assert sorted(cycles_a, key=str) == [a.id, a.id] + [None] * 4
        assert sorted(cycles_b, key=str) == [b.id] * 3 + [None] * 4
        assert everything.row_count == both.row_count == 9 and everything.content_sha256 == both.content_sha256
        assert own_a.meta["excluded_target_comparisons"] == 3 and own_b.meta["excluded_target_comparisons"] == 2
        assert "excluded_target_comparisons" not in everything.meta
        assert {mixed.id} <= {batch.id for batch in own_a.batches} & {batch.id for batch in own_b.batches}
        assert count_comparisons(s, training_only=True) == 9
        assert count_comparisons(s, training_only=True, targets=["default"]) == 6
        assert count_comparisons(s, training_only=True, targets=["b"]) == 7
        assert count_comparisons(s, targets=["b", "default"]) == 9


def test_a_rater_is_handed_and_counts_the_tasks_of_every_running_cycle(db):
    from datetime import timedelta

    with db.session() as s:
        a, _ = open_cycle(s, week=WEEK)
        b, _ = open_cycle(s, week=WEEK, target="b")
        _tasks(s, a.id, 1, 0)
        _tasks(s, b.id, 1, 1)
        create_tasks(s, tasks=[{"prompt": "no cycle", "response_a": "x", "response_b": "y"}])
        from store.cycles import running_cycle_ids

        leased = lease_tasks(s, rater_id="r", limit=10, lease=timedelta(minutes=5), cycle_ids=running_cycle_ids(s))
        assert sorted(x.task.cycle_id for x in leased) == sorted([a.id, b.id])  # not the task of no cycle
        progress = rater_progress(s, rater_id="r")
        assert progress.open_tasks == 2 and progress.answered_in_cycle == 0
        assert progress.cycle_week == f"{WEEK}@b, {WEEK}"


# -- two targets' cycles of one week, side by side ------------------------------------------------------


class RecordingRunner(FakeRunner):
    """The fake runner, keeping each request (its key, artifact prefix and tags)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.requests: list[StepRequest] = []
        self._lock = threading.Lock()

    def run(self, request: StepRequest) -> StepOutcome:
        with self._lock:
            self.requests.append(request)
        return super().run(request)


@pytest.fixture
def two_targets(pg_db, artifacts, work_dir, fake_env):
    """The fake world of the default target and of target "b" (its own P0, prompts@b, eval-prompts@b), with
    server defaults that name none of the target's names explicitly, and a runner that records requests."""
    fake_world(pg_db, artifacts, work_dir, target="b")
    defaults = fast_settings().model_dump(exclude_unset=True)
    defaults.pop("evaluate")  # fast_settings names evaluate.prompt_set explicitly: target b would share it
    fake_env.defaults = CycleSettings.model_validate(defaults)
    fake_env._runner = RecordingRunner(artifacts, work_dir)
    return fake_env


def _run_in_threads(env, *targets, week=WEEK) -> tuple[dict, dict, dict]:
    """Each target's cycle of ``week`` in a thread of its own, as the API's thread launcher runs them: the
    threads, and the summaries and errors they leave, by target."""
    results, errors = {}, {}

    def run(target):
        try:
            with use_env(env):
                results[target] = weekly_cycle(week=week, target=target)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors[target] = exc

    threads = {t: threading.Thread(target=run, args=(t,), name=f"cycle-{t}") for t in targets}
    for thread in threads.values():
        thread.start()
    return threads, results, errors


def _artifact_uris(session, cycle_id: int) -> set[str]:
    rows = [*session.scalars(select(PreferenceModel).where(PreferenceModel.cycle_id == cycle_id)),
            *session.scalars(select(Policy).where(Policy.cycle_id == cycle_id)),
            *session.scalars(select(Dataset).where(Dataset.cycle_id == cycle_id, Dataset.kind == "samples"))]
    return {row.artifact.uri for row in rows}


def _snapshot_task_cycles(session, artifacts: ArtifactStore, dataset_id: int) -> set[int | None]:
    dataset = session.get(Dataset, dataset_id)
    rows = [json.loads(line) for line in
            artifacts.read_bytes(dataset.artifact.uri, dataset.artifact.sha256).decode().splitlines()]
    task_ids = [r["task_id"] for r in rows if "task_id" in r]
    return set(session.scalars(select(ComparisonTask.cycle_id).where(ComparisonTask.id.in_(task_ids))))


def test_two_targets_run_the_same_week_side_by_side(prefect_api, two_targets, pg_db, pg_url, artifacts, work_dir,
                                                     monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app as cli_app

    with StoreLabeler(pg_db):
        threads, results, errors = _run_in_threads(two_targets, "default", "b")
        for thread in threads.values():
            thread.join(timeout=120)
    assert not errors, errors
    assert {t: (r["status"], r["deployed"]) for t, r in results.items()} == {
        "default": ("succeeded", True), "b": ("succeeded", True)}
    with pg_db.session() as s:
        a, b = find_cycle(s, week=WEEK), find_cycle(s, week=WEEK, target="b")
        assert (a.deploy_target, b.deploy_target) == ("default", "b") and a.id != b.id
        out_a = {r.stage: r.outputs for r in a.stages}
        out_b = {r.stage: r.outputs for r in b.stages}
        # each deploys to its own target, a candidate of its own P0
        assert active_deployment(s).cycle_id == a.id and active_deployment(s, name="b").cycle_id == b.id
        assert s.get(Policy, active_deployment(s, name="b").policy_id).name == "policy@b"
        assert s.get(Policy, active_deployment(s).policy_id).name == "policy"
        # their own names, recorded as they were used
        settings_b = out_b["open"]["settings"]
        assert (settings_b["prompt_set"], settings_b["evaluate"]["prompt_set"], settings_b["snapshot_name"]) == (
            "prompts@b", "eval-prompts@b", "comparisons@b")
        pms = {(s.get(PreferenceModel, o["train_pm"]["pm_id"]).name, s.get(PreferenceModel, o["train_pm"]["test_pm_id"]).name)
               for o in (out_a, out_b)}
        assert pms == {("pm", "test-pm"), ("pm@b", "test-pm@b")}
        snapshots = {s.get(Dataset, o["snapshot"]["dataset_id"]).name for o in (out_a, out_b)}
        assert snapshots == {"comparisons", "comparisons@b"}
        assert {s.get(Dataset, o["sample"]["samples_dataset_id"]).name for o in (out_a, out_b)} == {"samples", "samples@b"}
        # each snapshot holds the answers to its own cycle's tasks only (the labeler's batches mixed both)
        assert _snapshot_task_cycles(s, artifacts, out_a["snapshot"]["dataset_id"]) == {a.id}
        assert _snapshot_task_cycles(s, artifacts, out_b["snapshot"]["dataset_id"]) == {b.id}
        # no artifact folder shared
        uris_a, uris_b = _artifact_uris(s, a.id), _artifact_uris(s, b.id)
        assert uris_a and uris_b and not uris_a & uris_b
        assert all(f"/cycles/{WEEK}/" in u for u in uris_a) and all(f"/cycles/b/{WEEK}/" in u for u in uris_b)
    requests = two_targets.runner_for(two_targets.defaults).requests
    keys = {r.key for r in requests}
    assert {f"{WEEK}:sample", f"{WEEK}:train_pm", f"{WEEK}:improve", f"{WEEK}:evaluate"} <= keys
    assert {f"{WEEK}@b:sample", f"{WEEK}@b:train_pm", f"{WEEK}@b:improve", f"{WEEK}@b:evaluate"} <= keys
    assert len(keys) == len(requests)  # no step ran twice, nor under the other cycle's key
    for r in requests:
        mine = "b" if "@b:" in r.key else "default"
        assert r.tags == [f"week:{WEEK}", f"target:{mine}"]
        assert r.artifact_prefix.startswith(f"cycles/{WEEK}/" if mine == "default" else f"cycles/b/{WEEK}/")
    assert (work_dir / WEEK / "sample").is_dir() and (work_dir / f"{WEEK}@b" / "sample").is_dir()
    # the CLI finds each by --target
    monkeypatch.setenv("RATCHET_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    try:
        shown_b = CliRunner().invoke(cli_app, ["cycle", "show", "--week", WEEK, "--target", "b"])
        shown = CliRunner().invoke(cli_app, ["cycle", "show", "--week", WEEK])
        missing = CliRunner().invoke(cli_app, ["cycle", "show", "--week", WEEK, "--target", "c"])
    finally:
        get_settings.cache_clear()
    assert json.loads(shown_b.stdout)["cycle_id"] == b.id and json.loads(shown.stdout)["cycle_id"] == a.id
    assert json.loads(shown_b.stdout)["deploy_target"] == "b"
    assert missing.exit_code == 2 and missing.stderr == f"error: there is no cycle for week {WEEK} of target 'c'\n"


def test_a_cancel_of_one_targets_cycle_leaves_the_other_running(prefect_api, two_targets, pg_db):
    from prefect.exceptions import CancelledRun

    def in_gather(target):
        with pg_db.session() as s:
            cycle = find_cycle(s, week=WEEK, target=target)
            return cycle is not None and any(r.stage == "gather" and r.status == "running" for r in cycle.stages)

    threads, results, errors = _run_in_threads(two_targets, "default", "b")  # no labeler yet: both wait
    wait_for(lambda: in_gather("default") and in_gather("b"), timeout_s=60)
    with pg_db.session() as s:
        b_id = find_cycle(s, week=WEEK, target="b").id
    done = cancel(pg_db, cycle_id=b_id, actor="ops", via="api", reason="wrong product")
    assert (done["target"], done["status"]) == ("b", "cancelled")
    threads["b"].join(timeout=30)
    assert isinstance(errors.get("b"), CancelledRun)
    assert in_gather("default")  # the other target's cycle waits on, untouched
    with StoreLabeler(pg_db):
        threads["default"].join(timeout=120)
    assert results["default"]["status"] == "succeeded" and "default" not in errors
    with pg_db.session() as s:
        a, b = find_cycle(s, week=WEEK), find_cycle(s, week=WEEK, target="b")
        assert (a.status, b.status) == ("succeeded", "cancelled") and b.reason == "cancelled by ops: wrong product"
        assert {t.status for t in s.scalars(select(ComparisonTask).where(ComparisonTask.cycle_id == b.id))} == {"closed"}
        assert active_deployment(s, name="b").cycle_id is None  # b's P0 still serves


def test_a_cancel_tells_prefect_of_its_own_targets_step_runs_only(prefect_api):
    from prefect import flow, get_client

    @flow(name="step-probe")
    def probe() -> None:
        """Never run: only its flow runs' tags and states are read."""

    with get_client(sync_client=True) as client:
        runs = {name: client.create_flow_run(probe, tags=["ratchet", *tags]) for name, tags in {
            "b": ["week:2026-W37", "target:b"], "default": ["week:2026-W37", "target:default"],
            "legacy": ["week:2026-W37"], "other week": ["week:2026-W38", "target:b"]}.items()}
        answer = cancel_flow_runs("2026-W37", "b", None)
        states = {name: client.read_flow_run(run.id).state.type.value for name, run in runs.items()}
    assert answer == {"asked": True, "cancelled": [str(runs["b"].id)]}
    assert states == {"b": "CANCELLING", "default": "PENDING", "legacy": "PENDING", "other week": "PENDING"}


# -- surfaces: launchers, the API -------------------------------------------------------------------


@pytest.fixture
def operator(pg_db) -> dict:
    with pg_db.session() as s:
        return {"Authorization": f"Bearer {create_api_key(s, name='ops', role='operator')[1]}"}


def test_post_cycles_opens_a_cycle_per_target_and_week_and_lists_them_by_target(pg_db, artifacts, tmp_path, operator):
    started = []
    launcher = ThreadLauncher(pg_db, CycleSettings(), run=lambda **kw: started.append(kw))
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts, cycle_launcher=launcher)
    with TestClient(app) as client:
        a = client.post("/v1/cycles", json={"week": WEEK}, headers=operator)
        b = client.post("/v1/cycles", json={"week": WEEK, "target": "b"}, headers=operator)
        b_again = client.post("/v1/cycles", json={"week": WEEK, "params": {"deploy_target": "b"}}, headers=operator)
        differ = client.post("/v1/cycles", json={"week": WEEK, "target": "b", "params": {"deploy_target": "c"}},
                             headers=operator)
        slash = client.post("/v1/cycles", json={"week": WEEK, "target": "a/b"}, headers=operator)
        only_b = client.get("/v1/cycles?target=b", headers=operator).json()
        every = client.get("/v1/cycles", headers=operator).json()
    for thread in launcher.threads.values():
        thread.join(timeout=10)
    assert (a.status_code, b.status_code, b_again.status_code) == (202, 202, 200)
    assert (a.json()["cycle"]["deploy_target"], b.json()["cycle"]["deploy_target"]) == ("default", "b")
    assert b_again.json()["cycle"]["id"] == b.json()["cycle"]["id"] != a.json()["cycle"]["id"]
    assert differ.status_code == 422 and differ.json()["errors"][0]["field"] == "params.deploy_target"
    assert slash.status_code == 422 and "target" in json.dumps(slash.json()["errors"])
    assert [c["deploy_target"] for c in only_b["data"]] == ["b"] and every["count"] == 2
    assert sorted(started, key=lambda kw: kw["target"]) == [
        {"week": WEEK, "trigger": "api", "target": "b"}, {"week": WEEK, "trigger": "api", "target": "default"}]
    assert set(launcher.threads) == {WEEK, f"{WEEK}@b"}  # two targets' same week run side by side


def test_the_production_launcher_keys_another_targets_flow_run_by_its_target(pg_db, artifacts, tmp_path, operator,
                                                                               monkeypatch):
    import prefect.deployments

    calls = []
    monkeypatch.setattr(prefect.deployments, "run_deployment",
                        lambda name, **kw: calls.append(kw) or type("FlowRun", (), {"id": "fr-3"})())
    launcher = DeploymentLauncher(pg_db, CycleSettings(), deployment="weekly-cycle/weekly-cycle")
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts, cycle_launcher=launcher)
    with TestClient(app) as client:
        assert client.post("/v1/cycles", json={"week": WEEK}, headers=operator).status_code == 202
        assert client.post("/v1/cycles", json={"week": WEEK, "target": "b"}, headers=operator).status_code == 202
    assert [(c["idempotency_key"], c["parameters"]) for c in calls] == [
        (f"cycle:{WEEK}", {"week": WEEK, "trigger": "api", "target": "default"}),
        (f"cycle:b:{WEEK}", {"week": WEEK, "trigger": "api", "target": "b"})]


def test_open_cycle_refuses_a_target_that_cannot_be_a_folder(db):
    with db.session() as s, pytest.raises(InvalidInput, match="segment of keys and folders") as refused:
        open_cycle(s, week=WEEK, target="../etc")
    assert refused.value.errors[0]["field"] == "target"
    with db.session() as s:
        assert s.scalar(select(Cycle.id)) is None


def test_fake_world_of_another_target_is_its_own(pg_db, artifacts, tmp_path: Path):
    fake_world(pg_db, artifacts, tmp_path, target="b")
    with pg_db.session() as s:
        assert active_deployment(s) is None and active_deployment(s, name="b") is not None
        assert sorted(s.scalars(select(Dataset.name))) == ["eval-prompts@b", "prompts@b"]
