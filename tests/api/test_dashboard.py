"""The operator dashboard on the real app and PostgreSQL: sign-in, roles, what it shows."""

from __future__ import annotations

import re

import pytest

from api.routes.dashboard import COOKIE, charts, dashboard_data
from store.cycles import finish_cycle, finish_stage, open_cycle, start_stage
from store.datasets import snapshot_comparisons
from store.deployments import deploy
from store.feedback import create_feedback_batch
from tests import builders

# What a finished cycle's stages record (orchestrator/stages.py), trimmed to what the dashboard reads.
STAGE_OUTPUTS = {
    "snapshot": {"rows": 5},
    "gather": {"comparisons": 5},
    "train_pm": {"pm_version": 1, "heldout_accuracy": 0.71, "heldout_ece": 0.08, "test_pm_heldout_accuracy": 0.66},
    "ppo": {"policy_version": 2, "reward": 0.42, "reward_test_pm": 0.18, "reward_spread": 0.3, "kl": 2.25},
    "evaluate": {"metrics": {"eval/win_rate_test_pm": 0.47, "eval/win_rate_train_pm": 0.74, "eval/kl": 2.1}},
    "human_eval": {"enabled": True, "answers": 60, "wins": 20, "ties": 10, "losses": 30, "win_rate": 25 / 60,
                   "elo_candidate": -58.0, "elo_baseline": 0.0},
    "gate": {"deploy": False, "reasons": ["test-PM win rate 0.470 is below the required 0.520"],
             "measures": {"human_lower_bound": 0.33, "human_bar": 0.5},
             "thresholds": {"win_margin": 0.02, "kl_budget": 1.0, "max_pm_gap": 0.2}},
    "deploy": {"deployed": False, "reasons": ["test-PM win rate 0.470 is below the required 0.520"]},
}


def token_of(headers: dict) -> str:
    """The API key in a ``bearer()`` header."""
    return headers["Authorization"].removeprefix("Bearer ")


def form_csrf(html: str) -> str:
    """The CSRF token of the (first) form on a dashboard page."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "the page has no CSRF field"
    return found.group(1)


def sign_in(client, headers: dict, **post_headers):
    """Sign in as a browser does: the form, then its POST (the answer, not followed)."""
    form = client.get("/dashboard/login")
    return client.post("/dashboard/login", data={"token": token_of(headers), "csrf": form_csrf(form.text)},
                       headers=post_headers, follow_redirects=False)


def seed(db, artifacts) -> None:
    """A finished cycle whose candidate the gate rejected, its feedback, and a deployed policy."""
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W47")
        batches = [
            create_feedback_batch(s, source=rater, comparisons=[builders.comparison(i, rater=rater) for i in range(n)])[0]
            for rater, n in (("r1", 3), ("r2", 2))
        ]
        dataset, _ = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b.id for b in batches], cycle_id=cycle.id)
        pm = builders.pm(s, dataset_id=dataset.id)
        p0 = builders.policy(s)
        p1 = builders.policy(s, init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm.id, cycle_id=cycle.id)
        deploy(s, policy_id=p1.id, actor="seed", reason="first policy <b>")
        for stage, outputs in STAGE_OUTPUTS.items():
            start_stage(s, cycle_id=cycle.id, stage=stage)
            finish_stage(s, cycle_id=cycle.id, stage=stage, outputs=outputs, compute_s=1.5,
                         status="skipped" if stage == "deploy" else "succeeded")
        finish_cycle(s, cycle_id=cycle.id, status="succeeded", reason="candidate rejected by the gate")


def test_a_browser_without_a_key_is_sent_to_sign_in(client):
    r = client.get("/dashboard", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    page = client.get("/dashboard/login")
    assert page.status_code == 200 and 'name="token"' in page.text


def test_sign_in_needs_an_operator_key_and_sets_a_strict_cookie(client, keys):
    bad = sign_in(client, {"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "unknown or revoked" in bad.text
    labeler = sign_in(client, keys.labeler)
    assert labeler.status_code == 403 and "needs an operator key" in labeler.text
    assert sign_in(client, keys.revoked).status_code == 401

    ok = sign_in(client, keys.operator)
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
    cookie = ok.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200 and "signed in as operator" in page.text
    assert "No cycle has run yet" in page.text and "Nothing is deployed" in page.text

    out = client.post("/dashboard/logout", data={"csrf": form_csrf(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and COOKIE in out.headers["set-cookie"]
    client.cookies.clear()
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_a_script_may_send_a_bearer_key(client, keys):
    assert client.get("/dashboard", headers=keys.admin).status_code == 200
    r = client.get("/dashboard", headers=keys.labeler)
    assert r.status_code == 403 and "labeler" in r.text
    assert client.get("/dashboard?weeks=0", headers=keys.admin).status_code == 422


def test_the_page_shows_cycles_the_deployed_lineage_and_charts(client, keys, pg_db, artifacts):
    seed(pg_db, artifacts)
    page = client.get("/dashboard", headers=keys.operator)
    assert page.status_code == 200
    html = page.text
    for text in ("2026-W47", "candidate rejected by the gate", "test-PM win rate 0.470 is below the required 0.520",
                 "0.710", "0.470", "0.417", "&ge; 0.330 of 60", "trained on", "first policy &lt;b&gt;"):  # stored text is escaped
        assert text in html, text
    assert "<b>" not in html.split("first policy", 1)[1][:20]
    for name in ("pm", "human", "win_rate", "elo", "pm_gap", "reward_kl", "feedback", "agreement"):
        assert f'id="chart-{name}"' in html, name
    assert html.count("<svg") == 8


def test_the_data_behind_the_page(pg_db, artifacts):
    seed(pg_db, artifacts)
    data = dashboard_data(pg_db, weeks=12)
    (cycle,) = data["cycles"]
    assert cycle["pm_accuracy"] == 0.71 and cycle["pm_ece"] == 0.08 and cycle["required_win_rate"] == pytest.approx(0.52)
    assert cycle["ppo_reward_test_pm"] == 0.18 and cycle["deployed"] is False
    assert (cycle["human_answers"], cycle["human_lower_bound"], cycle["elo_deployed"]) == (60, 0.33, 0.0)
    assert [c["kind"] for c in data["deployed"]["chain"]] == ["policy", "pm", "dataset"]
    assert data["deployed"]["feedback_batches"] == 2 and data["deployed"]["policies_before"] == 1
    (feedback,) = data["feedback"]
    assert feedback["comparisons"] == 5 and feedback["batches"] == 2
    # pairs 0 and 1 were judged by r1 and by r2, alike
    assert feedback["pairs_with_multiple_raters"] == 2 and feedback["agreement"] == 1.0
    svgs = charts(data)
    assert set(svgs) == {"pm", "human", "win_rate", "elo", "pm_gap", "reward_kl", "feedback", "agreement"}
    assert "2026-W47" in svgs["reward_kl"]  # each point is labelled with its week
