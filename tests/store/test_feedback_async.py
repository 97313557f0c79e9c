"""The event-loop writer for small batches (PostgreSQL, asyncpg) against the COPY path."""

from __future__ import annotations

import asyncio
import socket

import pytest
from sqlalchemy.engine import make_url

from store.errors import Conflict, DatabaseUnavailable, StoreError
from store.feedback import NewComparison, comparisons_of, create_feedback_batch
from store.feedback_async import AsyncFeedbackWriter, asyncpg_dsn
from store.models import FeedbackBatch
from store.tasks import create_tasks

pytestmark = pytest.mark.postgres

TRICKY = [
    NewComparison(prompt="tab\there\nnewline \\ backslash", response_a="", response_b="ünïcødé ✓", choice="a", rater_id="r1"),
    NewComparison(prompt="p", response_a="same", response_b="same", choice="tie", rater_id="r2",
                  metadata={"z": 1, "a": ["x", {"k": "é"}]}),
    NewComparison(prompt="\r\n\n\nHuman: hi\n\nAssistant:", response_a=" a", response_b=" b", choice="b", rater_id="r1"),
]


def run(coro_fn, url):
    """Open a writer on ``url``, run ``coro_fn(writer)`` in a fresh event loop, close it."""
    async def main():
        writer = await AsyncFeedbackWriter.open(url, max_size=4)
        try:
            return await coro_fn(writer)
        finally:
            await writer.close()

    return asyncio.run(main())


def stored(db, batch_id: int) -> list[tuple]:
    with db.session() as s:
        return [
            (c.position, c.prompt, c.response_a, c.response_b, c.choice, c.rater_id, c.task_id, c.meta, c.strength)
            for c in comparisons_of(s, [batch_id])
        ]


def test_both_write_paths_store_the_same_rows_and_content_hash(pg_db, pg_url):
    comps = [TRICKY[0], TRICKY[1], NewComparison(**{**TRICKY[2].__dict__, "strength": 2.0})]
    row, created = run(lambda w: w.register(source="inline", comparisons=comps, idempotency_key=None,
                                            request_sha256="0" * 64, metadata={"m": 1}), pg_url)
    assert created and row["comparison_count"] == 3
    with pg_db.session() as s:
        copied, _ = create_feedback_batch(s, source="copy", comparisons=comps, metadata={"m": 1})
    inline_rows, copy_rows = stored(pg_db, row["id"]), stored(pg_db, copied.id)
    assert inline_rows == copy_rows and inline_rows[2][-1] == 2.0
    with pg_db.session() as s:
        first = s.get(FeedbackBatch, row["id"])
        assert first.content_sha256 == row["content_sha256"] == s.get(FeedbackBatch, copied.id).content_sha256
        assert first.meta == {"m": 1} and first.created_at == row["created_at"]
    unstrong = [*comps[:2], TRICKY[2]]
    with pg_db.session() as s:
        other, _ = create_feedback_batch(s, source="copy", comparisons=unstrong)
        assert other.content_sha256 != row["content_sha256"]  # the strength is part of the content


def test_the_event_loop_path_refuses_answers_to_tasks(pg_db, pg_url):
    with pg_db.session() as s:
        (task,) = create_tasks(s, tasks=[{"prompt": "p", "response_a": "x", "response_b": "y"}])
    comps = [NewComparison(**{**TRICKY[0].__dict__, "task_id": task.id})]
    with pytest.raises(StoreError, match="lease rules"):
        run(lambda w: w.register(source="inline", comparisons=comps, idempotency_key=None,
                                 request_sha256="0" * 64), pg_url)


def test_replays_race_to_one_batch_and_another_body_conflicts(pg_db, pg_url):
    async def race(writer):
        calls = [writer.register(source="s", comparisons=TRICKY, idempotency_key="k-1", request_sha256="a" * 64)
                 for _ in range(8)]
        return await asyncio.gather(*calls)

    results = run(race, pg_url)
    assert len({r["id"] for r, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    replay = results[[c for _, c in results].index(False)][0]
    assert replay["meta"] == {} and replay["content_sha256"] == results[0][0]["content_sha256"]
    with pytest.raises(Conflict, match="different request"):
        run(lambda w: w.register(source="s", comparisons=TRICKY, idempotency_key="k-1", request_sha256="b" * 64), pg_url)
    with pg_db.session() as s:
        assert s.query(FeedbackBatch).count() == 1
        assert len(comparisons_of(s, [results[0][0]["id"]])) == len(TRICKY)


def unreachable(url: str) -> str:
    """``url`` on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def test_an_unreachable_database_is_unavailable_not_a_crash(pg_url):
    down = unreachable(pg_url)
    with pytest.raises(DatabaseUnavailable):
        run(lambda w: w.register(source="s", comparisons=TRICKY, idempotency_key=None, request_sha256="d" * 64), down)


def test_warm_opens_the_pool_and_tolerates_a_database_that_is_down(pg_url):
    assert run(lambda w: w.warm(3), pg_url) == 3
    assert run(lambda w: w.warm(2), unreachable(pg_url)) == 0


def test_a_server_stopping_while_the_pool_warms_closes_cleanly(pg_url):
    # The app cancels warm() at shutdown; connections it had already acquired must go back to
    # the pool, or closing the pool would wait for them forever.
    async def stop_early(writer):
        opened_some = False
        for step in range(40):  # cancel at 0, 1, 2, ... ms: some connections are open, some still opening
            warming = asyncio.create_task(writer.warm(4))
            await asyncio.sleep(step / 1000)
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            opened_some |= writer._pool.get_size() > 0
            assert writer._pool.get_idle_size() == writer._pool.get_size(), f"a connection stayed acquired ({step} ms)"
        assert opened_some
        await asyncio.wait_for(writer._pool.close(), 5)

    run(stop_early, pg_url)


def test_dsn_of_a_sqlalchemy_url():
    assert asyncpg_dsn("postgresql+psycopg2://u:p@h:5433/db?sslmode=require") == "postgresql://u:p@h:5433/db?sslmode=require"
    with pytest.raises(StoreError, match="needs PostgreSQL"):
        asyncpg_dsn("sqlite:///x.db")
