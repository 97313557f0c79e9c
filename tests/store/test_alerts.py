"""The alert outbox: recorded once per key in the caller's transaction, delivered with retries, never raising."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import pytest
from sqlalchemy import func, select

from store.alerts import deliver_pending, record_alert
from store.cycles import open_cycle
from store.deployments import deploy, rollback
from store.models import Alert
from store.settings import Settings
from tests import builders
from tests.receivers import Receiver


def _settings(tmp_path, **alerts) -> Settings:
    return Settings(home=tmp_path, public_url="https://ratchet.example/", **alerts)


def _alerts(db) -> list[Alert]:
    with db.session() as s:
        return list(s.scalars(select(Alert).order_by(Alert.id)))


def _record(db, key: str = "gate_refused:1", **kw) -> Alert | None:
    with db.session() as s:
        return record_alert(s, event="gate_refused", dedupe_key=key, text="the gate refused policy v2", **kw)


class Sleeps(list):
    """A sleep that only remembers how long it was asked for."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_an_alert_is_recorded_once_and_delivered_once(db, tmp_path):
    first = _record(db, link="https://ratchet.example/dashboard/cycles/7", payload={"reasons": ["KL over budget"]})
    assert first is not None and first.status == "pending" and first.attempts == 0
    assert _record(db) is None  # the same key again: a no-op
    with db.session() as s:  # twice in one transaction too
        assert record_alert(s, event="x", dedupe_key="once", text="a") is not None
        assert record_alert(s, event="x", dedupe_key="once", text="b") is None
    assert len(_alerts(db)) == 2

    with Receiver() as hook:
        done = deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url), sleep=Sleeps())
        again = deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url), sleep=Sleeps())
    assert [d.status for d in done] == ["delivered", "delivered"] and again == []
    assert len(hook.bodies) == 2  # one POST each, and none for the second call
    body = hook.bodies[0]
    assert body["text"] == "the gate refused policy v2\nhttps://ratchet.example/dashboard/cycles/7"
    assert body["event"] == "gate_refused" and body["link"] == "https://ratchet.example/dashboard/cycles/7"
    assert body["payload"] == {"reasons": ["KL over budget"]} and body["dedupe_key"] == "gate_refused:1"
    assert body["cycle"] is None
    row = _alerts(db)[0]
    assert (row.status, row.attempts, row.last_error) == ("delivered", 1, None) and row.delivered_at is not None


def test_a_cycle_alert_links_to_the_cycles_page_under_the_public_url(db, tmp_path):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W30", trigger="manual", params={})
        record_alert(s, event="deadline", dedupe_key="deadline", text="gather ran out", cycle_id=cycle.id)
    assert _alerts(db)[0].link == f"/dashboard/cycles/{cycle.id}"  # a path: the link follows RATCHET_PUBLIC_URL
    with Receiver() as hook:
        deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url), sleep=Sleeps())
    (body,) = hook.bodies
    assert body["link"] == f"https://ratchet.example/dashboard/cycles/{cycle.id}" and body["cycle"] == "2026-W30"
    assert body["text"] == f"gather ran out\n{body['link']}" and body["cycle_id"] == cycle.id


def test_a_failing_webhook_is_retried_with_backoff_then_recorded_failed(db, tmp_path):
    _record(db)
    sleeps = Sleeps()
    with Receiver(status=500) as hook:
        done = deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url, alert_retries=2,
                                             alert_retry_delay_s=1.0), sleep=sleeps)
        later = deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url), sleep=sleeps)
    assert len(hook.bodies) == 3 and later == []  # three tries, then the alert is done with
    assert sleeps == [1.0, 2.0]  # exponential backoff between them
    assert [(d.status, d.attempts) for d in done] == [("failed", 3)]
    row = _alerts(db)[0]
    assert row.status == "failed" and row.attempts == 3 and row.delivered_at is None
    assert "answered 500" in row.last_error and "secret-path" not in row.last_error  # a webhook's path is its secret


def test_a_webhook_that_answers_at_the_second_try_is_delivered(db, tmp_path):
    _record(db)
    with Receiver(status=503) as hook:
        def sleep(_seconds):
            hook.status = 200  # the receiver came back while we waited

        done = deliver_pending(db, _settings(tmp_path, alert_webhook=hook.url), sleep=sleep)
    assert [(d.status, d.attempts) for d in done] == [("delivered", 2)] and len(hook.bodies) == 2
    row = _alerts(db)[0]
    assert row.status == "delivered" and "answered 503" in row.last_error  # the failed try stays on record


def test_an_unreachable_webhook_never_raises(db, tmp_path):
    _record(db)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = deliver_pending(db, _settings(tmp_path, alert_webhook=f"http://127.0.0.1:{port}/", alert_retries=1),
                           sleep=Sleeps())
    assert [(d.status, d.attempts) for d in done] == [("failed", 2)]
    assert "ConnectError" in _alerts(db)[0].last_error


def test_the_command_channel_gets_the_json_on_stdin(db, tmp_path):
    _record(db, cycle_id=None)
    out = tmp_path / "alerts.jsonl"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    command = f"{sys.executable} -c \"{script}\""
    done = deliver_pending(db, _settings(tmp_path, alert_command=command), sleep=Sleeps())
    assert [d.status for d in done] == ["delivered"]
    (body,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert body["event"] == "gate_refused" and body["text"] == "the gate refused policy v2"


def test_a_failing_or_hanging_command_is_recorded_failed(db, tmp_path):
    _record(db, "a")
    failing = f"{sys.executable} -c \"import sys; sys.stderr.write('no route to pager'); sys.exit(3)\""
    done = deliver_pending(db, _settings(tmp_path, alert_command=failing, alert_retries=1), sleep=Sleeps())
    assert [(d.status, d.attempts) for d in done] == [("failed", 2)]
    assert "exited 3: no route to pager" in _alerts(db)[0].last_error

    _record(db, "b")
    hanging = f"{sys.executable} -c \"import time; time.sleep(30)\""
    t0 = time.perf_counter()
    done = deliver_pending(db, _settings(tmp_path, alert_command=hanging, alert_retries=0, alert_timeout_s=0.3),
                           sleep=Sleeps())
    assert time.perf_counter() - t0 < 5
    assert [d.status for d in done] == ["failed"] and "took more than 0.3 s" in _alerts(db)[1].last_error


def test_without_a_channel_alerts_stay_pending(db, tmp_path):
    _record(db)
    assert deliver_pending(db, _settings(tmp_path)) == []
    assert _alerts(db)[0].status == "pending"


def test_two_transactions_recording_one_key_at_once_keep_one_row(db):
    """The loser's insert collides on the unique key (PostgreSQL) or finds the winner's row (SQLite, whose
    writers queue): either way it records nothing, and the rest of its transaction commits."""
    results = {}
    with db.session() as s:
        assert record_alert(s, event="deadline", dedupe_key="deadline:1:gather", text="first") is not None

        def loser():
            with db.session() as other:
                results["alert"] = record_alert(other, event="deadline", dedupe_key="deadline:1:gather", text="second")
                results["policy"] = builders.policy(other, name="still-written").id

        thread = threading.Thread(target=loser)
        thread.start()
        time.sleep(0.3)  # the loser is waiting on the winner's transaction now
    thread.join(timeout=30)
    assert results["alert"] is None and results["policy"] is not None
    assert [a.text for a in _alerts(db)] == ["first"]


def test_deploys_and_rollbacks_record_their_alert_in_their_transaction(db):
    with db.session() as s:
        p1, p2 = builders.policy(s), builders.policy(s)
        d1 = deploy(s, policy_id=p1.id, reason="P0", actor="ops")
        d2 = deploy(s, policy_id=p2.id, reason="better", actor="ops")
        back = rollback(s, reason="users complain", actor="alice")
    with pytest.raises(Exception):
        with db.session() as s:  # a rollback that does not commit leaves no alert
            rollback(s, reason="oops", actor="bob")
            raise RuntimeError("the caller failed")
    alerts = _alerts(db)
    assert [(a.event, a.dedupe_key) for a in alerts] == [
        ("deploy", f"deploy:{d1.id}"), ("deploy", f"deploy:{d2.id}"), ("rollback", f"deploy:{back.id}")]
    assert "Rolled back 'default' by alice: policy v1 serves again" in alerts[2].text
    assert "undoing v2" in alerts[2].text and "users complain" in alerts[2].text
    assert alerts[2].link == "/dashboard" and alerts[2].payload["rolled_back_id"] == d2.id
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Alert).where(Alert.status == "pending")) == 3
