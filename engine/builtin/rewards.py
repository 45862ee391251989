"""Built-in reward_grant: validate -> grant -> notify; a failed notification revokes."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from engine import PermanentError, Step, Workflow, WorkflowContext
from engine.builtin.adapters import Notifier
from engine.builtin.money import Amount, amount_text

MAX_REWARD_AMOUNT = Decimal(10_000)


class RewardInput(BaseModel):
    """A reward for the workflow's user."""

    amount: Amount
    reason: str = Field(min_length=1, max_length=500)


def reward_output(input: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a granted reward returns: the grant's id (its row in reward_grants), the
    amount as a decimal string, and whom it was told to."""
    grant = outputs["grant"]
    return {
        "grantId": grant.get("grantId"),  # None for a grant made by an earlier release
        "amount": amount_text(RewardInput.model_validate(input).amount),
        "userId": grant["user_id"],
        "notified": outputs["notify"]["notified"],
        "message": outputs["notify"]["message"],
    }


def reward_grant(notifier: Notifier) -> Workflow:
    """Validate the grant, book it in the reward ledger, tell the user; undo revokes it."""

    async def validate(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        amount = RewardInput.model_validate(input).amount
        if not ctx.user_id:
            raise PermanentError("a reward needs a user_id")
        if amount > MAX_REWARD_AMOUNT:
            raise PermanentError(f"a reward is at most {MAX_REWARD_AMOUNT}, not {amount_text(amount)}")
        return {"user_id": ctx.user_id, "amount": amount_text(amount)}

    async def grant(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        reward = RewardInput.model_validate(input)
        assert ctx.connection is not None  # transactional: booked exactly once with the step
        await ctx.connection.execute(
            "INSERT INTO reward_grants (workflow_id, user_id, amount, reason) VALUES (%s, %s, %s, %s)",
            (ctx.workflow_id, ctx.user_id, reward.amount, reward.reason),
        )
        # The grant's row is keyed by its workflow: one grant per workflow.
        return {
            "grantId": str(ctx.workflow_id),
            "granted": amount_text(reward.amount),
            "user_id": ctx.user_id,
        }

    async def revoke(input: dict[str, Any], output: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        assert ctx.connection is not None  # transactional
        await ctx.connection.execute(
            "UPDATE reward_grants SET status = 'revoked', revoked_at = now() "
            "WHERE workflow_id = %s AND status = 'granted'",
            (ctx.workflow_id,),
        )
        return {"revoked": output["granted"]}

    async def notify(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, Any]:
        reward = RewardInput.model_validate(input)
        message = f"You received {amount_text(reward.amount)} for {reward.reason}."
        await notifier.notify(ctx.user_id or "", message, idempotency_key=ctx.idempotency_key)
        return {"notified": ctx.user_id, "message": message}

    return Workflow(
        type="reward_grant",
        name="Reward grant",
        description="Validate a reward, grant it in the ledger, notify the user; revoke if that fails.",
        input_model=RewardInput,
        requires_compensation=True,
        exact_numbers=True,
        output=reward_output,
        steps=[
            Step("validate", validate),
            Step("grant", grant, compensate=revoke, transactional=True),
            Step("notify", notify, timeout=30),
        ],
    )
