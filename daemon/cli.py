"""The `workflowd` command line.

Every command talks to the database directly (no server needed). Errors a user can fix
(no database configured, database unreachable, schema missing, bad input) print one
line on stderr and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import AsyncConnection
from pydantic import ValidationError

from daemon.catalog import load_registry
from daemon.commands import (
    add_event_command,
    add_limits_commands,
    add_operator_commands,
    add_priority_command,
    add_schedule_commands,
    as_typed,
    idempotency_key,
    storable_text,
)
from daemon.dev import run_dev
from daemon.local_postgres import PostgresBinariesNotFoundError
from daemon.logs import configure_logging
from daemon.process import run_daemon
from daemon.settings import (
    ConfigurationError,
    Settings,
    unreachable,
    with_session_limits,
    without_password,
)
from daemon.tracing import start_tracing
from engine import UnstorableValueError, WorkflowEngineError, WorkflowService
from engine.definitions import priority_problem
from engine.idempotency import canonical_json
from engine.migrate import migrate
from engine.primary import connect_to_primary
from engine.records import StartResult
from engine.registry import WorkflowModuleNotFoundError
from engine.retention import FINISHED_STATES, WORKERS, Pruned, RetentionPolicy, prunable, prune
from engine.states import WorkflowState
from engine.store import Store

EXIT_FAILURE = 1
PRUNED_STATES = [state.value for state in (*FINISHED_STATES, WorkflowState.FAILED)]
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int] | int]


class DatabaseUnavailableError(Exception):
    """The database cannot be reached, or lacks the schema; the message says which."""


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[AsyncConnection[Any]]:
    """One autocommit connection, with a readable error when it cannot be had."""
    conninfo = with_session_limits(settings.conninfo(), settings)
    try:
        conn = await connect_to_primary(conninfo, autocommit=True)
    except psycopg.OperationalError as error:
        raise DatabaseUnavailableError(unreachable(settings, conninfo, error)) from None
    async with conn:
        yield conn


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    async with connect(settings) as conn:
        applied = await migrate(conn)
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("the schema is up to date")
    return 0


async def cmd_migrate_version(args: argparse.Namespace, settings: Settings) -> int:
    registry = load_registry(settings)
    async with connect(settings) as conn:
        moved = await WorkflowService(Store(conn), registry).migrate_version(
            args.type, args.from_version, args.to_version
        )
    print(
        f"moved {len(moved)} workflows of {args.type} from version {args.from_version} to {args.to_version}"
    )
    return 0


def _print_start(result: StartResult, as_json: bool) -> None:
    workflow = result.workflow
    if as_json:
        document = workflow.model_dump(mode="json") | {"created": result.created}
        print(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))
        return
    verb = "started" if result.created else "already started (same idempotency key)"
    print(f"{verb}: workflow {workflow.id}")
    print(f"  type             {workflow.type}")
    print(f"  state            {workflow.state}")
    if workflow.state == "pending" and workflow.next_retry_at > workflow.created_at:
        print(f"  starts at        {workflow.next_retry_at.isoformat(timespec='seconds')}")
    print(f"  user             {workflow.user_id or '-'}")
    print(f"  idempotency key  {workflow.idempotency_key}")


async def cmd_start(args: argparse.Namespace, settings: Settings) -> int:
    registry = load_registry(settings)
    async with connect(settings) as conn:
        result = await WorkflowService(Store(conn), registry).start(
            args.type,
            args.input,
            args.user,
            args.wallet,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            require_served=not args.allow_unserved,
            start_at=args.at,
            delay_seconds=args.delay,
        )
    _print_start(result, args.json)
    return 0


async def cmd_operator(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of the operator commands (status, list, ...) on a single connection."""
    async with connect(settings) as conn:
        print(await args.service_handler(args, WorkflowService(Store(conn), load_registry(settings))))
    return 0


async def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    configured = settings.retention_policy()
    policy = RetentionPolicy(
        finished_seconds=configured.finished_seconds if args.older_than is None else args.older_than,
        failed_seconds=configured.failed_seconds
        if args.failed_older_than is None
        else args.failed_older_than,
    )
    async with connect(settings) as conn:
        store = Store(conn)
        pruned = Pruned(await prunable(store, policy)) if args.dry_run else await prune(store, policy)
    report = {
        "dry_run": args.dry_run,
        "workflows": {state: pruned.removed[state] for state in PRUNED_STATES},
        "workers": None if args.dry_run else pruned.removed[WORKERS],
        "finished_older_than": policy.finished_seconds,
        "failed_older_than": policy.failed_seconds,
        "busy": pruned.busy,
    }
    print(json.dumps(report, indent=2) if args.json else _prune_report(report))
    return 0


def _prune_report(report: dict[str, Any]) -> str:
    workflows: dict[str, int] = report["workflows"]
    by_state = ", ".join(f"{count} {state}" for state, count in workflows.items())
    workers = "" if report["workers"] is None else f" and {report['workers']} worker rows"
    lines = [
        f"{'would remove' if report['dry_run'] else 'removed'} {sum(workflows.values())} finished "
        f"workflows with their steps and timeline ({by_state}){workers}",
        f"kept: {_kept(report['finished_older_than'], 'completed, cancelled, compensated')}; "
        f"{_kept(report['failed_older_than'], 'failed')}",
    ]
    if report["busy"]:
        lines.append("stopped early: another process (a daemon) is pruning now and goes on from here")
    return "\n".join(lines)


def _kept(seconds: float | None, states: str) -> str:
    return f"{states} for ever" if seconds is None else f"{states} finished in the last {seconds:g} s"


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    return run_dev(settings, force=args.force)


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # Tracing as the OTEL_* variables say (off when they say nothing), before the logs,
    # whose lines then carry the current span's ids.
    tracing = start_tracing(os.environ)
    configure_logging(settings.log_format, settings.log_level, trace_ids=tracing is not None)
    registry = load_registry(settings)
    if args.no_migrate:
        settings = settings.model_copy(update={"migrate": False})
    # An unreachable database is waited for (run_daemon), not an error: at boot or during a
    # failover it comes back, and systemd must not see a unit that keeps failing.
    try:
        return await run_daemon(settings, registry, settings.conninfo(), tracing=tracing)
    finally:
        if tracing is not None:
            tracing.shutdown()  # the last spans, within a bounded wait


def _json_object(text: str) -> dict[str, Any]:
    """The --input: a JSON object the engine can key and store; refused naming what was typed."""
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{as_typed(text)}: the input must be a JSON object")
    return value


def _json_value(text: str) -> Any:
    """Any JSON value the engine can store (numbers keep every digit); refused naming what
    was typed."""
    typed = as_typed(text)
    try:
        value = json.loads(text, parse_float=Decimal)  # an amount keeps every digit
        # The engine keys a start by this form: what it refuses (NaN, a NUL) is refused
        # here, and so is nesting too deep for it (or for json.loads) to walk.
        canonical_json(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{typed} is not valid JSON: {error}") from None
    except UnstorableValueError as error:
        raise argparse.ArgumentTypeError(f"{typed} cannot be stored: {error}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{typed} nests too deeply to be stored") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workflowd",
        description="A PostgreSQL-native workflow daemon. Configure it with DATABASE_URL "
        "(or DB_HOST, DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE) and WORKFLOWD_* settings.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon: claim and run workflows until stopped")
    run.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply migrations (WORKFLOWD_MIGRATE=false): wait until `workflowd migrate` has, "
        "for a database role without DDL rights",
    )
    run.set_defaults(handler=cmd_run)

    dev = commands.add_parser(
        "dev", help="the whole system in one command: a local database, a daemon, a demo (Ctrl-C stops)"
    )
    dev.add_argument(
        "--force",
        action="store_true",
        help="use the configured DATABASE_URL even though dev did not make it (dev's sandboxes "
        "complete workflows against fake services)",
    )
    dev.set_defaults(handler=cmd_dev)

    migrate_parser = commands.add_parser("migrate", help="apply pending schema migrations")
    migrate_parser.set_defaults(handler=cmd_migrate)

    move = commands.add_parser(
        "migrate-version",
        help="move a type's workflows in flight to another version of its definition whose steps line up",
    )
    move.add_argument("type", metavar="TYPE", type=storable_text, help="the workflow type")
    move.add_argument(
        "--from", dest="from_version", type=int, required=True, metavar="N", help="the version now"
    )
    move.add_argument(
        "--to", dest="to_version", type=int, required=True, metavar="M", help="the version to run"
    )
    move.set_defaults(handler=cmd_migrate_version)

    start = commands.add_parser("start", help="start a workflow (idempotent)")
    start.add_argument("type", metavar="TYPE", type=storable_text, help="the workflow type")
    start.add_argument("--input", type=_json_object, default={}, help="the input, a JSON object")
    start.add_argument("--user", type=storable_text, required=True, help="the user the workflow runs for")
    start.add_argument("--wallet", type=storable_text, default=None, help="the user's wallet address")
    start.add_argument(
        "--idempotency-key",
        type=idempotency_key,
        default=None,
        help="your own key for this start (default: computed from type, user and input); "
        "reusing it for a different start is refused",
    )
    start.add_argument(
        "--priority", type=priority_value, default=None, metavar="N",
        help="-100 to 100, smaller runs first (default: the type's definition's, else 0)",
    )  # fmt: skip
    when = start.add_mutually_exclusive_group()
    when.add_argument(
        "--at", type=moment, default=None, metavar="TIME",
        help="start it at TIME (RFC 3339 with a time zone: 2026-12-01T09:00:00+00:00), not before",
    )  # fmt: skip
    when.add_argument(
        "--delay", type=seconds_value, default=None, metavar="SECONDS", help="start it SECONDS from now"
    )
    start.add_argument(
        "--allow-unserved",
        action="store_true",
        help="start it even if no definition here and no live worker serves the type "
        "(for a worker yet to come)",
    )
    start.add_argument("--json", action="store_true", help="print the workflow as JSON")
    start.set_defaults(handler=cmd_start)

    pruning = commands.add_parser(
        "prune", help="delete finished workflows (with steps and timeline) kept longer than retention says"
    )
    pruning.add_argument(
        "--older-than", type=seconds_value, default=None, metavar="SECONDS",
        help="completed, cancelled and compensated workflows finished more than SECONDS ago "
        "(default: WORKFLOWD_RETENTION_DAYS)",
    )  # fmt: skip
    pruning.add_argument(
        "--failed-older-than", type=seconds_value, default=None, metavar="SECONDS",
        help="failed workflows finished more than SECONDS ago (default: WORKFLOWD_FAILED_RETENTION_DAYS)",
    )  # fmt: skip
    pruning.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    pruning.add_argument("--json", action="store_true", help="print JSON")
    pruning.set_defaults(handler=cmd_prune)

    add_operator_commands(commands)
    add_event_command(commands, _json_value)
    add_priority_command(commands, priority_value)
    add_limits_commands(commands)
    add_schedule_commands(commands, _json_object)
    return parser


def moment(text: str) -> datetime:
    """An argparse type: an RFC 3339 time with its time zone (`Z` or an offset)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{as_typed(text)} is not a time with a time zone, such as 2026-12-01T09:00:00+00:00"
        )
    return value


def priority_value(text: str) -> int:
    """An argparse type: a priority, a whole number from -100 to 100."""
    try:
        value: object = int(text)
    except ValueError:
        value = text
    if problem := priority_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return int(text)


def seconds_value(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a number of seconds (0 or more)")
    return value


def _settings_error(error: ValidationError) -> str:
    """Each invalid setting as the variable the user set, with what they typed:
    `WORKFLOWD_CONCURRENCY=abc: Input should be a valid integer`. (A secret is a
    SecretStr, which takes any text, so no error here ever quotes one; nor is the password
    of a connection string quoted.)"""
    problems = []
    for detail in error.errors(include_url=False):
        name = ".".join(str(part) for part in detail["loc"])
        field = Settings.model_fields.get(name)  # None: the name is a seed alias (PORT)
        variable = (
            name.upper() if field is None else str(field.validation_alias or f"WORKFLOWD_{name.upper()}")
        )
        typed = f"={without_password(detail['input'])}" if isinstance(detail.get("input"), str) else ""
        problems.append(f"{variable}{typed}: {detail['msg']}")
    return "invalid setting " + "; ".join(problems)


def explain(error: Exception) -> tuple[int, str]:
    """The exit code and the one line a user sees for an error they can act on."""
    if isinstance(error, ValidationError):
        return EXIT_USAGE, _settings_error(error)
    if isinstance(error, WorkflowModuleNotFoundError):
        # A setting to fix: the only modules a command loads are WORKFLOWD_MODULES.
        error = ConfigurationError(f"WORKFLOWD_MODULES: {error}")
    if isinstance(error, ConfigurationError | DatabaseUnavailableError | PostgresBinariesNotFoundError):
        return EXIT_USAGE, str(error)
    if isinstance(error, WorkflowEngineError):
        return EXIT_FAILURE, str(error)
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return EXIT_USAGE, (
            f"the database refused: {' '.join(str(error).split())} (a role without DDL rights: run "
            "`workflowd migrate` with one that has them, and the daemons with `run --no-migrate`)"
        )
    if isinstance(error, psycopg.errors.UndefinedTable):
        return EXIT_USAGE, "the database has no workflow schema yet: run `workflowd migrate` first"
    if isinstance(error, psycopg.Error):
        # The database went away or refused something mid-command.
        return EXIT_FAILURE, "database error: " + (" ".join(str(error).split()) or type(error).__name__)
    raise error


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    handler: Handler = cmd_operator if hasattr(args, "service_handler") else args.handler
    try:
        result = handler(args, Settings())
        return asyncio.run(result) if asyncio.iscoroutine(result) else result
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        code, message = explain(error)
        print(f"workflowd: {message}", file=sys.stderr)
        return code
