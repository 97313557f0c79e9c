"""The AI labeler beside a person, through the real API on PostgreSQL (uvicorn on a loopback port, as the demo).

A tiny PM trained on the synthetic preference (the response ending in
" please" wins) judges as ``ai-pm``; the demo's careful rater answers by the
same preference as a person would. Both answer a cycle's tasks, overlap
tasks among them, and the test reads what quality control and a snapshot
make of the AI's answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from api.app import create_app
from orchestrator.ai_labeler import AILabeler
from orchestrator.cli import app as cli_app
from orchestrator.demo.command import ApiThread
from orchestrator.demo.labeler import CAREFUL, SimulatedLabeler
from store.cycles import open_cycle
from store.datasets import snapshot_comparisons
from store.keys import create_api_key
from store.models import Comparison, ComparisonTask, FeedbackBatch
from store.settings import Settings
from store.tasks import create_tasks
from tests.workers.builders import synthetic_preferences, write_jsonl
from workers.common.testing import build_tiny_model, build_tokenizer
from workers.judge import PMJudge

AI = "ai-pm"
TASKS, OVERLAP = 60, 30


def please_gold(prompt: str, response: str) -> float:
    """The synthetic preference, as the simulated person judges it: the response ending in " please" wins."""
    return 1.0 if response.endswith(" please") else 0.0


@pytest.fixture(scope="module")
def please_pm(tmp_path_factory) -> Path:
    """A tiny PM trained on the synthetic preference (about a second)."""
    from workers.train_pm import TrainPMConfig, run

    root = tmp_path_factory.mktemp("ai-labeler")
    model = build_tiny_model(root / "gpt2", tokenizer=build_tokenizer(vocab_size=512), seed=0)
    data = write_jsonl(root / "synthetic.jsonl", synthetic_preferences(400))
    cfg = TrainPMConfig(model_path=str(model), dataset_path=str(data), output_dir=str(root / "run"),
                        heldout_fraction=0.2, batch_size=16, learning_rate=3e-3, max_steps=24, max_length=64,
                        progress=False)
    return Path(run(cfg).outputs["pm"])


def tasks(n: int, *, overlap: int = 0, seed: int = 11) -> list[dict]:
    """``n`` tasks of synthetic pairs the PM never saw; the first ``overlap`` need two raters."""
    return [{"prompt_id": f"t{seed}-{i}", "prompt": r["prompt"], "response_a": r["response_a"],
             "response_b": r["response_b"], "answers_needed": 2 if i < overlap else 1}
            for i, r in enumerate(synthetic_preferences(n, seed=seed))]


@contextmanager
def served(pg_db, artifacts, tmp_path, *, raters: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str], int]]:
    """The API on a loopback port over a cycle: (its URL, tokens by key name (``operator``, each rater), cycle id)."""
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W45")
        tokens = {"operator": create_api_key(s, name="operator", role="operator")[1]}
        tokens |= {rater: create_api_key(s, name=rater, role="labeler")[1] for rater in raters}
        cycle_id = cycle.id
    server = ApiThread(create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts))
    server.start()
    try:
        yield server.url, tokens, cycle_id
    finally:
        server.stop()


def add_tasks(pg_db, cycle_id: int, items: list[dict]) -> None:
    with pg_db.session() as s:
        create_tasks(s, cycle_id=cycle_id, tasks=items)


def run_cli(*args: str):
    result = CliRunner().invoke(cli_app, ["labeler", "run", *args])
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, report


def test_the_ai_labeler_answers_beside_a_person_and_its_feedback_is_told_apart(pg_db, artifacts, tmp_path, please_pm):
    judge = PMJudge(please_pm, device="cpu")
    source = f"ai:pm:{judge.name}"
    with served(pg_db, artifacts, tmp_path, raters=(CAREFUL.rater_id, AI)) as (url, tokens, cycle_id):
        add_tasks(pg_db, cycle_id, tasks(TASKS, overlap=OVERLAP))
        person = SimulatedLabeler.of(CAREFUL, url, tokens[CAREFUL.rater_id], gold=please_gold, batch_size=10)
        ai = AILabeler(url, tokens[AI], judge, rater_id=AI, batch_size=10)
        try:
            while sum([person.label_once(), ai.label_once()]):  # in turns, sharing the cycle's tasks
                pass
            agreement = ai.agreement(tokens["operator"])
            listed = httpx.get(f"{url}/v1/raters", headers={"Authorization": f"Bearer {tokens['operator']}"}).json()
        finally:
            person.close()
            ai.close()

        with pg_db.session() as s:
            assert {t.status for t in s.scalars(select(ComparisonTask))} == {"done"}
            batches = list(s.scalars(select(FeedbackBatch).where(FeedbackBatch.source == source)))
            answers = list(s.scalars(select(Comparison).where(Comparison.rater_id == AI)))
            tasks_by_id = {t.id: t for t in s.scalars(select(ComparisonTask))}
            people = s.scalars(select(FeedbackBatch.source).where(FeedbackBatch.source != source)).all()
        # every AI batch says what it is; the person's do not
        assert len(batches) == ai.stats.batches > 0 and set(people) == {"simulated-labeler"}
        assert all(b.meta == {"labeler": "ai", "judge": judge.describe(), "principles_sha256": None} for b in batches)
        assert len(answers) == ai.stats.comparisons == sum(ai.stats.choices.values())
        assert OVERLAP <= len(answers) < TASKS + OVERLAP
        for c in answers:
            assert c.task_id in tasks_by_id and c.batch_id in {b.id for b in batches}
            assert (c.strength == 0) == (c.choice == "tie") and 0 <= c.meta["p_a"] <= 1
        # the PM learnt the preference: the AI's answers follow it
        right = sum(c.choice == ("a" if please_gold("", tasks_by_id[c.task_id].response_a) else "b") for c in answers)
        assert right >= 0.9 * len(answers)
        # quality control measured it against the person on the overlap tasks (both answered each of them)
        assert agreement is not None and agreement.rater_id == AI and agreement.answered == len(answers)
        assert agreement.agreement_pairs == OVERLAP and agreement.kappa is not None and agreement.kappa > 0.5
        assert not agreement.flagged and not agreement.excluded
        row = next(r for r in listed["data"] if r["rater_id"] == AI)
        assert (row["kappa"], row["agreement_pairs"]) == (agreement.kappa, agreement.agreement_pairs)

        # a snapshot counts the AI's comparisons apart, and each record names its batch's source
        with pg_db.session() as s:
            dataset, _ = snapshot_comparisons(s, artifacts=artifacts, cycle_id=cycle_id)
            meta, art = dict(dataset.meta), dataset.artifact
        records = [json.loads(line) for line in artifacts.read_bytes(art.uri, art.sha256).decode().splitlines()]
        assert meta["sources"] == {source: len(answers), "simulated-labeler": TASKS + OVERLAP - len(answers)}
        assert meta["ai_comparisons"] == len(answers)
        by_rater = {(r["rater_id"], r["source"]) for r in records}
        assert by_rater == {(AI, source), (CAREFUL.rater_id, "simulated-labeler")}

        # the command line, against the same server: five more answers, then its agreement
        add_tasks(pg_db, cycle_id, tasks(8, seed=12))
        result, report = run_cli("--api-url", url, "--key", tokens[AI], "--rater-id", AI, "--judge", f"pm:{please_pm}",
                                 "--batch-size", "3", "--max-tasks", "5", "--operator-key", tokens["operator"],
                                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (report["comparisons"], report["batches"], report["source"], report["excluded"]) == (5, 2, source, None)
    assert report["agreement"]["answered"] == len(answers) + 5
    assert (report["agreement"]["kappa"], report["agreement"]["agreement_pairs"]) == (agreement.kappa, OVERLAP)
    assert "Cohen's kappa" in result.stderr
    with pg_db.session() as s:
        assert len(s.scalars(select(Comparison).where(Comparison.rater_id == AI)).all()) == len(answers) + 5
        assert sum(t.status != "done" for t in s.scalars(select(ComparisonTask))) == 3


def test_a_polling_ai_labeler_waits_while_quality_control_leaves_it_out(pg_db, artifacts, tmp_path, please_pm):
    judge = PMJudge(please_pm, device="cpu")
    with served(pg_db, artifacts, tmp_path, raters=(AI,)) as (url, tokens, cycle_id):
        operator = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['operator']}"}, timeout=30)
        ai = AILabeler(url, tokens[AI], judge, rater_id=AI, batch_size=4)
        stop = threading.Event()
        try:
            assert ai.agreement(tokens["operator"]) is None  # no answer yet
            add_tasks(pg_db, cycle_id, tasks(6))
            r = operator.put(f"/v1/raters/{AI}/decision", json={"decision": "exclude", "reason": "auditing the judge"})
            assert r.status_code == 200, r.text
            assert ai.label_once() == 0 and "auditing the judge" in ai.stats.excluded
            result, report = run_cli("--api-url", url, "--key", tokens[AI], "--rater-id", AI,
                                     "--judge", f"pm:{please_pm}", "--device", "cpu")
            assert result.exit_code == 1 and report["comparisons"] == 0 and "auditing the judge" in report["excluded"]
            # polling, it asks again and again; once an operator clears the exclusion it answers every task
            worker = threading.Thread(target=ai.run, kwargs={"poll_s": 0.05, "stop": stop}, daemon=True)
            worker.start()
            time.sleep(0.3)
            assert ai.stats.comparisons == 0 and ai.stats.excluded
            assert operator.put(f"/v1/raters/{AI}/decision", json={"decision": None}).status_code == 200
            deadline = time.monotonic() + 20
            while ai.stats.comparisons < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            worker.join(timeout=10)
        finally:
            stop.set()
            ai.close()
            operator.close()
    assert not worker.is_alive()
    assert (ai.stats.comparisons, ai.stats.batches, ai.stats.excluded, ai.stats.errors) == (6, 2, None, [])


def test_an_ai_labelers_source_says_it_is_ai_feedback(please_pm):
    judge = PMJudge(please_pm, device="cpu")
    with pytest.raises(ValueError, match=r"source \('vendor-x'\) must start with 'ai:'"):
        AILabeler("http://127.0.0.1:9", "unused", judge, rater_id=AI, source="vendor-x")
    with pytest.raises(ValueError, match=r"batch_size \(501\)"):
        AILabeler("http://127.0.0.1:9", "unused", judge, rater_id=AI, batch_size=501)
    labeler = AILabeler("http://127.0.0.1:9", "unused", judge, rater_id=AI, source="ai:pm:reviewed-v2")
    assert labeler.source == "ai:pm:reviewed-v2"
    labeler.close()
