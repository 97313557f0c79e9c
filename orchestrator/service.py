"""The API server as ``ratchet api`` runs it: the app plus the orchestrator's wiring.

``create_service_app`` is the uvicorn factory: ``api.app.create_app`` with a
cycle launcher for ``POST /v1/cycles`` and the deploy hook for rollbacks.
``RATCHET_CYCLE_LAUNCHER`` picks the launcher:

- ``deployment`` (the default off the embedded store; production): the
  route opens the week's cycle and creates a flow run of the ``weekly-cycle``
  deployment (``RATCHET_CYCLE_DEPLOYMENT``) with ``run_deployment``; a Prefect
  worker runs it. The API process does no training. Without
  ``PREFECT_API_URL`` the route answers 503 saying to set it (and the server
  warns at start-up): a service does not spawn an orchestrator of its own that
  no worker polls.
- ``thread`` (the default on the embedded store): the flow runs in a thread
  of the API process, against the configured Prefect API or else Prefect's
  temporary server: a single-machine setup. The temporary server is started
  for the first cycle and belongs to the API process: the app's shutdown
  (uvicorn's, on SIGTERM or Ctrl-C) stops it.
- ``off``: ``POST /v1/cycles`` answers 503.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.app import create_app
from orchestrator.hooks import api_on_deploy, hook_from_settings
from orchestrator.launcher import DeploymentLauncher, ThreadLauncher, configured_prefect_api
from orchestrator.settings import load_defaults
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_service_app(settings: Settings | None = None) -> FastAPI:
    """The API app with its cycle launcher and deploy hook, from the ``RATCHET_*`` settings."""
    settings = settings or get_settings()
    hook = hook_from_settings(settings)
    app = create_app(settings, on_deploy=api_on_deploy(hook) if hook else None)
    defaults = load_defaults(settings.cycle_config)
    mode = settings.resolved_cycle_launcher
    if mode == "thread":
        app.state.cycle_launcher = ThreadLauncher(app.state.database, defaults)
    elif mode == "deployment":
        app.state.cycle_launcher = DeploymentLauncher(app.state.database, defaults, deployment=settings.cycle_deployment)
        if configured_prefect_api() is None:
            log.warning("PREFECT_API_URL is not set: POST /v1/cycles answers 503 until it is (and the server restarts)")
    if app.state.cycle_launcher is not None:
        _close_on_shutdown(app, app.state.cycle_launcher)
    # What the server imported and built lives as long as it does: left out of the collector's full passes,
    # which otherwise walk every module's objects (tens of ms each, the dashboard's p99 at a year of cycles).
    gc.freeze()
    return app


def _close_on_shutdown(app: FastAPI, launcher: ThreadLauncher | DeploymentLauncher) -> None:
    """Run ``launcher.close()`` when the app shuts down, after the app's own shutdown."""
    serve = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        try:
            async with serve(app_):
                yield
        finally:
            launcher.close()

    app.router.lifespan_context = lifespan
