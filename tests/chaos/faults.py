"""Faults of the machinery under load: daemons killed and frozen, the server restarted,
backends terminated, the network cut and stalled. Each scenario ends with every
workflow completed exactly once, or says what broke."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from psycopg.conninfo import make_conninfo

from tests.chaos.harness import Database
from tests.chaos.stage import Stage, Verdict
from tests.daemons import Daemon
from tests.proxy import CuttableProxy

# The daemons' backends, by the application names the daemon gives its connections.
DAEMON_BACKENDS = (
    "SELECT pid FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name LIKE 'workflowd%'"
)


def insert_load(stage: Stage, steps: int, ledgers: int, sleep: float = 0.1) -> int:
    """Three-step workflows and ledger workflows (a transactional step); returns how many."""
    db = stage.db
    return db.insert("chaos_steps", steps, sleep=sleep) + db.insert(
        "chaos_ledger", ledgers, amount=10, sleep=sleep
    )


def repeats(db: Database) -> str:
    """How much work the faults made the daemons do again, for the notes."""
    again = db.value(
        "SELECT count(*) - count(DISTINCT (workflow_id, step_name)) FROM test_effects "
        "WHERE step_name <> 'credit'"
    )
    rolled_back = db.value(
        "SELECT (SELECT count(*) FROM test_effects WHERE step_name = 'credit') "
        "- (SELECT count(*) FROM test_ledger)"
    )
    return f"{again} step executions repeated, {rolled_back} ledger transactions rolled back"


def kill_storm(stage: Stage) -> Verdict:
    """kill -9 of random daemons while transactional steps run; a supervisor restarts them."""
    expected = 0
    kills = stage.size(10, 40)
    with stage.fleet(3, lease_seconds=1, poll_interval=0.1) as fleet:
        with fleet.supervise():
            for _ in range(kills):
                # Work arrives throughout, so that every kill finds steps in flight.
                expected += insert_load(stage, stage.size(8, 12), stage.size(4, 6), sleep=0.4)
                time.sleep(stage.rng.uniform(0.3, 1.0))
                if victims := fleet.alive():
                    fleet.kill(stage.rng.choice(victims))
        stage.db.wait_until_finished(stage.size(60, 180))
        problems = []
        if stage.db.value("SELECT count(*) FROM test_effects") <= stage.db.value(
            "SELECT count(*) FROM workflow_steps"
        ):
            problems.append("the kills interrupted no step: the scenario proved nothing")
        notes = [f"{kills} kills, {fleet.restarts} restarts; {repeats(stage.db)}"]
        return stage.judge(fleet, expected, problems, notes)


def holds_leases(db: Database, daemon: Daemon, count: int) -> bool:
    held = db.value("SELECT count(*) FROM workflows WHERE locked_by LIKE %s", (f"%-{daemon.pid}-%",))
    return bool(held >= count)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def in_transactional_steps(db: Database, daemons: list[Daemon]) -> list[Daemon]:
    """The daemons that hold a ledger workflow whose `credit` step runs: a transaction is open."""
    holders = db.rows(
        "SELECT w.locked_by FROM workflows w JOIN workflow_steps s ON s.workflow_id = w.id "
        "AND s.step_index = w.current_step_index WHERE s.step_name = 'credit' AND s.state = 'running'"
    )
    return [daemon for daemon in daemons if any(f"-{daemon.pid}-" in (holder or "") for (holder,) in holders)]


def sigstop_past_the_lease(stage: Stage) -> Verdict:
    """Freeze a daemon for three leases while it runs a transactional step, then let it go
    on: the others take its workflows over, and what the stale worker then finishes is
    discarded, its transaction rolled back."""
    lease = 1.0
    expected = 0
    stale: list[Daemon] = []
    with stage.fleet(3, lease_seconds=lease, poll_interval=0.1) as fleet:
        for _ in range(stage.size(2, 6)):
            # Fewer workflows than slots: the others are free to take the frozen one's over
            # (a backlog of pending work would be due before its expired leases).
            expected += insert_load(stage, 20, 8, sleep=0.5)
            if not wait_for(lambda: bool(in_transactional_steps(stage.db, fleet.slots)), 10):
                continue
            victim = in_transactional_steps(stage.db, fleet.slots)[0]
            victim.signal(signal.SIGSTOP)
            time.sleep(lease * 3)
            victim.signal(signal.SIGCONT)
            stale.append(victim)
        stage.db.wait_until_finished(stage.size(40, 90))
        frozen = {daemon.pid: daemon for daemon in stale}.values()  # one may be frozen twice
        lost = sum(event["event"] == "lease_lost" for daemon in frozen for event in daemon.log_events())
        problems = [] if lost else ["no frozen worker found its lease taken: the scenario proved nothing"]
        notes = [
            f"{len(stale)} freezes; the stale workers dropped {lost} results (lease_lost); "
            f"{repeats(stage.db)}"
        ]
        return stage.judge(fleet, expected, problems, notes)


def postgres_restarts(stage: Stage) -> Verdict:
    """pg_ctl restart -m fast, then -m immediate (crash recovery), while transactional steps run."""
    expected = 0
    modes = ["fast", "immediate"] * stage.size(1, 3)
    with stage.fleet(3) as fleet:
        for mode in modes:
            expected += insert_load(stage, stage.size(40, 80), stage.size(20, 40), sleep=0.5)
            # Restart while a transactional step has its transaction open.
            wait_for(lambda: bool(in_transactional_steps(stage.db, fleet.slots)), 10)
            stage.cluster.restart(mode)
        stage.db.wait_until_finished(stage.size(60, 120))
        notes = [f"restarts: {', '.join(modes)}; {repeats(stage.db)}"]
        return stage.judge(fleet, expected, notes=notes)


def terminate_backends(stage: Stage) -> Verdict:
    """pg_terminate_backend of one to three random daemon backends, several times a second."""
    db = stage.db
    expected, terminated = 0, 0
    rounds = stage.size(24, 100)
    with stage.fleet(3) as fleet:
        for round in range(rounds):
            if round % 6 == 0:  # keep them under load throughout
                expected += insert_load(stage, stage.size(20, 40), stage.size(8, 15), sleep=0.1)
            time.sleep(stage.rng.uniform(0.1, 0.4))
            backends = [pid for (pid,) in db.rows(DAEMON_BACKENDS)]
            for pid in stage.rng.sample(backends, min(len(backends), stage.rng.randint(1, 3))):
                terminated += bool(db.value("SELECT pg_terminate_backend(%s)", (pid,)))
        db.wait_until_finished(stage.size(60, 120))
        notes = [f"{terminated} daemon backends terminated; {repeats(db)}"]
        return stage.judge(fleet, expected, notes=notes)


def proxy_cuts_and_stalls(stage: Stage) -> Verdict:
    """Two daemons reach the database through a proxy that cuts the link, and stalls it past
    the lease while a third daemon, on a direct link, takes their workflows over: what the
    stalled daemons then finish must be discarded."""
    lease = 1.0
    expected = 0
    with CuttableProxy("127.0.0.1", stage.cluster.port).running() as proxy:
        through_proxy = make_conninfo(stage.db_url, port=proxy.port)
        with stage.fleet(2, {"DATABASE_URL": through_proxy}, lease_seconds=lease) as fleet:
            proxied = list(fleet.slots)
            fleet.add({"TEST_EFFECTS_URL": stage.db_url})
            for _ in range(stage.size(1, 3)):
                # Fewer workflows than slots: the direct daemon is free to take over.
                for fault, seconds in ((proxy.cut, 1.0), (proxy.stall, lease * 4)):
                    expected += insert_load(stage, stage.size(18, 20), stage.size(6, 8), sleep=0.5)
                    wait_for(lambda: all(holds_leases(stage.db, daemon, 2) for daemon in proxied), 10)
                    fault()
                    time.sleep(seconds)
                    proxy.restore()
            stage.db.wait_until_finished(stage.size(60, 120))
            dropped = sum(
                event["event"] == "lease_lost" for daemon in proxied for event in daemon.log_events()
            )
            problems = (
                [] if dropped else ["no stalled daemon found its lease taken: the scenario proved nothing"]
            )
            notes = [f"the proxied daemons dropped {dropped} results (lease_lost); {repeats(stage.db)}"]
            return stage.judge(fleet, expected, problems, notes)
