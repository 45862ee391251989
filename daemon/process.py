"""`workflowd run`: the daemon process around a Worker (signals, pool, HTTP, systemd)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from daemon import systemd
from daemon.health import Readiness
from daemon.http import EmbeddedServer, create_app, http_server
from daemon.metrics import Metrics
from daemon.settings import ConfigurationError, Settings, with_session_limits
from daemon.worker import Worker, WorkerConfig
from engine.migrate import migrate
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
    settings: Settings, registry: Registry, conninfo: str, companion: Companion | None = None
) -> int:
    """Migrate, then run a worker and its HTTP server until a signal stops them.

    `companion` (what `workflowd dev` adds: a sample and a progress display) runs beside
    them with the admin API's service and token, and is cancelled at shutdown.
    """
    if not registry.types:
        raise ConfigurationError(
            "no workflow types to serve: set WORKFLOWD_MODULES to the modules that define them"
        )
    admin_token = settings.admin_token_value()  # a bad token stops us before anything starts
    conninfo = with_session_limits(conninfo, settings)
    async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
        applied = await migrate(conn)
    if applied:
        LOG.info("migrations_applied", names=applied)
    if settings.builtins and settings.adapters == "sandbox":
        LOG.warning(
            "sandbox_adapters",
            message="THE BUILT-IN WORKFLOW TYPES TALK TO SANDBOXES, NOT TO REAL SERVICES: "
            "no chain, exchange or AI service is called (set WORKFLOWD_ADAPTERS=http for real ones)",
        )
    elif settings.builtins:
        LOG.warning(
            "sandbox_adapters",
            message="the exchange and the notifier of the built-in types have no HTTP adapter yet: SANDBOXES",
        )
    pool = AsyncConnectionPool(
        conninfo,
        min_size=2,
        max_size=min(settings.concurrency, POOL_MAX_SIZE) + POOL_EXTRA_CONNECTIONS,
        open=False,
        # A wait for a connection must end well before a lease could lapse over it; a
        # write that times out here is retried while its lease lasts.
        timeout=settings.lease_seconds / 6,
        # The application name shows which backends are daemons' in pg_stat_activity.
        kwargs={"autocommit": True, "application_name": "workflowd"},
    )
    # The admin API has a small pool of its own that checks a connection before lending
    # it, so a request never meets a connection the server dropped while it sat idle;
    # the worker's hot path does not pay for that check.
    api_pool = AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=API_POOL_MAX_SIZE,
        open=False,
        check=AsyncConnectionPool.check_connection,
        # A request waits this long for a connection, then answers 503: a client learns
        # of an outage in seconds, not after the pool's default of 30.
        timeout=API_POOL_TIMEOUT_SECONDS,
        kwargs={"autocommit": True, "application_name": "workflowd-api"},
    )
    await pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_SECONDS)
    await api_pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_SECONDS)
    try:
        await serve(
            settings, registry, conninfo, pool, api_pool, admin_token=admin_token, companion=companion
        )
    finally:
        await api_pool.close()
        await pool.close()
    return 0


async def serve(
    settings: Settings,
    registry: Registry,
    conninfo: str,
    pool: AsyncConnectionPool,
    api_pool: AsyncConnectionPool,
    *,
    admin_token: str | None,
    companion: Companion | None = None,
) -> None:
    metrics = Metrics(queue_depth_refresh_seconds=settings.queue_depth_interval)
    watchdog = systemd.Watchdog()
    worker = Worker(pool, conninfo, registry, worker_config(settings), metrics=metrics, on_loop=watchdog.ping)
    install_signal_handlers(worker)
    service = WorkflowService(Store(api_pool), registry)
    readiness = Readiness(conninfo)
    app = create_app(
        service, worker, metrics, readiness, admin_token=admin_token, max_body_bytes=settings.max_body_bytes
    )
    server = http_server(
        app,
        settings.host,
        settings.port,
        max_connections=settings.http_max_connections,
        head_timeout=settings.http_head_timeout,
    )
    http_task = asyncio.create_task(serve_http(server))
    while not server.started:  # listen before claiming: a taken port stops us early
        if http_task.done():
            raise ConfigurationError(
                f"cannot serve HTTP on {settings.host}:{settings.port} (is the port taken?): "
                "set PORT and WORKFLOWD_HOST"
            )
        await asyncio.sleep(0.01)
    depth_task = asyncio.create_task(metrics.queue_depth.run(conninfo))
    worker_task = asyncio.create_task(worker.run())
    LOG.info(
        "http_listening", url=f"http://{settings.host}:{settings.port}", admin_api=admin_token is not None
    )
    if admin_token is None:
        LOG.warning("admin_api_disabled", reason="WORKFLOWD_ADMIN_TOKEN is not set")
    systemd.notify("READY=1")
    side = [depth_task]
    if companion:
        side.append(asyncio.create_task(companion(service, admin_token)))
        side[-1].add_done_callback(_log_crash)
    try:
        await worker_task
    finally:
        server.should_exit = True
        for task in side:
            task.cancel()
        await asyncio.gather(http_task, *side, return_exceptions=True)
        await readiness.close()


async def serve_http(server: EmbeddedServer) -> None:
    """uvicorn's serve(), with its sys.exit() on a failed start turned into a plain end."""
    try:
        await server.serve()
    except SystemExit:
        LOG.error("http_start_failed")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        LOG.error("companion_crashed", error=repr(error), exc_info=error)
