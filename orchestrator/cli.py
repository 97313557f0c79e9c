"""The ``ratchet`` command line (Typer)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from store import errors
from store.db import Database, assert_schema_at_head, current_revision, head_revision, open_database, upgrade
from store.settings import get_settings

app = typer.Typer(help="Ratchet: iterated online RLHF as a service.", no_args_is_help=True)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _database() -> Database:
    """The configured database, refusing a schema that is not at head."""
    try:
        return open_database(get_settings().resolved_database_url)
    except errors.StoreError as exc:
        _fail(str(exc))


@app.callback()
def _main() -> None:
    logging.basicConfig(level=get_settings().log_level, format="%(levelname)s %(name)s: %(message)s")
    # Alembic narrates every connection at INFO; the commands say what happened.
    logging.getLogger("alembic").setLevel(logging.WARNING)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the schema (a no-op when it is at head already)."""
    url = get_settings().resolved_database_url
    try:
        before, after = upgrade(url, revision)
    except errors.StoreError as exc:
        _fail(str(exc))
    if before == after:
        typer.echo(f"schema already at {after}: nothing to do")
    else:
        typer.echo(f"schema upgraded from {before or '(empty)'} to {after}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the database and of this code."""
    db = Database(get_settings().resolved_database_url)
    try:
        typer.echo(f"database: {current_revision(db.engine) or '(empty)'}  code: {head_revision()}")
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()


def _status(as_json: bool) -> None:
    from store.status import store_counts

    settings = get_settings()
    db = _database()
    try:
        with db.session() as session:
            counts = store_counts(session)
        revision = assert_schema_at_head(db.engine)
    finally:
        db.dispose()
    report = {
        "database": db.engine.url.render_as_string(hide_password=True),
        "schema_revision": revision,
        "artifacts_url": settings.resolved_artifacts_url,
        **counts,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title="Ratchet store", show_header=False)
    for key, value in report.items():
        table.add_row(key, "-" if value is None else str(value))
    Console().print(table)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Print what the store holds."""
    _status(as_json)


@app.command()
def demo(
    cycles: Annotated[int, typer.Option(help="how many cycles to run")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="end with a JSON summary line")] = False,
) -> None:
    """Set up the embedded store (SQLite, local artifacts) and show its status.

    Full cycles on a demo world arrive with the orchestrator; until then the
    demo creates the store, migrates it to head and prints what it holds.
    """
    from store.artifacts import ArtifactStore

    settings = get_settings()
    before, after = upgrade(settings.resolved_database_url)
    ArtifactStore(settings.resolved_artifacts_url)
    console.print(f"store at {settings.resolved_database_url} (schema {before or '(empty)'} -> {after})")
    console.print(f"artifacts at {settings.resolved_artifacts_url}")
    if cycles:
        console.print(f"[yellow]note:[/yellow] running {cycles} cycle(s) needs the orchestrator; none were run")
    _status(as_json)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="labeler, operator or admin")],
    name: Annotated[str, typer.Option(help="a unique name for the key")],
) -> None:
    """Create an API key and print its token (shown this once only)."""
    from store.keys import create_api_key

    db = _database()
    try:
        with db.session() as session:
            key, token = create_api_key(session, name=name, role=role)
            console.print(f"created {key.role} key {key.name!r} (id {key.id}); the token is shown once:")
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(token)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (names, roles, prefixes; never tokens)."""
    from store.keys import list_api_keys

    db = _database()
    try:
        with db.session() as session:
            table = Table("id", "name", "role", "prefix", "created", "revoked")
            for key in list_api_keys(session, limit=10_000):
                table.add_row(
                    str(key.id), key.name, key.role, key.prefix, key.created_at.isoformat(timespec="seconds"),
                    key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-",
                )
    finally:
        db.dispose()
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Option(help="the key's name")]) -> None:
    """Revoke an API key; requests with it get 401 from then on."""
    from store.keys import revoke_api_key

    db = _database()
    try:
        with db.session() as session:
            key = revoke_api_key(session, name=name)
            typer.echo(f"revoked key {key.name!r} at {key.revoked_at.isoformat(timespec='seconds')}")
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the REST API (and, later, the dashboard) with uvicorn."""
    import uvicorn

    _database().dispose()  # refuse a schema not at head before binding the port
    uvicorn.run(
        "api.app:create_app", factory=True, host=host, port=port, workers=workers,
        log_level=get_settings().log_level.lower(), access_log=False,
    )


def main() -> None:
    """Entry point for ``python -m orchestrator.cli``."""
    app(prog_name="ratchet")


if __name__ == "__main__":
    sys.exit(main())
