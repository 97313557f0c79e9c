"""The dashboard joins each cycle with its flow run's state in Prefect (a real temporary server)."""

from __future__ import annotations

from prefect import flow, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from api.routes.dashboard import dashboard_data, flow_run_states
from store.cycles import claim_cycle, open_cycle


@flow(name="dashboard-probe")
def probe() -> None:
    """A flow that is never run: only its flow run's state is read."""


def test_each_cycle_shows_its_flow_runs_state(prefect_api, pg_db):
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe)
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W47")
        claim_cycle(s, cycle_id=cycle.id, flow_run_id=str(run.id))
        open_cycle(s, week="2026-W48")  # never claimed: no flow run to ask about
    data = dashboard_data(pg_db, weeks=12)
    assert data["prefect"] == "asked"
    assert [c["prefect_state"] for c in data["cycles"]] == [run.state.name, None]


def test_a_prefect_that_does_not_answer_is_reported_not_fatal(pg_db):
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W47")
        claim_cycle(s, cycle_id=cycle.id, flow_run_id="0b3d3b4e-5f4a-4b39-9c2e-1f2a3b4c5d6e")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert flow_run_states(["0b3d3b4e-5f4a-4b39-9c2e-1f2a3b4c5d6e"], timeout_s=1) is None
        data = dashboard_data(pg_db, weeks=12)
    assert data["prefect"] == "unreachable" and data["cycles"][0]["prefect_state"] is None
    assert flow_run_states(["not-a-uuid"]) == {}
