"""`workflowd run`: the daemon process around a Worker (signals, pool, migrations)."""

from __future__ import annotations

import asyncio
import os
import signal

import structlog
from psycopg_pool import AsyncConnectionPool

from daemon.settings import ConfigurationError, Settings
from daemon.worker import Worker, WorkerConfig
from engine.migrate import migrate
from engine.registry import Registry

LOG = structlog.get_logger("workflowd")
POOL_OPEN_TIMEOUT_SECONDS = 30.0
# The claim loop, the heartbeat and the commits share the pool; the listener has its own.
POOL_EXTRA_CONNECTIONS = 2
POOL_MAX_SIZE = 20


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        concurrency=settings.concurrency,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval,
        shutdown_grace=settings.shutdown_grace,
    )


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT stop the worker gracefully; a second signal exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.stopping.is_set():
            LOG.warning("second_signal_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        LOG.info("signal_received", signal=signal.Signals(signum).name)
        worker.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def run_daemon(settings: Settings, registry: Registry, conninfo: str) -> int:
    """Migrate, then run a worker until a signal stops it; returns the exit code."""
    if not registry.types:
        raise ConfigurationError(
            "no workflow types to serve: set WORKFLOWD_MODULES to the modules that define them"
        )
    from psycopg import AsyncConnection  # noqa: PLC0415

    async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
        applied = await migrate(conn)
    if applied:
        LOG.info("migrations_applied", names=applied)
    pool = AsyncConnectionPool(
        conninfo,
        min_size=2,
        max_size=min(settings.concurrency, POOL_MAX_SIZE) + POOL_EXTRA_CONNECTIONS,
        open=False,
        # The application name shows which backends are daemons' in pg_stat_activity.
        kwargs={"autocommit": True, "application_name": "workflowd"},
    )
    await pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_SECONDS)
    try:
        worker = Worker(pool, conninfo, registry, worker_config(settings))
        install_signal_handlers(worker)
        await worker.run()
    finally:
        await pool.close()
    return 0
