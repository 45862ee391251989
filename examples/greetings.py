"""A two-step workflow type to try the daemon with: `WORKFLOWD_MODULES=examples.greetings`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from engine import Step, Workflow, WorkflowContext


class GreetingInput(BaseModel):
    name: str


async def compose(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, str]:
    return {"text": f"Hello, {input['name']}!"}


def deliver(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
    # A plain function runs in the daemon's thread pool; ctx.outputs holds earlier results.
    return {"delivered": ctx.outputs["compose"]["text"], "key": ctx.idempotency_key}


greeting = Workflow(
    type="greeting",
    description="Compose a greeting, then deliver it.",
    input_model=GreetingInput,
    steps=[Step("compose", compose), Step("deliver", deliver, timeout=10)],
)
