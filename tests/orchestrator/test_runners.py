"""Step runners: uploads keyed by (week, stage), fetched inputs verified, and the deployment runner's
idempotency keys (a re-run finds the GPU job it started instead of starting a second one)."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.runners import DeploymentRunner, InProcessRunner, StepFailed, StepOutcome, StepRequest
from store.artifacts import ArtifactRef, ArtifactStore
from store.errors import ChecksumMismatch


def _request(**kw) -> StepRequest:
    base = dict(step="ppo", key="2026-W05:ppo", config={"total_episodes": 64}, inputs={}, outputs=["policy"],
                artifact_prefix="cycles/2026-W05/ppo")
    return StepRequest(**{**base, **kw})


def test_requests_and_outcomes_survive_a_trip_through_json():
    ref = ArtifactRef("file:///a/b", "0" * 64, 3, True)
    request = _request(inputs={"policy_path": ref}, input_sets={"policies": {"p0": ref}})
    assert StepRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    outcome = StepOutcome(result={"metrics": {"ppo/kl": 0.1}}, outputs={"policy": ref}, compute_s=1.5)
    assert StepOutcome.from_dict(json.loads(json.dumps(outcome.to_dict()))) == outcome
    assert request.work_subdir == "2026-W05/ppo"
    assert request.step_config(lambda r: "/local") == {"total_episodes": 64, "policy_path": "/local",
                                                       "policies": {"p0": "/local"}}


def test_a_reupload_of_a_stage_output_replaces_files_left_by_an_earlier_attempt(tmp_path, artifacts):
    runner = InProcessRunner(artifacts, tmp_path / "work")
    first = tmp_path / "first"
    first.mkdir()
    (first / "model.safetensors").write_bytes(b"old")
    (first / "stale.bin").write_bytes(b"from a crashed attempt")
    runner.upload(_request(), "policy", first, None)
    second = tmp_path / "second"
    second.mkdir()
    (second / "model.safetensors").write_bytes(b"new")
    ref = runner.upload(_request(), "policy", second, None)
    assert ref.uri.endswith("cycles/2026-W05/ppo/policy") and ref.is_dir
    artifacts.verify(ref)  # the manifest holds exactly the new files
    with pytest.raises(StepFailed, match="changed between the step and the upload"):
        runner.upload(_request(), "policy", second, "f" * 64)


def test_inputs_on_a_remote_store_are_fetched_once_and_verified(tmp_path):
    remote = ArtifactStore(f"memory://ratchet-test-{uuid.uuid4().hex}")
    ref = remote.put_bytes("datasets/d.jsonl", b'{"x": 1}\n')
    runner = InProcessRunner(remote, tmp_path / "work")
    path = Path(runner.localize(ref))
    assert path.read_bytes() == b'{"x": 1}\n' and path.parent == tmp_path / "work" / "cache"
    assert runner.localize(ref) == str(path)  # cached by content
    bad = ArtifactRef(ref.uri, "0" * 64, ref.size_bytes)
    with pytest.raises(ChecksumMismatch):
        runner.localize(bad)


class FakePrefect:
    """The slice of Prefect's sync client the deployment runner uses, over an in-memory run table."""

    def __init__(self, runs: dict[str, str] | None = None, finish_as: str = "COMPLETED"):
        self.runs = {key: SimpleNamespace(id=uuid.uuid4(), key=key, state=_state(s)) for key, s in (runs or {}).items()}
        self.finish_as = finish_as
        self.created: list[tuple[str, dict]] = []

    @contextmanager
    def __call__(self):
        yield self

    def read_deployment_by_name(self, name):
        return SimpleNamespace(id=uuid.uuid4(), name=name, work_pool_name="gpu")

    def read_flow_runs(self, flow_run_filter, deployment_filter, limit):
        key = flow_run_filter.idempotency_key.any_[0]
        return [self.runs[key]] if key in self.runs else []

    def create_flow_run_from_deployment(self, deployment_id, parameters, idempotency_key, tags):
        self.created.append((idempotency_key, parameters))
        run = SimpleNamespace(id=uuid.uuid4(), key=idempotency_key, state=_state("SCHEDULED"))
        self.runs[idempotency_key] = run
        return run

    def read_flow_run(self, flow_run_id):
        run = next(r for r in self.runs.values() if r.id == flow_run_id)
        if not run.state.is_final():
            run.state = _state(self.finish_as)  # it runs, then finishes
        return run


def _state(name: str):
    final = name in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    return SimpleNamespace(type=name, message=f"{name.lower()} run", is_final=lambda: final)


@pytest.fixture
def outcome_written(artifacts):
    """The worker flow's result.json for the request, as the GPU job writes it."""
    outcome = StepOutcome(result={"metrics": {"ppo/kl": 0.2}}, outputs={"policy": ArtifactRef("file:///p", "1" * 64, 1, True)},
                          compute_s=42.0)
    artifacts.put_bytes("cycles/2026-W05/ppo/result.json", json.dumps(outcome.to_dict()).encode())
    return outcome


def _runner(artifacts, prefect) -> DeploymentRunner:
    return DeploymentRunner(artifacts, {"ppo": "ratchet-step/ppo"}, poll_interval_s=0, client_factory=prefect)


def test_the_first_attempt_runs_under_the_week_stage_key(artifacts, outcome_written):
    prefect = FakePrefect()
    outcome = _runner(artifacts, prefect).run(_request())
    assert [key for key, _ in prefect.created] == ["2026-W05:ppo"]
    assert prefect.created[0][1] == {"request": _request().to_dict()}
    assert outcome.compute_s == 42.0 and outcome.extra["key"] == "2026-W05:ppo"


def test_a_rerun_finds_the_job_it_started_instead_of_starting_another(artifacts, outcome_written):
    prefect = FakePrefect(runs={"2026-W05:ppo": "RUNNING"})
    _runner(artifacts, prefect).run(_request())
    assert prefect.created == []  # waited for the running job, read its outcome


def test_after_a_failed_attempt_the_next_attempt_gets_the_next_key(artifacts, outcome_written):
    prefect = FakePrefect(runs={"2026-W05:ppo": "FAILED", "2026-W05:ppo:2": "CRASHED"})
    outcome = _runner(artifacts, prefect).run(_request())
    assert [key for key, _ in prefect.created] == ["2026-W05:ppo:3"] and outcome.extra["key"] == "2026-W05:ppo:3"


def test_a_job_that_fails_now_fails_the_step(artifacts):
    prefect = FakePrefect(finish_as="FAILED")
    with pytest.raises(StepFailed, match="ended FAILED: failed run"):
        _runner(artifacts, prefect).run(_request())
    with pytest.raises(StepFailed, match="no Prefect deployment"):
        _runner(artifacts, prefect).run(_request(step="sample"))


class StillRunning(FakePrefect):
    """A step job that runs until it is told otherwise; what the runner set on it is kept."""

    def __init__(self):
        super().__init__(finish_as="RUNNING")
        self.set_states: list[tuple[object, str]] = []

    def set_flow_run_state(self, flow_run_id, state, force):
        self.set_states.append((flow_run_id, state.type.value))


def test_a_cancelled_cycle_cancels_the_step_job_it_waits_on(artifacts):
    from workers.common.stopping import stop_when

    prefect = StillRunning()
    polls = []

    def cancelled() -> bool:  # the operator cancels while the job runs: the third look finds it
        polls.append(1)
        return len(polls) >= 3

    with stop_when(cancelled, every_s=0), pytest.raises(StepFailed, match="cancelled with its cycle"):
        _runner(artifacts, prefect).run(_request())
    run = prefect.runs["2026-W05:ppo"]
    assert prefect.set_states == [(run.id, "CANCELLING")]
    assert prefect.created[0][0] == "2026-W05:ppo"
