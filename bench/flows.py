"""No-op workflow types for the benchmarks: the engine's own cost, nothing else. No
limit is configured on any (the flow-controlled ones are in bench/limited_flows.py)."""

from __future__ import annotations

import time
from typing import Any

from engine import Step, Workflow, WorkflowContext


async def noop(input: Any, ctx: WorkflowContext) -> dict[str, Any]:
    return {}


def plain_noop(input: Any, ctx: WorkflowContext) -> dict[str, Any]:
    # A plain (synchronous) function: many users write steps so.
    return {}


async def stamp(input: Any, ctx: WorkflowContext) -> dict[str, float]:
    # Wall-clock time at step start, compared with the inserting client's clock (same host).
    return {"started": time.time()}


noop_1 = Workflow(type="noop_1", steps=[Step("only", noop)])
noop_3 = Workflow(type="noop_3", steps=[Step("one", noop), Step("two", noop), Step("three", noop)])
noop_sync_1 = Workflow(type="noop_sync_1", steps=[Step("only", plain_noop)])
pickup = Workflow(type="pickup", steps=[Step("stamp", stamp)])
