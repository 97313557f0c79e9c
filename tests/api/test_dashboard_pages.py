"""The dashboard's detail pages on the real app and PostgreSQL: a cycle, a version with its lineage, a
target's deployments; who may see them, what they show, and that stored text is escaped. Then the
operator's actions from its forms: each asks first and acts only once confirmed, through the API's
own functions, recorded with the key; and every refusal (a labeler, a forged token, another site,
bad params, the store's errors) does nothing and says why."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import unescape
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.app import create_app
from orchestrator.cli import app as cli_app
from orchestrator.cycle import jsonable
from orchestrator.launcher import ThreadLauncher
from orchestrator.settings import CycleSettings, resolve
from store.actions import record_action
from store.alerts import record_alert
from store.cycles import finish_cycle, finish_stage, get_cycle, open_cycle, start_stage
from store.datasets import create_dataset, snapshot_comparisons
from store.deployments import active_deployment, deploy, rollback
from store.feedback import create_feedback_batch
from store.lineage import lineage_forward
from store.models import Alert, ApiKey, Cycle, CycleAttempt, Deployment, OperatorAction, RaterDecision
from store.pages import cycle_page, flatten, gate_checks, ref_kind, refs_of, version_page
from store.settings import get_settings
from tests import builders
from tests.api.test_dashboard import form_csrf, sign_in

ERROR = "Traceback (most recent call last):\n  <script>alert('boom')</script> & " + "x" * 400
"""a stage error with markup in it, and one word far wider than a phone"""

SETTINGS = {"gate": {"kl_budget": 2.0, "win_margin": 0.02}, "qc": {"min_gold_accuracy": 0.6},
            "step_deployments": {"ppo": "ratchet-step/ppo"}}
OLD_SETTINGS = {**SETTINGS, "gate": {"kl_budget": 1.0, "win_margin": 0.02}}

GATE = {
    "deploy": False,
    "reasons": ["KL to the reference 1.5000 is over the budget 1.0000"],
    "checks": {"enough_human_answers": True, "people_prefer_candidate": True, "beats_deployed_under_test_pm": True,
               "within_kl_budget": False, "pms_agree": True},
    "measures": {"confidence": 0.9, "human_eval": "on", "human_answers": 60, "human_lower_bound": 0.55,
                 "human_bar": 0.5, "interval": "bootstrap"},
    "measured": {"win_rate_test_pm": 0.61, "win_rate_train_pm": 0.7, "kl": 1.5},
    "thresholds": {"win_margin": 0.02, "kl_budget": 1.0, "max_pm_gap": 0.2},
}


@dataclass(frozen=True)
class Seeded:
    cycle: int
    dataset: int
    prompts: int
    samples: int
    pm: int
    p0: int
    p1: int


def seed_pages(db, artifacts) -> Seeded:
    """A re-run cycle (kl_budget 1.0 -> 2.0) whose deploy stage failed with ``ERROR``, with its versions
    P0 <- PM <- comparisons <- two batches, P1 (init and reference P0, trained against the PM), a prompt set
    and its samples; P0 deployed, then P1, then rolled back; an operator's action and an alert."""
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W47")
        batches = [create_feedback_batch(s, source=rater, comparisons=[builders.comparison(i, rater=rater)
                                                                       for i in range(n)])[0]
                   for rater, n in (("r1", 3), ("r2", 2))]
        dataset, _ = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b.id for b in batches], cycle_id=cycle.id)
        prompts, _ = create_dataset(s, name="prompts", kind="prompts", content_sha256="a" * 64, row_count=8)
        samples, _ = create_dataset(s, name="samples", kind="samples", content_sha256="b" * 64, row_count=16,
                                    source_dataset_id=prompts.id, cycle_id=cycle.id)
        pm = builders.pm(s, dataset_id=dataset.id, cycle_id=cycle.id, metrics={"heldout_accuracy": 0.71})
        p0 = builders.policy(s)
        p1 = builders.policy(s, init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm.id, cycle_id=cycle.id,
                             config={"ppo": {"learning_rate": 1e-5}}, metrics={"losses/value": 0.25})
        deploy(s, policy_id=p0.id, actor="seed", reason="P0")
        deploy(s, policy_id=p1.id, actor="orchestrator", reason="cycle 2026-W47 <b>passed</b>", cycle_id=cycle.id)
        rollback(s, actor="operator", reason="answers got curt")
        outputs = {
            "open": {"settings": SETTINGS, "week": "2026-W47", "baseline_policy_id": p0.id,
                     "sample_policy_ids": [p0.id], "prompt_dataset_id": prompts.id},
            "sample": {"samples_dataset_id": samples.id, "tasks": 8, "rounds": [{"prompts": 8, "tasks": 8}]},
            "snapshot": {"dataset_id": dataset.id, "rows": 5,
                         "excluded_raters": [{"rater_id": "mallory", "reason": "gold accuracy 0.00", "comparisons": 4}]},
            "train_pm": {"pm_id": pm.id, "test_pm_id": 999_999, "dataset_id": dataset.id, "heldout_accuracy": 0.71},
            "improve": {"method": "ppo", "policy_id": p1.id, "init_policy_id": p0.id, "kl": 1.5},
            "evaluate": {"candidate_policy_id": p1.id, "report_uri": "file:///reports/w47.json",
                         "metrics": {"eval/win_rate_test_pm": 0.61, "eval/kl": 1.5}},
            "human_eval": {"enabled": True, "answers": 60, "wins": 30, "ties": 10, "losses": 20, "win_rate": 35 / 60,
                           "min_comparisons": 50, "excluded_raters": {"eve": "excluded by an operator: bot"}},
            "gate": {**GATE, "candidate_policy_id": p1.id},
        }
        for stage, out in outputs.items():
            start_stage(s, cycle_id=cycle.id, stage=stage)
            finish_stage(s, cycle_id=cycle.id, stage=stage, outputs=out, compute_s=2.5)
        start_stage(s, cycle_id=cycle.id, stage="deploy")
        finish_stage(s, cycle_id=cycle.id, stage="deploy", status="failed", error=ERROR)
        s.add(CycleAttempt(cycle_id=cycle.id, number=2, params={"gate": {"kl_budget": 2.0}}, changed=["gate.kl_budget"],
                           kept=["open", "sample"], rerun=["gate", "deploy"],
                           discarded={"open": {"settings": OLD_SETTINGS}}, actor="operator", reason="budget <too> tight"))
        record_action(s, action="rerun", subject_kind="cycle", subject_id=cycle.id, actor="operator",
                      via="dashboard", detail={"attempt": 2, "changed": ["gate.kl_budget"]})
        record_alert(s, event="stage_failed", dedupe_key="w47:deploy", text="deploy failed <again>", cycle_id=cycle.id)
        finish_cycle(s, cycle_id=cycle.id, status="failed", reason="deploy failed")
        return Seeded(cycle=cycle.id, dataset=dataset.id, prompts=prompts.id, samples=samples.id, pm=pm.id,
                      p0=p0.id, p1=p1.id)


def section(html: str, id: str) -> str:
    """The ``<section id=...>`` of a page (its inner HTML), without the line-break hints in long names."""
    found = re.search(rf'<section id="{id}"[^>]*>(.*?)</section>', html, re.S)
    assert found is not None, f"the page has no section {id!r}"
    return found.group(1).replace("<wbr>", "")


PAGES = ("/dashboard/cycles/{cycle}", "/dashboard/policies/{p1}", "/dashboard/pms/{pm}", "/dashboard/datasets/{dataset}",
         "/dashboard/deployments?target=default")


def urls(seeded: Seeded) -> list[str]:
    return [p.format(**vars(seeded)) for p in PAGES]


# --- who may look ------------------------------------------------------------------------------


def test_the_pages_need_an_operator(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    for url in urls(seeded):
        assert client.get(url, follow_redirects=False).headers["location"] == "/dashboard/login", url
        refused = client.get(url, headers=keys.labeler)
        assert refused.status_code == 403 and "needs an operator key" in refused.text, url
        answer = client.get(url, headers=keys.admin)
        assert answer.status_code == 200, url
        assert "default-src 'none'" in answer.headers["content-security-policy"] and "<script" not in answer.text
        assert answer.headers["cache-control"] == "no-store" and " style=" not in answer.text


def test_a_signed_in_operator_sees_them_with_a_sign_out_form(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    sign_in(client, keys.operator)
    for url in urls(seeded):
        page = client.get(url)
        assert page.status_code == 200 and "signed in as operator" in page.text, url
        assert form_csrf(page.text) and 'action="/dashboard/logout"' in page.text


@pytest.mark.parametrize("url", ["/dashboard/cycles/4242", "/dashboard/policies/4242", "/dashboard/pms/4242",
                                 "/dashboard/datasets/4242", "/dashboard/cycles/0", "/dashboard/pms/99999999999"])
def test_an_unknown_id_is_a_404_page(client, keys, url):
    answer = client.get(url, headers=keys.operator)
    assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
    assert "does not exist" in section(answer.text, "not-found") and "default-src 'none'" in answer.headers[
        "content-security-policy"]


# --- the cycle page ----------------------------------------------------------------------------


def test_the_cycles_table_links_each_week_to_its_page(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get("/dashboard", headers=keys.operator).text
    assert f'<a class="week" href="/dashboard/cycles/{seeded.cycle}">2026-W47</a>' in html
    assert 'href="/dashboard/deployments?target=default"' in section(html, "deployed")


def test_the_cycle_page_shows_stages_errors_escaped_and_outputs_linked(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get(f"/dashboard/cycles/{seeded.cycle}", headers=keys.operator).text
    deploy_stage = section(html, "stage-deploy")
    assert "&lt;script&gt;alert(&#39;boom&#39;)&lt;/script&gt; &amp; " + "x" * 400 in deploy_stage  # whole, escaped
    assert '<pre class="text">' in deploy_stage and "<script>" not in html
    train_pm = section(html, "stage-train_pm")
    assert f'<a href="/dashboard/pms/{seeded.pm}">pm v1</a>' in train_pm
    assert f'<a href="/dashboard/datasets/{seeded.dataset}">comparisons v1</a>' in train_pm
    assert "pm 999999 (not in the store)" in train_pm  # a test PM id that names nothing is said so
    opened = section(html, "stage-open")
    assert f'<a href="/dashboard/policies/{seeded.p0}">policy v1</a>' in opened  # baseline_policy_id and the list
    assert opened.count(f"/dashboard/policies/{seeded.p0}") == 2 and '<a href="#settings">see settings</a>' in opened
    assert f'/dashboard/datasets/{seeded.samples}"' in section(html, "stage-sample")
    assert '[{&#34;prompts&#34;: 8, &#34;tasks&#34;: 8}]' in section(html, "stage-sample")  # a list as one line of JSON
    assert f'<a href="/dashboard/policies/{seeded.p1}">policy v2</a>' in section(html, "stage-improve")
    stages = section(html, "stages")
    assert stages.count('<a href="#stage-') == 9 and '<span class="chip failed">failed</span>' in stages


def test_the_cycle_page_shows_settings_attempts_and_what_a_rerun_changed(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get(f"/dashboard/cycles/{seeded.cycle}", headers=keys.operator).text
    settings = section(html, "settings")
    assert '<tr><th>gate.kl_budget <span class="chip running">changed in attempt 2</span></th><td>2</td></tr>' in settings
    assert "<tr><th>step_deployments.ppo</th><td>ratchet-step/ppo</td></tr>" in settings
    attempts = section(html, "attempts")
    assert "<li><code>gate.kl_budget</code>: 1 &rarr; 2</li>" in attempts and "first run" in attempts
    assert "budget &lt;too&gt; tight" in attempts and '<span class="chip running">deploy</span>' in attempts


def test_the_cycle_page_shows_the_evaluation_the_verdict_and_the_gates_checks(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get(f"/dashboard/cycles/{seeded.cycle}", headers=keys.operator).text
    assert "<tr><th>eval/win_rate_test_pm</th><td>0.61</td></tr>" in section(html, "evaluation")
    human = section(html, "human")
    assert "30 / 10 / 20" in human and "0.583" in human and "0.550" in human and "(the gate needs 50)" in human
    gate = section(html, "gate")
    assert '<span class="chip no">reject</span>' in gate and "KL to the reference 1.5000 is over the budget" in gate
    kl = gate.split("<code>within_kl_budget</code>", 1)[1].split("</tr>", 1)[0]
    assert "1.500" in kl and "≤ 1.000" in kl and '<span class="chip no">no</span>' in kl
    people = gate.split("<code>people_prefer_candidate</code>", 1)[1].split("</tr>", 1)[0]
    assert "0.550" in people and "&gt; 0.500" in people and '<span class="chip yes">yes</span>' in people
    assert "≤ 0.200" in gate.split("<code>pms_agree</code>", 1)[1].split("</tr>", 1)[0]


def test_the_cycle_page_shows_raters_left_out_actions_alerts_and_deployments(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get(f"/dashboard/cycles/{seeded.cycle}", headers=keys.operator).text
    excluded = section(html, "excluded")
    assert "mallory" in excluded and "gold accuracy 0.00" in excluded and "eve" in excluded
    actions = section(html, "operator-actions")
    assert "rerun" in actions and "dashboard" in actions and "<code>changed</code>: [&#34;gate.kl_budget&#34;]" in actions
    alerts = section(html, "alerts")
    assert "deploy failed &lt;again&gt;" in alerts and '<span class="chip pending">pending</span>' in alerts
    summary = section(html, "cycle")
    assert 'href="/dashboard/deployments?target=default">default v2</a> (deploy)' in summary
    assert "no flow run is recorded for this cycle" in summary
    assert "{% block" not in html  # the actions block is left empty for the forms


def test_the_cycle_page_links_the_flow_run_to_prefects_ui(client, keys, pg_db, artifacts, monkeypatch,
                                                          no_prefect_api):
    seeded = seed_pages(pg_db, artifacts)
    with pg_db.session() as s:
        from store.models import Cycle

        s.get(Cycle, seeded.cycle).flow_run_id = "0b6c1f57-3a0e-4a43-9d1c-2f1f3e8d9a10"
    monkeypatch.setenv("PREFECT_UI_URL", "http://prefect.example/")
    summary = section(client.get(f"/dashboard/cycles/{seeded.cycle}", headers=keys.operator).text, "cycle")
    assert 'href="http://prefect.example/runs/flow-run/0b6c1f57-3a0e-4a43-9d1c-2f1f3e8d9a10">open in Prefect</a>' in summary
    assert "Prefect was not asked (PREFECT_API_URL is not set)" in summary


def test_a_cycle_that_has_just_opened(client, keys, pg_db):
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W50")
    html = client.get(f"/dashboard/cycles/{cycle.id}", headers=keys.operator).text
    for text in ("The gate has not decided yet.", "The human evaluation has not run yet.", "No stage has started yet.",
                 "No rater was left out.", "No operator has acted on this cycle.", "No alert was raised",
                 "The open stage has not recorded the settings yet."):
        assert text in html, text


# --- the version pages -------------------------------------------------------------------------


def test_a_policy_page_walks_its_lineage_up_and_down(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get(f"/dashboard/policies/{seeded.p1}", headers=keys.operator).text
    parents = section(html, "parents")
    for relation, href in (("init", f"/dashboard/policies/{seeded.p0}"), ("reference", f"/dashboard/policies/{seeded.p0}"),
                           ("trained against", f"/dashboard/pms/{seeded.pm}")):
        assert re.search(rf'<td>{relation}</td><td><a href="{href}">', parents), relation
    ancestors = section(html, "ancestors")
    assert f'/dashboard/datasets/{seeded.dataset}"' in ancestors and "feedback batch (2)" in ancestors
    assert f'<a href="/dashboard/cycles/{seeded.cycle}">2026-W47</a>' in section(html, "version")
    assert "<tr><th>ppo.learning_rate</th><td>1e-05</td></tr>" in section(html, "config")
    assert "<tr><th>losses/value</th><td>0.25</td></tr>" in section(html, "metrics")
    deployments = section(html, "deployments")
    assert "v2" in deployments and "deploy" in deployments
    p0 = client.get(f"/dashboard/policies/{seeded.p0}", headers=keys.operator).text
    assert f'<td>init</td><td><a href="/dashboard/policies/{seeded.p1}">policy v2</a>' in section(p0, "children")
    assert "Nothing: it is a root of the lineage." in section(p0, "parents")


def test_a_pm_and_a_dataset_page(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    pm = client.get(f"/dashboard/pms/{seeded.pm}", headers=keys.operator).text
    assert f'<td>trained on</td><td><a href="/dashboard/datasets/{seeded.dataset}">comparisons v1</a>' in section(pm, "parents")
    assert f'<td>trained against</td><td><a href="/dashboard/policies/{seeded.p1}">policy v2</a>' in section(pm, "children")
    assert "<tr><th>role</th><td>train</td></tr>" in section(pm, "version") and "<h2>PM pm v1</h2>" in pm
    dataset = client.get(f"/dashboard/datasets/{seeded.dataset}", headers=keys.operator).text
    assert "2 feedback batch(es)" in section(dataset, "parents")
    assert f'/dashboard/policies/{seeded.p1}"' in section(dataset, "descendants")
    assert "<tr><th>rows</th><td>5</td></tr>" in section(dataset, "version")
    prompts = client.get(f"/dashboard/datasets/{seeded.prompts}", headers=keys.operator).text
    assert f'<td>source</td><td><a href="/dashboard/datasets/{seeded.samples}">samples v1</a>' in section(prompts, "children")


# --- the deployments page ----------------------------------------------------------------------


def test_the_deployment_history_lists_every_deployment_newest_first(client, keys, pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    html = client.get("/dashboard/deployments?target=default", headers=keys.operator).text
    rows = re.findall(r'<tr id="deployment-\d+" class="deployment[^"]*">(.*?)</tr>', section(html, "history"), re.S)
    assert [re.search(r"<td><b>v(\d+)</b>", r).group(1) for r in rows] == ["3", "2", "1"]
    newest, deployed, first = rows
    assert "active" in newest and "rollback" in newest and "undoes v2" in newest and "answers got curt" in newest
    assert f'/dashboard/policies/{seeded.p0}"' in newest and "operator" in newest
    assert f'/dashboard/policies/{seeded.p1}"' in deployed and "cycle 2026-W47 &lt;b&gt;passed&lt;/b&gt;" in deployed
    assert f'<a href="/dashboard/cycles/{seeded.cycle}">2026-W47</a>' in deployed and "orchestrator" in deployed
    assert "seed" in first and "active" not in first
    other = client.get("/dashboard/deployments?target=staging", headers=keys.operator)
    assert other.status_code == 200 and "Nothing has been deployed to staging yet." in other.text
    assert '<a href="/dashboard/deployments?target=default">default</a>' in other.text
    assert client.get("/dashboard/deployments?target=", headers=keys.operator).status_code == 422


# --- the store functions behind them -----------------------------------------------------------


def test_flatten_keeps_order_and_treats_lists_and_empty_dicts_as_leaves():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == [
        ("a.b", 1), ("a.c.d", [1, 2]), ("e", {}), ("f", None)]
    assert flatten(3, "x") == [("x", 3)] and flatten({}) == [] and flatten(None) == []


def test_output_fields_that_name_versions():
    assert [ref_kind(k) for k in ("candidate_policy_id", "test_pm_id", "samples_dataset_id", "sample_policy_ids",
                                  "warm_start_pm_ids.train", "report_artifact_id", "deployment_id", "pm_version")] == [
        "policy", "pm", "dataset", "policy", "pm", None, None, None]
    assert refs_of("sample_policy_ids", [3, 4]) == [("policy", 3), ("policy", 4)]
    assert refs_of("dataset_id", None) == [] and refs_of("pm_id", True) == []


def test_gate_checks_pair_each_check_with_its_number_and_threshold():
    checks = {c["name"]: c for c in gate_checks(GATE, {"min_comparisons": 50})}
    assert (checks["enough_human_answers"]["value"], checks["enough_human_answers"]["threshold"]) == (60, 50)
    assert (checks["beats_deployed_under_test_pm"]["value"], checks["beats_deployed_under_test_pm"]["threshold"]) == (
        0.61, pytest.approx(0.52))
    assert checks["pms_agree"]["value"] == pytest.approx(0.09) and checks["pms_agree"]["threshold"] == 0.2
    assert checks["within_kl_budget"]["passed"] is False and list(checks) == list(GATE["checks"])
    odd = gate_checks({"checks": {"a_new_check": True}}, {})
    assert odd == [{"name": "a_new_check", "passed": True, "measure": "a new check", "value": None, "op": "",
                    "threshold": None}]


def test_the_store_reads_behind_the_pages(pg_db, artifacts):
    seeded = seed_pages(pg_db, artifacts)
    with pg_db.session() as s:
        data = cycle_page(s, cycle_id=seeded.cycle)
        assert [a["number"] for a in data["attempts"]] == [1, 2]
        assert data["attempts"][1]["changed"] == [{"key": "gate.kl_budget", "before": 1.0, "after": 2.0}]
        assert data["excluded"]["snapshot"][0]["rater_id"] == "mallory"
        assert [d["version"] for d in data["deployments"]] == [2]
        p1 = version_page(s, kind="policy", id=seeded.p1)
        assert {(p["relation"], p["kind"], p["id"]) for p in p1["parents"]} == {
            ("init", "policy", seeded.p0), ("reference", "policy", seeded.p0), ("trained_against", "pm", seeded.pm)}
        assert [n["id"] for n in p1["ancestors"]["feedback_batch"]] and p1["descendants"] == {}
        # the forward walk reaches a prompt set's samples (a dataset made from it)
        assert lineage_forward(s, kind="dataset", id=seeded.prompts).ids("dataset") == sorted(
            [seeded.prompts, seeded.samples])


# --- the operator's actions --------------------------------------------------------------------

RUNNING, FAILED, NEW = "2026-W20", "2026-W21", "2026-W30"
STAGES = ["open", "sample", "gather", "snapshot", "train_pm", "improve", "evaluate", "human_eval", "gate", "deploy"]


@dataclass(frozen=True)
class Subjects:
    running: int
    """a cycle running its sample stage"""
    failed: int
    """a cycle whose deploy failed, every stage before it done, with the settings the defaults resolve to"""
    p0: int
    p1: int
    """deployed in turn to ``default``: a rollback restores p0"""


def seed_actions(db) -> Subjects:
    """Something for every action to act on: a running and a failed cycle, two deploys, rater mallory."""
    settings = jsonable(resolve(CycleSettings(), {}, trusted=False).model_dump(mode="json"))
    with db.session() as s:
        running, _ = open_cycle(s, week=RUNNING)
        start_stage(s, cycle_id=running.id, stage="sample")
        failed, _ = open_cycle(s, week=FAILED, trigger="api")
        for stage in STAGES:
            start_stage(s, cycle_id=failed.id, stage=stage)
            finish_stage(s, cycle_id=failed.id, stage=stage, outputs={"settings": settings} if stage == "open" else {},
                         status="failed" if stage == "deploy" else "succeeded",
                         error="the deploy hook <timed out>" if stage == "deploy" else None)
        finish_cycle(s, cycle_id=failed.id, status="failed", reason="deploy failed")
        p0, p1 = builders.policy(s), builders.policy(s)
        deploy(s, policy_id=p0.id, actor="seed")
        deploy(s, policy_id=p1.id, actor="seed")
        create_feedback_batch(s, source="vendor", comparisons=[builders.comparison(i, rater="mallory") for i in range(2)])
        return Subjects(running=running.id, failed=failed.id, p0=p0.id, p1=p1.id)


@dataclass
class Acting:
    """A signed-in operator's browser on an app whose launcher is the orchestrator's own (``ThreadLauncher``,
    its flow replaced by a list of the calls), with a deploy hook that lists what it hears."""

    client: TestClient
    launcher: ThreadLauncher
    flows: list[dict] = field(default_factory=list)
    hooked: list[tuple[str, int]] = field(default_factory=list)

    def ask(self, url: str, **fields) -> object:
        """POST an action's form as its page sends it (the session's CSRF token added); the answer."""
        token = form_csrf(self.client.get("/dashboard").text)
        return self.client.post(url, data={"csrf": token, **fields}, follow_redirects=False)

    def confirm(self, asked) -> object:
        """Press Confirm on the confirmation page ``asked`` (its form, its hidden fields); the answer."""
        assert asked.status_code == 200, asked.text
        action, fields = confirm_form(asked.text)
        return self.client.post(action, data=fields, follow_redirects=False)


def confirm_form(html: str) -> tuple[str, dict[str, str]]:
    """The Confirm form of a confirmation page: where it posts and its hidden fields."""
    found = re.search(r'<section id="confirm".*?<form method="post" action="([^"]+)">(.*?)</form>', html, re.S)
    assert found is not None, "not a confirmation page"
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', found.group(2))
    return unescape(found.group(1)), {name: unescape(value) for name, value in fields}


def done_of(answer) -> tuple[str, str]:
    """The page a finished action sends the browser to, and what it says it did (``?done=``)."""
    assert answer.status_code == 303, answer.text
    url = urlsplit(answer.headers["location"])
    return url.path, parse_qs(url.query)["done"][0]


def key_id(db, name: str) -> int:
    with db.session() as s:
        return s.scalar(select(ApiKey.id).where(ApiKey.name == name))


def recorded(db) -> list[tuple]:
    """Every operator action: (action, subject kind, subject id, actor, key id, via)."""
    with db.session() as s:
        return [(a.action, a.subject_kind, a.subject_id, a.actor, a.api_key_id, a.via)
                for a in s.scalars(select(OperatorAction).order_by(OperatorAction.id))]


def state(db) -> tuple:
    """What an action could change: the cycles' statuses, the deployments, the decisions, the actions."""
    with db.session() as s:
        return (dict(s.execute(select(Cycle.week, Cycle.status)).all()),
                s.scalar(select(func.count()).select_from(Deployment)),
                s.scalar(select(func.count()).select_from(RaterDecision)),
                s.scalar(select(func.count()).select_from(OperatorAction)),
                s.scalar(select(func.count()).select_from(CycleAttempt)))


@pytest.fixture
def acting(pg_db, artifacts, api_settings, keys, no_prefect_api) -> Iterator[Acting]:
    # no_prefect_api: a cancel does not ask Prefect
    flows: list[dict] = []
    launcher = ThreadLauncher(pg_db, CycleSettings(), run=lambda **kw: flows.append(kw))
    hooked: list[tuple[str, int]] = []
    app = create_app(api_settings, database=pg_db, artifacts=artifacts, cycle_launcher=launcher,
                     on_deploy=lambda row: hooked.append((row.name, row.version)))
    with TestClient(app) as client:
        assert sign_in(client, keys.operator).status_code == 303
        yield Acting(client=client, launcher=launcher, flows=flows, hooked=hooked)
    for thread in launcher.threads.values():
        thread.join(timeout=10)


def every_action(subjects: Subjects) -> list[tuple[str, dict]]:
    """Each action's route and a confirmed form that would act, were it let through."""
    return [
        ("/dashboard/cycles", {"week": NEW, "params": "{}", "confirm": "yes"}),
        (f"/dashboard/cycles/{subjects.running}/cancel", {"reason": "x", "confirm": "yes"}),
        (f"/dashboard/cycles/{subjects.failed}/rerun", {"params": '{"gate": {"kl_budget": 2.0}}', "confirm": "yes"}),
        ("/dashboard/deployments/rollback", {"name": "default", "confirm": "yes"}),
        ("/dashboard/raters/mallory/decision", {"decision": "exclude", "confirm": "yes"}),
    ]


def test_the_forms_are_shown_where_their_action_applies(acting, pg_db):
    subjects = seed_actions(pg_db)
    client = acting.client
    running = client.get(f"/dashboard/cycles/{subjects.running}").text
    assert 'id="cancel-form"' in running and 'id="rerun-form"' not in running
    failed = client.get(f"/dashboard/cycles/{subjects.failed}").text
    assert 'id="cancel-form"' in failed and 'id="rerun-form"' in failed
    with pg_db.session() as s:
        finish_cycle(s, cycle_id=subjects.running, status="succeeded")
    done = client.get(f"/dashboard/cycles/{subjects.running}").text
    assert 'id="cancel-form"' not in done and 'id="rerun-form"' not in done
    front = client.get("/dashboard").text
    assert 'id="start-form"' in front and 'action="/dashboard/raters/mallory/decision"' in front
    default = section(client.get("/dashboard/deployments?target=default").text, "actions")
    assert 'id="rollback-form"' in default and "policy v2 serves now (deployment v2)" in default
    with pg_db.session() as s:
        deploy(s, policy_id=subjects.p1, name="canary")
    canary = client.get("/dashboard/deployments?target=canary").text
    assert 'id="rollback-form"' not in canary
    assert "No rollback: deployment 'canary' v1 has no earlier deployment to roll back to." in unescape(
        section(canary, "history"))
    for html in (running, failed, front, default):  # every action form carries the session's token
        assert html.count('name="csrf" value="') == html.count('method="post"')


def test_cancel_asks_first_then_cancels_and_records_the_key(acting, pg_db, keys):
    subjects = seed_actions(pg_db)
    asked = acting.ask(f"/dashboard/cycles/{subjects.running}/cancel", reason="wrong <prompt> set")
    assert asked.status_code == 200 and "Cancel cycle 2026-W20?" in asked.text
    restated = section(asked.text, "confirm")
    assert "wrong &lt;prompt&gt; set" in restated and "<prompt>" not in restated and "running" in restated
    assert f'href="/dashboard/cycles/{subjects.running}">Back</a>' in restated
    with pg_db.session() as s:
        assert get_cycle(s, subjects.running).status == "running"  # asking did nothing
    path, said = done_of(acting.confirm(asked))
    assert path == f"/dashboard/cycles/{subjects.running}"
    assert said == "Cancelled cycle 2026-W20. Prefect was not told (PREFECT_API_URL is not set)."
    page = acting.client.get(f"/dashboard/cycles/{subjects.running}?done=Cancelled <b>cycle</b>").text
    assert "Cancelled &lt;b&gt;cycle&lt;/b&gt;" in section(page, "done")  # the message is shown escaped
    assert '<span class="chip cancelled">cancelled</span>' in section(page, "cycle")
    assert 'id="cancel-form"' not in page and 'id="rerun-form"' in page
    with pg_db.session() as s:
        cycle = get_cycle(s, subjects.running)
        assert cycle.status == "cancelled" and cycle.reason == "cancelled by operator: wrong <prompt> set"
    assert recorded(pg_db) == [("cancel", "cycle", str(subjects.running), "operator", key_id(pg_db, "operator"),
                                "dashboard")]


def test_a_failed_cycle_reruns_with_corrected_params_and_the_plan_is_shown(acting, pg_db):
    subjects = seed_actions(pg_db)
    url = f"/dashboard/cycles/{subjects.failed}/rerun"
    asked = acting.ask(url, params='{"gate": {"kl_budget": 2.0}}', reason="budget too tight")
    restated = section(asked.text, "confirm")
    assert "Re-run cycle 2026-W21?" in restated and "budget too tight" in restated
    assert "&#34;kl_budget&#34;: 2.0" in restated  # the corrections, indented
    assert confirm_form(asked.text)[1] == {"csrf": form_csrf(asked.text), "params": '{"gate":{"kl_budget":2.0}}',
                                           "reason": "budget too tight", "confirm": "yes"}
    path, said = done_of(acting.confirm(asked))
    assert path == f"/dashboard/cycles/{subjects.failed}"
    assert said.splitlines() == [
        "Re-run of cycle 2026-W21 recorded as attempt 2 and started.",
        "changed: gate.kl_budget",
        "kept: open, sample, gather, snapshot, train_pm, improve, evaluate, human_eval",
        "run again: gate (gate.kl_budget changed); deploy (after gate)",
    ]
    acting.launcher.threads[FAILED].join(timeout=10)
    assert [flow["week"] for flow in acting.flows] == [FAILED]  # the flow was started, once
    with pg_db.session() as s:
        assert get_cycle(s, subjects.failed).params == {"gate": {"kl_budget": 2.0}}
    action, kind, subject, actor, api_key, via = recorded(pg_db)[0]
    assert (action, subject, actor, via) == ("rerun", str(subjects.failed), "operator", "dashboard") and api_key
    page = acting.client.get(f"/dashboard/cycles/{subjects.failed}").text
    assert "budget too tight" in section(page, "attempts")


def test_start_asks_for_the_week_and_params_then_starts_once(acting, pg_db, keys):
    asked = acting.ask("/dashboard/cycles", week=NEW, params='{"gate": {"kl_budget": 2.0}}')
    restated = section(asked.text, "confirm")
    assert "Start the cycle of 2026-W30?" in restated and "&#34;kl_budget&#34;: 2.0" in restated
    path, said = done_of(acting.confirm(asked))
    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == NEW))
        assert cycle.params == {"gate": {"kl_budget": 2.0}} and cycle.status == "running"
    assert (path, said) == (f"/dashboard/cycles/{cycle.id}", "Started the cycle of 2026-W30.")
    again = done_of(acting.confirm(acting.ask("/dashboard/cycles", week=NEW)))[1]
    assert again == "The cycle of 2026-W30 already existed (running): nothing new was started."
    assert recorded(pg_db) == [("start", "cycle", str(cycle.id), "operator", key_id(pg_db, "operator"), "dashboard")]
    acting.launcher.threads[NEW].join(timeout=10)
    assert [flow["week"] for flow in acting.flows] == [NEW]
    this_week = confirm_form(acting.ask("/dashboard/cycles").text)[1]["week"]  # no week: this one, fixed when asked
    assert re.fullmatch(r"\d{4}-W\d{2}", this_week)


def test_a_rollback_asks_what_it_restores_then_rolls_back_with_the_hook_and_the_alert(acting, pg_db):
    subjects = seed_actions(pg_db)
    history = acting.client.get("/dashboard/deployments?target=default").text
    expected = re.search(r'name="expected" value="(\d+)"', section(history, "actions")).group(1)
    asked = acting.ask("/dashboard/deployments/rollback", name="default", reason="answers got curt", expected=expected)
    restated = section(asked.text, "confirm")
    assert "Roll back default?" in restated and "answers got curt" in restated
    assert "policy v2 (deployment v2)" in restated and "policy v1 (as deployment v1 did)" in restated
    path, said = done_of(acting.confirm(asked))
    assert path == "/dashboard/deployments" and said == "Rolled default back: deployment v3 serves policy v1 again."
    with pg_db.session() as s:
        active = active_deployment(s, name="default")
        assert (active.action, active.policy_id, active.actor, active.reason) == (
            "rollback", subjects.p0, "operator", "answers got curt")
        assert s.scalar(select(func.count()).select_from(Alert).where(Alert.event == "rollback")) == 1
    assert acting.hooked == [("default", 3)]
    assert recorded(pg_db) == [("rollback", "deployment", "default", "operator", key_id(pg_db, "operator"), "dashboard")]
    # the page shown before that rollback is out of date now: its form is refused, nothing rolls back again
    stale = acting.ask("/dashboard/deployments/rollback", name="default", expected=expected, confirm="yes")
    assert stale.status_code == 409 and "changed since" in stale.text
    assert len(recorded(pg_db)) == 1


def test_a_rater_is_excluded_from_the_raters_table(acting, pg_db):
    seed_actions(pg_db)
    asked = acting.ask("/dashboard/raters/mallory/decision", decision="exclude", reason="answers at random")
    restated = section(asked.text, "confirm")
    assert "Exclude rater mallory?" in restated and "answers at random" in restated
    path, said = done_of(acting.confirm(asked))
    assert (path, said) == ("/dashboard", "Rater mallory: excluded (answers at random).")
    with pg_db.session() as s:
        (row,) = s.scalars(select(RaterDecision)).all()
        assert (row.rater_id, row.decision, row.reason, row.actor) == ("mallory", "exclude", "answers at random",
                                                                        "operator")
    assert recorded(pg_db) == [("rater_decision", "rater", "mallory", "operator", key_id(pg_db, "operator"),
                                "dashboard")]
    page = acting.client.get("/dashboard").text
    assert re.search(r'<tr class="rater[^"]*excluded', page) and '<option value="clear">' in page


def test_a_labeler_key_is_refused_every_action(acting, pg_db, keys):
    subjects = seed_actions(pg_db)
    before = state(pg_db)
    for url, fields in every_action(subjects):
        refused = acting.client.post(url, data=fields, headers=keys.labeler, follow_redirects=False)
        assert refused.status_code == 403 and "needs an operator key" in refused.text, url
    assert state(pg_db) == before and acting.flows == []


@pytest.mark.parametrize("token", ["forged", None])
def test_a_form_without_the_sessions_token_is_refused_and_does_nothing(acting, pg_db, token):
    subjects = seed_actions(pg_db)
    before = state(pg_db)
    for url, fields in every_action(subjects):
        sent = fields if token is None else {**fields, "csrf": token}
        refused = acting.client.post(url, data=sent, follow_redirects=False)
        assert refused.status_code == 403 and "CSRF token is missing or is not this session" in refused.text, url
    assert state(pg_db) == before and acting.flows == []


def test_a_form_sent_from_another_site_is_refused_and_does_nothing(acting, pg_db):
    subjects = seed_actions(pg_db)
    before = state(pg_db)
    token = form_csrf(acting.client.get("/dashboard").text)
    for url, fields in every_action(subjects):
        refused = acting.client.post(url, data={**fields, "csrf": token}, headers={"Origin": "https://evil.example"},
                                     follow_redirects=False)
        assert refused.status_code == 403 and "sent from another site" in refused.text, url
    assert state(pg_db) == before and acting.flows == []


@pytest.mark.parametrize(("params", "message"), [
    ("{not json", "not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ("[1, 2]", "Input should be a valid dictionary"),
    ('{"ppo": {"config": {"learning_rate": -1}}}', None),
])
def test_bad_params_are_a_422_page_naming_the_field(acting, pg_db, keys, params, message):
    subjects = seed_actions(pg_db)
    before = state(pg_db)
    for url in ("/dashboard/cycles", f"/dashboard/cycles/{subjects.failed}/rerun"):
        # a script with a Bearer key sends no token: it has no cookie to abuse
        answer = acting.client.post(url, data={"params": params, "confirm": "yes"}, headers=keys.operator)
        assert answer.status_code == 422 and answer.headers["content-type"].startswith("text/html"), answer.text
        fields = section(answer.text, "message")
        assert "<code>params" in fields and (message is None or message in unescape(fields)), fields
    assert state(pg_db) == before


def test_the_stores_refusals_are_pages_with_their_status(client, keys, pg_db):
    subjects = seed_actions(pg_db)
    with pg_db.session() as s:
        finish_cycle(s, cycle_id=subjects.running, status="succeeded")
    sign_in(client, keys.operator)
    token = form_csrf(client.get("/dashboard").text)

    def post(url: str, **fields):
        return client.post(url, data={"csrf": token, "confirm": "yes", **fields}, follow_redirects=False)

    refusals = [
        (post(f"/dashboard/cycles/{subjects.running}/cancel"), 409, "only a running or failed cycle can be cancelled"),
        (post(f"/dashboard/cycles/{subjects.running}/rerun"), 409, "only a failed or cancelled cycle can be re-run"),
        (post("/dashboard/cycles/4242/cancel"), 404, "cycle 4242 does not exist"),
        (post("/dashboard/cycles/99999999999/rerun"), 404, "does not exist"),
        (post("/dashboard/cycles", week="2027-W53"), 422, "ISO year 2027 has 52 weeks"),
        (post("/dashboard/cycles", week=NEW), 503, "no orchestrator is configured for this API server"),  # no launcher
        (post(f"/dashboard/cycles/{subjects.failed}/rerun"), 503, "no orchestrator is configured"),
        (post("/dashboard/deployments/rollback", name="staging"), 404, "'staging' has never been deployed"),
        (post("/dashboard/raters/mallory/decision", decision="ban"), 422, "not include, exclude or clear"),
        (post("/dashboard/cycles/{0}/cancel".format(subjects.failed), reason="x" * 2001), 422, "at most 2000"),
    ]
    for answer, status, words in refusals:
        assert answer.status_code == status and words in unescape(answer.text), (status, answer.text[-600:])
        assert answer.headers["content-type"].startswith("text/html") and "<script" not in answer.text
    assert recorded(pg_db) == []
    # without a launcher a cancel still lands in the store, recorded with the key
    assert done_of(post(f"/dashboard/cycles/{subjects.failed}/cancel", reason="give up"))[1] == (
        "Cancelled cycle 2026-W21. Prefect was not told (no orchestrator is configured for this API server).")
    assert [a[0] for a in recorded(pg_db)] == ["cancel"]


def test_the_api_and_the_cli_record_rollbacks_and_decisions_their_way(client, keys, pg_db, pg_url, monkeypatch):
    seed_actions(pg_db)
    operator = key_id(pg_db, "operator")
    assert client.post("/v1/deployments/rollback", json={"reason": "bad"}, headers=keys.operator).status_code == 201
    put = client.put("/v1/raters/mallory/decision", json={"decision": "include", "reason": "fine"}, headers=keys.operator)
    assert put.status_code == 200, put.text
    with pg_db.session() as s:
        deploy(s, policy_id=active_deployment(s, name="default").policy_id, name="canary")
        deploy(s, policy_id=active_deployment(s, name="default").policy_id, name="canary")
    monkeypatch.setenv("RATCHET_DATABASE_URL", pg_url)
    monkeypatch.delenv("RATCHET_DEPLOY_HOOK", raising=False)
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(cli_app, ["deploy", "rollback", "--target", "canary", "--reason", "cli"])
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output
    (api_rollback, api_decision, cli_rollback) = recorded(pg_db)
    assert api_rollback == ("rollback", "deployment", "default", "operator", operator, "api")
    assert api_decision == ("rater_decision", "rater", "mallory", "operator", operator, "api")
    assert cli_rollback[:3] == ("rollback", "deployment", "canary") and cli_rollback[3].startswith("cli:")
    assert cli_rollback[4:] == (None, "cli")
    with pg_db.session() as s:
        details = [a.detail for a in s.scalars(select(OperatorAction).order_by(OperatorAction.id))]
    assert details[0] == {"reason": "bad", "version": 3, "policy_id": details[0]["policy_id"], "rolled_back_version": 2,
                          "rolled_back_policy_id": details[0]["rolled_back_policy_id"]}
    assert details[1] == {"decision": "include", "reason": "fine", "was": None}


# -- live refresh ------------------------------------------------------------------------------------


def test_a_running_cycle_page_watches_its_state_and_a_finished_one_does_not(acting, pg_db):
    subjects = seed_actions(pg_db)
    client = acting.client
    page = client.get(f"/dashboard/cycles/{subjects.running}")
    nonce = re.search(r'<script nonce="([^"]+)">', page.text).group(1)
    assert f"script-src 'nonce-{nonce}'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert f'"/dashboard/cycles/{subjects.running}/state"' in page.text and 'id="live-note"' in page.text
    first = client.get(f"/dashboard/cycles/{subjects.running}/state").json()
    assert first["live"] is True and first["version"] in page.text
    assert client.get(f"/dashboard/cycles/{subjects.running}/state").json() == first  # nothing changed
    with pg_db.session() as s:
        finish_stage(s, cycle_id=subjects.running, stage="sample", outputs={})
    moved = client.get(f"/dashboard/cycles/{subjects.running}/state").json()
    assert moved["version"] != first["version"]
    with pg_db.session() as s:
        finish_cycle(s, cycle_id=subjects.running, status="succeeded")
    done = client.get(f"/dashboard/cycles/{subjects.running}")
    assert "<script" not in done.text and "script-src" not in done.headers["content-security-policy"]
    assert client.get("/dashboard/cycles/999999/state").status_code == 404


def test_the_dashboard_watches_while_a_cycle_it_shows_runs(acting, pg_db, keys):
    subjects = seed_actions(pg_db)
    client = acting.client
    page = client.get("/dashboard")
    assert '"/dashboard/state?weeks=12\\u0026target=default"' in page.text  # the URL, as tojson writes it
    before = client.get("/dashboard/state").json()
    assert before["live"] is True
    with pg_db.session() as s:
        rollback(s, name="default", reason="bad", actor="ops")
    assert client.get("/dashboard/state").json()["version"] != before["version"]
    with TestClient(client.app) as labeler:  # a labeler key reads no state either
        labeler.headers.update(keys.labeler)
        assert labeler.get(f"/dashboard/cycles/{subjects.running}/state").status_code == 403


def test_the_dashboard_switches_between_targets_and_starts_the_one_it_shows(acting, pg_db):
    subjects = seed_actions(pg_db)
    with pg_db.session() as s:
        deploy(s, policy_id=subjects.p1, name="support")
        other, _ = open_cycle(s, week="2026-W30", target="support")
    client = acting.client
    default = client.get("/dashboard").text
    switcher = re.search(r'<nav id="targets".*?</nav>', default, re.S).group(0)
    assert '<b>default</b>' in switcher and 'href="/dashboard?target=support&amp;weeks=12">support</a>' in switcher
    assert f'href="/dashboard/cycles/{other.id}"' not in section(default, "cycles")  # another target's cycle
    support = client.get("/dashboard?target=support").text
    assert f'href="/dashboard/cycles/{other.id}"' in section(support, "cycles")
    assert f'href="/dashboard/cycles/{subjects.running}"' not in section(support, "cycles")
    assert '<input type="hidden" name="target" value="support">' in support
    asked = acting.ask("/dashboard/cycles", week="2026-W31", params="{}", target="support")
    assert "Start the cycle of 2026-W31 of support?" in unescape(asked.text)
    acting.confirm(asked)
    with pg_db.session() as s:
        assert s.scalar(select(Cycle.deploy_target).where(Cycle.week == "2026-W31")) == "support"
    page = client.get(f"/dashboard/cycles/{other.id}").text
    assert "cycle <b>2026-W30</b> of <b>support</b>" in page
