"""Workflow types for the end-to-end tests, loaded by real daemons (WORKFLOWD_MODULES).

Every step records that it really ran in `test_effects`, outside the engine's
transactions, so a test can compare what was executed with what was committed. The
workflow input steers the behaviour: `sleep` seconds per step, `fail_times` failures
before success. The fault suite (tests/chaos) builds its own types from these steps.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from engine import NotExecuted, PermanentError, Snooze, Step, Workflow, WorkflowContext

_pool: AsyncConnectionPool | None = None


def effects_url() -> str:
    """Where steps record their effects: TEST_EFFECTS_URL when a test routes the daemon's
    own DATABASE_URL through a faulty proxy, so that the instrument is not the fault."""
    return os.environ.get("TEST_EFFECTS_URL") or os.environ["DATABASE_URL"]


async def _effects_pool() -> AsyncConnectionPool:
    global _pool  # noqa: PLW0603 (one pool per daemon process, made on first use)
    if _pool is None:
        # Checked before lending: after a server restart a step should record its effect,
        # not fail on a connection that died while it sat in the pool.
        _pool = AsyncConnectionPool(
            effects_url(), min_size=1, max_size=4, open=False, check=AsyncConnectionPool.check_connection
        )
        await _pool.open()
    return _pool


EFFECT = (
    "INSERT INTO test_effects (workflow_id, step_name, attempt, idempotency_key, pid) "
    "VALUES (%s, %s, %s, %s, %s)"
)


def _effect(ctx: WorkflowContext, step_name: str | None) -> tuple[Any, ...]:
    return (ctx.workflow_id, step_name or ctx.step_name, ctx.attempt, ctx.idempotency_key, os.getpid())


async def record_effect(ctx: WorkflowContext, step_name: str | None = None) -> None:
    """Record, outside the engine's transactions, that this attempt ran (as `step_name`)."""
    async with (await _effects_pool()).connection() as conn:
        await conn.execute(EFFECT, _effect(ctx, step_name))


def record_effect_from_a_thread(ctx: WorkflowContext, step_name: str | None = None) -> None:
    """record_effect for plain functions, which run in the daemon's thread pool."""
    with psycopg.connect(effects_url(), autocommit=True) as conn:
        conn.execute(EFFECT, _effect(ctx, step_name))


async def recorded(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    await asyncio.sleep(float(input.get("sleep", 0)))
    return {"step": ctx.step_name, "attempt": ctx.attempt, "seen": sorted(ctx.outputs)}


def recorded_in_a_thread(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """A plain function: the daemon runs it in its thread pool, off the event loop."""
    record_effect_from_a_thread(ctx)
    time.sleep(float(input.get("sleep", 0)))
    thread = threading.current_thread().name
    return {"step": ctx.step_name, "attempt": ctx.attempt, "seen": sorted(ctx.outputs), "thread": thread}


async def flaky(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    if ctx.attempt <= int(input["fail_times"]):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"succeeded_on": ctx.attempt}


async def declined(input: dict[str, Any], ctx: WorkflowContext) -> None:
    await record_effect(ctx)
    raise PermanentError("card declined")


async def sleepy(input: dict[str, Any], ctx: WorkflowContext) -> None:
    await record_effect(ctx)
    await asyncio.sleep(30)


async def cut_daemon_connections(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """Terminate the daemons' pooled connections while this step runs, so that the
    commit of its own result meets a dead connection."""
    await record_effect(ctx)
    async with (await _effects_pool()).connection() as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'workflowd'"
        )
    return {"step": ctx.step_name, "attempt": ctx.attempt, "seen": sorted(ctx.outputs)}


three_steps = Workflow(
    type="three_steps",
    steps=[Step("first", recorded), Step("second", recorded_in_a_thread), Step("third", recorded)],
)
retrying = Workflow(type="retrying", steps=[Step("flaky", flaky)], max_retries=3)
permanent = Workflow(type="permanent", steps=[Step("charge", declined)], max_retries=5)
timing_out = Workflow(type="timing_out", steps=[Step("slow", sleepy, timeout=0.3, max_retries=1)])
cut_connections = Workflow(
    type="cut_connections", steps=[Step("cut", cut_daemon_connections), Step("after", recorded)]
)


class OrderInput(BaseModel):
    order_id: int
    amount: float


validated = Workflow(type="validated", steps=[Step("use", recorded)], input_model=OrderInput)
not_idempotent = Workflow(type="not_idempotent", steps=[Step("transfer", sleepy, is_idempotent=False)])


def exits(input: dict[str, Any], ctx: WorkflowContext) -> None:
    raise SystemExit(1)


async def returns_a_set(input: dict[str, Any], ctx: WorkflowContext) -> Any:
    return {1, 2, 3}


broken_exit = Workflow(type="broken_exit", steps=[Step("exits", exits)])
broken_output = Workflow(type="broken_output", steps=[Step("returns_a_set", returns_a_set)])


# Sagas, switches and transactional steps for the semantics tests. A "switch" is a row in
# test_switches that a test sets and clears to break and mend a step between attempts.


async def switch_is_on(name: str) -> bool:
    async with (await _effects_pool()).connection() as conn:
        cursor = await conn.execute("SELECT 1 FROM test_switches WHERE name = %s", (name,))
        return await cursor.fetchone() is not None


async def saga_step(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    if await switch_is_on(f"break:{ctx.step_name}"):
        raise RuntimeError(f"{ctx.step_name} is broken")
    if input.get("fail_at") == ctx.step_name:
        raise PermanentError(f"{ctx.step_name} refused")
    await asyncio.sleep(float(input.get("sleep", 0)))
    return {"step": ctx.step_name, "attempt": ctx.attempt, "seen": sorted(ctx.outputs)}


async def undo(input: dict[str, Any], output: Any, ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx, f"undo:{ctx.step_name}")
    if output is None or output["step"] != ctx.step_name:
        raise PermanentError(f"compensation of {ctx.step_name} got the wrong output: {output}")
    if await switch_is_on(f"break:undo:{ctx.step_name}"):
        raise RuntimeError(f"undo of {ctx.step_name} is broken")
    await asyncio.sleep(float(input.get("undo_sleep", 0)))
    return {"undone": ctx.step_name}


saga = Workflow(
    type="saga",
    requires_compensation=True,
    max_retries=2,
    steps=[
        Step("reserve", saga_step, compensate=undo),
        Step("notify", saga_step),  # nothing to undo
        Step("charge", saga_step, compensate=undo),
        Step("ship", saga_step, compensate=undo),
    ],
)
plain_failing = Workflow(
    type="plain_failing",
    max_retries=0,
    steps=[Step("reserve", saga_step, compensate=undo), Step("charge", saga_step, compensate=undo)],
)


async def watch_for_cancel(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    for _ in range(int(float(input.get("sleep", 0)) / 0.05)):
        if ctx.cancel_requested:
            return {"step": ctx.step_name, "attempt": ctx.attempt, "saw_cancel": True, "seen": []}
        await asyncio.sleep(0.05)
    return {"step": ctx.step_name, "attempt": ctx.attempt, "saw_cancel": False, "seen": []}


cancellable = Workflow(
    type="cancellable",
    steps=[Step("one", watch_for_cancel), Step("two", watch_for_cancel), Step("three", watch_for_cancel)],
)
cancellable_saga = Workflow(
    type="cancellable_saga",
    requires_compensation=True,
    steps=[Step("reserve", saga_step, compensate=undo), Step("charge", saga_step, compensate=undo)],
)


async def credit_ledger(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """Writes its ledger row in the transaction that records the step's completion."""
    await record_effect(ctx)  # outside the transaction: counts every execution
    assert ctx.connection is not None
    await ctx.connection.execute(
        "INSERT INTO test_ledger (workflow_id, amount) VALUES (%s, %s)", (ctx.workflow_id, input["amount"])
    )
    # The step's own SQL plans as the database is configured, not under the worker's pins.
    planner = await ctx.connection.execute("SELECT current_setting('enable_seqscan')")
    (seqscan,) = await planner.fetchone() or ("?",)
    await asyncio.sleep(float(input.get("sleep", 0)))
    if input.get("fail"):
        raise PermanentError("ledger refused")
    return {"step": ctx.step_name, "attempt": ctx.attempt, "seen": sorted(ctx.outputs), "seqscan": seqscan}


# An interrupted attempt spends a retry: a budget above the kill tests' 20 kills.
ledger = Workflow(type="ledger", max_retries=25, steps=[Step("credit", credit_ledger, transactional=True)])


# Hardening: steps that time out in a thread, refuse, crash their process, return
# values json.dumps cannot write, hang, or wait on the database.


def slow_in_a_thread(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """Records its start and its end: a timeout leaves the thread running in between."""
    record_effect_from_a_thread(ctx, f"{ctx.step_name}:start")
    time.sleep(float(input.get("sleep", 0)))
    record_effect_from_a_thread(ctx, f"{ctx.step_name}:end")
    return {"attempt": ctx.attempt}


at_most_once = Workflow(
    type="at_most_once",
    max_retries=3,
    steps=[Step("transfer", slow_in_a_thread, is_idempotent=False, timeout=1)],
)
lingering = Workflow(type="lingering", max_retries=1, steps=[Step("linger", slow_in_a_thread, timeout=0.5)])


async def send_payment(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """Not idempotent: refuses before acting (NotExecuted) on its first attempts, then
    fails mid-call when asked to."""
    await record_effect(ctx)
    if ctx.attempt <= int(input.get("not_executed_times", 0)):
        raise NotExecuted("the payment service refused the request before acting on it")
    if input.get("break"):
        raise ConnectionResetError("the connection dropped mid-call")
    return {"sent_on": ctx.attempt}


payment = Workflow(type="payment", max_retries=3, steps=[Step("send", send_payment, is_idempotent=False)])


async def priced(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    return {"amount": Decimal("1.10"), "meta": MappingProxyType({"currency": "EUR"})}


decimal_output = Workflow(type="decimal_output", steps=[Step("price", priced), Step("after", recorded)])


async def hangs(input: dict[str, Any], ctx: WorkflowContext) -> None:
    await record_effect(ctx)
    await asyncio.sleep(3600)


hanging = Workflow(type="hanging", max_retries=0, steps=[Step("hang", hangs)])


async def slow_query(input: dict[str, Any], ctx: WorkflowContext) -> None:
    assert ctx.connection is not None
    await ctx.connection.execute("SELECT pg_sleep(%s)", (float(input["seconds"]),))


slow_statement = Workflow(
    type="slow_statement", max_retries=0, steps=[Step("query", slow_query, transactional=True)]
)


async def remember_key(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    if input.get("fail_at") == ctx.step_name:
        raise PermanentError(f"{ctx.step_name} refused")
    return {"step": ctx.step_name}


async def undo_remembering_key(input: dict[str, Any], output: Any, ctx: WorkflowContext) -> None:
    await record_effect(ctx, f"undo:{ctx.step_name}")


keyed_saga = Workflow(
    type="keyed_saga",
    requires_compensation=True,
    steps=[Step("book", remember_key, compensate=undo_remembering_key), Step("pay", remember_key)],
)
unknown_saga = Workflow(
    type="unknown_saga",
    requires_compensation=True,
    steps=[
        Step("reserve", saga_step, compensate=undo),
        Step("send", send_payment, is_idempotent=False),
    ],
)


async def cut_own_connection(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    """A transactional step whose connection the server drops while it runs."""
    await record_effect(ctx)
    assert ctx.connection is not None
    async with (await _effects_pool()).connection() as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (ctx.connection.info.backend_pid,))
    if input.get("fail"):
        raise RuntimeError("the step failed after its connection was cut")
    return {"step": ctx.step_name}


cut_transaction = Workflow(
    type="cut_transaction",
    max_retries=3,
    steps=[Step("book", cut_own_connection, transactional=True, is_idempotent=False)],
)
cut_then_fail = Workflow(
    type="cut_then_fail", max_retries=1, steps=[Step("book", cut_own_connection, transactional=True)]
)


# Failover: three-step workflows whose middle step is transactional, or not idempotent.
# Their retries cover the interruptions a failover can cause.
ledger_in_three = Workflow(
    type="ledger_in_three",
    max_retries=10,
    steps=[
        Step("reserve", recorded),
        Step("credit", credit_ledger, transactional=True),
        Step("notify", recorded),
    ],
)
payout_in_three = Workflow(
    type="payout_in_three",
    max_retries=10,
    steps=[
        Step("prepare", recorded),
        Step("send", send_payment, is_idempotent=False),
        Step("confirm", recorded),
    ],
)


# Snooze: a step that is "not yet" `snoozes` times (`every` seconds apart), then done.
# Each attempt is recorded, so a test counts them; no retries at all are allowed, so a
# snooze that spent one would fail the workflow.
async def waits(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    if ctx.attempt <= int(input.get("snoozes", 1)):
        raise Snooze(float(input.get("every", 0.2)), f"not settled yet (check {ctx.attempt})")
    return {"settled_at_attempt": ctx.attempt}


def waits_by_returning(input: dict[str, Any], ctx: WorkflowContext) -> Any:
    record_effect_from_a_thread(ctx)
    if ctx.attempt <= int(input.get("snoozes", 1)):
        return Snooze(float(input.get("every", 0.2)))
    return {"settled_at_attempt": ctx.attempt}


async def books_then_waits(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    assert ctx.connection is not None  # transactional: its writes roll back with a snooze
    await ctx.connection.execute(
        "INSERT INTO test_ledger (workflow_id, amount) VALUES (%s, %s)", (ctx.workflow_id, ctx.attempt)
    )
    return await waits(input, ctx)


snoozing = Workflow(
    type="snoozing",
    max_retries=0,
    steps=[Step("before", recorded), Step("wait", waits, is_idempotent=False), Step("after", recorded)],
)
snoozing_plain = Workflow(type="snoozing_plain", max_retries=0, steps=[Step("wait", waits_by_returning)])
snoozing_ledger = Workflow(
    type="snoozing_ledger", max_retries=0, steps=[Step("book", books_then_waits, transactional=True)]
)


# External events: a step that waits for "approved" (its payload is the step's output),
# between a step with an undo and one after; briefly, it times out and is compensated.
async def approved_by(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    return {"step": ctx.step_name, "approval": ctx.outputs["approval"], "seen": sorted(ctx.outputs)}


awaiting_approval = Workflow(
    type="awaiting_approval",
    requires_compensation=True,
    steps=[
        Step("reserve", saga_step, compensate=undo),
        Step("approval", wait_for_event="approved", timeout=60),
        Step("after", approved_by),
    ],
)
awaiting_briefly = Workflow(
    type="awaiting_briefly",
    requires_compensation=True,
    steps=[
        Step("reserve", saga_step, compensate=undo),
        Step("approval", wait_for_event="approved", timeout=1.5),
    ],
)


# Priorities: a bulk type that runs last and an urgent one that runs first, as their
# definitions say (a SQL insert without a priority gets its type's).
async def naps(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await asyncio.sleep(float(input.get("sleep", 0)))
    return {}


bulk_reindex = Workflow(type="bulk_reindex", priority=50, steps=[Step("reindex", naps)])
urgent_trade = Workflow(type="urgent_trade", priority=-50, steps=[Step("trade", naps)])

# Flow control: at most five of these hold a lease at once, across every daemon.
limited_five = Workflow(type="limited_five", max_concurrency=5, steps=[Step("one", naps), Step("two", naps)])
# At most ten step starts per second of these, across every daemon.
rated_ten = Workflow(type="rated_ten", rate_limit="10/s", steps=[Step("one", naps), Step("two", naps)])
# Due work shared round-robin between users.
fair_share = Workflow(type="fair_share", fair_by="user_id", steps=[Step("one", naps)])
