"""Workflow types the fault suite's daemons serve (WORKFLOWD_MODULES=tests.chaos.flows).

Built from the e2e tests' steps, which record every execution in `test_effects` (through
TEST_EFFECTS_URL when the daemon's own link to the database is the fault) and, for the
transactional `credit` step, write `test_ledger` in the transaction that records the
step's completion.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from pydantic import BaseModel

from engine import Step, Workflow, WorkflowContext
from tests.e2e.flows import credit_ledger, record_effect, recorded

# A step that meets a dropped connection while recording its effect fails as retryable:
# the faults must not spend a retry budget meant for the steps' own errors.
RETRIES_THROUGH_FAULTS = 10

chaos_steps = Workflow(
    type="chaos_steps",
    max_retries=RETRIES_THROUGH_FAULTS,
    steps=[Step("first", recorded), Step("second", recorded), Step("third", recorded)],
)
chaos_ledger = Workflow(
    type="chaos_ledger",
    max_retries=RETRIES_THROUGH_FAULTS,
    steps=[Step("prepare", recorded), Step("credit", credit_ledger, transactional=True)],
)


class Order(BaseModel):
    order_id: int
    amount: float


chaos_validated = Workflow(
    type="chaos_validated",
    max_retries=RETRIES_THROUGH_FAULTS,
    steps=[Step("use", recorded)],
    input_model=Order,
)


async def exit_the_process(input: dict[str, Any], ctx: WorkflowContext) -> NoReturn:
    """Broken step code that takes its whole daemon down, the way a segfaulting extension
    or an OOM kill would: no exception for the engine to catch, just a dead process."""
    await record_effect(ctx)
    os._exit(1)


# Two retries: the step may run at most three times, however often it kills its daemon.
chaos_exit = Workflow(type="chaos_exit", max_retries=2, steps=[Step("exit", exit_the_process)])
