"""The FastAPI application: ``create_app()`` builds it from settings.

The app refuses to start on a database whose schema is not at the code's
head revision (``ratchet db upgrade`` fixes that). ``ratchet api`` serves it
with uvicorn; ``uvicorn --factory api.app:create_app`` works too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.deps import KeyCache
from api.routes import (
    admin,
    cycles,
    dashboard,
    datasets,
    deployments,
    feedback_batches,
    imports,
    label,
    policies,
    preference_models,
    raters,
    tasks,
)
from store.artifacts import ArtifactStore
from store.db import Database, open_database
from store.feedback_async import AsyncFeedbackWriter
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Labeling tools register comparisons and fetch comparison tasks; operators read
the registry (datasets, preference models, policies and their lineage,
deployments, cycles), start cycles and roll deployments back.

Authenticate with `Authorization: Bearer <token>` (`ratchet keys create`).
Roles are ranked labeler < operator < admin; a key may do what its role and
the roles below it may. Every error body is `{"detail", "errors"}`; invalid
input names each bad record by `index` and `field`.
"""

ROUTERS = (
    admin, feedback_batches, imports, tasks, raters, datasets, preference_models, policies, deployments, cycles, label,
    dashboard,
)
"""The modules whose ``router`` the app serves, one per resource, in the order they are matched."""


def create_app(
    settings: Settings | None = None,
    *,
    database: Database | None = None,
    artifacts: ArtifactStore | None = None,
    cycle_launcher: Callable | None = None,
    on_deploy: Callable | None = None,
) -> FastAPI:
    """The API app. Without ``database`` it opens the configured one and
    refuses a schema that is not at head.

    ``cycle_launcher(week=, params=, actor=)`` starts a cycle for
    ``POST /v1/cycles`` (503 without one); ``on_deploy(deployment)`` is told of
    every rollback made through the API (the orchestrator's deploy hook).
    """
    settings = settings or get_settings()
    owns_database = database is None
    database = database or open_database(settings.resolved_database_url, pool_timeout_s=settings.db_pool_timeout_s)
    artifacts = artifacts or ArtifactStore(settings.resolved_artifacts_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # A 10,000-comparison batch allocates ~100k objects; with the default
        # thresholds that is hundreds of young collections and some full ones
        # that walk every object the process holds. Startup objects are frozen
        # out of collection and the young generation is made larger.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        # PostgreSQL: small feedback batches are written from the event loop
        # (store.feedback_async); the pool lives in the loop that serves.
        warming = None
        if database.engine.dialect.name == "postgresql" and settings.inline_batch_bytes > 0:
            app.state.inline_writer = await AsyncFeedbackWriter.open(
                database.url, max_size=settings.inline_pool_size, acquire_timeout_s=settings.db_pool_timeout_s
            )
            warming = asyncio.create_task(app.state.inline_writer.warm())
        try:
            yield
        finally:
            if warming is not None:
                warming.cancel()
                await asyncio.gather(warming, return_exceptions=True)
            if app.state.inline_writer is not None:
                await app.state.inline_writer.close()
                app.state.inline_writer = None
            if owns_database:
                database.dispose()

    app = FastAPI(title="Ratchet", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.database = database
    app.state.artifacts = artifacts
    app.state.cycle_launcher = cycle_launcher
    app.state.on_deploy = on_deploy
    app.state.inline_writer = None
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    errors.install(app)

    app.add_middleware(AnswerHeaders)
    for module in ROUTERS:
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)
    return app


class AnswerHeaders:
    """Adds to every answer ``Server-Timing: app;dur=<ms>`` (the time the app
    spent on the request, so a client can tell server time from network and
    its own queueing) and, unless the route set its own,
    ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
    ``Referrer-Policy: same-origin`` (no page of the app may be framed, sniffed
    into another type, or tell another site which URL linked to it). The
    dashboard adds its own Content-Security-Policy; the API docs page loads
    scripts and keeps none. A pure ASGI middleware: no extra task or thread hop."""

    SECURITY = (
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
    )

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                duration = (time.perf_counter() - start) * 1000
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in self.SECURITY if name not in present)
                headers.append((b"server-timing", f"app;dur={duration:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, with the models of bodies that routes read raw
    (to hash and size-check them first) added to its components."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from api.schemas.feedback import FeedbackBatchCreate

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema = FeedbackBatchCreate.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        components.update(schema.pop("$defs", {}))
        components["FeedbackBatchCreate"] = schema
        app.openapi_schema = spec
    return app.openapi_schema
