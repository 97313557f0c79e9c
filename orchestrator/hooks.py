"""The deploy hook: tell a serving stack that the active policy changed.

After every deploy (by a cycle) and every rollback (``ratchet deploy
rollback``, ``POST /v1/deployments/rollback``) the hook receives one JSON
event::

    {"event": "deploy" | "rollback", "target": "default",
     "deployment": {"id", "version", "previous_id", "rolled_back_id", "reason", "actor"},
     "policy": {"id", "name", "version", "uri", "sha256"}, "cycle": "2026-W48" | null}

``RATCHET_DEPLOY_HOOK`` is either an ``http(s)://`` URL, POSTed the event
(any 2xx answer is success), or a command, split like a shell line and run
without a shell, given the event on stdin and as ``RATCHET_DEPLOY_EVENT`` in
its environment (exit status 0 is success). A hook must be idempotent:
after a crash the orchestrator calls it again for the same deployment
(at-least-once), and the event always describes the deployment that is
active, so "reload what is active" is the right reaction.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
from collections.abc import Callable
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, object_session

from store.artifacts import get_artifact
from store.cycles import get_cycle
from store.models import Deployment
from store.policies import get_policy

log = logging.getLogger(__name__)


class HookFailed(RuntimeError):
    """The deploy hook did not succeed."""


def deploy_event(session: Session, deployment: Deployment) -> dict[str, Any]:
    """The hook's JSON event for ``deployment``."""
    policy = get_policy(session, deployment.policy_id)
    artifact = get_artifact(session, policy.artifact_id) if policy.artifact_id is not None else None
    return {
        "event": deployment.action,
        "target": deployment.name,
        "deployment": {
            "id": deployment.id,
            "version": deployment.version,
            "previous_id": deployment.previous_id,
            "rolled_back_id": deployment.rolled_back_id,
            "reason": deployment.reason,
            "actor": deployment.actor,
        },
        "policy": {
            "id": policy.id,
            "name": policy.name,
            "version": policy.version,
            "uri": artifact.uri if artifact else None,
            "sha256": artifact.sha256 if artifact else None,
        },
        "cycle": get_cycle(session, deployment.cycle_id).week if deployment.cycle_id is not None else None,
    }


class DeployHook:
    """A configured hook: a webhook URL or a command."""

    def __init__(self, spec: str, *, timeout_s: float = 30.0):
        spec = spec.strip()
        if not spec:
            raise ValueError("a deploy hook needs a URL or a command")
        self.spec = spec
        self.timeout_s = timeout_s
        self.is_webhook = spec.startswith(("http://", "https://"))
        self.argv = None if self.is_webhook else shlex.split(spec)

    def __repr__(self) -> str:
        return f"DeployHook({'webhook' if self.is_webhook else 'command'} {self.argv[0] if self.argv else self.spec.split('?')[0]!r})"

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        """Deliver ``event``; returns what happened, raises ``HookFailed`` otherwise."""
        body = json.dumps(event, sort_keys=True)
        if self.is_webhook:
            import httpx

            try:
                response = httpx.post(
                    self.spec, content=body, headers={"Content-Type": "application/json"}, timeout=self.timeout_s
                )
            except httpx.HTTPError as exc:
                raise HookFailed(f"deploy webhook {self.spec} failed: {exc}") from None
            if not response.is_success:
                raise HookFailed(f"deploy webhook {self.spec} answered {response.status_code}: {response.text[:500]}")
            return {"kind": "webhook", "status": response.status_code}
        try:
            done = subprocess.run(
                self.argv,
                input=body,
                text=True,
                capture_output=True,
                timeout=self.timeout_s,
                env={**os.environ, "RATCHET_DEPLOY_EVENT": body},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HookFailed(f"deploy hook command {self.argv[0]!r} failed: {exc}") from None
        if done.returncode != 0:
            raise HookFailed(
                f"deploy hook command {self.argv[0]!r} exited {done.returncode}: {(done.stderr or done.stdout)[-500:]}"
            )
        return {"kind": "command", "exit_status": 0}


def hook_from_settings(settings) -> DeployHook | None:
    """The hook ``RATCHET_DEPLOY_HOOK`` names, or None."""
    if not settings.deploy_hook:
        return None
    return DeployHook(settings.deploy_hook, timeout_s=settings.deploy_hook_timeout_s)


def api_on_deploy(hook: DeployHook) -> Callable[[Deployment], None]:
    """``app.state.on_deploy`` for the API: call ``hook`` once the route's transaction commits.

    The rollback route calls ``on_deploy(row)`` before its session commits;
    the event is built then (inside the transaction) and delivered after the
    commit, so a serving stack never hears of a rollback that did not
    happen. A failed hook is logged as an error: the rollback stands.
    """

    def on_deploy(row: Deployment) -> None:
        session = object_session(row)
        if session is None:  # not in a session: nothing to wait for
            _deliver(hook, None, row)
            return
        payload = deploy_event(session, row)

        def after_commit(_session: Session) -> None:
            _deliver(hook, payload, row)

        sa_event.listen(session, "after_commit", after_commit, once=True)

    return on_deploy


def _deliver(hook: DeployHook, payload: dict[str, Any] | None, row: Deployment) -> None:
    try:
        if payload is None:
            raise HookFailed("the deployment row is not attached to a session")
        hook(payload)
        log.info("deploy hook %r delivered %s of %s v%s", hook, payload["event"], row.name, row.version)
    except HookFailed as exc:
        log.error("deploy %s v%s is recorded but its hook failed: %s", row.name, row.version, exc)
