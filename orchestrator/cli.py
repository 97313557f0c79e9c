"""The ``ratchet`` command line (Typer)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.settings import Method
from store import errors
from store.cycles import week_problem
from store.db import Database, assert_schema_at_head, current_revision, head_revision, open_database, upgrade
from store.settings import get_settings

app = typer.Typer(help="Ratchet: iterated online RLHF as a service.", no_args_is_help=True)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
cycle_app = typer.Typer(help="Weekly cycles.", no_args_is_help=True)
deploy_app = typer.Typer(help="Deployments.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(cycle_app, name="cycle")
app.add_typer(deploy_app, name="deploy")
prompts_app = typer.Typer(help="Prompt sets.", no_args_is_help=True)
policy_app = typer.Typer(help="Policies.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
app.add_typer(policy_app, name="policy")
labeler_app = typer.Typer(help="AI labelers: a PM or an LM judge answering comparison tasks.", no_args_is_help=True)
app.add_typer(labeler_app, name="labeler")

console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _checked_week(option: str, week: str) -> str:
    """``week`` if it labels an ISO week that exists (2026 has 53, 2027 has 52), else exit saying why."""
    problem = week_problem(week)
    if problem is not None:
        _fail(f"{option} {problem}")
    return week


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


def _prefect_env(home) -> None:
    """Prefect settings for commands that run flows, set before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # A first run keeps Prefect's state (its temporary server's database) under RATCHET_HOME.
    if "PREFECT_HOME" not in os.environ:
        prefect_home = (home / "prefect").resolve()
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)


@app.command()
def demo(
    cycles: Annotated[int, typer.Option(min=1, max=50, help="how many weekly cycles to run")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="end with a JSON summary line on stdout")] = False,
    noise: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="share of the careful rater's judgements that are coin flips")] = 0.1,
    raters: Annotated[Literal["all", "one"], typer.Option(
        help="the simulated raters: all (careful, noisy, random) or one (the careful one)")] = "all",
    no_qc: Annotated[bool, typer.Option(
        "--no-qc", help="quality control flags raters but leaves none out of the snapshots")] = False,
    start_week: Annotated[str | None, typer.Option(
        "--start-week", help="ISO week of the first simulated cycle, e.g. 2026-W49 (default: this week)")] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="seed of P0, the raters, the gold comparisons, and the PM, policy and evaluation runs")] = 0,
    method: Annotated[Method, typer.Option(
        help="how each cycle improves the policy (improve.method): ppo, dpo, online_dpo, rloo, grpo, "
             "rejection_sampling")] = "ppo",
) -> None:
    """Run N full cycles of iterated online RLHF on the demo world, end to end.

    Embedded by default: a fresh SQLite store under RATCHET_HOME/demo, Prefect's
    temporary local server, the REST API on a loopback port, simulated raters
    posting through it (a careful, a noisy and a random one, each with its own
    key; quality control leaves the flagged ones out of the snapshots). Set
    RATCHET_DATABASE_URL to run it on PostgreSQL.
    """
    if start_week is not None:
        _checked_week("--start-week", start_week)
    settings = get_settings()
    _prefect_env(settings.home)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    from orchestrator.demo.command import json_line, rater_table, run_demo, summary_table

    hf_logging.set_verbosity_error()
    try:
        result = run_demo(settings, cycles=cycles, console=console, labeler_noise=noise, raters=raters, qc=not no_qc,
                          start_week=start_week, seed=seed, method=method)
    except errors.StoreError as exc:
        _fail(str(exc))
    Console().print(summary_table(result))
    Console().print(rater_table(result))
    console.print(
        f"gold score of the deployed policy: {result['gold_score_initial']:.3f} (P0) -> "
        f"{result['gold_score_final']:.3f} after {len(result['cycles'])} cycle(s); wall time {result['wall_s']:.0f} s"
        if result["gold_score_final"] is not None and result["gold_score_initial"] is not None
        else f"wall time {result['wall_s']:.0f} s"
    )
    env = "" if settings.database_url else f"RATCHET_HOME={(settings.home / 'demo').resolve()} "
    console.print(
        f"on the dashboard: {env}ratchet keys create --role operator --name me, then {env}ratchet api "
        "and open http://127.0.0.1:8000/dashboard"
    )
    if as_json:
        typer.echo(json_line(result))
    if any(row["status"] != "succeeded" for row in result["cycles"]) or len(result["cycles"]) < cycles:
        raise typer.Exit(1)


def _parse_params(items: list[str], raw: str | None) -> dict:
    """``--params JSON`` deep-merged with ``--param a.b=value`` items (values parsed as JSON when they can be)."""
    params: dict = {}
    if raw:
        try:
            params = json.loads(raw)
        except json.JSONDecodeError as exc:
            _fail(f"--params is not valid JSON: {exc}")
        if not isinstance(params, dict):
            _fail("--params must be a JSON object")
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            _fail(f"--param {item!r} is not of the form key=value (dotted keys for sections: ppo.config.learning_rate=1e-4)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _fail(f"--param {item!r}: {part} is not a section")
        node[leaf] = value
    return params


@cycle_app.command("run")
def cycle_run(
    week: Annotated[str | None, typer.Option(help="ISO week, e.g. 2026-W48 (default: this week)")] = None,
    param: Annotated[list[str], typer.Option("--param", help="a setting override, key=value (dotted: ppo.config.learning_rate=1e-4)")] = [],  # noqa: B006
    params: Annotated[str | None, typer.Option(help="setting overrides as a JSON object")] = None,
    via_deployment: Annotated[bool, typer.Option("--via-deployment", help="create a flow run of the weekly-cycle deployment instead of running here")] = False,
) -> None:
    """Start the week's cycle now (or resume it, after a crash or a failure).

    By default the flow runs in this process (worker steps run as the cycle's
    settings say: in-process, or as deployments on the gpu pool) and the
    cycle's summary is printed as JSON. A week's cycle that already succeeded
    is not run again.
    """
    from datetime import UTC, datetime

    from orchestrator.settings import week_of

    settings = get_settings()
    _prefect_env(settings.home)
    overrides = _parse_params(param, params)
    week = _checked_week("--week", week) if week is not None else week_of(datetime.now(UTC))
    if via_deployment:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            settings.cycle_deployment, parameters={"week": week, "params": overrides, "trigger": "cli"},
            idempotency_key=f"cycle:{week}", timeout=0, as_subflow=False,
        )
        typer.echo(json.dumps({"week": week, "flow_run_id": str(flow_run.id), "deployment": settings.cycle_deployment}))
        return
    from orchestrator.flow import weekly_cycle

    try:
        summary = weekly_cycle(week=week, params=overrides, trigger="cli")
    except errors.StoreError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary, default=str))
    if summary.get("status") == "failed":
        raise typer.Exit(1)


@cycle_app.command("defaults")
def cycle_defaults(
    param: Annotated[list[str], typer.Option("--param", help="a setting override, key=value (dotted: ppo.config.learning_rate=1e-4)")] = [],  # noqa: B006
    params: Annotated[str | None, typer.Option(help="setting overrides as a JSON object")] = None,
) -> None:
    """Print the effective cycle settings with every field's documentation.

    The server's defaults (RATCHET_CYCLE_CONFIG, else the built-in ones), with
    the overrides given here, checked as a trigger's params are; each worker
    step's config is listed field by field, with the value a cycle runs it with.
    """
    from orchestrator.settings import describe, load_defaults, resolve

    try:
        settings = resolve(load_defaults(get_settings().cycle_config), _parse_params(param, params), trusted=True)
    except errors.InvalidInput as exc:
        _fail("; ".join([str(exc), *(f"{e['field']}: {e['message']}" for e in exc.errors)]), code=2)
    typer.echo("\n".join(describe(settings)))


@cycle_app.command("show")
def cycle_show(week: Annotated[str, typer.Option(help="ISO week, e.g. 2026-W48")]) -> None:
    """Print a cycle's summary (versions, metrics, gate decision, stages) as JSON."""
    from sqlalchemy import select

    from orchestrator.report import cycle_summary
    from store.models import Cycle

    _checked_week("--week", week)
    db = _database()
    try:
        with db.session() as session:
            cycle_id = session.scalar(select(Cycle.id).where(Cycle.week == week))
        if cycle_id is None:
            _fail(f"there is no cycle for week {week}")
        typer.echo(json.dumps(cycle_summary(db, cycle_id), default=str))
    finally:
        db.dispose()


@deploy_app.command("rollback")
def deploy_rollback(
    target: Annotated[str, typer.Option(help="the deployment target")] = "default",
    reason: Annotated[str, typer.Option(help="why (kept in the deployment log)")] = "",
) -> None:
    """Restore the deployment that was active before the current one, then call the deploy hook."""
    import getpass

    from orchestrator.hooks import HookFailed, deploy_event, hook_from_settings
    from store.deployments import rollback

    settings = get_settings()
    hook = hook_from_settings(settings)
    db = _database()
    try:
        with db.session() as session:
            row = rollback(session, name=target, reason=reason, actor=f"cli:{getpass.getuser()}")
            event = deploy_event(session, row)
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    policy = event["policy"]
    console.print(
        f"rolled {target!r} back: deployment v{event['deployment']['version']} serves "
        f"{policy['name']} v{policy['version']}"
    )
    if hook is not None:
        try:
            hook(event)
        except HookFailed as exc:
            _fail(f"the rollback is recorded, but the deploy hook failed: {exc}")
        console.print(f"deploy hook {hook!r} called")
    typer.echo(json.dumps(event))


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


@prompts_app.command("add")
def prompts_add(
    path: Annotated[str, typer.Argument(help='JSONL, one {"id", "prompt"} a line')],
    name: Annotated[str, typer.Option(help="dataset name (cycles sample the one named in their settings)")] = "prompts",
) -> None:
    """Register a prompt set (the same file twice is one version)."""
    from orchestrator.bootstrap import register_prompt_set
    from store.artifacts import ArtifactStore

    db = _database()
    try:
        dataset, created = register_prompt_set(db, ArtifactStore(get_settings().resolved_artifacts_url), path, name=name)
    except errors.InvalidInput as exc:
        for problem in exc.errors[:20]:
            console.print(f"  line {problem.get('index')}: {problem.get('field')}: {problem.get('message')}")
        _fail(str(exc))
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"{'registered' if created else 'already registered:'} {dataset.name} v{dataset.version} "
               f"({dataset.row_count} prompts, id {dataset.id})")


@policy_app.command("add")
def policy_add(
    path: Annotated[str, typer.Argument(help="a Hugging Face model directory (safetensors)")],
    name: Annotated[str, typer.Option(help="policy name")] = "policy",
    deploy_to: Annotated[str | None, typer.Option("--deploy", help="deploy it on this target (e.g. default)")] = None,
) -> None:
    """Register an initial policy (P0), optionally deploying it; cycles start from the deployed policy."""
    from orchestrator.bootstrap import register_policy
    from store.artifacts import ArtifactStore

    db = _database()
    try:
        policy, deployment = register_policy(
            db, ArtifactStore(get_settings().resolved_artifacts_url), path, name=name, deploy_to=deploy_to
        )
    except errors.StoreError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"registered policy {policy.name} v{policy.version} (id {policy.id})"
               + (f", deployed on {deployment.name} v{deployment.version}" if deployment else ""))


@labeler_app.command("run")
def labeler_run(
    api_url: Annotated[str, typer.Option("--api-url", help="the Ratchet API, e.g. http://127.0.0.1:8000")],
    key: Annotated[str, typer.Option(help="a labeler API key")],
    rater_id: Annotated[str, typer.Option("--rater-id", help="the rater id its answers are given under")],
    judge_spec: Annotated[str, typer.Option("--judge", help="pm:PATH (a preference model) or lm:PATH (a causal LM)")],
    principles: Annotated[str | None, typer.Option(
        help="an LM judge's constitution: one principle a line, # comments (default: the built-in one)")] = None,
    principle_mode: Annotated[Literal["sample", "all"], typer.Option(
        "--principle-mode", help="an LM judge: one principle drawn per task (sample) or all in the prompt",
    )] = "sample",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, max=500, help="tasks leased and posted at a time")] = 32,
    max_tasks: Annotated[int | None, typer.Option("--max-tasks", min=1, help="stop after answering this many")] = None,
    poll: Annotated[float | None, typer.Option(
        min=0.1, help="when no task is open, ask again every SECONDS (default: stop)")] = None,
    operator_key: Annotated[str | None, typer.Option(
        "--operator-key", help="an operator key: print the labeler's agreement with the other raters")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Answer comparison tasks with a PM or an LM judge through the REST API, as one rater.

    Each lease is posted as one feedback batch whose source is ai:<pm|lm>:<name>,
    so snapshots count AI feedback apart; quality control treats the labeler as it
    treats people. Prints what it did as JSON on stdout; exits 1 when quality
    control leaves the rater out.
    """
    import threading

    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from orchestrator.ai_labeler import AILabeler
    from workers.common.config import WorkerError
    from workers.judge import load_judge

    try:
        judge = load_judge(judge_spec, principles=principles, principle_mode=principle_mode, device=device)
    except WorkerError as exc:
        _fail(str(exc), code=2)
    labeler = AILabeler(api_url, key, judge, rater_id=rater_id, batch_size=batch_size)
    console.print(f"AI labeler {rater_id!r}: {labeler.source} at {api_url}")
    stop = threading.Event()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("answering tasks", total=max_tasks)
            labeler.run(max_tasks=max_tasks, poll_s=poll, stop=stop, on_batch=lambda n: progress.advance(bar, n))
    except KeyboardInterrupt:
        stop.set()
    except httpx.HTTPStatusError as exc:
        _fail(f"{exc.request.method} {exc.request.url.path} answered {exc.response.status_code}: {exc.response.text}")
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the API at {api_url}: {exc}")
    stats = labeler.stats
    report = {"rater_id": rater_id, "source": labeler.source, **stats.as_dict()}
    console.print(f"answered {stats.comparisons} task(s) in {stats.batches} batch(es): "
                  + ", ".join(f"{c} {stats.choices[c]}" for c in ("a", "b", "tie")))
    if stats.excluded:
        console.print(f"[yellow]quality control leaves {rater_id!r} out:[/yellow] {stats.excluded}")
    if operator_key is not None:
        try:
            agreement = labeler.agreement(operator_key)
        except httpx.HTTPError as exc:
            _fail(f"cannot read the rater's numbers (GET /v1/raters/{rater_id}): {exc}")
        report["agreement"] = None if agreement is None else agreement._asdict()
        if agreement is None:
            console.print("agreement: the rater has given no comparison yet")
        else:
            kappa = "-" if agreement.kappa is None else f"{agreement.kappa:.3f}"
            console.print(f"agreement with the other raters: Cohen's kappa {kappa} over {agreement.agreement_pairs} "
                          f"answer pair(s); {agreement.answered} answered"
                          + ("; [red]flagged[/red]" if agreement.flagged else ""))
    labeler.close()
    typer.echo(json.dumps(report))
    if stats.excluded:
        raise typer.Exit(1)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the REST API and the operator dashboard (/dashboard) with uvicorn.

    POST /v1/cycles starts cycles as RATCHET_CYCLE_LAUNCHER says (a thread here on the
    embedded store, run_deployment of the weekly-cycle deployment otherwise), and
    rollbacks call RATCHET_DEPLOY_HOOK. The deployment launcher needs PREFECT_API_URL
    (without it POST /v1/cycles is a 503 saying so); the thread launcher without it
    starts Prefect's temporary server on the first trigger and stops it on shutdown.
    """
    import uvicorn

    _prefect_env(get_settings().home)
    _database().dispose()  # refuse a schema not at head before binding the port
    uvicorn.run(
        "orchestrator.service:create_service_app", factory=True, host=host, port=port, workers=workers,
        log_level=get_settings().log_level.lower(), access_log=False,
    )


def main() -> None:
    """Entry point for ``python -m orchestrator.cli``."""
    app(prog_name="ratchet")


if __name__ == "__main__":
    sys.exit(main())
