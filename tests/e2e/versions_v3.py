"""Version 3 of the `versioned` type: version 2's steps, by name and order, with new code
(a fix): version 2's workflows in flight may move to it (`workflowd migrate-version`)."""

from __future__ import annotations

from typing import Any

from engine import Step, Workflow, WorkflowContext
from tests.e2e.flows import record_effect, recorded


async def charge_card_fixed(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    await record_effect(ctx)
    return {"step": ctx.step_name, "fixed": True}


versioned_v3 = Workflow(
    type="versioned",
    version=3,
    max_retries=25,
    steps=[Step("reserve", recorded), Step("check_fraud", recorded), Step("charge_card", charge_card_fixed)],
)
