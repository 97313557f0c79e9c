"""``POST /v1/cycles`` through ``ratchet api``'s launchers: the 503s say what is wrong, and without ``PREFECT_API_URL``
nothing the API starts outlives it.

The production launcher (``deployment``) refuses with 503 and starts no Prefect server; the embedded one
(``thread``) runs its cycles on Prefect's temporary server and stops it when the API shuts down, on SIGTERM too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from orchestrator.service import create_service_app
from store.db import Database, upgrade
from store.keys import create_api_key
from store.settings import Settings

PREFECT_SERVER = "prefect.server.api.server:create_app"


def _prefect_servers(parent: psutil.Process) -> list[psutil.Process]:
    """The temporary Prefect servers among ``parent``'s descendants."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if PREFECT_SERVER in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def no_prefect_api():
    """No Prefect API configured, whatever the session's harness set."""
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not PREFECT_API_URL.value()
        yield


def test_the_production_launcher_refuses_without_prefect_api_url_and_starts_no_server(
    pg_db, pg_url, tmp_path, no_prefect_api
):
    with pg_db.session() as s:
        operator = {"Authorization": f"Bearer {create_api_key(s, name='ops-lifetime', role='operator')[1]}"}
    me = psutil.Process()
    before = {p.pid for p in _prefect_servers(me)}
    app = create_service_app(Settings(home=tmp_path, database_url=pg_url, cycle_launcher="deployment"))
    with TestClient(app) as client:
        r = client.post("/v1/cycles", json={"week": "2026-W44"}, headers=operator)
    app.state.database.dispose()
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "PREFECT_API_URL is not set" in detail and not detail.endswith("None"), detail
    assert {p.pid for p in _prefect_servers(me)} == before


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (ObjectNotFound(http_exc=RuntimeError("404")), "has no such deployment: register it with `prefect deploy"),
        (ConnectionError(), "failed (ConnectionError: no message); trigger the cycle again once it answers"),
    ],
)
def test_a_failed_flow_run_is_a_503_that_says_what_is_wrong(pg_db, pg_url, tmp_path, monkeypatch, failure, says):
    import prefect.deployments

    def run_deployment(name, **kw):
        raise failure  # what Prefect's client raises: str(ObjectNotFound(http_exc=...)) is "None"

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    with pg_db.session() as s:
        operator = {"Authorization": f"Bearer {create_api_key(s, name='ops-503', role='operator')[1]}"}
    app = create_service_app(Settings(home=tmp_path, database_url=pg_url, cycle_launcher="deployment"))
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.internal:4200/api"}), TestClient(app) as client:
        r = client.post("/v1/cycles", json={"week": "2026-W46"}, headers=operator)
    app.state.database.dispose()
    detail = r.json()["detail"]
    assert r.status_code == 503 and "None" not in detail, detail
    assert detail.startswith("cycle 2026-W46 is opened but its flow run could not be created on deployment "
                             "'weekly-cycle/weekly-cycle': the Prefect API at http://prefect.internal:4200/api ")
    assert says in detail, detail


def test_sigterm_stops_the_temporary_prefect_server_of_an_embedded_api(tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'ratchet.db'}"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        token = create_api_key(s, name="ops", role="operator")[1]
    db.dispose()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RATCHET_"))}
    env.update(RATCHET_HOME=str(home), RATCHET_LOG_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", DO_NOT_TRACK="1")
    api = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port)], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    servers: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert api.poll() is None, f"ratchet api exited: {api.stderr.read().decode()[-2000:]}"
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _wait(healthy, 20, "ratchet api to answer /healthz")
        # The first trigger starts the temporary server before it answers.
        r = httpx.post(f"{base}/v1/cycles", json={"week": "2026-W45"}, timeout=60,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202, r.text
        servers = _prefect_servers(psutil.Process(api.pid))
        assert len(servers) == 1 and servers[0].is_running()
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=20)
        survivors = [p for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors == [], f"Prefect server(s) {[p.pid for p in survivors]} outlived ratchet api"
    finally:
        if api.poll() is None:
            servers += _prefect_servers(psutil.Process(api.pid))
            api.kill()
            api.wait()
        for server in servers:
            if server.is_running():
                server.kill()
