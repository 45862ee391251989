"""Workflow types that kill their daemon on every attempt, for the crash-loop tests only.

Kept out of tests/e2e/flows.py: every daemon of the other tests loads that module, and a
fuzzer that starts a workflow of this type would take its daemon down.
"""

from __future__ import annotations

import os
from typing import Any

from engine import PermanentError, Step, Workflow, WorkflowContext
from tests.e2e.flows import record_effect_from_a_thread, recorded


def exits_the_process(input: dict[str, Any], ctx: WorkflowContext) -> None:
    """What a segfault in a C extension or the OOM killer does to the daemon."""
    record_effect_from_a_thread(ctx, ctx.step_name)
    os._exit(1)


crash_loop = Workflow(type="crash_loop", steps=[Step("crash", exits_the_process, max_retries=2)])
# Innocent bystanders of a crash loop: each crash interrupts them too, and an interrupted
# attempt spends a retry, so their budget covers the crashes.
sturdy = Workflow(type="sturdy", max_retries=10, steps=[Step("one", recorded), Step("two", recorded)])


async def _book(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    return {"booked": True}


async def _refuse(input: dict[str, Any], ctx: WorkflowContext) -> None:
    raise PermanentError("refused, so the booking is undone")


def undo_exits_the_process(input: dict[str, Any], output: Any, ctx: WorkflowContext) -> None:
    record_effect_from_a_thread(ctx, f"undo:{ctx.step_name}")
    os._exit(1)


# A saga whose compensation kills its daemon on every attempt: it ends too.
crash_loop_undo = Workflow(
    type="crash_loop_undo",
    requires_compensation=True,
    steps=[Step("book", _book, compensate=undo_exits_the_process, max_retries=1), Step("pay", _refuse)],
)
