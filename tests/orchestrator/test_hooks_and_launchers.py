"""The deploy hook (command, webhook; rollback through the API and the CLI) and the cycle launchers
behind ``POST /v1/cycles``, against the real app and PostgreSQL."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from orchestrator.cli import app as cli_app
from orchestrator.hooks import DeployHook, HookFailed, api_on_deploy
from orchestrator.launcher import DeploymentLauncher, ThreadLauncher
from orchestrator.settings import CycleSettings
from orchestrator.service import create_service_app
from store.deployments import active_deployment, deploy
from store.keys import create_api_key
from store.settings import Settings, get_settings
from tests import builders

EVENT = {"event": "deploy", "target": "default", "deployment": {"id": 7}, "policy": {"version": 3}, "cycle": None}


def _writer(path) -> str:
    """A hook command that appends its stdin and $RATCHET_DEPLOY_EVENT to ``path``."""
    code = f"import os, sys; open({str(path)!r}, 'a').write(sys.stdin.read() + '\\n' + os.environ['RATCHET_DEPLOY_EVENT'] + '\\n')"
    return f"{sys.executable} -c \"{code}\""


def test_a_command_hook_gets_the_event_on_stdin_and_in_its_environment(tmp_path):
    hook = DeployHook(_writer(tmp_path / "events"))
    assert hook(EVENT) == {"kind": "command", "exit_status": 0}
    stdin, env = (tmp_path / "events").read_text().splitlines()
    assert json.loads(stdin) == json.loads(env) == EVENT
    with pytest.raises(HookFailed, match="exited 3: boom"):
        DeployHook(f"{sys.executable} -c \"import sys; sys.stderr.write('boom'); sys.exit(3)\"")(EVENT)
    with pytest.raises(HookFailed, match="failed"):
        DeployHook("/no/such/reload-command")(EVENT)


def test_a_webhook_is_posted_the_event_and_a_non_2xx_answer_fails(tmp_path):
    received, status = [], [204]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = DeployHook(f"http://127.0.0.1:{server.server_port}/reload", timeout_s=5)
        assert hook(EVENT) == {"kind": "webhook", "status": 204} and received == [EVENT]
        status[0] = 503
        with pytest.raises(HookFailed, match="answered 503"):
            hook(EVENT)
    finally:
        server.shutdown()


@pytest.fixture
def operator(pg_db) -> dict:
    with pg_db.session() as s:
        return {"Authorization": f"Bearer {create_api_key(s, name='ops', role='operator')[1]}"}


def _two_deploys(pg_db) -> tuple[int, int]:
    with pg_db.session() as s:
        p1, p2 = builders.policy(s).id, builders.policy(s).id
        deploy(s, policy_id=p1)
        deploy(s, policy_id=p2)
    return p1, p2


def test_a_rollback_through_the_api_calls_the_hook_once_committed(pg_db, artifacts, tmp_path, operator):
    p1, _ = _two_deploys(pg_db)
    seen = []

    def hook(event):
        with pg_db.session() as s:  # a serving stack reading the store at hook time sees the rollback
            seen.append((event, active_deployment(s).policy_id))

    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts, on_deploy=api_on_deploy(hook))
    with TestClient(app) as client:
        answer = client.post("/v1/deployments/rollback", json={"reason": "regression"}, headers=operator)
    assert answer.status_code == 201
    ((event, active_policy),) = seen
    assert event["event"] == "rollback" and event["policy"]["id"] == p1 == active_policy
    assert event["deployment"]["actor"] == "ops" and event["deployment"]["reason"] == "regression"


def test_ratchet_deploy_rollback_calls_the_hook(pg_db, pg_url, tmp_path, monkeypatch):
    p1, _ = _two_deploys(pg_db)
    monkeypatch.setenv("RATCHET_DATABASE_URL", pg_url)
    monkeypatch.setenv("RATCHET_DEPLOY_HOOK", _writer(tmp_path / "events"))
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(cli_app, ["deploy", "rollback", "--reason", "bad week"])
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output
    event = json.loads((tmp_path / "events").read_text().splitlines()[0])
    assert event["event"] == "rollback" and event["policy"]["id"] == p1
    assert json.loads(done.stdout.strip().splitlines()[-1]) == event


def test_post_cycles_opens_one_cycle_per_week_and_starts_it_once(pg_db, artifacts, tmp_path, operator):
    started = []
    launcher = ThreadLauncher(pg_db, CycleSettings(), run=lambda **kw: started.append(kw))
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts, cycle_launcher=launcher)
    with TestClient(app) as client:
        first = client.post("/v1/cycles", json={"week": "2026-W40", "params": {"ppo": {"config": {"learning_rate": 1e-4}}}},
                            headers=operator)
        second = client.post("/v1/cycles", json={"week": "2026-W40"}, headers=operator)
        locked = client.post("/v1/cycles", json={"week": "2026-W41", "params": {"gold": "os:system"}}, headers=operator)
        invalid = client.post("/v1/cycles", json={"week": "2026-W41", "params": {"ppo": {"config": {"learning_rate": -1}}}},
                              headers=operator)
    launcher.threads["2026-W40"].join(timeout=10)
    assert (first.status_code, first.json()["created"]) == (202, True)
    assert (second.status_code, second.json()["created"]) == (200, False)
    assert first.json()["cycle"]["id"] == second.json()["cycle"]["id"]
    assert first.json()["cycle"]["params"] == {"ppo": {"config": {"learning_rate": 1e-4}}} and first.json()["cycle"]["trigger"] == "api"
    assert started == [{"week": "2026-W40", "trigger": "api", "target": "default"}]
    assert locked.status_code == 422 and locked.json()["errors"][0]["field"] == "params.gold"
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["field"] == "params.ppo.config.learning_rate"


def test_the_production_launcher_creates_one_flow_run_per_week(pg_db, artifacts, tmp_path, operator, monkeypatch):
    import prefect.deployments

    calls = []

    def run_deployment(name, **kw):
        calls.append((name, kw))
        if kw["parameters"]["week"] == "2026-W43":
            raise RuntimeError("Prefect API unreachable")
        return type("FlowRun", (), {"id": "fr-1"})()

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    launcher = DeploymentLauncher(pg_db, CycleSettings(), deployment="weekly-cycle/weekly-cycle")
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts, cycle_launcher=launcher)
    with TestClient(app) as client:
        assert client.post("/v1/cycles", json={"week": "2026-W42"}, headers=operator).status_code == 202
        assert client.post("/v1/cycles", json={"week": "2026-W42"}, headers=operator).status_code == 200
        down = client.post("/v1/cycles", json={"week": "2026-W43"}, headers=operator)
    assert [(name, kw["idempotency_key"], kw["timeout"]) for name, kw in calls[:2]] == [
        ("weekly-cycle/weekly-cycle", "cycle:2026-W42", 0)] * 2  # the key makes the second call return the first run
    assert down.status_code == 503 and down.json()["detail"].startswith("cycle ") and "could not be created" in down.json()["detail"]


def test_ratchet_api_wires_the_launcher_its_settings_name(pg_url, tmp_path, operator):
    off = create_service_app(Settings(home=tmp_path, database_url=pg_url, cycle_launcher="off"))
    with TestClient(off) as client:
        assert client.post("/v1/cycles", json={}, headers=operator).status_code == 503
    prod = create_service_app(Settings(home=tmp_path, database_url=pg_url, deploy_hook="true"))
    assert isinstance(prod.state.cycle_launcher, DeploymentLauncher) and prod.state.on_deploy is not None
    embedded = create_service_app(Settings(home=tmp_path, cycle_launcher="thread", database_url=pg_url))
    assert isinstance(embedded.state.cycle_launcher, ThreadLauncher) and embedded.state.on_deploy is None
    for app in (off, prod, embedded):
        app.state.database.dispose()
