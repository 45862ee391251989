"""`workflowd dev`: the whole system in one command.

With no database configured it starts a PostgreSQL of its own (data in ./.workflowd,
kept for the next run; binaries from the `embedded` extra or the system), migrates,
runs a daemon with the five built-in types on sandbox adapters and the admin API, starts
a sample of workflows of every type (some fail on purpose, to show retries and
compensation), shows their progress, then a summary, and keeps serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

import psycopg
from psycopg import sql
from pydantic import SecretStr

from daemon.local_postgres import SUPERUSER, LocalPostgres, port_is_free
from daemon.logs import configure_logging
from daemon.process import run_daemon
from daemon.settings import ConfigurationError, Settings, describe_database, unreachable
from engine import Registry, WorkflowService
from engine.builtin import builtin_workflows, sandbox_adapters

DEV_HOME = Path(".workflowd")
DEV_DATABASE = "workflowd"
LOG_NAME = "workflowd.log"
# The embedded server listens here when the port is free, so that the DATABASE_URL dev
# prints stays the same from one run to the next.
DEV_PORT = 55432
# Written as the comment of every database dev uses: dev runs sandboxes that "complete"
# workflows against fake services, so it refuses a database without it (unless --force).
DEV_MARKER = "workflowd dev database: sandbox adapters, not for real work"
# Sandbox realism for the demo, unless the user set these: slow enough to watch, with
# some transient failures to show retries.
DEV_LATENCY_SECONDS = 0.15
DEV_FAILURE_RATE = 0.15
PROGRESS_INTERVAL_SECONDS = 0.3
BAR_WIDTH = 28
FINISHED = ("completed", "failed", "cancelled", "compensated")


def sample(run: str) -> list[tuple[str, dict[str, Any], str]]:
    """(type, input, user) of the demo's workflows; the last of each type fails on purpose."""
    audio = base64.b64encode(b"what is the status of my order").decode()
    inputs: dict[str, list[dict[str, Any]]] = {
        "contract_deployment": [
            *({"contractCode": "0x6080604052", "contractName": f"Token{n}"} for n in range(3)),
            {"contractCode": "0x", "contractName": "Empty"},
        ],
        "trade_execution": [
            *({"tokenA": "ETH", "tokenB": "USDC", "amount": f"{n}.5", "slippage": 0.01} for n in range(1, 4)),
            # Slippage is a fraction: 0.0001 (0.01 %) is tighter than the sandbox settles.
            {"tokenA": "ETH", "tokenB": "DAI", "amount": 1, "slippage": 0.0001},
        ],
        "ai_job_chain": [
            *({"audio": audio, "instruction": f"Answer #{n}"} for n in range(3)),
            {"audio": "not base64!"},
        ],
        "indexing_verification": [
            *({"fromBlock": 100 * n, "toBlock": 100 * n + 50} for n in range(3)),
            {"fromBlock": 10, "toBlock": 5},
        ],
        "reward_grant": [{"amount": 10 * (n + 1), "reason": "welcome"} for n in range(4)],
    }
    starts = []
    for workflow_type, items in inputs.items():
        for n, input in enumerate(items):
            # The last reward goes to a user the sandbox notifier cannot reach: revoked.
            user = f"unreachable-{run}" if workflow_type == "reward_grant" and n == 3 else f"{run}-user{n}"
            starts.append((workflow_type, input, user))
    return starts


class Progress:
    """Progress bars per type, redrawn in place on a terminal, printed as lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last = ""

    def show(self, counts: dict[str, dict[str, int]], totals: dict[str, int]) -> None:
        lines = [self.line(t, counts.get(t, {}), totals[t]) for t in sorted(totals)]
        text = "\n".join(lines)
        if text == self.last:
            return
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # back to the first bar, clear below
        self.out.write(text + "\n")
        self.out.flush()
        self.drawn, self.last = len(lines), text

    @staticmethod
    def line(workflow_type: str, counts: dict[str, int], total: int) -> str:
        done = sum(counts.get(state, 0) for state in FINISHED)
        filled = BAR_WIDTH * done // max(total, 1)
        states = ", ".join(
            f"{counts[state]} {state}"
            for state in (*FINISHED, "running", "compensating", "pending")
            if counts.get(state)
        )
        return f"{workflow_type:<22} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}  {states}"


def summary(counts: dict[str, dict[str, int]]) -> str:
    rows = [(t, *(counts.get(t, {}).get(state, 0) for state in FINISHED)) for t in sorted(counts)]
    header = f"{'TYPE':<22} " + " ".join(f"{state.upper():>11}" for state in FINISHED)
    return "\n".join([header, *(f"{t:<22} " + " ".join(f"{n:>11}" for n in numbers) for t, *numbers in rows)])


async def demo(service: WorkflowService, out: TextIO, run: str) -> None:
    """Start the sample, show its progress until every workflow is finished, then a summary."""
    ids: list[UUID] = []
    totals: dict[str, int] = {}
    for workflow_type, input, user in sample(run):
        if workflow_type == "indexing_verification" and input["toBlock"] < input["fromBlock"]:
            # As a plain SQL INSERT would: unvalidated, so the daemon refuses it at its claim.
            row = await service.store.insert_workflow(
                type=workflow_type, version=None, input=input, user_id=user, wallet_address=None,
                total_steps=0, max_retries=0, requires_compensation=False, priority=0,
            )  # fmt: skip
            assert row is not None  # the run tag makes every sample input new
            ids.append(row["id"])
        else:
            ids.append((await service.start_workflow(workflow_type, input, user)).id)
        totals[workflow_type] = totals.get(workflow_type, 0) + 1
    progress = Progress(out)
    while True:
        counts: dict[str, dict[str, int]] = {}
        for row in await service.store.count_by_type_and_state(ids):
            counts.setdefault(row["type"], {})[row["state"]] = row["count"]
        progress.show(counts, totals)
        if sum(n for c in counts.values() for s, n in c.items() if s in FINISHED) == len(ids):
            break
        await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
    out.write("\nsummary\n" + summary(counts) + "\n\n")
    out.write("The failures are on purpose: an empty contract, a trade past its slippage (unwound),\n")
    out.write("bad audio, an inverted block range inserted by plain SQL (refused at its claim),\n")
    out.write("an unreachable user (the grant is revoked).\n")
    out.write("The daemon keeps running; Ctrl-C stops it (the data stays in .workflowd for next time).\n")
    out.flush()


@contextmanager
def embedded_database(out: TextIO) -> Iterator[str]:
    """A PostgreSQL of our own with its data in ./.workflowd/pgdata; stopped (not removed) after."""
    if os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"):
        raise ConfigurationError(
            "workflowd dev does not start an embedded database under systemd: set DATABASE_URL "
            "and use `workflowd run`"
        )
    DEV_HOME.mkdir(exist_ok=True)
    DEV_HOME.chmod(0o755)  # as root, the database runs as an unprivileged user
    cluster = LocalPostgres(DEV_HOME.resolve() / "pgdata", port=DEV_PORT if port_is_free(DEV_PORT) else None)
    fresh = not cluster.initialized
    data = f"{'new' if fresh else 'existing'} data in {DEV_HOME}/pgdata"
    out.write(f"starting PostgreSQL from {cluster.bindir} ({data})\n")
    cluster.start()
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEV_DATABASE,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEV_DATABASE)))
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(DEV_DATABASE), sql.Literal(DEV_MARKER)
                )
            )
        yield f"postgresql://{SUPERUSER}@127.0.0.1:{cluster.port}/{DEV_DATABASE}"
    finally:
        cluster.stop()


@contextmanager
def dev_database(settings: Settings, force: bool) -> Iterator[str]:
    """The database DATABASE_URL (or DB_*) names, if dev made it (its marker) or `force`."""
    conninfo = settings.conninfo()
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            (comment,) = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname = current_database()"
            ).fetchone() or (None,)
    except psycopg.OperationalError as error:
        raise ConfigurationError(unreachable(settings, conninfo, error)) from None
    if comment != DEV_MARKER and not force:
        raise ConfigurationError(
            f"workflowd dev runs sandboxes that complete workflows against fake services, and "
            f"{describe_database(conninfo)} is not a database dev made (it has no dev marker): unset "
            "DATABASE_URL for dev's own database, use `workflowd run` for real work, or pass --force "
            "to use this one anyway"
        )
    yield conninfo


def sandbox_realism(settings: Settings) -> tuple[float, float]:
    """The sandboxes' latency (seconds) and injected failure rate: the demo's, unless the
    settings chose them."""
    chosen = settings.model_fields_set
    latency = settings.sandbox_latency_ms / 1000 if "sandbox_latency_ms" in chosen else DEV_LATENCY_SECONDS
    failures = settings.sandbox_failure_rate if "sandbox_failure_rate" in chosen else DEV_FAILURE_RATE
    return latency, failures


def dev_registry(settings: Settings) -> Registry:
    """The built-in types on sandbox adapters (slowed down and a little flaky for the
    demo, unless the settings say otherwise), and WORKFLOWD_MODULES."""
    registry = Registry(builtin_workflows(sandbox_adapters(*sandbox_realism(settings))))
    registry.load_modules(settings.modules)
    return registry


def run_dev(settings: Settings, *, force: bool = False) -> int:
    """Run the demo; returns the exit code. `force`: use a configured database that dev
    did not make."""
    out = sys.stdout
    DEV_HOME.mkdir(exist_ok=True)
    with (DEV_HOME / LOG_NAME).open("a", encoding="utf-8") as log:
        configure_logging("json", settings.log_level, stream=log)
        token = settings.admin_token_value()
        # A token the user set is never echoed, only where it came from: it may be a
        # production secret.
        shown_token = None
        if token:
            file = settings.admin_token_file
            shown_token = f"$(cat {shlex.quote(str(file))})" if file else "$WORKFLOWD_ADMIN_TOKEN"
        token = token or secrets.token_urlsafe(32)
        # The token is now given as is: a token file of the settings is read once, above.
        update = {
            "admin_token": SecretStr(token),
            "admin_token_file": None,
            "builtins": True,
            "adapters": "sandbox",
        }
        settings = settings.model_copy(update=update)
        registry = dev_registry(settings)
        if settings.database_url or settings.db_host:
            database, where = dev_database(settings, force), "the DATABASE_URL you set"
        else:
            database, where = embedded_database(out), None
        with database as conninfo:
            introduce(
                out, settings, registry, where or f"export DATABASE_URL={conninfo}", shown_token or token
            )
            run = secrets.token_hex(3)
            return asyncio.run(
                run_daemon(
                    settings, registry, conninfo, companion=lambda service, _token: demo(service, out, run)
                )
            )


def introduce(out: TextIO, settings: Settings, registry: Registry, database: str, token: str) -> None:
    """What dev serves and how to reach it: the database, the types, the admin API."""
    url = f"http://{settings.host}:{settings.port}"
    _, failures = sandbox_realism(settings)
    out.write(f"database   {database}\n")
    out.write(f"serving    {', '.join(registry.types)}\n")
    out.write(
        f"           on sandbox adapters; {failures:.0%} of their calls fail on purpose, to show retries\n"
    )
    out.write(f"admin API  {url}/docs   (token: {token})\n")
    out.write(f'try        curl -H "Authorization: Bearer {token}" {url}/admin/workflows/stats/overview\n')
    out.write(f"logs       {DEV_HOME / LOG_NAME}\n\n")
    out.flush()
