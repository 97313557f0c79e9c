"""The API under load and under a killed server, over loopback, against PostgreSQL.

Bounded: the load test runs RATCHET_LOAD_TEST_S seconds (default 30) with 32
clients on 127.0.0.1 only; the kill test streams one large import and kills
the server with SIGKILL half-way.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from store.keys import create_api_key
from store.models import Comparison, FeedbackBatch

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
LOAD_SECONDS = float(os.environ.get("RATCHET_LOAD_TEST_S", "30"))
CLIENTS = 32


class LiveServer:
    """`ratchet api` in a subprocess on a free loopback port."""

    def __init__(self, database_url: str, home: Path):
        self.env = os.environ | {"RATCHET_DATABASE_URL": database_url, "RATCHET_HOME": str(home), "RATCHET_LOG_LEVEL": "WARNING"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(self.port)], cwd=ROOT, env=self.env
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def server(pg_db, pg_url, tmp_path):
    live = LiveServer(pg_url, tmp_path)
    live.start()
    yield live
    live.stop()


@pytest.fixture
def token(pg_db) -> dict:
    with pg_db.session() as s:
        _, tok = create_api_key(s, name="load", role="labeler")
    return {"Authorization": f"Bearer {tok}"}


def _records(tag: str, n: int) -> list[dict]:
    return [
        {"prompt": f"Human: {tag} q{i}\n\nAssistant:", "response_a": f" a{i}", "response_b": f" b{i}", "choice": "ab"[i % 2], "rater_id": f"r{i % 3}"}
        for i in range(n)
    ]


def test_under_load_every_acknowledged_comparison_is_stored_and_nothing_else(server, token, pg_db):
    sent: dict[str, list[dict]] = {}
    acknowledged: dict[str, int] = {}
    unresolved: set[str] = set()
    rejected = 0

    async def client(c: int) -> None:
        nonlocal rejected
        rng = random.Random(c)
        async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
            k = 0
            end = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < end:
                k += 1
                key = f"c{c}-{k}"
                records = _records(key, rng.randint(1, 40))
                if rng.random() < 0.1:
                    records[-1]["choice"] = "maybe"  # invalid: must be refused whole
                sent[key] = records
                try:
                    r = await http.post("/v1/feedback-batches", json={"source": "load", "comparisons": records}, headers=token | {"Idempotency-Key": key})
                except httpx.HTTPError:
                    unresolved.add(key)
                    continue
                if r.status_code == 201:
                    acknowledged[key] = r.json()["id"]
                elif r.status_code == 422:
                    rejected += 1
                    sent.pop(key)
                else:
                    unresolved.add(key)
                if rng.random() < 0.05 and key in acknowledged:  # a replay must not write again
                    again = await http.post("/v1/feedback-batches", json={"source": "load", "comparisons": records}, headers=token | {"Idempotency-Key": key})
                    assert again.status_code == 200 and again.json()["id"] == acknowledged[key]

    async def run() -> None:
        await asyncio.gather(*(client(c) for c in range(CLIENTS)))

    asyncio.run(run())
    # Requests whose answer was lost are retried with their key: each ends acknowledged exactly once.
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for key in unresolved:
            r = http.post("/v1/feedback-batches", json={"source": "load", "comparisons": sent[key]}, headers=token | {"Idempotency-Key": key})
            assert r.status_code in (200, 201), r.text
            acknowledged[key] = r.json()["id"]

    print(f"load: {len(acknowledged)} batches acknowledged, {rejected} refused as invalid, {len(unresolved)} retried")
    assert len(acknowledged) > 100 and rejected > 0
    with pg_db.session() as s:
        stored_batches = dict(s.execute(select(FeedbackBatch.idempotency_key, FeedbackBatch.id)).all())
        assert stored_batches == acknowledged
        expected = sum(len(sent[k]) for k in acknowledged)
        assert s.scalar(select(func.count()).select_from(Comparison)) == expected
        for key in random.Random(0).sample(sorted(acknowledged), 25):
            rows = s.execute(
                select(Comparison.prompt, Comparison.response_a, Comparison.response_b, Comparison.choice, Comparison.rater_id)
                .where(Comparison.batch_id == acknowledged[key])
                .order_by(Comparison.position)
            ).all()
            assert [tuple(r) for r in rows] == [(x["prompt"], x["response_a"], x["response_b"], x["choice"], x["rater_id"]) for x in sent[key]]


def test_a_killed_import_leaves_nothing_and_the_retry_lands_once(server, token, pg_db):
    lines = [
        json.dumps({"prompt": f"Human: question {i}?\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}"}).encode() + b"\n"
        for i in range(30_000)
    ]
    headers = token | {"Idempotency-Key": "big-import-1", "Content-Type": "application/jsonl"}
    streamed = 0

    def slow_body():
        nonlocal streamed
        for start in range(0, len(lines), 1000):
            streamed += 1000
            yield b"".join(lines[start : start + 1000])
            time.sleep(0.05)

    def kill_later():
        time.sleep(0.8)
        server.kill()

    import threading

    killer = threading.Thread(target=kill_later)
    killer.start()
    with pytest.raises(httpx.HTTPError):
        httpx.post(server.base + "/v1/feedback-batches/import?format=trl", content=slow_body(), headers=headers, timeout=60)
    killer.join()
    assert 0 < streamed < len(lines)  # killed in the middle
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(FeedbackBatch)) == 0
        assert s.scalar(select(func.count()).select_from(Comparison)) == 0

    server.start()
    body = b"".join(lines)
    first = httpx.post(server.base + "/v1/feedback-batches/import?format=trl", content=body, headers=headers, timeout=120)
    again = httpx.post(server.base + "/v1/feedback-batches/import?format=trl", content=body, headers=headers, timeout=120)
    assert (first.status_code, again.status_code) == (201, 200), first.text
    assert first.json()["imported"] == 30_000 and again.json()["batch"]["id"] == first.json()["batch"]["id"]
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(FeedbackBatch)) == 1
        assert s.scalar(select(func.count()).select_from(Comparison)) == 30_000
