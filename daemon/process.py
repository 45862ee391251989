"""`workflowd run`: the daemon process around a Worker (signals, pool, HTTP, systemd)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from daemon import systemd
from daemon.health import Readiness, ReplicaLag
from daemon.http import EmbeddedServer, create_app, http_server
from daemon.metrics import Metrics
from daemon.periodic import fire_periodically, prune_periodically, recount_periodically, rekey_periodically
from daemon.relay import publisher_for, run_relay
from daemon.settings import ConfigurationError, JwtSettings, Settings, with_session_limits
from daemon.tracing import Tracing
from daemon.worker import Worker, WorkerConfig
from engine.migrate import Migration, migrate, pending_migrations
from engine.primary import READ_ONLY_ERRORS, connect_to_primary, require_primary
from engine.registry import Registry
from engine.service import WorkflowService
from engine.store import Store

LOG = structlog.get_logger("workflowd")
POOL_OPEN_TIMEOUT_SECONDS = 30.0
# The pool serves the steps (a transactional step holds a connection while it runs), the
# claim loop and the group commit: one connection per concurrent step and these two.
# The heartbeat, the listener, the queue-depth reporter and readiness have their own.
POOL_EXTRA_CONNECTIONS = 2
API_POOL_MAX_SIZE = 4
API_POOL_TIMEOUT_SECONDS = 5.0
POOL_MAX_SIZE = 20
# Waiting for the database at start: the first retry after this, doubling up to the cap.
DATABASE_WAIT_DELAY_MIN_SECONDS = 0.5
DATABASE_WAIT_DELAY_MAX_SECONDS = 10.0
# Room for one connection attempt (each host's connect timeout) and a migration.
DATABASE_ATTEMPT_MARGIN_SECONDS = 60.0
# After an outage every pool reconnects with a backoff that doubles each time (1, 2, 4 ...
# seconds) until this much time has passed, then give up and start again at the next
# demand: a short span keeps the gap between attempts short, so a fleet is back within
# seconds of a failover or a restart, not after psycopg_pool's default of 5 minutes.
POOL_RECONNECT_SECONDS = 4.0
# The pools on the primary lend connections to the primary only (engine/primary.py).
PRIMARY_ONLY: dict[str, Any] = {"configure": require_primary, "reset": require_primary}


async def worker_session(conn: AsyncConnection[Any]) -> None:
    """A new connection of the worker's pool: on the primary, with the hot path's plans
    pinned for the session (sql/queries/plans.sql)."""
    await require_primary(conn)
    await Store(conn).pin_hot_plans()


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        concurrency=settings.concurrency,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval,
        shutdown_grace=settings.shutdown_grace,
        step_timeout=settings.step_timeout,
    )


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT stop the worker gracefully; a second signal exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.stopping.is_set():
            LOG.warning("second_signal_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        LOG.info("signal_received", signal=signal.Signals(signum).name)
        systemd.notify("STOPPING=1")
        worker.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


Companion = Callable[[WorkflowService, str | None], Coroutine[Any, Any, None]]


async def run_daemon(
    settings: Settings,
    registry: Registry,
    conninfo: str,
    companion: Companion | None = None,
    *,
    tracing: Tracing | None = None,
) -> int:
    """Serve HTTP, wait for the database and migrate it, then run a worker until a signal
    stops it.

    `companion` (what `workflowd dev` adds: a sample and a progress display) runs beside
    them with the admin API's service and token, and is cancelled at shutdown. `tracing`:
    the spans of runs, attempts and admin requests (None: no tracing; the caller
    started it, and flushes it after).
    """
    if not registry.types:
        raise ConfigurationError(
            "no workflow types to serve: set WORKFLOWD_MODULES to the modules that define them"
        )
    admin_token = settings.admin_token_value()  # a bad token stops us before anything starts
    jwt = settings.jwt_settings()  # and so do incomplete JWT settings
    conninfo = with_session_limits(conninfo, settings)
    _warn_about_sandboxes(settings)
    pool = AsyncConnectionPool(
        conninfo,
        min_size=2,
        max_size=min(settings.concurrency, POOL_MAX_SIZE) + POOL_EXTRA_CONNECTIONS,
        open=False,
        # A wait for a connection must end well before a lease could lapse over it; a
        # write that times out here is retried while its lease lasts.
        timeout=settings.lease_seconds / 6,
        reconnect_timeout=POOL_RECONNECT_SECONDS,
        # The application name shows which backends are daemons' in pg_stat_activity.
        kwargs={"autocommit": True, "application_name": "workflowd"},
        configure=worker_session,
        reset=require_primary,
    )
    reads = settings.read_database_url
    replica = with_session_limits(reads, settings) if reads else None
    pools = Pools(worker=pool, api=api_pool(conninfo, "workflowd-api", **PRIMARY_ONLY), replica=replica)
    try:
        await serve(
            settings, registry, conninfo, pools, admin_token=admin_token, jwt=jwt, companion=companion,
            tracing=tracing,
        )  # fmt: skip
    finally:
        await pools.close()
    return 0


def api_pool(conninfo: str, application_name: str, **hooks: Any) -> AsyncConnectionPool:
    """A small pool for the admin API. It checks a connection before lending it, so a
    request never meets a connection the server dropped while it sat idle (the worker's
    hot path does not pay for that check), and a request waits API_POOL_TIMEOUT_SECONDS
    for one, then answers 503: a client learns of an outage in seconds, not after the
    pool's default of 30."""
    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=API_POOL_MAX_SIZE,
        open=False,
        check=AsyncConnectionPool.check_connection,
        timeout=API_POOL_TIMEOUT_SECONDS,
        reconnect_timeout=POOL_RECONNECT_SECONDS,
        kwargs={"autocommit": True, "application_name": application_name},
        **hooks,
    )


@dataclass
class Pools:
    """The daemon's connection pools: the worker's and the admin API's, on the primary,
    and, with WORKFLOWD_READ_DATABASE_URL, one on a replica for the API's lists, search
    and stats."""

    worker: AsyncConnectionPool
    api: AsyncConnectionPool
    # The read replica's connection string; its pool is made from it.
    replica: str | None = None
    reads: AsyncConnectionPool | None = field(init=False)

    def __post_init__(self) -> None:
        # A replica refuses writes by design: no primary-only hooks there.
        self.reads = api_pool(self.replica, "workflowd-api-reads") if self.replica else None

    def service(self, registry: Registry) -> WorkflowService:
        """The admin API's service: commands and reads by id on the primary, lists,
        search and stats on the replica when there is one."""
        return WorkflowService(Store(self.api), registry, reads=Store(self.reads) if self.reads else None)

    async def open_api(self) -> None:
        """Open the API's pools, connecting in the background: requests made while a
        database is away answer 503 after API_POOL_TIMEOUT_SECONDS."""
        for pool in (self.api, self.reads):
            if pool is not None:
                await pool.open(wait=False)

    async def close(self) -> None:
        for pool in (self.reads, self.api, self.worker):
            if pool is not None:
                await pool.close()


class SchemaBehindError(Exception):
    """The database lacks migrations this code needs, and this daemon may not apply them."""

    def __init__(self, missing: list[Migration]) -> None:
        names = ", ".join(migration.name for migration in missing)
        super().__init__(
            f"the database lacks {names}: run `workflowd migrate` (this daemon runs with --no-migrate)"
        )


def _warn_about_sandboxes(settings: Settings) -> None:
    if settings.builtins and settings.adapters == "sandbox":
        LOG.warning(
            "sandbox_adapters",
            message="THE BUILT-IN WORKFLOW TYPES TALK TO SANDBOXES, NOT TO REAL SERVICES: "
            "no chain, exchange or AI service is called (set WORKFLOWD_ADAPTERS=http for real ones)",
        )
    elif settings.builtins and not (settings.exchange_url and settings.notifier_url):
        sandboxed = [name for name, url in (("exchange", settings.exchange_url),
                                             ("notifier", settings.notifier_url)) if not url]  # fmt: skip
        LOG.warning(
            "sandbox_adapters",
            message=f"the built-in types' {' and '.join(sandboxed)} are SANDBOXES "
            "(set WORKFLOWD_EXCHANGE_URL and WORKFLOWD_NOTIFIER_URL for real ones)",
        )


async def wait_for_database(conninfo: str, worker: Worker, *, apply_migrations: bool = True) -> bool:
    """Connect to the primary and migrate it, trying again with a capped backoff until
    it answers; False when a signal stopped the daemon first. Without `apply_migrations`
    it waits, the same way, until someone else has applied them.

    A daemon started before its database (at boot, during a failover) waits instead of
    exiting: systemd would give up on a unit that fails five times in ten seconds. /livez
    sees a live process meanwhile, and /readyz says 503 until the database answers.
    """
    delay = DATABASE_WAIT_DELAY_MIN_SECONDS
    attempt = 1
    while True:
        worker.mark_alive()  # not the watchdog: systemd arms it at READY
        try:
            async with await connect_to_primary(conninfo, autocommit=True) as conn:
                if apply_migrations:
                    applied = await migrate(conn)
                elif missing := await pending_migrations(conn):
                    raise SchemaBehindError(missing)
                else:
                    applied = []
        except (psycopg.OperationalError, *READ_ONLY_ERRORS, SchemaBehindError) as error:
            event = "schema_behind" if isinstance(error, SchemaBehindError) else "database_unavailable"
            LOG.warning(event, error=" ".join(str(error).split()), attempt=attempt, retry_in=delay)
            # Not READY; the start timeout is pushed past the next attempt, so that
            # systemd does not kill a start that is only waiting.
            extend = round((delay + DATABASE_ATTEMPT_MARGIN_SECONDS) * 1_000_000)
            systemd.notify(f"STATUS=waiting for the database\nEXTEND_TIMEOUT_USEC={extend}")
        else:
            if applied:
                LOG.info("migrations_applied", names=applied)
            return True
        if await worker.stopped_within(delay):
            return False
        delay = min(delay * 2, DATABASE_WAIT_DELAY_MAX_SECONDS)
        attempt += 1


async def serve(
    settings: Settings,
    registry: Registry,
    conninfo: str,
    pools: Pools,
    *,
    admin_token: str | None,
    jwt: JwtSettings | None = None,
    companion: Companion | None = None,
    tracing: Tracing | None = None,
) -> None:
    metrics = Metrics(queue_depth_refresh_seconds=settings.queue_depth_interval)
    watchdog = systemd.Watchdog()
    worker = Worker(
        pools.worker, conninfo, registry, worker_config(settings), metrics=metrics, on_loop=watchdog.ping,
        tracing=tracing,
    )  # fmt: skip
    install_signal_handlers(worker)
    service = pools.service(registry)
    readiness = Readiness(conninfo)
    replica = ReplicaLag(pools.replica) if pools.replica else None
    app = create_app(
        service,
        worker,
        metrics,
        readiness,
        admin_token=admin_token,
        max_body_bytes=settings.max_body_bytes,
        replica=replica,
        jwt=jwt,
    )
    server = http_server(
        app,
        settings.host,
        settings.port,
        max_connections=settings.http_max_connections,
        head_timeout=settings.http_head_timeout,
    )
    http_task = asyncio.create_task(serve_http(server))
    try:
        while not server.started:  # listen first: a taken port stops us early
            if http_task.done():
                raise ConfigurationError(
                    f"cannot serve HTTP on {settings.host}:{settings.port} (is the port taken?): "
                    "set PORT and WORKFLOWD_HOST"
                )
            await asyncio.sleep(0.01)
        LOG.info(
            "http_listening",
            url=f"http://{settings.host}:{settings.port}",
            admin_api=admin_token is not None or jwt is not None,
            admin_jwt_issuer=jwt.issuer if jwt else None,
        )
        if admin_token is None and jwt is None:
            LOG.warning(
                "admin_api_disabled", reason="neither WORKFLOWD_ADMIN_TOKEN nor WORKFLOWD_JWT_JWKS_URL is set"
            )
        await pools.open_api()
        if not await wait_for_database(conninfo, worker, apply_migrations=settings.migrate):
            return
        await pools.worker.open(wait=True, timeout=POOL_OPEN_TIMEOUT_SECONDS)
        periodic = [
            prune_periodically(
                pools.worker, settings.retention_policy(), settings.retention_interval, metrics
            ),
            fire_periodically(pools.worker, registry, worker.id, settings.schedule_interval),
            recount_periodically(pools.worker),
            rekey_periodically(pools.worker),
        ]
        if settings.events_url is not None:
            publisher = publisher_for(settings.events_url.get_secret_value(), settings.events_exchange)
            metrics.export_relay()
            periodic.append(run_relay(conninfo, publisher, metrics))
        await _run_worker(
            worker,
            metrics,
            conninfo=conninfo,
            service=service,
            admin_token=admin_token,
            companion=companion,
            periodic=periodic,
        )
    finally:
        server.should_exit = True
        await asyncio.gather(http_task, return_exceptions=True)
        await readiness.close()
        if replica is not None:
            await replica.close()


async def _run_worker(
    worker: Worker,
    metrics: Metrics,
    *,
    conninfo: str,
    service: WorkflowService,
    admin_token: str | None,
    companion: Companion | None,
    periodic: list[Coroutine[Any, Any, None]],
) -> None:
    """The worker, the queue-depth reporter, the periodic tasks (retention, schedules)
    and the companion, until the worker stops."""
    side = [asyncio.create_task(task) for task in (metrics.queue_depth.run(conninfo), *periodic)]
    worker_task = asyncio.create_task(worker.run())
    systemd.notify("READY=1\nSTATUS=serving")
    if companion:
        side.append(asyncio.create_task(companion(service, admin_token)))
        side[-1].add_done_callback(_log_crash)
    try:
        await worker_task
    finally:
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)


async def serve_http(server: EmbeddedServer) -> None:
    """uvicorn's serve(), with its sys.exit() on a failed start turned into a plain end."""
    try:
        await server.serve()
    except SystemExit:
        LOG.error("http_start_failed")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        LOG.error("companion_crashed", error=repr(error), exc_info=error)
