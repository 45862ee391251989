"""Throughput of a peer job or workflow system on PostgreSQL, for bench/peers.py.

    python bench/peers/run.py --dsn postgresql://... --system {pgqueuer,procrastinate,dbos}
        [--jobs 20000] [--processes 2] [--steps 1|3] [--timeout 300] [--pickup N]

Runs with the peers' own virtualenv (bench/peers/requirements.txt), never the project's:
it imports none of the project's packages. It installs the system's schema into the
given empty database, enqueues --jobs no-op jobs in bulk (not timed), then starts
--processes worker processes (this script again, with --worker) that drain the queue.
The time is the database's own, from the first job picked to the last one completed, so
the workers' start-up is not counted; it prints one JSON line on stdout.

With --pickup N (PgQueuer only) it measures pickup latency instead, as the bench measures
workflowd's: idle workers, then N single enqueues 10 ms apart, each timed from the
acknowledged commit of the enqueue to the start of the job's code.

Each system runs in its best documented configuration for throughput; --concurrency,
--batch-size and --polling-interval override the defaults to try others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import procrastinate
import psycopg
import sqlalchemy
import uvloop
from dbos import DBOS, DBOSClient, DBOSConfig, EnqueueOptions
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job

POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 10
ENQUEUE_CHUNK = 10_000
DBOS_APP = "peerbench"
DBOS_QUEUE = "peerbench"
PICKUP_GAP_SECONDS = 0.01
PICKUP_IDLE_SECONDS = 1.0
# The pickup case's workers append "job-number start-time" lines here (inherited environment).
STAMPS_ENV = "PEERBENCH_PICKUP_STAMPS"
# Workers and the enqueuer must agree on the version, or the workers leave the jobs alone.
DBOS_VERSION = "peerbench-1"


@DBOS.step()
def noop_step() -> None:
    pass


@DBOS.workflow()
def noop_workflow(steps: int) -> None:
    for _ in range(steps):
        noop_step()


@dataclass(frozen=True)
class Settings:
    dsn: str
    jobs: int
    steps: int
    concurrency: int
    batch_size: int
    polling_interval: float


class Peer:
    """One system: how to install it, fill its queue, run a worker and read its progress."""

    distribution: ClassVar[str]
    concurrency: ClassVar[int]
    batch_size: ClassVar[int] = 1
    polling_interval: ClassVar[float] = 1.0
    # Polled every POLL_SECONDS, so cheap however many jobs are done: whether any is left.
    pending_sql: ClassVar[str]
    done_sql: ClassVar[str]  # jobs completed
    window_sql: ClassVar[str]  # seconds from the first job picked to the last completed

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def config(self) -> str:
        raise NotImplementedError

    def setup(self) -> None:
        raise NotImplementedError

    def work(self, ready: Callable[[], None]) -> None:
        """Run one worker until the process is stopped, calling `ready` (which returns at
        the start signal) once connected and before taking any job."""
        raise NotImplementedError


class PgQueuer(Peer):
    distribution = "pgqueuer"
    # As PgQueuer's own benchmark runs it (tools/benchmark.py, docs/development/benchmark.md):
    # asyncpg, its fastest driver, uvloop, and several QueueManagers on connections of their
    # own. Its defaults there, five managers taking batches of ten, drained about 10,000
    # jobs/s here; two managers taking batches of 50 about twice that, with one or two processes.
    concurrency = 2
    batch_size = 50
    pending_sql = "SELECT EXISTS (SELECT FROM pgqueuer)"  # a job's row goes when it completes
    done_sql = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
    window_sql = (
        "SELECT extract(epoch FROM max(created) FILTER (WHERE status = 'successful')"
        " - min(created) FILTER (WHERE status = 'picked')) FROM pgqueuer_log"
    )

    def config(self) -> str:
        return (
            f"asyncpg, uvloop, {self.settings.concurrency} QueueManagers per process (one connection each), "
            f"batch_size {self.settings.batch_size}, async no-op entrypoint, durable (logged) tables"
        )

    def setup(self) -> None:
        uvloop.run(self._setup())

    async def _setup(self) -> None:
        connection = await asyncpg.connect(self.settings.dsn)
        try:
            queries = Queries(AsyncpgDriver(connection))
            await queries.install()
            for start in range(0, self.settings.jobs, ENQUEUE_CHUNK):
                count = min(ENQUEUE_CHUNK, self.settings.jobs - start)
                await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
        finally:
            await connection.close()

    def work(self, ready: Callable[[], None]) -> None:
        uvloop.run(self._work(ready))

    async def _work(self, ready: Callable[[], None]) -> None:
        managers = [await self._manager() for _ in range(self.settings.concurrency)]
        await asyncio.to_thread(ready)
        await asyncio.gather(*(manager.run(batch_size=self.settings.batch_size) for manager in managers))

    async def _manager(self) -> QueueManager:
        manager = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(self.settings.dsn))))

        @manager.entrypoint("noop")
        async def noop(job: Job) -> None:
            pass

        if stamps := os.environ.get(STAMPS_ENV):
            stamps_fd = os.open(stamps, os.O_WRONLY | os.O_APPEND)

            @manager.entrypoint("stamp")
            async def stamp(job: Job) -> None:
                started = time.time()
                assert job.payload is not None
                os.write(stamps_fd, f"{job.payload.decode()} {started}\n".encode())

        return manager

    def enqueue_singly(self, count: int) -> dict[int, float]:
        """`count` jobs enqueued one at a time, each number with the time its commit was
        acknowledged."""
        return uvloop.run(self._enqueue_singly(count))

    async def _enqueue_singly(self, count: int) -> dict[int, float]:
        connection = await asyncpg.connect(self.settings.dsn)
        committed: dict[int, float] = {}
        try:
            queries = Queries(AsyncpgDriver(connection))
            for n in range(count):
                await queries.enqueue("stamp", str(n).encode())
                committed[n] = time.time()
                await asyncio.sleep(PICKUP_GAP_SECONDS)
        finally:
            await connection.close()
        return committed


class Procrastinate(Peer):
    distribution = "procrastinate"
    # The documented way to more throughput per worker is concurrency ("Execute multiple
    # jobs at the same time": app.run_worker(concurrency=30)) with asynchronous tasks. Of
    # 10, 30, 50 and 100 sub-workers, 50 did best here, though within the runs' noise.
    concurrency = 50
    polling_interval = 5.0  # the default; LISTEN/NOTIFY wakes the worker, polling is the fallback
    pending_sql = "SELECT EXISTS (SELECT FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
    done_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
    window_sql = (
        "SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
        " - min(at) FILTER (WHERE type = 'started')) FROM procrastinate_events"
    )

    def config(self) -> str:
        return (
            f"PsycopgConnector (pool of {self._pool_size()}), worker concurrency {self.settings.concurrency}, "
            f"async no-op task, LISTEN/NOTIFY on, polling fallback {self.settings.polling_interval}s, "
            "jobs kept (delete_jobs=never)"
        )

    def _pool_size(self) -> int:
        # Each sub-worker takes a connection to fetch and to finish its job; one more listens.
        return self.settings.concurrency + 2

    def _app(self) -> tuple[procrastinate.App, Any]:
        # It warns that an app made in __main__ cannot be found by its CLI: not used here.
        logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
        connector = procrastinate.PsycopgConnector(
            conninfo=self.settings.dsn, min_size=1, max_size=self._pool_size()
        )
        app = procrastinate.App(connector=connector)

        @app.task(name="noop")
        async def noop() -> None:
            pass

        return app, noop

    def setup(self) -> None:
        asyncio.run(self._setup())

    async def _setup(self) -> None:
        app, noop = self._app()
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for start in range(0, self.settings.jobs, ENQUEUE_CHUNK):
                count = min(ENQUEUE_CHUNK, self.settings.jobs - start)
                await noop.batch_defer_async(*({} for _ in range(count)))

    def work(self, ready: Callable[[], None]) -> None:
        asyncio.run(self._work(ready))

    async def _work(self, ready: Callable[[], None]) -> None:
        app, _ = self._app()
        async with app.open_async():
            await asyncio.to_thread(ready)
            await app.run_worker_async(
                concurrency=self.settings.concurrency,
                fetch_job_polling_interval=self.settings.polling_interval,
                install_signal_handlers=False,
            )


class Dbos(Peer):
    distribution = "dbos"
    # A DBOS Queue with worker_concurrency, each process with its own executor_id (the
    # queue reference requires a unique one per process for worker_concurrency). A process
    # claims at most that many workflows per poll, so with the default poll of a second
    # the limit caps throughput; of 10 to 500 workflows and polls of 1, 0.1 and 0.05 s,
    # 50 every 0.1 s did best here.
    concurrency = 50
    polling_interval = 0.1
    pending_sql = (
        "SELECT EXISTS (SELECT FROM dbos.workflow_status "
        f"WHERE queue_name = '{DBOS_QUEUE}' AND status IN ('ENQUEUED', 'PENDING'))"
    )
    done_sql = (
        f"SELECT count(*) FROM dbos.workflow_status WHERE queue_name = '{DBOS_QUEUE}' AND status = 'SUCCESS'"
    )
    window_sql = (
        "SELECT (max(completed_at) - min(started_at_epoch_ms)) / 1000.0 FROM dbos.workflow_status "
        f"WHERE queue_name = '{DBOS_QUEUE}' AND status = 'SUCCESS'"
    )

    def config(self) -> str:
        return (
            f"DBOS Queue, worker_concurrency {self.settings.concurrency}, polling_interval_sec "
            f"{self.settings.polling_interval}, workflow of {self.settings.steps} no-op @DBOS.step(), "
            "enqueued with DBOSClient.enqueue_in_transaction, one executor_id per process"
        )

    def setup(self) -> None:
        # `dbos migrate` is the documented way to create the system tables without launching.
        subprocess.run(
            [str(Path(sys.executable).parent / "dbos"), "migrate", "--sys-db-url", self.settings.dsn],
            check=True,
            capture_output=True,
        )
        client = DBOSClient(system_database_url=self.settings.dsn, application_name=DBOS_APP)
        try:
            client.register_queue(
                DBOS_QUEUE,
                worker_concurrency=self.settings.concurrency,
                polling_interval_sec=self.settings.polling_interval,
            )
            self._enqueue(client)
        finally:
            client.destroy()

    def _enqueue(self, client: DBOSClient) -> None:
        """All in one transaction per chunk: the client's bulk enqueue."""
        options: EnqueueOptions = {
            "queue_name": DBOS_QUEUE,
            "workflow_name": noop_workflow.__qualname__,
            "app_version": DBOS_VERSION,
        }
        engine = sqlalchemy.create_engine(
            self.settings.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        )
        try:
            for start in range(0, self.settings.jobs, ENQUEUE_CHUNK):
                with engine.begin() as connection:
                    for _ in range(min(ENQUEUE_CHUNK, self.settings.jobs - start)):
                        client.enqueue_in_transaction(connection, options, self.settings.steps)
        finally:
            engine.dispose()

    def work(self, ready: Callable[[], None]) -> None:
        config: DBOSConfig = {
            "name": DBOS_APP,
            "system_database_url": self.settings.dsn,
            "application_version": DBOS_VERSION,
            "executor_id": f"peerbench-{os.getpid()}",
            "log_level": "WARNING",
        }
        DBOS(config=config)
        ready()  # launch starts the queue's threads, which take jobs at once
        DBOS.launch()
        threading.Event().wait()  # the queue's threads do the work until the process is stopped


SYSTEMS: dict[str, type[Peer]] = {"pgqueuer": PgQueuer, "procrastinate": Procrastinate, "dbos": Dbos}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True, help="postgresql:// URL of an empty database")
    parser.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="no-op steps per workflow (DBOS only)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds the workers may take")
    parser.add_argument("--concurrency", type=int, help="per process; the system's documented best if unset")
    parser.add_argument("--batch-size", type=int, help="PgQueuer's dequeue batch size")
    parser.add_argument("--polling-interval", type=float, help="seconds (Procrastinate, DBOS)")
    parser.add_argument(
        "--pickup",
        type=int,
        metavar="N",
        help="measure pickup latency over N single enqueues (PgQueuer only)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pickup and args.system != "pgqueuer":
        parser.error("--pickup applies to PgQueuer only")
    if args.steps != 1 and args.system != "dbos":
        parser.error("--steps applies to DBOS only: the job queues run single no-op jobs")
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    peer = SYSTEMS[args.system]
    return Settings(
        dsn=args.dsn,
        jobs=0 if args.pickup else args.jobs,  # the pickup case enqueues its own, singly
        steps=args.steps,
        concurrency=args.concurrency or peer.concurrency,
        batch_size=args.batch_size or peer.batch_size,
        polling_interval=args.polling_interval or peer.polling_interval,
    )


def ready_and_wait_for_start() -> None:
    """The worker's half of the start barrier: "ready" on stdout, then "go" on stdin.

    Without it the first process to finish importing would drain alone for a while, and
    short runs would measure one process more than the others. Afterwards stdout goes to
    stderr, and the end of stdin, the parent closing it or dying, ends the worker: none
    outlives a run."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if sys.stdin.readline().strip() != "go":
        os._exit(1)

    def exit_at_end_of_input() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_at_end_of_input, daemon=True).start()


def wait_until_ready(worker: subprocess.Popen[bytes]) -> None:
    assert worker.stdout is not None
    for line in worker.stdout:  # a library may print before the worker is ready
        if line.strip() == b"ready":
            return
    raise RuntimeError(f"a worker failed to start (exit code {worker.wait()})")


def start_workers(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` workers, connected and ready, all given the start signal together."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker"]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(count)]
    try:
        for worker in workers:
            wait_until_ready(worker)
    except BaseException:
        stop_workers(workers)
        raise
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        worker.stdin.flush()
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    for worker in workers:
        for pipe in (worker.stdin, worker.stdout):
            if pipe:
                pipe.close()


def scalar(conn: psycopg.Connection[tuple[Any, ...]], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return row[0] if row else None


def wait_for(pending: Callable[[], bool], workers: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Poll until no job is left; False on timeout. A worker that dies ends the run."""
    deadline = time.monotonic() + timeout
    while pending():
        if time.monotonic() > deadline:
            return False
        if failed := [worker.returncode for worker in workers if worker.poll() is not None]:
            raise RuntimeError(f"a worker exited early (exit codes {failed})")
        time.sleep(POLL_SECONDS)
    return True


def measure(args: argparse.Namespace, peer: Peer) -> dict[str, Any]:
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        workers = start_workers(args.processes)
        started = time.monotonic()
        try:
            finished = wait_for(lambda: bool(scalar(conn, peer.pending_sql)), workers, args.timeout)
            wall = time.monotonic() - started
        finally:
            stop_workers(workers)
        done = int(scalar(conn, peer.done_sql))
        window = scalar(conn, peer.window_sql)
    seconds = float(window) if window else wall
    return {
        "system": args.system,
        "processes": args.processes,
        "jobs": args.jobs,
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(done / seconds, 1),
        "steps_per_s": round(done * args.steps / seconds, 1),
        "version": version(peer.distribution),
        "config": peer.config(),
        "timed_out": not finished,
        "jobs_done": done,
        "wall_seconds": round(wall, 3),
    }


def measure_pickup(args: argparse.Namespace, peer: PgQueuer) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="peerbench-stamps-") as stamps:
        os.environ[STAMPS_ENV] = stamps.name  # the workers inherit it
        workers = start_workers(args.processes)
        try:
            time.sleep(PICKUP_IDLE_SECONDS)  # idle workers, listening
            committed = peer.enqueue_singly(args.pickup)
            deadline = time.monotonic() + args.timeout
            while len(Path(stamps.name).read_text().splitlines()) < args.pickup:
                if time.monotonic() > deadline:
                    raise RuntimeError("the pickup jobs did not all start in time")
                time.sleep(POLL_SECONDS)
        finally:
            stop_workers(workers)
        started = [line.split() for line in Path(stamps.name).read_text().splitlines()]
    latencies = [(float(at) - committed[int(n)]) * 1000 for n, at in started]
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "system": args.system,
        "processes": args.processes,
        "inserts": args.pickup,
        "p50_ms": round(quantiles[49], 2),
        "p95_ms": round(quantiles[94], 2),
        "p99_ms": round(quantiles[98], 2),
        "version": version(peer.distribution),
        "config": peer.config(),
    }


def main() -> None:
    args = parse_args()
    peer = SYSTEMS[args.system](settings_for(args))
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            peer.work(ready_and_wait_for_start)
        return
    peer.setup()
    if args.pickup:
        assert isinstance(peer, PgQueuer)
        print(json.dumps(measure_pickup(args, peer)), flush=True)
    else:
        print(json.dumps(measure(args, peer)), flush=True)


if __name__ == "__main__":
    main()
