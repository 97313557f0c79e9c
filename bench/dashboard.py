"""The operator pages at a year of cycles: server time of the dashboard, a cycle page and ``GET /v1/raters``.

    python bench/dashboard.py [--cycles 100] [--comparisons 1000000] [--raters 200] [--requests 40]
                              [--all-closed] [--no-aggregates] [--keep]

1. A scratch PostgreSQL database (on RATCHET_BENCH_POSTGRES_URL, default the
   local server), migrated, filled with COPY (not timed): ``--cycles`` cycles
   a week apart, each finished with its ten stage rows (outputs shaped as a
   cycle records them, numbers drawn per cycle) but the last, which is still
   gathering (its open, sample and gather stages; ``--all-closed``: finished
   too); a candidate policy, two PMs, a snapshot and a deployment;
   ``--comparisons`` answers from ``--raters`` raters in batches of 100 across
   the cycles (the running one's share included), each answering a task of its
   cycle with a lease taken a while before (log-normal, median 33 s, at most 10 min;
   90% of tasks answered once, 8% overlap tasks answered by two raters, 2%
   gold tasks), and 200 gold comparisons. Each finished cycle is closed the
   way a cycle closes, right after its answers are in
   (``store.aggregates.close_cycle``, which keeps its aggregates);
   ``--no-aggregates`` closes none, so every page computes everything from
   the comparisons, as before ``store.aggregates`` (the baseline).
2. The app in this process as ``ratchet api`` builds it
   (``orchestrator.service.create_service_app`` on that database, no cycle
   launcher), an operator key as Bearer, and ``--requests`` requests of each page (the
   cycle page is the last cycle's), alternating, after two warm-ups each.
   Server time is the time of the request through the ASGI app (no network).

The last line is JSON: per page ``p50_ms``, ``p99_ms``, ``max_ms``; target p50 <= 100 ms and p99 <= 300 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

SERVER = os.environ.get("RATCHET_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
BATCH = 100
STAGES = ["open", "sample", "gather", "snapshot", "train_pm", "improve", "evaluate", "human_eval", "gate", "deploy"]
START = datetime(2025, 1, 6, 6, tzinfo=UTC)  # a Monday


def scratch_database() -> tuple[str, str]:
    from store.db import upgrade

    name = f"ratchet_bench_dash_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(SERVER).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url, name


def drop_database(name: str) -> None:
    admin = sa.create_engine(SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _text(value) -> str:
    """A value in COPY's text format."""
    if value is None:
        return r"\N"
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if isinstance(value, datetime):
        value = value.astimezone(UTC).isoformat(sep=" ")
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def copy_rows(raw, table: str, columns: list[str], rows) -> int:
    """COPY ``rows`` (tuples in ``columns`` order) into ``table``; how many."""
    buf, n = io.StringIO(), 0
    for row in rows:
        buf.write("\t".join(_text(v) for v in row) + "\n")
        n += 1
    buf.seek(0)
    with raw.cursor() as cur:
        cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buf)
    return n


def outputs_of(i: int, rng: random.Random, ids: dict[str, int]) -> dict[str, dict]:
    """Stage outputs shaped as a finished cycle records them (the fields the pages read)."""
    acc = 0.55 + 0.3 * rng.random()
    gold = 0.3 + 0.4 * i / 100
    return {
        "open": {"settings": {"prompt_set": "prompts", "deploy_target": "default", "improve": {"method": "ppo"},
                              "gate": {"kl_budget": 1.0, "win_margin": 0.0}}, "baseline_policy_id": ids["p0"]},
        "sample": {"samples_dataset_id": ids["dataset"], "tasks": 110, "top_up_rounds": 0, "prompts_cut": 0},
        "gather": {"comparisons": 10_000, "min_comparisons": 100, "outcome": "enough", "waited_s": 3.0},
        "snapshot": {"dataset_id": ids["dataset"], "rows": 10_000 * (i + 1), "batches": 100 * (i + 1)},
        "train_pm": {"pm_id": ids["pm"], "test_pm_id": ids["test_pm"], "pm_version": i + 1, "heldout_accuracy": acc,
                     "heldout_ece": 0.05, "test_pm_heldout_accuracy": acc - 0.02, "ensemble_size": 3,
                     "ensemble_spread": 0.1},
        "improve": {"policy_id": ids["policy"], "policy_version": i + 2, "method": "ppo", "reward": rng.random(),
                    "reward_test_pm": rng.random(), "kl": 0.2 + rng.random() * 0.3},
        "evaluate": {"candidate_policy_id": ids["policy"], "metrics": {
            "eval/kl": 0.3, "eval/win_rate_test_pm": 0.6, "eval/win_rate_train_pm": 0.62,
            "eval/gold_candidate": gold + 0.02, "eval/gold_baseline": gold}},
        "human_eval": {"answers": 60, "wins": 40, "ties": 5, "losses": 15, "win_rate": 0.7, "elo_candidate": 10.0 * i,
                       "elo_baseline": 10.0 * i - 8, "excluded_raters": {"r199": "gold accuracy 0.40 ..."}},
        "gate": {"deploy": True, "reasons": [], "checks": {"within_kl_budget": True, "human_preferred": True},
                 "measures": {"human_lower_bound": 0.58, "human_bar": 0.5, "kl": 0.3},
                 "thresholds": {"kl_budget": 1.0, "win_margin": 0.0}, "candidate_policy_id": ids["policy"]},
        "deploy": {"deployed": True, "deployment_id": ids["deployment"], "policy_id": ids["policy"]},
    }


def fill(url: str, *, cycles: int, comparisons: int, raters: int, aggregates: bool = True,
         all_closed: bool = False, seed: int = 0) -> dict[str, int]:
    """The store at a year of cycles; the ids the measurement needs. ``aggregates=False`` closes no cycle
    through ``store.aggregates`` (the pages then compute everything from the comparisons); ``all_closed``
    finishes the last cycle too."""
    from store.db import Database
    from store.keys import create_api_key
    from store.models import Artifact, Dataset, Deployment, Policy, PreferenceModel

    rng = random.Random(seed)
    database = Database(url)
    with database.session() as s:
        art = Artifact(uri="file:///bench/p", sha256="0" * 64, size_bytes=1, is_dir=True)
        s.add(art)
        s.flush()
        p0 = Policy(name="policy", version=1, base_model="bench", artifact_id=art.id, config={}, metrics={})
        s.add(p0)
        s.flush()
        dataset = Dataset(name="comparisons", version=1, kind="comparisons", content_sha256="1" * 64, row_count=1,
                          artifact_id=art.id, meta={})
        s.add(dataset)
        s.flush()
        pm = PreferenceModel(name="pm", version=1, role="train", dataset_id=dataset.id, base_model="bench",
                             artifact_id=art.id, config={}, metrics={})
        test_pm = PreferenceModel(name="test-pm", version=1, role="test", dataset_id=dataset.id, base_model="bench",
                                  artifact_id=art.id, config={}, metrics={})
        policy = Policy(name="policy", version=2, base_model="bench", artifact_id=art.id, config={}, metrics={},
                        init_policy_id=p0.id, reference_policy_id=p0.id)
        s.add_all([pm, test_pm, policy])
        s.flush()
        deployment = Deployment(name="default", version=1, policy_id=policy.id, action="deploy", reason="bench",
                                actor="bench")
        s.add(deployment)
        s.flush()
        token = create_api_key(s, name="bench-operator", role="operator")[1]
        ids = {"p0": p0.id, "dataset": dataset.id, "pm": pm.id, "test_pm": test_pm.id, "policy": policy.id,
               "deployment": deployment.id}

    per_cycle = comparisons // cycles
    rater_ids = [f"r{i:03d}" for i in range(raters)]
    raw = database.engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("INSERT INTO gold_comparisons (prompt, response_a, response_b, choice, metadata, created_by, "
                        "created_at) SELECT 'gold ' || g, 'a', 'b', 'a', '{}', 'bench', now() FROM generate_series(1, 200) g")
        raw.commit()
        next_ids = {"cycle": 1, "stage": 1, "batch": 1, "cmp": 1, "task": 1, "lease": 1}
        t0 = time.perf_counter()
        for c in range(cycles):
            running = c == cycles - 1 and not all_closed
            _fill_cycle(raw, c, rng, ids, next_ids, per_cycle, rater_ids, running=running)
            raw.commit()
            if aggregates and not running:
                from store.aggregates import close_cycle

                with database.session() as s:
                    close_cycle(s, cycle_id=next_ids["cycle"] - 1)
            if (c + 1) % 10 == 0:
                print(f"  {c + 1}/{cycles} cycles, {next_ids['cmp'] - 1:,} comparisons "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        with raw.cursor() as cur:
            for table in ("cycles", "stage_runs", "feedback_batches", "comparisons", "comparison_tasks", "task_leases"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
            cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        database.dispose()
    return {"last_cycle": next_ids["cycle"] - 1, "token": token}


def _fill_cycle(raw, c: int, rng: random.Random, ids: dict, next_ids: dict, n: int, rater_ids: list[str], *,
                running: bool = False) -> None:
    """One cycle with ``n`` answers to its tasks, COPYed: finished, or (``running``) still gathering, its first
    two stages done."""
    cycle_id = next_ids["cycle"]
    next_ids["cycle"] += 1
    opened = START + timedelta(weeks=c)
    year, week, _ = opened.isocalendar()
    copy_rows(raw, "cycles", ["id", "week", "status", "trigger", "params", "created_at", "finished_at"],
              [(cycle_id, f"{year}-W{week:02d}", "running" if running else "succeeded", "schedule", {}, opened,
                None if running else opened + timedelta(hours=20))])
    outputs = outputs_of(c, rng, ids)
    stages = []
    for k, stage in enumerate(STAGES[:3] if running else STAGES):
        gathering = running and stage == "gather"
        stages.append((next_ids["stage"], cycle_id, stage, "running" if gathering else "succeeded", 1,
                       {} if gathering else outputs[stage], None if gathering else 1.0 + k,
                       opened + timedelta(hours=2 * k), None if gathering else opened + timedelta(hours=2 * k + 1)))
        next_ids["stage"] += 1
    copy_rows(raw, "stage_runs", ["id", "cycle_id", "stage", "status", "attempts", "outputs", "compute_s",
                                  "started_at", "finished_at"], stages)
    copy_rows(raw, "cycle_attempts", ["cycle_id", "number", "params", "changed", "kept", "rerun", "discarded",
                                      "actor", "reason", "created_at"],
              [(cycle_id, 1, {}, [], [], [], {}, "schedule", "", opened)])
    tasks, answers = [], []  # (task row), (rater, task_id, choice, answered_at)
    while len(answers) < n:
        task_id = next_ids["task"]
        next_ids["task"] += 1
        roll = rng.random()
        kind, needed = ("gold", 1) if roll < 0.02 else (("train", 2) if roll < 0.10 else ("train", 1))
        created = opened + timedelta(hours=4, seconds=len(tasks))
        chosen = rng.sample(rater_ids, needed)
        expected = "a" if kind == "gold" else None
        tasks.append((task_id, cycle_id, f"\n\nHuman: question {task_id}?\n\nAssistant:", " yes", " no", {}, kind,
                      expected, needed, needed, "done", created, created + timedelta(minutes=5)))
        for rater in chosen:
            bad = rater.endswith("9")  # one rater in ten answers at random
            choice = rng.choice("ab") if bad else ("a" if rng.random() < 0.85 else "b")
            answers.append((rater, task_id, choice, created + timedelta(seconds=rng.randint(5, 300))))
    copy_rows(raw, "comparison_tasks", ["id", "cycle_id", "prompt", "response_a", "response_b", "metadata", "kind",
                                        "expected_choice", "answers_needed", "answers", "status", "created_at",
                                        "done_at"], tasks)
    batches, cmps, leases = [], [], []
    prompt_of = {t[0]: t[2] for t in tasks}
    for start in range(0, len(answers), BATCH):
        chunk = answers[start:start + BATCH]
        batch_id = next_ids["batch"]
        next_ids["batch"] += 1
        batches.append((batch_id, "bench", uuid.uuid4().hex + uuid.uuid4().hex, len(chunk), cycle_id, {},
                        chunk[-1][3]))
        for position, (rater, task_id, choice, at) in enumerate(chunk):
            cmps.append((next_ids["cmp"], batch_id, position, prompt_of[task_id], " yes", " no", choice, rater, task_id))
            next_ids["cmp"] += 1
            took = min(600.0, rng.lognormvariate(3.5, 0.8))  # seconds from lease to answer: median 33 s
            leases.append((next_ids["lease"], task_id, rater, at - timedelta(seconds=took), at + timedelta(minutes=10), at))
            next_ids["lease"] += 1
    copy_rows(raw, "feedback_batches", ["id", "source", "content_sha256", "comparison_count", "cycle_id", "metadata",
                                        "created_at"], batches)
    copy_rows(raw, "comparisons", ["id", "batch_id", "position", "prompt", "response_a", "response_b", "choice",
                                   "rater_id", "task_id"], cmps)
    copy_rows(raw, "task_leases", ["id", "task_id", "rater_id", "leased_at", "leased_until", "answered_at"], leases)


def measure(url: str, token: str, cycle_id: int, requests: int) -> dict[str, dict]:
    from fastapi.testclient import TestClient

    from orchestrator.service import create_service_app
    from store.settings import Settings

    pages = {"dashboard": "/dashboard", "cycle_page": f"/dashboard/cycles/{cycle_id}", "v1_raters": "/v1/raters"}
    times: dict[str, list[float]] = {name: [] for name in pages}
    headers = {"Authorization": f"Bearer {token}"}
    app = create_service_app(Settings(home=Path("/tmp"), database_url=url, cycle_launcher="off"))  # as `ratchet api`
    with TestClient(app) as client:
        for name, path in pages.items():
            for _ in range(2):
                answer = client.get(path, headers=headers)
                assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        for _ in range(requests):
            for name, path in pages.items():
                t0 = time.perf_counter()
                answer = client.get(path, headers=headers)
                times[name].append((time.perf_counter() - t0) * 1000)
                assert answer.status_code == 200
    app.state.database.dispose()
    return {name: {"p50_ms": round(statistics.median(ms), 1),
                   "p99_ms": round(sorted(ms)[max(0, round(0.99 * len(ms)) - 1)], 1),
                   "max_ms": round(max(ms), 1), "requests": len(ms)} for name, ms in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--comparisons", type=int, default=1_000_000)
    parser.add_argument("--raters", type=int, default=200)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (its name is printed)")
    parser.add_argument("--all-closed", action="store_true", help="finish the last cycle too (no cycle is running)")
    parser.add_argument("--no-aggregates", action="store_true",
                        help="close no cycle through store.aggregates: every page computes from the comparisons")
    args = parser.parse_args()
    url, name = scratch_database()
    print(f"scratch database {name}", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        filled = fill(url, cycles=args.cycles, comparisons=args.comparisons, raters=args.raters,
                      aggregates=not args.no_aggregates, all_closed=args.all_closed)
        print(f"filled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        result = measure(url, filled["token"], filled["last_cycle"], args.requests)
    finally:
        if not args.keep:
            drop_database(name)
    for page, numbers in result.items():
        print(f"{page:<10} p50 {numbers['p50_ms']:7.1f} ms  p99 {numbers['p99_ms']:7.1f} ms  max {numbers['max_ms']:7.1f} ms",
              file=sys.stderr)
    met = all(n["p50_ms"] <= 100 and n["p99_ms"] <= 300 for n in result.values())
    print(json.dumps({"cycles": args.cycles, "comparisons": args.comparisons, "raters": args.raters,
                      "aggregates": not args.no_aggregates, "running_cycle": not args.all_closed, **result,
                      "target_met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
