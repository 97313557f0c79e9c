"""The operator dashboard on the real app and PostgreSQL: sign-in, roles, what it shows."""

from __future__ import annotations

import json
import random
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.routes.dashboard import COOKIE, charts, dashboard_data
from store.cycles import finish_cycle, finish_stage, open_cycle, start_stage
from store.datasets import snapshot_comparisons
from store.deployments import deploy
from store.feedback import NewComparison, create_feedback_batch
from store.keys import create_api_key
from store.models import ApiKey
from store.raters import QCPolicy, decide, register_gold
from store.settings import Settings
from store.tasks import create_tasks, lease_tasks
from tests import builders

# What a finished cycle's stages record (orchestrator/stages.py), trimmed to what the dashboard reads.
STAGE_OUTPUTS = {
    "snapshot": {"rows": 5},
    "gather": {"comparisons": 5},
    "train_pm": {"pm_version": 1, "heldout_accuracy": 0.71, "heldout_ece": 0.08, "test_pm_heldout_accuracy": 0.66},
    "improve": {"method": "ppo", "policy_version": 2, "reward": 0.42, "reward_test_pm": 0.18, "reward_spread": 0.3, "kl": 2.25},
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
    assert cycle["policy_reward_test_pm"] == 0.18 and cycle["deployed"] is False
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


# --- the raters panel ------------------------------------------------------------------------------

LABELS = ("a", "b", "tie")
OTHER = {"a": "b", "b": "tie", "tie": "a"}
"""an answer that is never the given one"""
OVERLAP_TASKS = 12
GOLD = 5


def seed_raters(db, *, week: str = "2026-W48") -> int:
    """A finished cycle whose tasks three raters took under one labeling tool's key: 12 overlap
    tasks (three answers each) labelled a, b, tie in turn, which alice and bob answer as labelled
    and mallory never does; and 5 gold comparisons it registers, each handed to all three beside
    the overlap tasks, which mallory gets wrong. dave sends two comparisons of his own, and
    an operator excludes him. Returns the cycle's id."""
    with db.session() as s:
        tool = (s.scalar(select(ApiKey.id).where(ApiKey.name == "labeling-tool"))
                or create_api_key(s, name="labeling-tool", role="labeler")[0].id)
        cycle, _ = open_cycle(s, week=week)
        cycle_id = cycle.id
        register_gold(s, items=[{"prompt": f"gold {i}?", "response_a": f"right {i}", "response_b": f"wrong {i}",
                                 "choice": "a"} for i in range(GOLD)])
        create_tasks(s, cycle_id=cycle_id, tasks=[
            {"prompt": f"{week} overlap {i}?", "response_a": f"first {i}", "response_b": f"second {i}",
             "answers_needed": 3, "metadata": {"label": LABELS[i % 3]}}
            for i in range(OVERLAP_TASKS)
        ])
    for rater in ("alice", "bob", "mallory"):
        with db.session() as s:
            leased = [lease.task for lease in lease_tasks(
                s, rater_id=rater, api_key_id=tool, limit=OVERLAP_TASKS + GOLD, lease=timedelta(minutes=10),
                gold_share=0.9, rng=random.Random(rater))]
            assert sum(t.kind == "gold" for t in leased) == GOLD, rater
            answers = []
            for task in leased:
                right = task.expected_choice if task.kind == "gold" else task.meta["label"]
                answers.append(NewComparison(prompt=task.prompt, response_a=task.response_a, response_b=task.response_b,
                                             choice=OTHER[right] if rater == "mallory" else right, rater_id=rater,
                                             task_id=task.id))
        with db.session() as s:
            create_feedback_batch(s, source="labeling-tool", comparisons=answers, api_key_id=tool)
    with db.session() as s:
        create_feedback_batch(s, source="dave", comparisons=[builders.comparison(i, rater="dave") for i in range(2)])
        decide(s, rater_id="dave", decision="exclude", reason="duplicate account", actor="operator")
        finish_cycle(s, cycle_id=cycle_id, status="succeeded")
    return cycle_id


def record_qc(db, *, cycle_id: int, **qc) -> None:
    """The cycle's open stage, recording these ``qc`` settings (as a cycle run does)."""
    with db.session() as s:
        start_stage(s, cycle_id=cycle_id, stage="open")
        finish_stage(s, cycle_id=cycle_id, stage="open", outputs={"settings": {"qc": qc}})


def by_rater(data: dict) -> dict[str, dict]:
    return {r["rater_id"]: r for r in data["raters"]["raters"]}


def row_classes(html: str) -> dict[str, str]:
    """Each rater row's classes on the page, by rater id."""
    rows = re.findall(r'<tr class="(rater[^"]*)">\s*<td>([^<]+)</td>', html)
    return {rater: classes for classes, rater in rows}


# alpha over 12 units (x, x, y): coincidences (x,x) = (x,y) = (y,x) = 1 per unit, so n = 36, D_o = 24, every
# label's marginal is 12 and D_e = 6 * 12 * 12 / 35
CYCLE_ALPHA = 1 - 24 / (6 * 144 / 35)


def test_the_data_behind_the_raters_panel(pg_db):
    seed_raters(pg_db)
    data = dashboard_data(pg_db, weeks=12)
    panel = data["raters"]
    assert panel["policy"] == QCPolicy().model_dump()
    assert panel["gold"] == {"registered": 5, "active": 5, "retired": 0}
    raters = by_rater(data)
    assert sorted(raters) == ["alice", "bob", "dave", "mallory"]
    for name in ("alice", "bob"):
        r = raters[name]
        assert (r["answered"], r["gold_answered"], r["gold_correct"], r["gold_accuracy"]) == (17, 5, 5, 1.0), name
        # measured against the trusted raters only (gold flags mallory): 12 pairs with the other good rater,
        # all agreeing over a, b, tie in equal thirds: p_o = 1, p_e = 1/3 -> kappa 1
        assert r["agreement_pairs"] == 12 and r["kappa"] == pytest.approx(1.0), name
        assert (r["flags"], r["flagged"], r["excluded"], r["decision"]) == ([], False, False, None), name
        assert r["median_seconds"] is not None and 0 <= r["median_seconds"] < 60
    mallory = raters["mallory"]
    assert (mallory["gold_accuracy"], mallory["agreement_pairs"]) == (0.0, 24)
    assert mallory["kappa"] == pytest.approx(-0.5)  # never agrees with alice or bob; p_e = 1/3
    assert mallory["flags"] == ["gold accuracy 0.00 over 5 gold answers is under 0.6 (at most 0.35 at 95% confidence)",
                                "agreement (Cohen's kappa) -0.50 over 24 answer pairs is under 0.2"]
    assert mallory["flagged"] and mallory["excluded"] and mallory["exclusion_reason"] == "; ".join(mallory["flags"])
    dave = raters["dave"]
    assert (dave["answered"], dave["gold_answered"], dave["gold_accuracy"], dave["kappa"]) == (2, 0, None, None)
    assert (dave["flagged"], dave["decision"], dave["decision_reason"], dave["excluded"]) == (
        False, "exclude", "duplicate account", True)
    assert dave["exclusion_reason"] == "excluded by an operator: duplicate account"
    (cycle,) = panel["agreement"]
    assert (cycle["week"], cycle["tasks"], cycle["raters"]) == ("2026-W48", OVERLAP_TASKS, 3)
    assert cycle["alpha"] == pytest.approx(CYCLE_ALPHA)
    svgs = charts(data)
    assert "rater_alpha" in svgs and "Krippendorff" in svgs["rater_alpha"]


def test_the_raters_panel_uses_the_policy_in_force(pg_db):
    cycle_id = seed_raters(pg_db)
    lenient = by_rater(dashboard_data(pg_db, weeks=12, qc_default=QCPolicy(exclude_flagged=False)))
    assert lenient["mallory"]["flagged"] and not lenient["mallory"]["excluded"]  # no cycle recorded a policy yet
    assert lenient["dave"]["excluded"]  # an operator's exclusion holds whatever the policy
    record_qc(pg_db, cycle_id=cycle_id, min_agreement_pairs=30)
    data = dashboard_data(pg_db, weeks=12, qc_default=QCPolicy(exclude_flagged=False))
    assert data["raters"]["policy"]["min_agreement_pairs"] == 30 and data["raters"]["policy"]["exclude_flagged"] is True
    mallory = by_rater(data)["mallory"]  # 24 answer pairs are too few to flag on agreement now; gold still flags
    assert mallory["flags"] == ["gold accuracy 0.00 over 5 gold answers is under 0.6 (at most 0.35 at 95% confidence)"] and mallory["excluded"]


def test_the_page_shows_the_raters_panel_and_marks_flagged_raters(client, keys, pg_db):
    seed_raters(pg_db)
    page = client.get("/dashboard", headers=keys.operator)
    assert page.status_code == 200
    html = page.text
    panel = html.split('<section id="raters">', 1)[1].split("</section>", 1)[0]
    policy_line = " ".join(re.search(r'<p class="muted" id="qc-policy">(.*?)</p>', panel, re.S).group(1).split())
    assert "gold accuracy <b>0.6</b> after 5 gold answers" in policy_line
    assert "agreement (Cohen's kappa) <b>0.2</b> after 10 answer pairs" in policy_line
    assert "Gold comparisons: 5 registered, 5 active, 0 retired." in policy_line
    assert row_classes(panel) == {"alice": "rater", "bob": "rater", "dave": "rater excluded skipped",
                                  "mallory": "rater flagged excluded skipped"}
    mallory = panel.split("<td>mallory</td>", 1)[1].split("</tr>", 1)[0]
    assert '<span class="chip no">flagged</span>' in mallory and "0.000" in mallory and "-0.500" in mallory
    assert "<li>gold accuracy 0.00 over 5 gold answers is under 0.6 (at most 0.35 at 95% confidence)</li>" in mallory
    dave = panel.split("<td>dave</td>", 1)[1].split("</tr>", 1)[0]
    assert '<span class="chip no">exclude</span>' in dave and "duplicate account" in dave
    alice = panel.split("<td>alice</td>", 1)[1].split("</tr>", 1)[0]
    assert "flagged" not in alice and alice.count("1.000") == 2 and "5 of 5" in alice  # gold accuracy and kappa
    assert 'id="chart-rater_alpha"' in panel and html.count('id="chart-rater_alpha"') == 1


def test_the_raters_panel_before_any_rater(client, keys):
    html = client.get("/dashboard", headers=keys.operator).text
    assert "No rater has given a comparison yet." in html and "Gold comparisons: 0 registered" in html
    assert "chart-rater_alpha" not in html


def test_the_raters_panel_falls_back_on_the_servers_cycle_config(pg_db, artifacts, keys, tmp_path):
    config = tmp_path / "cycle.json"
    config.write_text(json.dumps({"qc": {"min_gold_accuracy": 0.8, "exclude_flagged": False}}))
    app = create_app(Settings(home=tmp_path, cycle_config=config), database=pg_db, artifacts=artifacts)
    seed_raters(pg_db)
    with TestClient(app) as client:
        html = client.get("/dashboard", headers=keys.operator).text
    panel = html.split('<section id="raters">', 1)[1].split("</section>", 1)[0]
    assert "gold accuracy <b>0.8</b>" in panel and "flagged raters stay in snapshots" in panel
    assert row_classes(panel)["mallory"] == "rater flagged"  # flagged, not left out
