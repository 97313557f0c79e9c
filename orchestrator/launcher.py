"""Starting a cycle now: what ``POST /v1/cycles`` and ``ratchet cycle run`` call.

A launcher validates the trigger's params, opens the week's cycle in the
store (one per week: a second trigger finds the first and starts nothing),
and, when it created the cycle, starts its flow run:

- ``DeploymentLauncher`` (production API): ``run_deployment`` of the
  ``weekly-cycle`` deployment with idempotency key ``cycle:<week>``, not
  waiting; a Prefect worker on the ``cpu`` pool runs it, under the
  deployment's concurrency limit of 1.
- ``ThreadLauncher`` (embedded, the demo): runs the flow in a thread of this
  process, against the Prefect API configured (or Prefect's temporary server).

The flow run reads the params from the cycle row, so they are not passed twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from api.schemas.registry import CyclePublic, CycleStarted
from orchestrator.settings import CycleSettings, resolve
from store.cycles import open_cycle
from store.db import Database
from store.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class _Launcher:
    trigger = "api"

    def __init__(self, database: Database, defaults: CycleSettings):
        self.database = database
        self.defaults = defaults

    def __call__(self, *, week: str, params: dict[str, Any], actor: str) -> CycleStarted:
        resolve(self.defaults, params, trusted=False)  # InvalidInput (422) before anything is written
        with self.database.session() as session:
            cycle, created = open_cycle(session, week=week, trigger=self.trigger, params={**params} if params else {})
            started = CycleStarted(cycle=CyclePublic.model_validate(cycle), created=created)
        if started.cycle.status == "running":
            self.start(week, created=created, actor=actor)
        return started

    def start(self, week: str, *, created: bool, actor: str) -> None:
        raise NotImplementedError


class OrchestratorUnavailable(ServiceUnavailable):
    """Prefect could not create the cycle's flow run (the API answers 503)."""


class ThreadLauncher(_Launcher):
    """Runs the new cycle's flow in a daemon thread of this process.

    If the process exits mid-cycle, the cycle stays ``running`` in the store;
    ``ratchet cycle run --week W`` resumes it.
    """

    def __init__(self, database: Database, defaults: CycleSettings, *, run: Callable[..., Any] | None = None):
        super().__init__(database, defaults)
        self._run = run
        self.threads: dict[str, threading.Thread] = {}
        self.errors: dict[str, BaseException] = {}

    def start(self, week: str, *, created: bool, actor: str) -> None:
        if not created:
            return  # whoever opened the cycle runs it; `ratchet cycle run --week W` resumes a crashed one
        log.info("%s opened cycle %s; running it in this process", actor, week)

        def target() -> None:
            from orchestrator.flow import weekly_cycle

            try:
                (self._run or weekly_cycle)(week=week, trigger=self.trigger)
            except BaseException as exc:  # noqa: BLE001 - recorded in the store by the flow; kept for callers
                self.errors[week] = exc
                log.error("cycle %s failed: %s", week, exc)

        thread = threading.Thread(target=target, name=f"cycle-{week}", daemon=True)
        self.threads[week] = thread
        thread.start()


class DeploymentLauncher(_Launcher):
    """Creates a flow run of the ``weekly-cycle`` deployment (``run_deployment``, not waiting)."""

    def __init__(self, database: Database, defaults: CycleSettings, *, deployment: str):
        super().__init__(database, defaults)
        self.deployment = deployment

    def start(self, week: str, *, created: bool, actor: str) -> None:
        # Called for every trigger of a running cycle: the idempotency key makes a second call return the
        # first flow run, and a cycle opened while Prefect was down gets its flow run on the next trigger.
        from prefect.deployments import run_deployment

        try:
            flow_run = run_deployment(
                self.deployment,
                parameters={"week": week, "trigger": self.trigger},
                idempotency_key=f"cycle:{week}",
                timeout=0,
                as_subflow=False,
            )
        except Exception as exc:  # noqa: BLE001 - any Prefect failure: the API answers 503
            raise OrchestratorUnavailable(
                f"cycle {week} is opened but its flow run could not be created on deployment "
                f"{self.deployment!r}: {exc}; trigger it again once Prefect answers"
            ) from exc
        log.info("%s: cycle %s is flow run %s of %s", actor, week, flow_run.id, self.deployment)
