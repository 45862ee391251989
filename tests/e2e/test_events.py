"""External events: a step declared with wait_for_event parks its workflow (no lease, no
slot) until the event comes, by HTTP, the CLI, Python or SQL; an event sent early waits
for the step; a duplicate is a no-op; the timeout fails and compensates; no wake-up is
lost to a race, and a parked workflow survives kill -9."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import psycopg

from engine import WorkflowService
from tests.e2e.conftest import ROOT, Daemons, states, wait_until
from tests.e2e.test_http import AUTH, TOKEN


def start(db_url: str, type: str, n: int, **options: Any) -> UUID:
    async def go() -> UUID:
        async with WorkflowService.connect(db_url) as service:
            return (await service.start_workflow(type, {"n": n}, "u1", **options)).id

    return asyncio.run(go())


def state(db: psycopg.Connection[Any], workflow_id: UUID) -> str:
    (found,) = db.execute("SELECT state::text FROM workflows WHERE id = %s", (workflow_id,)).fetchone()  # type: ignore[misc]
    return str(found)


def parked(db: psycopg.Connection[Any], workflow_id: UUID) -> bool:
    """Waiting at its `approval` step, released: no lease, the step pending."""
    row = db.execute(
        "SELECT w.locked_by IS NULL, s.state::text FROM workflows w JOIN workflow_steps s "
        "ON s.workflow_id = w.id AND s.step_index = w.current_step_index "
        "WHERE w.id = %s AND s.step_name = 'approval'",
        (workflow_id,),
    ).fetchone()
    return row == (True, "pending")


def output_of(db: psycopg.Connection[Any], workflow_id: UUID, step: str) -> Any:
    (output,) = db.execute(
        "SELECT output FROM workflow_steps WHERE workflow_id = %s AND step_name = %s", (workflow_id, step)
    ).fetchone()  # type: ignore[misc]
    return output


def test_an_event_sent_before_during_or_twice_completes_the_waiting_step_once(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start(admin_token=TOKEN)
    api = f"{daemon.url}/admin/workflows"
    # Before: the workflow has not started yet (delayed); the event waits for its step.
    early = start(db_url, "awaiting_approval", 1, start_at=datetime.now(UTC) + timedelta(seconds=2))
    sent = httpx.post(
        f"{api}/{early}/events", headers=AUTH, json={"name": "approved", "payload": {"by": "ada"}}
    )
    assert (sent.status_code, sent.json()) == (202, {"delivered": True})
    # During: parked, holding no lease, then woken by the CLI.
    waiting = start(db_url, "awaiting_approval", 2)
    wait_until(lambda: parked(db, waiting), 15, "the workflow to park at its approval step")
    cli = subprocess.run(
        [sys.executable, "-m", "daemon", "send-event", str(waiting), "approved", "--payload", '{"by": "bob", "amount": 1.10}',
         "--event-id", "approval-7"],
        env={**os.environ, "DATABASE_URL": db_url}, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert cli.stdout == f"event approved sent to workflow {waiting}\n", cli.stderr
    # Twice: the same event id again is a no-op, over HTTP too.
    again = subprocess.run(
        [sys.executable, "-m", "daemon", "send-event", str(waiting), "approved", "--payload", "{}", "--event-id",
         "approval-7"],
        env={**os.environ, "DATABASE_URL": db_url}, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "before (same event id): nothing new" in again.stdout
    wait_until(lambda: state(db, early) == state(db, waiting) == "completed", 20, "both to complete")
    assert output_of(db, early, "approval") == {"by": "ada"}
    assert output_of(db, waiting, "approval") == {"by": "bob", "amount": 1.1}
    assert output_of(db, waiting, "after")["approval"] == {"by": "bob", "amount": 1.1}
    assert db.execute("SELECT count(*), count(consumed_at) FROM workflow_signals").fetchone() == (2, 2)
    # After: a finished workflow takes no more events; an unknown one is not found.
    late = httpx.post(f"{api}/{waiting}/events", headers=AUTH, json={"name": "approved"})
    assert late.status_code == 409
    assert "is completed: it takes no more events" in late.json()["detail"]
    unknown = httpx.post(
        f"{api}/00000000-0000-7000-8000-000000000000/events", headers=AUTH, json={"name": "x"}
    )
    assert unknown.status_code == 404
    # The timeline says the step parked and went on.
    waits = db.execute(
        "SELECT error->>'message' FROM workflow_events WHERE workflow_id = %s AND to_state = 'pending'",
        (waiting,),
    ).fetchall()
    assert waits == [("waiting for event 'approved'",)]


def test_the_timeout_fails_the_waiting_step_and_compensates(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    never = start(db_url, "awaiting_briefly", 1)
    wait_until(lambda: state(db, never) == "compensated", 20, "the wait to time out and compensate")
    (error,) = db.execute(
        "SELECT error FROM workflow_steps WHERE workflow_id = %s AND step_name = 'approval'", (never,)
    ).fetchone()  # type: ignore[misc]
    assert (error["type"], error["message"]) == ("EventTimeout", "no event 'approved' came within 1.5 s")
    assert db.execute("SELECT count(*) FROM test_effects WHERE step_name = 'undo:reserve'").fetchone() == (1,)


def test_no_wakeup_is_lost_to_a_race_and_a_parked_workflow_survives_kill_9(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    first = daemons.start()
    ids = [start(db_url, "awaiting_approval", n) for n in range(20)]
    # Events at random moments while the workflows reach their step and park, from SQL.
    rng = random.Random(7)

    def send_all() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for workflow_id in rng.sample(ids[:15], 15):
                time.sleep(rng.uniform(0, 0.1))
                conn.execute(
                    "SELECT workflow_send_event(%s, 'approved', %s::jsonb)", (workflow_id, '{"sql": true}')
                )

    sender = threading.Thread(target=send_all)
    sender.start()
    sender.join(timeout=30)
    # The last five park; kill -9 the daemon, start another, then send theirs.
    wait_until(lambda: all(parked(db, workflow_id) for workflow_id in ids[15:]), 20, "the last five to park")
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    daemons.start()
    with psycopg.connect(db_url, autocommit=True) as conn:
        for workflow_id in ids[15:]:
            conn.execute("SELECT workflow_send_event(%s, 'approved')", (workflow_id,))
    wait_until(lambda: states(db) == {"completed": 20}, 30, "every workflow to complete")
    approvals = [output_of(db, workflow_id, "after")["approval"] for workflow_id in ids]
    assert approvals == [{"sql": True}] * 15 + [None] * 5  # each its own event, once
    assert db.execute("SELECT count(*), count(consumed_at) FROM workflow_signals").fetchone() == (20, 20)
