"""Alerts: the events an operator should hear of, kept in an outbox and delivered to a webhook or a command.

1. ``record_alert`` inserts a pending ``Alert`` row in the transaction of
   the event itself (the stage commit that saw the gate refuse, the deploy
   that wrote the deployment row), once per ``dedupe_key``: the event and
   its alert commit together or not at all, and a re-run that meets the
   same event again records nothing.
2. After that transaction commits, the writer calls ``deliver_pending``: it
   sends every pending alert to the configured channels
   (``RATCHET_ALERT_WEBHOOK``, a JSON POST with a Slack-compatible body;
   ``RATCHET_ALERT_COMMAND``, the same JSON on stdin), retried with
   exponential backoff, each try recorded on the row (``attempts``,
   ``last_error``, then ``status`` delivered or failed, ``delivered_at``).
   Delivery never raises: a receiver that is down is logged and recorded,
   and the cycle or the request that caused the alert goes on.

Delivery is at least once. On PostgreSQL each alert is claimed with a
session advisory lock while it is sent, so two deliverers (the API and the
orchestrator) never send it together; a process that dies between a
receiver's answer and the row's update sends it again next time. Every body
carries ``dedupe_key`` for a receiver that must drop repeats. Alerts recorded
while no channel is configured stay pending, and go out once one is.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.db import Database
from store.models import Alert, Cycle, Deployment, Policy, utcnow
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)

LOCK_NAMESPACE = 0x52414C54
"""first key of the advisory lock that claims an alert while it is sent (``RALT``)"""

MAX_TEXT = 4000
"""longest alert text kept (a stage's error can be a whole traceback line)"""

_delivering = threading.Lock()
"""one deliverer per process at a time (SQLite has no advisory locks; on PostgreSQL this saves connections)"""


# -- recording --------------------------------------------------------------------------------------


def cycle_link(cycle_id: int) -> str:
    """The path of cycle ``cycle_id``'s dashboard page (``message`` puts ``RATCHET_PUBLIC_URL`` before it)."""
    return f"/dashboard/cycles/{cycle_id}"


DASHBOARD_LINK = "/dashboard"
"""the path of the dashboard's front page (an alert that belongs to no cycle)"""


def absolute(link: str | None, settings: Settings) -> str | None:
    """``link`` as people open it: a path is put under ``RATCHET_PUBLIC_URL``; a full URL is kept."""
    if link is None or not link.startswith("/"):
        return link
    return settings.public_url.rstrip("/") + link


def record_alert(
    session: Session,
    *,
    event: str,
    dedupe_key: str,
    text: str,
    cycle_id: int | None = None,
    link: str | None = None,
    payload: dict[str, Any] | None = None,
) -> Alert | None:
    """A pending alert, in the caller's transaction; None when ``dedupe_key`` was recorded already.

    ``link`` defaults to the cycle's dashboard page when there is a cycle; a path (``/dashboard/...``) is
    kept as one and put under ``RATCHET_PUBLIC_URL`` when the alert is sent, so the link follows the setting.
    A concurrent transaction that records the same key first wins: this
    insert's SAVEPOINT is rolled back, and the caller's transaction goes on.
    """
    if session.scalar(select(Alert.id).where(Alert.dedupe_key == dedupe_key)) is not None:
        return None
    if link is None and cycle_id is not None:
        link = cycle_link(cycle_id)
    alert = Alert(event=event, dedupe_key=dedupe_key, cycle_id=cycle_id, text=_clip(text), link=link,
                  payload=payload or {}, status="pending", attempts=0)
    try:
        with session.begin_nested():
            session.add(alert)
    except IntegrityError:
        return None
    log.info("alert %s recorded: %s", dedupe_key, alert.text)
    return alert


def deployment_alert(session: Session, row: Deployment) -> Alert | None:
    """The alert of a deploy or a rollback (``row``, just written), once per deployment."""
    policy = session.get(Policy, row.policy_id)
    name = f"{policy.name} v{policy.version}" if policy is not None else f"policy {row.policy_id}"
    week = session.scalar(select(Cycle.week).where(Cycle.id == row.cycle_id)) if row.cycle_id is not None else None
    by = f" by {row.actor}" if row.actor else ""
    why = f": {row.reason}" if row.reason else ""
    if row.action == "rollback":
        undone = session.get(Deployment, row.rolled_back_id) if row.rolled_back_id is not None else None
        text = (f"Rolled back {row.name!r}{by}: {name} serves again (deployment v{row.version}"
                f"{f', undoing v{undone.version}' if undone is not None else ''}){why}")
    else:
        text = f"Deployed {name} to {row.name!r}{by} (deployment v{row.version}{f', cycle {week}' if week else ''}){why}"
    payload = {"target": row.name, "deployment_id": row.id, "deployment_version": row.version,
               "policy_id": row.policy_id, "policy": name, "previous_id": row.previous_id,
               "rolled_back_id": row.rolled_back_id, "actor": row.actor, "reason": row.reason}
    return record_alert(session, event=row.action, dedupe_key=f"deploy:{row.id}", text=text, cycle_id=row.cycle_id,
                        link=None if row.cycle_id is not None else DASHBOARD_LINK, payload=payload)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


# -- delivering -------------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """One channel did not take an alert (the message says which and why)."""


class Channel(Protocol):
    """Where alerts go: ``send`` returns on success and raises ``DeliveryFailed`` otherwise."""

    name: str

    def send(self, body: dict[str, Any]) -> None: ...


class Webhook:
    """A JSON POST to ``url``; any 2xx answer is delivered. Errors name the host only (a Slack webhook's path is
    its secret)."""

    def __init__(self, url: str, *, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        parts = urlsplit(url)
        self.name = f"webhook {parts.scheme}://{parts.netloc}"

    def send(self, body: dict[str, Any]) -> None:
        import httpx

        try:
            response = httpx.post(self.url, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{self.name} failed: {type(exc).__name__}: {exc}") from None
        if not response.is_success:
            raise DeliveryFailed(f"{self.name} answered {response.status_code}: {response.text[:300]}")


class Command:
    """A command run without a shell, given the alert's JSON on stdin; exit status 0 is delivered."""

    def __init__(self, spec: str, *, timeout_s: float):
        self.argv, self.timeout_s = shlex.split(spec), timeout_s
        if not self.argv:
            raise ValueError("RATCHET_ALERT_COMMAND is empty")
        self.name = f"command {self.argv[0]!r}"

    def send(self, body: dict[str, Any]) -> None:
        try:
            done = subprocess.run(self.argv, input=json.dumps(body, sort_keys=True), text=True, capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise DeliveryFailed(f"{self.name} took more than {self.timeout_s:g} s") from None
        except OSError as exc:
            raise DeliveryFailed(f"{self.name} could not run: {exc}") from None
        if done.returncode != 0:
            raise DeliveryFailed(f"{self.name} exited {done.returncode}: {(done.stderr or done.stdout)[-300:]}")


def channels(settings: Settings) -> list[Channel]:
    """The channels the settings configure (none: alerts stay pending)."""
    out: list[Channel] = []
    if settings.alert_webhook:
        out.append(Webhook(settings.alert_webhook, timeout_s=settings.alert_timeout_s))
    if settings.alert_command and settings.alert_command.strip():
        out.append(Command(settings.alert_command, timeout_s=settings.alert_timeout_s))
    return out


@dataclass(frozen=True)
class Delivery:
    """How one alert's delivery went."""

    alert_id: int
    event: str
    dedupe_key: str
    status: str
    """delivered, failed (out of tries) or pending (its channels failed and tries are left: a later call goes on)"""
    attempts: int
    """tries so far, this call's and earlier ones'"""
    error: str | None = None
    """the last failed try's error"""


def deliver_pending(
    database: Database,
    config: Settings | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    limit: int = 100,
) -> list[Delivery]:
    """Send every pending alert (oldest first, ``limit`` at most) to the channels of ``config``
    (default ``get_settings()``); how each went. Never raises: errors are logged."""
    out: list[Delivery] = []
    try:
        settings = config or get_settings()
        to = channels(settings)
        if not to:
            return out
        with _delivering:
            with database.session() as session:
                ids = list(session.scalars(
                    select(Alert.id).where(Alert.status == "pending").order_by(Alert.id).limit(limit)))
            for alert_id in ids:
                done = _deliver(database, alert_id, to, settings, sleep)
                if done is not None:
                    out.append(done)
    except Exception:  # noqa: BLE001 - an alert must never fail what raised it
        log.exception("could not deliver the pending alerts")
    return out


def _deliver(database: Database, alert_id: int, to: list[Channel], settings: Settings,
             sleep: Callable[[float], None]) -> Delivery | None:
    """Send one alert with its tries left; None when another deliverer has it or had it."""
    with _claimed(database, alert_id) as mine:
        if not mine:
            return None
        with database.session() as session:
            alert = session.get(Alert, alert_id)
            if alert is None or alert.status != "pending":
                return None
            body = message(session, alert, settings)
            attempts, event, key = alert.attempts, alert.event, alert.dedupe_key
        # Tries an earlier call made count (a deliverer that died half way): the budget is per alert.
        tries = settings.alert_retries + 1
        waiting = list(to)
        status, error = "pending", None
        for attempt in range(attempts, max(tries, attempts + 1)):
            if attempt > 0:
                sleep(settings.alert_retry_delay_s * 2 ** (attempt - 1))
            failures = []
            for channel in list(waiting):  # a channel that took the alert is not sent it again
                try:
                    channel.send(body)
                    waiting.remove(channel)
                except DeliveryFailed as exc:
                    failures.append(str(exc))
                except Exception as exc:  # noqa: BLE001 - a channel's own bug is a failed try too
                    failures.append(f"{channel.name} failed: {type(exc).__name__}: {exc}")
            attempts = attempt + 1
            status = "delivered" if not waiting else "failed" if attempts >= tries else "pending"
            error = "; ".join(failures) or error
            _record_try(database, alert_id, status=status, error="; ".join(failures) or None)
            if status != "pending":
                break
    if status == "delivered":
        log.info("alert %s delivered (%d tries)", key, attempts)
    else:
        log.error("alert %s not delivered after %d tries: %s", key, attempts, error)
    return Delivery(alert_id=alert_id, event=event, dedupe_key=key, status=status, attempts=attempts, error=error)


def _record_try(database: Database, alert_id: int, *, status: str, error: str | None) -> None:
    """One try, on the row: its count, its error (kept from an earlier try when this one had none), the status."""
    values: dict[str, Any] = {"attempts": Alert.attempts + 1, "status": status}
    if error is not None:
        values["last_error"] = _clip(error)
    if status == "delivered":
        values["delivered_at"] = utcnow()
    with database.session() as session:
        session.execute(update(Alert).where(Alert.id == alert_id).values(**values))


@contextmanager
def _claimed(database: Database, alert_id: int) -> Iterator[bool]:
    """Whether this deliverer holds the alert (PostgreSQL: a session advisory lock, on a connection of its own,
    held while it is sent; SQLite: the process's lock is all there is)."""
    if database.engine.dialect.name != "postgresql":
        yield True
        return
    with database.engine.connect() as conn:
        mine = bool(conn.scalar(select(func.pg_try_advisory_lock(LOCK_NAMESPACE, alert_id))))
        conn.commit()
        try:
            yield mine
        finally:
            if mine:
                conn.scalar(select(func.pg_advisory_unlock(LOCK_NAMESPACE, alert_id)))
                conn.commit()


def message(session: Session, alert: Alert, settings: Settings) -> dict[str, Any]:
    """The JSON each channel gets: Slack's ``text`` (the alert and its link), then the alert's fields."""
    week = session.scalar(select(Cycle.week).where(Cycle.id == alert.cycle_id)) if alert.cycle_id is not None else None
    link = absolute(alert.link, settings)
    return {
        "text": f"{alert.text}\n{link}" if link else alert.text,
        "event": alert.event,
        "cycle": week,
        "cycle_id": alert.cycle_id,
        "link": link,
        "payload": alert.payload,
        "dedupe_key": alert.dedupe_key,
        "alert_id": alert.id,
        "created_at": alert.created_at.isoformat() if alert.created_at else None,
    }
