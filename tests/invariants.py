"""What every fault test proves, checked in the database after the fault: nothing lost,
nothing committed twice, nothing executed without its attempt on the books, every
workflow terminal, the timeline legal, the daemons alive.

Shared by the e2e tests (kill -9, SIGSTOP, restarts) and the fault suite
(python -m tests.chaos). The side tables are the instruments: step code writes
`test_effects` outside the engine's transactions, so it counts every execution, and a
transactional step named `credit` writes `test_ledger` inside the transaction that
records its completion, so each workflow must have at most one ledger row.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.states import STEP_TRANSITIONS, WORKFLOW_TRANSITIONS, StepState, WorkflowState

SIDE_TABLES = (
    "CREATE TABLE test_effects (workflow_id uuid, step_name text, attempt int, "
    "idempotency_key text, pid int, at timestamptz DEFAULT clock_timestamp())",
    "CREATE TABLE test_switches (name text PRIMARY KEY)",
    "CREATE TABLE test_ledger (workflow_id uuid, amount int)",
)

# A step result, or a workflow's end, recorded more than once; a workflow with more than
# one ledger row (its transactional write committed twice).
COMMITTED_TWICE = """
SELECT (SELECT count(*) FROM (
            SELECT 1 FROM workflow_events WHERE from_state = 'running' AND to_state = 'completed'
            GROUP BY workflow_id, step_index HAVING count(*) > 1) twice)
     + (SELECT count(*) FROM (SELECT 1 FROM test_ledger GROUP BY workflow_id HAVING count(*) > 1) twice)
"""

# An execution whose attempt the timeline never started (the engine promises to record
# an attempt before its code runs), and a ledger row of a workflow whose `credit` step is
# not completed (a transactional write that took effect without its step). `undo:X`
# effects are compensation attempts of step X.
EXECUTED_UNRECORDED = """
SELECT (SELECT count(*) FROM test_effects f WHERE NOT EXISTS (
            SELECT 1 FROM workflow_events e
            WHERE e.workflow_id = f.workflow_id AND e.attempt = f.attempt
              AND e.step_name = regexp_replace(f.step_name, '^undo:', '')
              AND e.to_state = CASE WHEN f.step_name LIKE 'undo:%' THEN 'compensating' ELSE 'running' END))
     + (SELECT count(*) FROM test_ledger l WHERE NOT EXISTS (
            SELECT 1 FROM workflow_steps s
            WHERE s.workflow_id = l.workflow_id AND s.step_name = 'credit' AND s.state = 'completed'))
"""


def create_side_tables(conn: psycopg.Connection[Any]) -> None:
    for statement in SIDE_TABLES:
        conn.execute(statement)


def illegal_transitions(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int | None]]:
    """Recorded transitions that are no arrow of the state machines.

    Two self-arrows are bookkeeping, not transitions: running -> running restarts an
    interrupted step, compensating -> compensating records a failed compensation attempt.
    """
    illegal = []
    for from_state, to_state, step_index in conn.execute(
        "SELECT from_state, to_state, step_index FROM workflow_events WHERE from_state IS NOT NULL"
    ).fetchall():
        if step_index is None:
            legal = WORKFLOW_TRANSITIONS.can(WorkflowState(from_state), WorkflowState(to_state))
        elif from_state == to_state and from_state in ("running", "compensating"):
            legal = True
        else:
            legal = STEP_TRANSITIONS.can(StepState(from_state), StepState(to_state))
        if not legal:
            illegal.append((from_state, to_state, step_index))
    return illegal


@dataclass(frozen=True)
class Invariants:
    """The state of a database after a fault, and what of it breaks a promise."""

    expected: int
    completed: int
    unfinished: int
    committed_twice: int
    executed_unrecorded: int
    illegal: list[tuple[str, str, int | None]]
    alive: int
    daemons: int

    @property
    def problems(self) -> list[str]:
        found = []
        if self.completed != self.expected:
            found.append(f"{self.completed} workflows completed, {self.expected} expected")
        if self.unfinished:
            found.append(f"{self.unfinished} workflows are not in a final state")
        if self.committed_twice:
            found.append(f"{self.committed_twice} results or ledger writes were committed twice")
        if self.executed_unrecorded:
            found.append(f"{self.executed_unrecorded} executions or ledger writes have no recorded attempt")
        if self.illegal:
            found.append(f"illegal transitions in the timeline: {sorted(set(self.illegal))}")
        if self.alive != self.daemons:
            found.append(f"only {self.alive} of {self.daemons} daemons are alive")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"completed {self.completed}/{self.expected}  committed-twice {self.committed_twice}  "
            f"executed-unrecorded {self.executed_unrecorded}  daemons {self.alive}/{self.daemons} alive"
        )


def check_invariants(
    conn: psycopg.Connection[Any], *, expected_completed: int, daemons: Iterable[subprocess.Popen[bytes]]
) -> Invariants:
    """Read the invariants from the database; `daemons` are the processes that must be alive."""
    processes = list(daemons)

    def count(query: str) -> int:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    return Invariants(
        expected=expected_completed,
        completed=count("SELECT count(*) FROM workflows WHERE state = 'completed'"),
        unfinished=count(
            "SELECT count(*) FROM workflows WHERE state IN ('pending', 'running', 'compensating')"
        ),
        committed_twice=count(COMMITTED_TWICE),
        executed_unrecorded=count(EXECUTED_UNRECORDED),
        illegal=illegal_transitions(conn),
        alive=sum(process.poll() is None for process in processes),
        daemons=len(processes),
    )


def assert_invariants(
    conn: psycopg.Connection[Any], *, expected_completed: int, daemons: Iterable[subprocess.Popen[bytes]]
) -> Invariants:
    """check_invariants, failing the test with every broken promise at once."""
    found = check_invariants(conn, expected_completed=expected_completed, daemons=daemons)
    assert found.ok, "; ".join(found.problems)
    return found
