"""WorkflowService: idempotent start (also under races), reads, listing, execution summary."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from engine import (
    IdempotencyKeyConflictError,
    InputValidationError,
    InvalidWorkflowIdError,
    Registry,
    Step,
    UnstorableValueError,
    Workflow,
    WorkflowNotFoundError,
    WorkflowService,
    WorkflowState,
)
from engine.service import LIST_LIMIT_MAX
from engine.store import Store
from tests.factories import insert_step, insert_workflow


class TradeInput(BaseModel):
    tokenA: str
    tokenB: str
    amount: float
    slippage: float = 0.5


def _noop(input: Any, ctx: Any) -> dict[str, Any]:
    return {}


TRADE = Workflow(
    type="trade_execution",
    steps=[
        Step("execute_trade", _noop),
        Step("confirm_trade", _noop),
        Step("update_portfolio", _noop),
    ],
    requires_compensation=True,
    max_retries=5,
    input_model=TradeInput,
)


async def test_start_creates_a_pending_workflow_shaped_by_its_definition(db_url: str) -> None:
    async with WorkflowService.connect(db_url, Registry([TRADE])) as service:
        result = await service.start(
            "trade_execution", {"tokenA": "ETH", "tokenB": "USDC", "amount": 2}, "u1", "0xw"
        )
    workflow = result.workflow
    assert result.created is True
    assert workflow.state is WorkflowState.PENDING
    assert (workflow.total_steps, workflow.max_retries, workflow.requires_compensation) == (
        3,
        5,
        True,
    )
    assert (workflow.user_id, workflow.wallet_address) == ("u1", "0xw")
    assert workflow.idempotency_key.startswith("workflow:trade_execution:u1:")


async def test_a_duplicate_start_returns_the_existing_workflow(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    first = await service.start_workflow("report", {"month": "2026-11", "format": "pdf"}, "u1")
    again = await service.start("report", {"format": "pdf", "month": "2026-11"}, "u1")
    assert again.created is False
    assert again.workflow.id == first.id
    other_user = await service.start("report", {"month": "2026-11", "format": "pdf"}, "u2")
    assert other_user.created is True
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (2,)


async def test_an_explicit_idempotency_key_finds_its_start_and_refuses_another(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    first = await service.start("payout", {"amount": 1.5, "to": "0xa"}, "u1", idempotency_key="order-7")
    assert first.created is True
    assert first.workflow.idempotency_key == "order-7"
    # The same start in another key order and number spelling: the same workflow.
    again = await service.start("payout", {"to": "0xa", "amount": 1.50}, "u1", idempotency_key="order-7")
    assert (again.created, again.workflow.id) == (False, first.workflow.id)
    assert (await service.start_workflow("payout", {"to": "0xa", "amount": 1.5}, "u1",
                                         idempotency_key="order-7")).id == first.workflow.id  # fmt: skip
    for start, differing in (
        (("payout", {"amount": 2, "to": "0xa"}, "u1"), ["input"]),
        (("refund", {"amount": 1.5, "to": "0xa"}, "u1"), ["type"]),
        (("payout", {"amount": 1.5, "to": "0xa"}, "u2"), ["user"]),
        (("refund", {"amount": 1.5, "to": "0xa"}, None), ["type", "user"]),
    ):
        with pytest.raises(IdempotencyKeyConflictError) as conflict:
            await service.start(*start, idempotency_key="order-7")
        assert conflict.value.differences == differing
        assert conflict.value.workflow_id == first.workflow.id
        assert "idempotency key 'order-7' already belongs to workflow" in str(conflict.value)
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


async def test_a_key_chosen_in_sql_is_found_by_a_start_with_it(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    row = insert_workflow(db, type="payout", input={"amount": 3}, user_id="u1", idempotency_key="sql-chosen")
    found = await service.start("payout", {"amount": 3.0}, "u1", idempotency_key="sql-chosen")
    assert (found.created, found.workflow.id) == (False, row["id"])
    with pytest.raises(IdempotencyKeyConflictError, match="'sql-chosen'"):
        await service.start("payout", {"amount": 4}, "u1", idempotency_key="sql-chosen")


async def test_an_idempotency_key_must_be_storable_text_of_a_sane_length(service: WorkflowService) -> None:
    for bad in ("", "k" * 513, "nul\x00key"):
        with pytest.raises(UnstorableValueError, match="idempotency key"):
            await service.start("payout", {}, "u1", idempotency_key=bad)
    assert (await service.start("payout", {}, "u1", idempotency_key="k" * 512)).created is True


async def test_twenty_concurrent_duplicate_starts_from_separate_connections_give_one_row(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    connections = [await psycopg.AsyncConnection.connect(db_url, autocommit=True) for _ in range(20)]
    try:
        services = [WorkflowService(Store(conn)) for conn in connections]
        # Hold every start at the line, then release them together.
        gate = asyncio.Event()

        async def start(service: WorkflowService) -> Any:
            await gate.wait()
            return await service.start("payout", {"amount": 10, "to": "0xabc"}, "racer")

        tasks = [asyncio.create_task(start(service)) for service in services]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks)
    finally:
        for conn in connections:
            await conn.close()
    assert len({result.workflow.id for result in results}) == 1
    assert sum(result.created for result in results) == 1
    assert db.execute("SELECT count(*) FROM workflows WHERE type = 'payout'").fetchone() == (1,)


async def test_input_is_validated_against_the_definition_and_nothing_is_stored(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    async with WorkflowService.connect(db_url, Registry([TRADE])) as service:
        with pytest.raises(InputValidationError) as caught:
            await service.start("trade_execution", {"tokenA": "ETH", "amount": "lots"}, "u1")
    assert caught.value.messages == [
        "tokenB: Field required",
        "amount: Input should be a valid number, unable to parse string as a number",
    ]
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)


async def test_an_unknown_type_may_still_be_started(service: WorkflowService) -> None:
    workflow = await service.start_workflow("served_elsewhere", {"x": 1}, "u1")
    assert workflow.state is WorkflowState.PENDING
    assert workflow.total_steps == 0  # learnt from the definition at the first claim
    assert workflow.version is None  # so is its version: the newest its claimer serves


async def test_a_start_takes_the_newest_version_the_starting_side_knows(db_url: str) -> None:
    newer = Workflow(type="trade_execution", version=2, steps=[Step("quote", _noop), *TRADE.steps])
    async with WorkflowService.connect(db_url, Registry([TRADE, newer])) as service:
        workflow = await service.start_workflow(
            "trade_execution", {"tokenA": "A", "tokenB": "B", "amount": 1}, "u1"
        )
    assert (workflow.version, workflow.total_steps) == (2, 4)


async def test_input_that_is_not_json_is_refused(service: WorkflowService) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        await service.start("t", {"when": object()}, "u1")
    with pytest.raises(ValueError, match="not a JSON number"):
        await service.start("t", {"x": float("nan")}, "u1")


async def test_get_workflow_by_id_and_its_errors(service: WorkflowService) -> None:
    started = await service.start_workflow("t", {"a": 1}, "u1")
    assert (await service.get_workflow(str(started.id))).id == started.id
    with pytest.raises(WorkflowNotFoundError, match="no workflow with id"):
        await service.get_workflow(uuid.uuid4())
    with pytest.raises(InvalidWorkflowIdError, match="not a workflow id"):
        await service.get_workflow("not-a-uuid")


async def test_list_workflows_pages_filters_and_caps(
    service: WorkflowService, db: psycopg.Connection[Any]
) -> None:
    for n in range(7):
        insert_workflow(db, type="alpha", input={"n": n}, user_id="ua")
    for n in range(3):
        insert_workflow(db, type="beta", input={"n": n}, user_id="ub", state="failed")
    page1 = await service.list_workflows(page=1, limit=4, type="alpha")
    page2 = await service.list_workflows(page=2, limit=4, type="alpha")
    assert (page1.total, len(page1.items), len(page2.items)) == (7, 4, 3)
    assert not {w.id for w in page1.items} & {w.id for w in page2.items}
    created = [w.created_at for w in page1.items + page2.items]
    assert created == sorted(created, reverse=True)
    failed = await service.list_workflows(state="failed")
    assert failed.total == 3
    assert {w.type for w in failed.items} == {"beta"}
    assert (await service.list_workflows(user_id="ua", state=WorkflowState.FAILED)).total == 0
    assert (await service.list_workflows(limit=10_000)).limit == LIST_LIMIT_MAX
    with pytest.raises(ValueError, match="page must be in"):
        await service.list_workflows(page=0)
    with pytest.raises(ValueError, match="is not a valid WorkflowState"):
        await service.list_workflows(state="bogus")


async def test_execution_summary_reports_progress_current_step_retries_and_error(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    row = insert_workflow(
        db,
        type="trade_execution",
        state="running",
        total_steps=3,
        current_step_index=1,
        started_at="2026-01-01T00:00:00Z",
    )
    insert_step(
        db,
        row,
        0,
        "execute_trade",
        state="completed",
        attempt=1,
        started_at="2026-01-01T00:00:00Z",
        completed_at="2026-01-01T00:00:02Z",
    )
    insert_step(
        db,
        row,
        1,
        "confirm_trade",
        state="failed",
        attempt=3,
        retry_count=2,
        error={"type": "Timeout", "message": "slow"},
    )
    insert_step(db, row, 2, "update_portfolio")
    async with WorkflowService.connect(db_url, Registry([TRADE])) as service:
        summary = await service.get_execution_summary(row["id"])
    assert (summary.completed_steps, summary.total_steps, summary.progress_percentage) == (
        1,
        3,
        33.3,
    )
    assert (summary.current_step, summary.retries) == ("confirm_trade", 2)
    assert summary.last_error == {"type": "Timeout", "message": "slow"}
    assert summary.steps[0].duration_seconds == 2.0
    assert [step.state for step in summary.steps] == ["completed", "failed", "pending"]


async def test_execution_summary_of_a_sql_inserted_workflow_uses_the_definition(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    row = insert_workflow(db, type="trade_execution")
    async with WorkflowService.connect(db_url, Registry([TRADE])) as service:
        summary = await service.get_execution_summary(row["id"])
    assert (summary.completed_steps, summary.total_steps, summary.progress_percentage) == (
        0,
        3,
        0.0,
    )
    assert summary.current_step == "execute_trade"


async def test_stats_and_the_gauge_report_workflows_no_daemon_will_claim(
    service: WorkflowService, db: psycopg.Connection[Any], db_url: str
) -> None:
    from daemon.metrics import QueueDepthCollector  # noqa: PLC0415 (a daemon part, used here only)

    insert_workflow(db, state="running", next_retry_at="2999-01-01T00:00:00Z")  # edited by hand
    insert_workflow(db, state="compensating", next_retry_at="2999-01-01T00:00:00Z")
    insert_workflow(db, state="running")  # due now: claimable
    insert_workflow(db, state="pending", next_retry_at="2999-01-01T00:00:00Z")  # a start for later
    insert_workflow(db, state="failed", next_retry_at="2999-01-01T00:00:00Z")  # finished
    assert (await service.get_stats()).stuck_workflows == 2
    collector = QueueDepthCollector()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await collector.run_once(conn)
    gauges = {family.name: family.samples for family in collector.collect()}
    assert [sample.value for sample in gauges["workflowd_stuck_workflows"]] == [2]
