"""The ``ratchet`` command line (Typer)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Literal

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from api.formats import FormatName
from orchestrator.settings import Method
from store import errors
from store.cycles import week_problem
from store.db import Database, assert_schema_at_head, current_revision, head_revision, open_database, upgrade
from store.settings import get_settings


class BadInput(Exception):
    """Input a command cannot use (an option's value, a missing or unreadable file): ``error: <message>`` on
    stderr and exit code 2."""


BAD_INPUT = (BadInput, errors.InvalidInput, errors.NotFound, errors.Conflict)
"""what the user gave wrong, the store's refusals included: one line on stderr and exit code 2"""
MAX_ERROR_DETAILS = 100
"""an InvalidInput's bad records printed under its line (the rest counted)"""


class _Commands(typer.core.TyperGroup):
    """The ``ratchet`` command group: the one place a command's errors become what the user reads.

    ``BAD_INPUT`` (bad input, and the store's InvalidInput, NotFound and
    Conflict) is ``error: <message>`` on stderr, an InvalidInput's bad
    records indented under it, and exit code 2; any other store error (a
    schema not at head, a database that does not answer) is the same line
    with exit code 1. Everything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BAD_INPUT as exc:
            _report(exc)
            raise typer.Exit(2) from None
        except errors.StoreError as exc:
            _report(exc)
            raise typer.Exit(1) from None


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr, on one line (not wrapped to the terminal, no markup read in the message)."""
    typer.secho("error:", fg="red", err=True, nl=False)
    typer.echo(f" {message}", err=True)


def _report(exc: Exception) -> None:
    _error_line(str(exc))
    details = getattr(exc, "errors", None) or []
    for detail in details[:MAX_ERROR_DETAILS]:
        where = [f"line {detail['index']}"] if detail.get("index") is not None else []
        if detail.get("field") and detail.get("field") != "line":
            where.append(str(detail["field"]))
        typer.echo(f"  {': '.join([*where, str(detail.get('message', ''))])}", err=True)
    if len(details) > MAX_ERROR_DETAILS:
        typer.echo(f"  ... and {len(details) - MAX_ERROR_DETAILS} more", err=True)


app = typer.Typer(help="Ratchet: iterated online RLHF as a service.", no_args_is_help=True, cls=_Commands)
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
feedback_app = typer.Typer(help="Feedback batches: preference pairs imported from files.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")

console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    """End the command with ``error: <message>`` on stderr (for bad input raise ``BadInput`` instead: exit code 2)."""
    _error_line(message)
    raise typer.Exit(code)


def _checked_week(option: str, week: str) -> str:
    """``week`` if it labels an ISO week that exists (2026 has 53, 2027 has 52), else ``BadInput`` saying why."""
    problem = week_problem(week)
    if problem is not None:
        raise BadInput(f"{option} {problem}")
    return week


def _database() -> Database:
    """The configured database, refusing a schema that is not at head (``SchemaNotAtHead``: exit code 1)."""
    return open_database(get_settings().resolved_database_url)


@app.callback()
def _main() -> None:
    logging.basicConfig(level=get_settings().log_level, format="%(levelname)s %(name)s: %(message)s")
    # Alembic narrates every connection at INFO; the commands say what happened.
    logging.getLogger("alembic").setLevel(logging.WARNING)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the schema (a no-op when it is at head already)."""
    url = get_settings().resolved_database_url
    before, after = upgrade(url, revision)
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
    result = run_demo(settings, cycles=cycles, console=console, labeler_noise=noise, raters=raters, qc=not no_qc,
                      start_week=start_week, seed=seed, method=method)
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
        f"and open {settings.public_url.rstrip('/')}/dashboard; each cycle's page:"
    )
    for row in result["cycles"]:
        console.print(f"  cycle {row['cycle']} ({row['week']}, {row['status']}): {row['page']}")
    if as_json:
        typer.echo(json_line(result))
    if any(row["status"] != "succeeded" for row in result["cycles"]) or len(result["cycles"]) < cycles:
        raise typer.Exit(1)


def _parse_params(items: list[str], raw: str | None) -> dict:
    """``--params JSON`` deep-merged with ``--param a.b=value`` items (values parsed as JSON when they can be);
    ``BadInput`` saying what is wrong with them."""
    params: dict = {}
    if raw:
        try:
            params = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise BadInput("--params must be a JSON object")
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--param {item!r} is not of the form key=value (dotted keys for sections: "
                           "ppo.config.learning_rate=1e-4)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadInput(f"--param {item!r}: {part} is not a section")
        node[leaf] = value
    return params


@cycle_app.command("run")
def cycle_run(
    week: Annotated[str | None, typer.Option(help="ISO week, e.g. 2026-W48 (default: this week)")] = None,
    param: Annotated[list[str], typer.Option("--param", help="a setting override, key=value (dotted: ppo.config.learning_rate=1e-4)")] = [],  # noqa: B006
    params: Annotated[str | None, typer.Option(help="setting overrides as a JSON object")] = None,
    via_deployment: Annotated[bool, typer.Option("--via-deployment", help="create a flow run of the weekly-cycle deployment instead of running here")] = False,
    target: Annotated[str, typer.Option(help="the deployment target whose cycle it is")] = "default",
) -> None:
    """Start the week's cycle of a deployment target now (or resume it, after a crash or a failure).

    By default the flow runs in this process (worker steps run as the cycle's
    settings say: in-process, or as deployments on the gpu pool) and the
    cycle's summary is printed as JSON. A cycle that already succeeded is not
    run again. Each target has its own cycle of a week (``--target``).
    """
    from datetime import UTC, datetime

    from orchestrator.launcher import cycle_run_key
    from orchestrator.settings import week_of

    settings = get_settings()
    _prefect_env(settings.home)
    overrides = _parse_params(param, params)
    week = _checked_week("--week", week) if week is not None else week_of(datetime.now(UTC))
    _checked_target("--target", target)
    if via_deployment:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            settings.cycle_deployment,
            parameters={"week": week, "params": overrides, "trigger": "cli", "target": target},
            idempotency_key=cycle_run_key(week, target), timeout=0, as_subflow=False,
        )
        typer.echo(json.dumps({"week": week, "target": target, "flow_run_id": str(flow_run.id),
                               "deployment": settings.cycle_deployment}))
        return
    _run_flow(week, overrides, target)


def _checked_target(option: str, target: str) -> str:
    """``target`` if it can name a cycle's deployment target, else ``BadInput`` saying why."""
    from store.cycles import target_problem

    problem = target_problem(target)
    if problem is not None:
        raise BadInput(f"{option} {problem}")
    return target


def _week_cycle_id(db: Database, week: str, target: str) -> int:
    """The id of the cycle of (target, week) (``NotFound`` if there is none)."""
    from store.cycles import DEFAULT_TARGET, find_cycle

    with db.session() as session:
        cycle = find_cycle(session, week=week, target=target)
        if cycle is None:
            of = "" if target == DEFAULT_TARGET else f" of target {target!r}"
            raise errors.NotFound(f"there is no cycle for week {week}{of}")
        return cycle.id


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@cycle_app.command("cancel")
def cycle_cancel(
    week: Annotated[str, typer.Option(help="ISO week, e.g. 2026-W48")],
    reason: Annotated[str, typer.Option(help="why (recorded with the cancel, shown on the cycle's page)")] = "",
    target: Annotated[str, typer.Option(help="the deployment target whose cycle it is")] = "default",
) -> None:
    """Cancel the week's running (or failed) cycle of a deployment target.

    The store marks it cancelled and closes its open tasks; finished stages and
    versions are kept. The Prefect flow run and the step runs of its week and
    target are set to Cancelling (PREFECT_API_URL), and the step the cycle
    waits on stops at its next unit of work, registering nothing; another
    target's cycle of the week runs on. Prints what was done as JSON.
    """
    from orchestrator.operations import cancel
    from store.cycles import cycle_label

    _checked_week("--week", week)
    _checked_target("--target", target)
    settings = get_settings()
    _prefect_env(settings.home)
    db = _database()
    try:
        out = cancel(db, cycle_id=_week_cycle_id(db, week, target), actor=_actor(), via="cli", reason=reason)
    finally:
        db.dispose()
    console.print(f"cycle {cycle_label(week, target)} cancelled; Prefect: {out['prefect']}")
    typer.echo(json.dumps(out, default=str))


@cycle_app.command("rerun")
def cycle_rerun(
    week: Annotated[str, typer.Option(help="ISO week, e.g. 2026-W48")],
    param: Annotated[list[str], typer.Option("--param", help="a corrected setting, key=value (dotted: ppo.learning_rate=1e-4)")] = [],  # noqa: B006
    params: Annotated[str | None, typer.Option(help="corrected settings as a JSON object")] = None,
    reason: Annotated[str, typer.Option(help="why (recorded with the attempt)")] = "",
    via_deployment: Annotated[bool, typer.Option("--via-deployment", help="create a flow run of the weekly-cycle deployment instead of running here")] = False,
    target: Annotated[str, typer.Option(help="the deployment target whose cycle it is")] = "default",
) -> None:
    """Re-run the week's failed or cancelled cycle of a deployment target with corrected settings, as a new attempt.

    The corrections are merged over the cycle's params and checked as a
    trigger's are. Finished stages whose inputs did not change are kept; the
    rest run again (the plan, with why, is printed first). Then the flow runs
    here, as `ratchet cycle run` does, and the summary is printed as JSON.
    """
    from orchestrator.flow import current_env
    from orchestrator.launcher import cycle_run_key
    from orchestrator.operations import rerun
    from store.cycles import cycle_label

    _checked_week("--week", week)
    _checked_target("--target", target)
    settings = get_settings()
    _prefect_env(settings.home)
    overrides = _parse_params(param, params)
    env = current_env()  # the database and default settings the flow run here will use
    plan = rerun(env.database, env.defaults, cycle_id=_week_cycle_id(env.database, week, target), params=overrides,
                 actor=_actor(), trusted=True, via="cli", reason=reason)
    console.print(f"cycle {cycle_label(week, target)}, attempt {plan['attempt']}: changed "
                  f"{', '.join(plan['changed']) or 'nothing'}; keeps {', '.join(plan['kept']) or 'no stage'}")
    for stage in plan["rerun"]:
        console.print(f"  runs {stage} again: {plan['why'][stage]}")
    if via_deployment:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            settings.cycle_deployment, parameters={"week": week, "trigger": "cli", "target": target},
            idempotency_key=cycle_run_key(week, target, plan["attempt"]), timeout=0, as_subflow=False,
        )
        typer.echo(json.dumps({**plan, "flow_run_id": str(flow_run.id), "deployment": settings.cycle_deployment}))
        return
    _run_flow(week, {}, target)


def _run_flow(week: str, overrides: dict, target: str) -> None:
    """Run the cycle flow of (target, week) here and print its summary as JSON; exit 1 if it failed or was
    cancelled."""
    from prefect.exceptions import CancelledRun

    from orchestrator.flow import weekly_cycle
    from store.cycles import cycle_label

    try:
        summary = weekly_cycle(week=week, params=overrides, trigger="cli", target=target)
    except CancelledRun as exc:
        _fail(f"cycle {cycle_label(week, target)} was cancelled while it ran: {exc}")
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

    settings = resolve(load_defaults(get_settings().cycle_config), _parse_params(param, params), trusted=True)
    typer.echo("\n".join(describe(settings)))


@cycle_app.command("show")
def cycle_show(
    week: Annotated[str, typer.Option(help="ISO week, e.g. 2026-W48")],
    target: Annotated[str, typer.Option(help="the deployment target whose cycle it is")] = "default",
) -> None:
    """Print a cycle's summary (versions, metrics, gate decision, stages) as JSON."""
    from orchestrator.report import cycle_summary

    _checked_week("--week", week)
    _checked_target("--target", target)
    db = _database()
    try:
        typer.echo(json.dumps(cycle_summary(db, _week_cycle_id(db, week, target)), default=str))
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
    from store.alerts import deliver_pending
    from store.deployments import rollback

    settings = get_settings()
    hook = hook_from_settings(settings)
    db = _database()
    try:
        with db.session() as session:
            row = rollback(session, name=target, reason=reason, actor=f"cli:{getpass.getuser()}", api_key_id=None,
                           via="cli")
            event = deploy_event(session, row)
        deliver_pending(db, settings)  # the rollback's alert, now that it committed (never raises)
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
    finally:
        db.dispose()
    typer.echo(f"registered policy {policy.name} v{policy.version} (id {policy.id})"
               + (f", deployed on {deployment.name} v{deployment.version}" if deployment else ""))


IMPORT_READ_BYTES = 1 << 20
"""bytes ``ratchet feedback import`` reads (and parses) at a time"""


@feedback_app.command("import")
def feedback_import(
    path: Annotated[str, typer.Argument(help="a JSONL file of preference pairs, plain or gzipped")],
    fmt: Annotated[FormatName, typer.Option(
        "--format", help="hh-rlhf: {chosen, rejected} dialogues; trl: {prompt, chosen, rejected} strings; "
                         "trl-conversational: the same as {role, content} message lists")] = "hh-rlhf",
    source: Annotated[str | None, typer.Option(help="the batch's source (default: import:<format>)")] = None,
    rater_id: Annotated[str | None, typer.Option(
        "--rater-id", help="the rater id of every comparison (default: the source)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="write nothing if any line is skipped")] = False,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="import the file once: run again with this key, nothing is written and the "
                                  "first import is reported (another file under the key is refused)")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print the result as POST /v1/feedback-batches/import answers it")] = False,
) -> None:
    """Import a file of preference pairs as one feedback batch, as POST /v1/feedback-batches/import does.

    Each line becomes a comparison whose chosen response is preferred to the
    rejected one. A line that cannot be used is skipped, named at the end
    with its reason, and the rest are imported (--strict: nothing is
    written); a file with no usable line writes nothing. The batch counts
    in the next cycle's snapshot. Prints what was registered on stdout.
    """
    import hashlib

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from api.formats import DecodedTooLarge, FormatError, JsonlImportParser
    from api.schemas.feedback import MAX_TEXT_CHARS, FeedbackBatchPublic, ImportResult, SkippedLine
    from store.feedback import IdempotentReplay
    from store.imports import MAX_SKIPPED_REPORTED, PreferenceImport, import_counts, replay_of, replay_winner

    settings = get_settings()
    limit = settings.max_import_bytes
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the import has read it
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None
    db = None
    try:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise BadInput(f"{path} is {size} bytes, over the import limit of {limit} (RATCHET_MAX_IMPORT_BYTES)")
        db = _database()
        hasher, skipped, job = hashlib.sha256(), None, None
        if idempotency_key is not None and (batch := replay_of(db, idempotency_key=idempotency_key)) is not None:
            while chunk := fh.read(IMPORT_READ_BYTES):
                hasher.update(chunk)
            replay_of(db, idempotency_key=idempotency_key, request_sha256=hasher.hexdigest())  # Conflict: another file
            console.print(f"{path} was imported under idempotency key {idempotency_key!r} already: nothing written")
        else:
            parser = JsonlImportParser(fmt, max_decoded_bytes=limit, max_text_chars=MAX_TEXT_CHARS)
            job = PreferenceImport(db, parser, fmt=fmt, source=source, rater_id=rater_id,
                                   max_records=settings.max_batch_records)
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
            try:
                # Drawn on a terminal only: elsewhere (a pipe, a log) it would only leave a blank line.
                with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
                    bar = progress.add_task(f"reading {os.path.basename(path)}", total=size)
                    while chunk := fh.read(IMPORT_READ_BYTES):
                        hasher.update(chunk)
                        job.consume(chunk)
                        progress.update(bar, advance=len(chunk), description=(
                            f"reading {os.path.basename(path)}: {job.imported} imported, {job.skipped_count} skipped"))
                    job.end()
                batch = job.finish(strict=strict, idempotency_key=idempotency_key, request_sha256=hasher.hexdigest())
                skipped = job.skipped
            except IdempotentReplay as lost:  # a concurrent import under this key committed first
                job.abort(lost)
                batch = replay_winner(db, lost)
                console.print(f"{path} was imported under idempotency key {idempotency_key!r} meanwhile: "
                              "nothing written")
            except (FormatError, DecodedTooLarge) as exc:
                job.abort(exc)
                raise BadInput(f"{path} could not be read: {exc}; nothing was written") from None
            except BaseException as exc:
                raise job.abort(exc) from None
    finally:
        fh.close()
        if db is not None:
            db.dispose()
    counts = import_counts(batch)
    named = skipped if skipped is not None else counts.skipped_lines  # a replay has the first ones with its batch
    for line in named:
        typer.echo(f"skipped line {line.line}: {line.reason}", err=True)
    if counts.skipped > len(named):
        kept = f"the first {len(named)} are named" if named else "none is named"
        typer.echo(f"... {counts.skipped - len(named)} more line(s) skipped ({kept}; an import keeps the reasons of "
                   f"{MAX_SKIPPED_REPORTED})", err=True)
    if as_json:
        result = ImportResult(batch=FeedbackBatchPublic.model_validate(batch), imported=counts.imported,
                              skipped=counts.skipped,
                              skipped_lines=[SkippedLine(line=s.line, reason=s.reason) for s in counts.skipped_lines])
        typer.echo(result.model_dump_json())
        return
    rater = f", rater {job.rater_id!r}" if job is not None and skipped is not None else ""
    typer.echo(f"imported {counts.imported} comparison(s) from {path} as feedback batch {batch.id} "
               f"(source {batch.source!r}{rater}); {counts.skipped} line(s) skipped")


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
