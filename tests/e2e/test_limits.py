"""Fleet-wide concurrency limits with real daemons: a type limited to 5 never has more
than 5 leases at once, sampled from the database throughout a run of 200 slow workflows
on three daemons (one of them killed -9 on the way), still finishes, and does not hold
back the other types."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psycopg

from tests.e2e.conftest import Daemons, insert_workflows, wait_until

LIMIT = 5
WORKFLOWS = 200


class LeaseSampler(threading.Thread):
    """Counts the leases of a type every 10 ms on its own connection; keeps the most."""

    def __init__(self, db_url: str, workflow_type: str) -> None:
        super().__init__(daemon=True)
        self.db_url, self.workflow_type = db_url, workflow_type
        self.most = self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self.done.is_set():
                (leases,) = conn.execute(
                    "SELECT count(*) FROM workflows WHERE type = %s AND locked_by IS NOT NULL",
                    (self.workflow_type,),
                ).fetchone()  # type: ignore[misc]
                self.most, self.samples = max(self.most, leases), self.samples + 1
                time.sleep(0.01)


def finished(db: psycopg.Connection[Any], workflow_type: str) -> int:
    (count,) = db.execute(
        "SELECT count(*) FROM workflows WHERE type = %s AND state = 'completed'", (workflow_type,)
    ).fetchone()  # type: ignore[misc]
    return int(count)


def test_a_type_limited_to_five_never_holds_more_than_five_leases_across_three_daemons(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    started = [daemons.start(concurrency=20) for _ in range(3)]
    sampler = LeaseSampler(db_url, "limited_five")
    sampler.start()
    insert_workflows(db, "limited_five", WORKFLOWS, sleep=0.1)
    insert_workflows(db, "three_steps", 50)
    # The other type is not held back by the limited one's queue.
    wait_until(lambda: finished(db, "three_steps") == 50, 30, "the unlimited type")
    assert finished(db, "limited_five") < WORKFLOWS / 2

    wait_until(lambda: finished(db, "limited_five") >= 40, 60, "some limited workflows")
    os.kill(started[0].pid, signal.SIGKILL)  # its leases (and slots) go with its lease time
    wait_until(lambda: finished(db, "limited_five") == WORKFLOWS, 120, "every limited workflow")
    sampler.done.set()
    sampler.join()

    assert sampler.samples > 100
    assert sampler.most == LIMIT, sampler.most  # reached, never passed
    (in_use,) = db.execute(
        "SELECT count(*) FROM workflow_slots s JOIN workflows w ON w.id = s.workflow_id AND w.lease_token = s.lease_token"
    ).fetchone()  # type: ignore[misc]
    assert in_use == 0  # every slot free again, without a write of its own
    assert all(daemon.process.poll() is None for daemon in started[1:])


def test_a_limit_set_by_hand_holds_for_the_work_queued_before_it(
    daemons: Daemons, db: psycopg.Connection[Any], db_url: str
) -> None:
    # Queued while the type had no limit: its rows carry no flow key (migration 0019).
    insert_workflows(db, "three_steps", 60, sleep=0.05)
    db.execute(
        "INSERT INTO workflow_limits (type, max_concurrency, set_by) VALUES ('three_steps', 3, 'by hand')"
    )
    sampler = LeaseSampler(db_url, "three_steps")
    sampler.start()
    started = [daemons.start(concurrency=20) for _ in range(2)]
    wait_until(lambda: finished(db, "three_steps") == 60, 90, "every workflow queued before the limit")
    sampler.done.set()
    sampler.join()
    assert sampler.most == 3, sampler.most  # the daemons' rekey brought the old rows under it
    assert db.execute("SELECT count(*) FROM workflow_flow_rekeys").fetchone() == (0,)
    assert all(daemon.process.poll() is None for daemon in started)


RATE = 10
RATED_WORKFLOWS = 100  # two steps each: 200 starts, about 19 s at 10 per second


def test_a_rate_limited_type_starts_no_more_than_its_rate_across_three_daemons(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    started = [daemons.start(concurrency=20) for _ in range(3)]
    insert_workflows(db, "rated_ten", RATED_WORKFLOWS, sleep=0.05)
    wait_until(lambda: finished(db, "rated_ten") == RATED_WORKFLOWS, 60, "every rate-limited workflow")

    # Every step start (its claim's time, the time its token was stamped with).
    starts = [at for (at,) in db.execute(
        "SELECT e.at FROM workflow_events e JOIN workflows w ON w.id = e.workflow_id "
        "WHERE w.type = 'rated_ten' AND e.step_index IS NOT NULL AND e.to_state = 'running' ORDER BY e.at"
    ).fetchall()]  # fmt: skip
    assert len(starts) == 2 * RATED_WORKFLOWS  # no step waited on a failure: excess work waits, due
    # No second holds more than the rate: the window that opens at each start.
    busiest = max(
        sum(1 for other in starts[i:] if (other - at).total_seconds() < 1) for i, at in enumerate(starts)
    )
    assert busiest <= RATE, busiest
    # And the fleet keeps to the rate: past the first full second (its tokens' first
    # spending), starts come at 10 per second, within 10 %.
    steady = [at for at in starts if (at - starts[0]).total_seconds() >= 1]
    observed = (len(steady) - 1) / (steady[-1] - steady[0]).total_seconds()
    assert RATE * 0.9 <= observed <= RATE * 1.1, observed
    assert all(daemon.process.poll() is None for daemon in started)


def test_with_fairness_one_users_ten_thousand_delay_anothers_first_by_at_most_two_batches(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    concurrency = 5
    started = [daemons.start(concurrency=concurrency) for _ in range(3)]
    db.execute(
        "INSERT INTO workflows (type, input, user_id) "
        "SELECT 'fair_share', jsonb_build_object('n', n, 'sleep', 0.3), 'alice' FROM generate_series(1, 10000) n"
    )
    wait_until(lambda: finished(db, "fair_share") >= 15, 30, "the daemons to be busy with alice's work")
    (bob,) = db.execute(
        "INSERT INTO workflows (type, input, user_id) VALUES ('fair_share', '{\"sleep\": 0}', 'bob') RETURNING id"
    ).fetchone()  # type: ignore[misc]
    wait_until(lambda: finished(db, "fair_share") and db.execute(
        "SELECT started_at IS NOT NULL FROM workflows WHERE id = %s", (bob,)
    ).fetchone() == (True,), 30, "bob's workflow to start")  # fmt: skip
    (ahead,) = db.execute(
        "SELECT count(*) FROM workflows a, workflows b WHERE b.id = %s AND a.user_id = 'alice' "
        "AND a.started_at > b.created_at AND a.started_at < b.started_at",
        (bob,),
    ).fetchone()  # type: ignore[misc]
    # A batch of the fleet is at most each daemon's room: 3 x 5 workflows.
    assert ahead <= 2 * 3 * concurrency, ahead
    (left,) = db.execute(
        "SELECT count(*) FROM workflows WHERE user_id = 'alice' AND started_at IS NULL"
    ).fetchone()  # type: ignore[misc]
    assert left > 9000  # bob did not wait for alice's queue
    assert all(daemon.process.poll() is None for daemon in started)
