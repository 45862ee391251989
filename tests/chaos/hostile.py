"""Hostile input mixed into good traffic: rows no daemon can read, step code that kills its
process, and abusive HTTP clients. Each must cost its own workflow or request, never the
daemon or the other workflows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import psycopg
from psycopg import errors

from tests.chaos import clients
from tests.chaos.faults import insert_load, wait_for
from tests.chaos.stage import Stage, Verdict

# A bad row must have failed this long after its insert, at the most.
BAD_ROW_FAILS_WITHIN_SECONDS = 10.0
# One attempt and two retries (chaos_exit's max_retries).
EXIT_STEP_RUNS_AT_MOST = 3


def nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass(frozen=True)
class BadRow:
    """A row inserted by plain SQL that is valid jsonb but that no daemon can run."""

    name: str
    type: str
    input: str
    context: str = "{}"
    step_index: int = 0


BAD_ROWS = [
    # Python reads it as a float, which overflows to inf: no canonical form for the keys.
    BadRow("huge-decimal", "chaos_steps", '{"amount": 1' + "0" * 5000 + ".5}"),
    # More digits than Python converts from a string to an int (sys.get_int_max_str_digits).
    BadRow("int-past-limit", "chaos_steps", '{"amount": 1' + "0" * 5000 + "}"),
    # Deeper than Python's recursion limit; the explicit key spares the trigger's recursion.
    BadRow("deep-nesting", "chaos_steps", '{"deep": ' + nested_arrays(2000) + "}"),
    BadRow("context-array", "chaos_steps", "{}", context="[]"),
    BadRow("context-string", "chaos_steps", "{}", context='"not an object"'),
    # Shaped by another definition: its step index is past the three steps of this one.
    BadRow("step-past-definition", "chaos_steps", "{}", step_index=7),
    BadRow("invalid-input", "chaos_validated", '{"order_id": "seven"}'),
]


def insert_bad_row(db_url: str, row: BadRow) -> tuple[str | None, psycopg.Error | None]:
    """Insert `row` in a statement of its own: (its id, None), or (None, the error that refused it)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        try:
            inserted = conn.execute(
                "INSERT INTO workflows (type, input, context, current_step_index, user_id, idempotency_key) "
                "VALUES (%s, %s::jsonb, %s::jsonb, %s, 'chaos-bad', %s) RETURNING id",
                (row.type, row.input, row.context, row.step_index, f"chaos-bad:{row.name}"),
            ).fetchone()
        except psycopg.DatabaseError as error:
            return None, error
    assert inserted is not None
    return str(inserted[0]), None


def judge_bad_row(
    stage: Stage, row: BadRow, workflow_id: str | None, refusal: psycopg.Error | None
) -> tuple[str | None, str]:
    """(a problem or None, a note) for one bad row after the run."""
    if workflow_id is None:
        # A CHECK constraint on the table is a fine answer to a bad row; any other error is not.
        if isinstance(refusal, errors.CheckViolation):
            return None, f"{row.name}: refused at insert (check_violation)"
        why = f"{type(refusal).__name__} ({refusal.sqlstate if refusal else None}): {refusal}"
        return f"{row.name} was refused at insert by {why}", f"{row.name}: refused at insert"
    state, error, seconds = stage.db.rows(
        "SELECT state::text, error, extract(epoch FROM completed_at - created_at) "
        "FROM workflows WHERE id = %s",
        (workflow_id,),
    )[0]
    error = error if isinstance(error, dict) else {}
    kind, message = error.get("type"), error.get("message")
    if state != "failed":
        return f"{row.name} is {state}, not failed", f"{row.name}: {state}"
    if not kind or not message:
        return f"{row.name} failed without a readable error: {error!r}", f"{row.name}: failed"
    note = f"{row.name}: failed {kind} in {seconds:.1f} s"
    if seconds > BAD_ROW_FAILS_WITHIN_SECONDS:
        return f"{row.name} failed only after {seconds:.0f} s", note
    return None, note


def bad_rows(stage: Stage) -> Verdict:
    """Unreadable and unrunnable rows inserted by SQL between batches of good workflows:
    the good ones complete, each bad one fails alone with a readable error (or is refused
    at insert by a CHECK constraint), the daemons keep going."""
    db = stage.db
    expected = 0
    inserted: dict[BadRow, tuple[str | None, psycopg.Error | None]] = {}
    with stage.fleet(2) as fleet:
        halves = (BAD_ROWS[::2], BAD_ROWS[1::2])
        for half in halves:
            expected += insert_load(stage, stage.size(20, 80), 0, sleep=0.05)
            expected += db.insert("chaos_validated", stage.size(10, 40), order_id=7, amount=9.5)
            for row in half:
                inserted[row] = insert_bad_row(stage.db_url, row)
        expected += insert_load(stage, stage.size(20, 80), 0, sleep=0.05)
        db.wait_until_finished(stage.size(20, 40))
        judged = [judge_bad_row(stage, row, *inserted[row]) for row in BAD_ROWS]
        problems = [problem for problem, _ in judged if problem]
        return stage.judge(fleet, expected, problems, [note for _, note in judged])


def exit_runs(stage: Stage) -> int:
    return int(stage.db.value("SELECT count(*) FROM test_effects WHERE step_name = 'exit'"))


def exit_scenario_settled(stage: Stage) -> bool:
    """The good workflows are final, and the exiting one is too or has already run too often."""
    good_unfinished = stage.db.value(
        "SELECT count(*) FROM workflows "
        "WHERE type <> 'chaos_exit' AND state IN ('pending', 'running', 'compensating')"
    )
    return good_unfinished == 0 and (stage.db.unfinished() == 0 or exit_runs(stage) > EXIT_STEP_RUNS_AT_MOST)


def exiting_step(stage: Stage) -> Verdict:
    """A step that calls os._exit(1), max_retries=2, among good workflows, under a
    supervisor that restarts the daemons it kills: it runs at most three times and its
    workflow fails; the others complete."""
    db = stage.db
    expected = insert_load(stage, stage.size(40, 120), stage.size(20, 60), sleep=0.1)
    db.insert("chaos_exit", 1)
    with stage.fleet(3, lease_seconds=1, poll_interval=0.1) as fleet:
        with fleet.supervise():
            wait_for(lambda: exit_scenario_settled(stage), stage.size(40, 90))
        runs = exit_runs(stage)
        state, error = db.rows("SELECT state::text, error FROM workflows WHERE type = 'chaos_exit'")[0]
        problems = []
        if runs > EXIT_STEP_RUNS_AT_MOST:
            problems.append(f"the os._exit step ran {runs} times (at most {EXIT_STEP_RUNS_AT_MOST})")
        if state != "failed" or not error:
            problems.append(f"the os._exit workflow is {state}, not failed with an error")
        kind = error.get("type") if isinstance(error, dict) else None
        notes = [
            f"the os._exit step ran {runs} times; its workflow is {state} ({kind}); {fleet.restarts} restarts"
        ]
        return stage.judge(fleet, expected, problems, notes)


def admin_abuse(stage: Stage) -> Verdict:
    """A 50 MB unauthenticated POST and many slow clients against each daemon's HTTP port,
    while its health endpoints are probed and workflows run."""
    db = stage.db
    expected = insert_load(stage, stage.size(60, 200), stage.size(20, 60), sleep=0.3)
    with stage.fleet(2, admin_token="chaos-admin-token-0123456789abcdef") as fleet:
        peaks_before = [clients.peak_rss_mb(daemon.pid) for daemon in fleet.slots]
        report = asyncio.run(
            clients.attack(
                [daemon.port for daemon in fleet.slots],
                seconds=stage.size(6.0, 20.0),
                slow_clients=stage.size(60, 300),
            )
        )
        growth = [
            clients.peak_rss_mb(daemon.pid) - before
            for daemon, before in zip(fleet.slots, peaks_before, strict=True)
        ]
        db.wait_until_finished(stage.size(30, 60))
        problems = report.problems()
        if max(growth) > clients.RSS_GROWTH_LIMIT_MB:
            problems.append(
                f"a daemon's peak memory grew by {max(growth):.0f} MB during the attack "
                f"(limit {clients.RSS_GROWTH_LIMIT_MB} MB): it buffered the oversized body"
            )
        notes = [
            *report.notes(),
            f"peak memory growth per daemon: {', '.join(f'{mb:.0f} MB' for mb in growth)}",
        ]
        return stage.judge(fleet, expected, problems, notes)
