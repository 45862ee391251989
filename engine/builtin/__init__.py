"""The seed's five workflow types, defined with the public API on adapter interfaces."""

from __future__ import annotations

from engine.builtin.adapters import Adapters
from engine.builtin.ai import ai_job_chain
from engine.builtin.chain import contract_deployments, indexing_verification
from engine.builtin.rewards import reward_grant
from engine.builtin.sandbox import sandbox_adapters
from engine.builtin.trade import trade_executions
from engine.definitions import Workflow

BUILTIN_TYPES = (
    "contract_deployment",
    "trade_execution",
    "ai_job_chain",
    "indexing_verification",
    "reward_grant",
)


def builtin_workflows(adapters: Adapters) -> list[Workflow]:
    """The five built-in workflow types, served by every daemon unless turned off."""
    return [
        *contract_deployments(adapters.chain),
        *trade_executions(adapters.exchange),
        ai_job_chain(adapters.ai),
        indexing_verification(adapters.chain),
        reward_grant(adapters.notifier),
    ]


__all__ = ["BUILTIN_TYPES", "Adapters", "builtin_workflows", "sandbox_adapters"]
