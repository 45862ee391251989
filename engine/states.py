"""Workflow and step states, and the transitions between them.

The tables below are the whole state machine: every arrow of the seed's diagrams plus
the ones that retry, cancel and compensate need. Anything else is refused with an
`IllegalTransitionError` that names the allowed targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from engine.errors import IllegalTransitionError


class WorkflowState(StrEnum):
    """The states of a workflow; the values are the `workflow_state` enum's labels."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


class StepState(StrEnum):
    """The states of a step; the values are the `step_state` enum's labels."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


S = TypeVar("S", bound=StrEnum)


@dataclass(frozen=True)
class TransitionTable(Generic[S]):
    """The allowed arrows of one state machine."""

    kind: str
    arrows: Mapping[S, frozenset[S]]

    def allowed(self, source: S) -> frozenset[S]:
        """The states reachable from `source` in one step."""
        return self.arrows.get(source, frozenset())

    def can(self, source: S, target: S) -> bool:
        """Whether `source` may go to `target`."""
        return target in self.allowed(source)

    def check(self, source: S, target: S) -> None:
        """Raise `IllegalTransitionError` unless `source` may go to `target`."""
        if not self.can(source, target):
            allowed = frozenset(str(state) for state in self.allowed(source))
            raise IllegalTransitionError(self.kind, str(source), str(target), allowed)

    def is_final(self, state: S) -> bool:
        """Whether nothing leaves `state`."""
        return not self.allowed(state)


_W = WorkflowState
WORKFLOW_TRANSITIONS = TransitionTable[WorkflowState](
    kind="workflow",
    arrows={
        # Claimed; cancelled before it started; or refused at claim (invalid input).
        _W.PENDING: frozenset({_W.RUNNING, _W.CANCELLED, _W.FAILED}),
        # Finished, failed for good, or stopped at a step boundary by a cancel.
        _W.RUNNING: frozenset({_W.COMPLETED, _W.FAILED, _W.CANCELLED}),
        # Manual retry (resume at the failed step) or compensation (saga).
        _W.FAILED: frozenset({_W.PENDING, _W.COMPENSATING}),
        # A cancelled workflow whose definition requires compensation undoes its steps.
        _W.CANCELLED: frozenset({_W.COMPENSATING}),
        # Done, or a compensation exhausted its retries and needs attention.
        _W.COMPENSATING: frozenset({_W.COMPENSATED, _W.FAILED}),
        _W.COMPLETED: frozenset(),
        _W.COMPENSATED: frozenset(),
    },
)

_S = StepState
STEP_TRANSITIONS = TransitionTable[StepState](
    kind="step",
    arrows={
        # Started, or skipped because its workflow was cancelled or failed before it.
        _S.PENDING: frozenset({_S.RUNNING, _S.SKIPPED}),
        # An attempt succeeded or failed, or snoozed (engine.Snooze: not yet, no effect).
        _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.PENDING}),
        # A scheduled retry starts another attempt; a manual retry resets the step.
        _S.FAILED: frozenset({_S.RUNNING, _S.PENDING}),
        # Undo it (a step without a compensate function, too, passes through compensating:
        # its compensation is a no-op).
        _S.COMPLETED: frozenset({_S.COMPENSATING}),
        _S.COMPENSATING: frozenset({_S.COMPENSATED}),
        _S.SKIPPED: frozenset(),
        _S.COMPENSATED: frozenset(),
    },
)

# The states in which a workflow is work for a daemon: the claim's partial index holds
# exactly these, and every query that asks for due work lists them (a test compares).
RUNNABLE_WORKFLOW_STATES = frozenset({_W.PENDING, _W.RUNNING, _W.COMPENSATING})
# The others: a workflow stays in them until an operator acts (wait_for returns).
FINISHED_WORKFLOW_STATES = frozenset(WorkflowState) - RUNNABLE_WORKFLOW_STATES
