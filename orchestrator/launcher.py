"""Starting a cycle now: what ``POST /v1/cycles`` and ``ratchet cycle run`` call.

A launcher validates the trigger's params, opens the cycle of (deployment
target, week) in the store (one per target and week: a second trigger finds
the first and starts nothing), and, when it created the cycle, starts its
flow run, handing it the week and the target (a resume reads the params from
the cycle row, but must know which target's cycle it resumes):

- ``DeploymentLauncher`` (production API): ``run_deployment`` of the
  ``weekly-cycle`` deployment with idempotency key ``cycle:<week>``
  (``cycle:<target>:<week>`` for a target other than "default"), not
  waiting; a Prefect worker on the ``cpu`` pool runs it, under the
  deployment's concurrency limit of 1. It needs ``PREFECT_API_URL`` and never
  starts Prefect's temporary server: no worker would poll one, and it would be
  an orchestrator nobody started on purpose, outliving the API. Without it the
  trigger opens the week's cycle and answers 503 saying to set it; the first
  trigger after that creates the cycle's flow run.
- ``ThreadLauncher`` (embedded, the demo): runs the flow in a thread of this
  process, against the Prefect API configured or else Prefect's temporary
  server, which the launcher starts for the first cycle and stops in
  ``close()`` (``ratchet api`` calls it on shutdown, SIGTERM included) if it
  was the one to start it.

The flow run reads the params from the cycle row, so they are not passed twice.

Operators' actions on a cycle go through the launcher too (the API holds it,
and may not import the orchestrator): ``cancel`` and ``rerun`` call
``orchestrator.operations``, and a re-run's new attempt is started as a new
cycle is (the deployment's idempotency key is ``cycle:<week>:a<n>``, or
``cycle:<target>:<week>:a<n>``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from api.schemas.registry import CyclePublic, CycleStarted
from orchestrator.settings import CycleSettings, cycle_target, resolve
from store.cycles import DEFAULT_TARGET, cycle_label, open_cycle
from store.db import Database
from store.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class _Launcher:
    trigger = "api"

    def __init__(self, database: Database, defaults: CycleSettings):
        self.database = database
        self.defaults = defaults

    def __call__(self, *, week: str, params: dict[str, Any], actor: str, target: str | None = None) -> CycleStarted:
        """Open the cycle of (target, week) and start it. ``target`` None: the params' ``deploy_target``, else
        the server's (``cycle_target``); a target and a params ``deploy_target`` that differ are 422."""
        target = cycle_target(self.defaults, params, target)
        resolve(self.defaults, params, trusted=False, target=target)  # InvalidInput (422) before anything is written
        self.prepare()  # ServiceUnavailable (503) before anything is written
        with self.database.session() as session:
            cycle, created = open_cycle(session, week=week, target=target, trigger=self.trigger,
                                        params={**params} if params else {})
            started = CycleStarted(cycle=CyclePublic.model_validate(cycle), created=created)
        if started.cycle.status == "running":
            self.start(week, created=created, actor=actor, target=target)
        return started

    def cancel(self, *, cycle_id: int, actor: str, api_key_id: int | None = None, via: str = "api",
               reason: str = "") -> dict[str, Any]:
        """Cancel a running or failed cycle (``orchestrator.operations.cancel``)."""
        from orchestrator.operations import cancel

        return cancel(self.database, cycle_id=cycle_id, actor=actor, api_key_id=api_key_id, via=via, reason=reason)

    def rerun(self, *, cycle_id: int, params: dict[str, Any], actor: str, api_key_id: int | None = None,
              via: str = "api", reason: str = "") -> dict[str, Any]:
        """Record a re-run of a failed or cancelled cycle with corrected ``params`` (checked as an API trigger's
        are) and start it; the plan (``orchestrator.operations.rerun``). ``ServiceUnavailable`` before anything
        is written if no flow run could be started; one that fails to start after the attempt is recorded
        leaves the cycle failed, to be resumed with ``ratchet cycle run --week W``."""
        from orchestrator.operations import rerun

        self.prepare()
        plan = rerun(self.database, self.defaults, cycle_id=cycle_id, params=params, actor=actor, trusted=False,
                     api_key_id=api_key_id, via=via, reason=reason)
        self.start(plan["week"], created=True, actor=actor, attempt=plan["attempt"], target=plan["target"])
        return plan

    def preview_rerun(self, *, cycle_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """The plan a re-run with ``params`` would follow (``orchestrator.operations.preview_rerun``); nothing
        is written."""
        from orchestrator.operations import preview_rerun

        return preview_rerun(self.database, self.defaults, cycle_id=cycle_id, params=params, trusted=False)

    def prepare(self) -> None:
        """Get ready to start a cycle, or raise ``ServiceUnavailable`` saying why it cannot be started."""

    def start(self, week: str, *, created: bool, actor: str, attempt: int = 1, target: str = DEFAULT_TARGET) -> None:
        """Start the flow run of the cycle of (target, week) (``attempt`` > 1: an operator's re-run of it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the launcher started (nothing, unless a subclass says otherwise)."""


def cycle_run_key(week: str, target: str = DEFAULT_TARGET, attempt: int = 1) -> str:
    """The idempotency key of a cycle's flow run of the ``weekly-cycle`` deployment: ``cycle:<week>`` for the
    default target (as before targets), ``cycle:<target>:<week>`` for another; ``:a<n>`` for re-run attempt n."""
    key = f"cycle:{week}" if target == DEFAULT_TARGET else f"cycle:{target}:{week}"
    return key if attempt == 1 else f"{key}:a{attempt}"


class OrchestratorUnavailable(ServiceUnavailable):
    """Prefect could not create the cycle's flow run (the API answers 503)."""


def configured_prefect_api() -> str | None:
    """The Prefect API URL of this process's settings (``PREFECT_API_URL`` or the profile), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


class ThreadLauncher(_Launcher):
    """Runs the new cycle's flow in a daemon thread of this process.

    If the process exits mid-cycle, the cycle stays ``running`` in the store;
    ``ratchet cycle run --week W [--target T]`` resumes it. ``run`` replaces the flow (and
    with it Prefect): it is called as ``run(week=, trigger=, target=)``. ``threads`` and ``errors`` are keyed
    by the cycle's label (``cycle_label``: the week for the default target, ``<week>@<target>`` for another),
    so two targets' cycles of one week run side by side.

    Without a configured Prefect API the flows run on Prefect's temporary
    server. The launcher starts it in the trigger's request, before the cycle
    is opened (so a server that fails to start is a 503 and nothing is
    written; the first trigger takes the server's start-up time), and
    ``close()`` stops it. Under uvicorn that order is safe: a shutdown waits
    for requests in flight before the app's shutdown calls ``close()``.
    """

    def __init__(self, database: Database, defaults: CycleSettings, *, run: Callable[..., Any] | None = None):
        super().__init__(database, defaults)
        self._run = run
        self.threads: dict[str, threading.Thread] = {}
        self.errors: dict[str, BaseException] = {}
        self._server_lock = threading.Lock()
        self._server: Any = None
        """Prefect's temporary server, when this launcher started it"""
        self._api_url: str | None = None
        """the temporary server's API URL, handed to the flows as their PREFECT_API_URL"""
        self._closed = False

    def prepare(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        with self._server_lock:
            if self._closed:
                raise OrchestratorUnavailable("the API server is shutting down, so it starts no cycle")
            if self._run is not None or self._api_url is not None or configured_prefect_api():
                return
            server = SubprocessASGIServer()  # the process-wide instance; the demo may have started it already
            if not server.running:
                log.info("PREFECT_API_URL is not set: starting Prefect's temporary server for this API process")
                try:
                    server.start(timeout=120)
                except Exception as exc:  # noqa: BLE001 - any failure to start: the trigger answers 503
                    server.stop()
                    raise OrchestratorUnavailable(
                        f"Prefect's temporary server did not start ({type(exc).__name__}: {exc}); "
                        "set PREFECT_API_URL to a running Prefect server and restart `ratchet api`"
                    ) from exc
                self._server = server
            self._api_url = server.api_url

    def start(self, week: str, *, created: bool, actor: str, attempt: int = 1, target: str = DEFAULT_TARGET) -> None:
        if not created:
            return  # whoever opened the cycle runs it; `ratchet cycle run --week W` resumes a crashed one
        label = cycle_label(week, target)
        log.info("%s %s cycle %s; running it in this process", actor,
                 "opened" if attempt == 1 else f"re-ran (attempt {attempt})", label)

        def run_cycle() -> None:
            from orchestrator.flow import weekly_cycle

            try:
                with self._flow_settings():
                    (self._run or weekly_cycle)(week=week, trigger=self.trigger, target=target)
            except BaseException as exc:  # noqa: BLE001 - recorded in the store by the flow; kept for callers
                self.errors[label] = exc
                log.error("cycle %s failed: %s", label, exc)

        thread = threading.Thread(target=run_cycle, name=f"cycle-{label}", daemon=True)
        self.threads[label] = thread
        thread.start()

    def _flow_settings(self) -> AbstractContextManager:
        """The flow's Prefect settings: the temporary server's URL as PREFECT_API_URL, when there is one.

        Handed over explicitly, so a flow still running once ``close()`` has stopped the server fails to
        reach it instead of starting another temporary server that nobody would stop.
        """
        if self._api_url is None:
            return nullcontext()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self._api_url})

    def close(self) -> None:
        """Stop Prefect's temporary server if this launcher started it; cycles still running then fail
        to reach it and stay ``running`` in the store, for ``ratchet cycle run --week W`` to resume."""
        with self._server_lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            log.info("stopping the temporary Prefect server at %s", server.api_url)
            server.stop()


class DeploymentLauncher(_Launcher):
    """Creates a flow run of the ``weekly-cycle`` deployment (``run_deployment``, not waiting)."""

    def __init__(self, database: Database, defaults: CycleSettings, *, deployment: str):
        super().__init__(database, defaults)
        self.deployment = deployment

    def start(self, week: str, *, created: bool, actor: str, attempt: int = 1, target: str = DEFAULT_TARGET) -> None:
        # Called for every trigger of a running cycle: the idempotency key makes a second call return the
        # first flow run, and a cycle opened while Prefect was down gets its flow run on the next trigger.
        # A re-run is a flow run of its own (its attempt in the key).
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

        try:
            # Never Prefect's temporary server: no worker polls it, and it would outlive this process.
            with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
                flow_run = run_deployment(
                    self.deployment,
                    parameters={"week": week, "trigger": self.trigger, "target": target},
                    idempotency_key=cycle_run_key(week, target, attempt),
                    timeout=0,
                    as_subflow=False,
                )
        except Exception as exc:  # noqa: BLE001 - any Prefect failure: the API answers 503
            raise OrchestratorUnavailable(
                f"cycle {cycle_label(week, target)} is opened but its flow run could not be created on deployment "
                f"{self.deployment!r}: {self._why(exc)}"
            ) from exc
        log.info("%s: cycle %s is flow run %s of %s", actor, cycle_label(week, target), flow_run.id, self.deployment)

    def _why(self, exc: Exception) -> str:
        """What went wrong and what to do, for the 503 (Prefect's own messages can be empty or ``None``)."""
        from prefect.exceptions import ObjectNotFound

        api = configured_prefect_api()
        if api is None:
            return (
                "PREFECT_API_URL is not set, and this API server does not start a temporary Prefect server (no "
                "worker would run the flow run there): set PREFECT_API_URL to the Prefect API your cpu-pool workers "
                "poll, restart `ratchet api` and trigger the cycle again (RATCHET_CYCLE_LAUNCHER=thread runs cycles "
                "inside the API process instead, on one machine)"
            )
        if isinstance(exc, ObjectNotFound):
            return (
                f"the Prefect API at {api} has no such deployment: register it with `prefect deploy --all "
                "--prefect-file deploy/prefect.yaml` (or set RATCHET_CYCLE_DEPLOYMENT to the one registered), "
                "then trigger the cycle again"
            )
        reason = str(exc).strip()
        if not reason or reason == "None":
            reason = "no message"
        return (
            f"the Prefect API at {api} failed ({type(exc).__name__}: {reason}); "
            "trigger the cycle again once it answers"
        )
