"""The definition API: a workflow type is an ordered list of steps.

Developers write plain data: `Workflow(type=..., steps=[Step(name=..., execute=...)])`.
Step functions may be `async def` or plain functions; the daemon awaits the first on its
event loop and runs the second in a thread pool.
"""

from __future__ import annotations

import builtins
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ValidationError

from engine.errors import DefinitionError, InputValidationError
from engine.limits import RateLimit, TypeLimits, concurrency_problem, fair_by_problem, rate_limit_problem

if TYPE_CHECKING:
    from psycopg import AsyncConnection

TYPE_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")
MAX_RETRIES_DEFAULT = 3
# Priorities: smaller runs first; due work is claimed by priority, then by due time.
# The default sits in the middle so that a type or a start can go either way.
PRIORITY_MIN, PRIORITY_DEFAULT, PRIORITY_MAX = -100, 0, 100


def priority_problem(priority: object) -> str | None:
    """Why `priority` is not one, in words; None when it is."""
    if (
        isinstance(priority, int)
        and not isinstance(priority, bool)
        and PRIORITY_MIN <= priority <= PRIORITY_MAX
    ):
        return None
    return (
        f"a priority is a whole number from {PRIORITY_MIN} (first) to {PRIORITY_MAX} (last), not {priority!r}"
    )


ExecuteFn = Callable[[Any, "WorkflowContext"], Any | Awaitable[Any]]
CompensateFn = Callable[[Any, Any, "WorkflowContext"], Any | Awaitable[Any]]
# A workflow's final output from its input and its steps' outputs (by step name).
OutputFn = Callable[[Any, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class WorkflowContext:
    """What a running step knows about its workflow and its own attempt.

    `idempotency_key` is the same on every attempt of the step: pass it to outside
    services so that a call repeated after a crash is deduplicated there. `outputs`
    holds the outputs of the steps that completed before this one, by step name.
    `connection` is set only for transactional steps: the open transaction that will
    also record the step's completion. `cancel_requested` turns true when the workflow is
    asked to cancel while the step runs.
    """

    workflow_id: UUID
    workflow_type: str
    step_name: str
    step_index: int
    idempotency_key: str
    attempt: int
    outputs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    wallet_address: str | None = None
    connection: AsyncConnection[Any] | None = None
    # Asked on every read of `cancel_requested`; the daemon's heartbeat keeps it current.
    cancel_check: Callable[[], bool] = field(default=lambda: False, repr=False)

    @property
    def cancel_requested(self) -> bool:
        """Whether someone asked to cancel the workflow while this step runs.

        The workflow stops at the next step boundary anyway; a long step may look at
        this to stop early (and raise, or return what it has).
        """
        return self.cancel_check()


@dataclass(frozen=True)
class Step:
    """One step of a workflow: what it does, how to undo it, and how to retry it.

    `max_retries` None means the workflow's. `timeout` is in seconds; an attempt that
    runs longer fails and is retried. `is_idempotent=False` promises at most one
    execution: a step interrupted by a crash is not run again blindly. A
    `transactional` step must be `async def`; it gets the completing transaction in
    `ctx.connection`, so its database writes commit exactly once with the step (its
    compensate function, too, runs in the transaction that records the compensation).

    A step with `wait_for_event` and no execute function waits, parked (no lease, no
    worker slot), until an event of that name is sent to its workflow
    (`workflow_send_event`); the event's payload is its output. Its `timeout`, counted
    from when the wait began, fails it (`EventTimeout`) if no event came; without one it
    waits for ever.
    """

    name: str
    execute: ExecuteFn | None = None
    compensate: CompensateFn | None = None
    is_idempotent: bool = True
    max_retries: int | None = None
    timeout: float | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    transactional: bool = False
    wait_for_event: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise DefinitionError("a step needs a name")
        if (self.execute is None) == (self.wait_for_event is None):
            raise DefinitionError(
                f"step {self.name!r}: give it an execute function or wait_for_event, one of them"
            )
        if self.wait_for_event is not None and (not self.wait_for_event or self.transactional):
            raise DefinitionError(
                f"step {self.name!r}: wait_for_event names an event, and a wait is not transactional"
            )
        if self.execute is not None and not callable(self.execute):
            raise DefinitionError(f"step {self.name!r}: execute must be callable")
        if self.compensate is not None and not callable(self.compensate):
            raise DefinitionError(f"step {self.name!r}: compensate must be callable")
        if self.max_retries is not None and self.max_retries < 0:
            raise DefinitionError(f"step {self.name!r}: max_retries cannot be negative")
        if self.timeout is not None and self.timeout <= 0:
            raise DefinitionError(f"step {self.name!r}: timeout must be positive seconds")
        plain = [fn for fn in (self.execute, self.compensate) if fn and not inspect.iscoroutinefunction(fn)]
        if self.transactional and plain:
            raise DefinitionError(
                f"step {self.name!r}: a transactional step's execute and compensate must be async defs, "
                "because they share the daemon's async database connection"
            )
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    def retries(self, workflow_max_retries: int) -> int:
        """The retry budget of this step: its own, else the workflow's."""
        return workflow_max_retries if self.max_retries is None else self.max_retries


@dataclass(frozen=True)
class Workflow:
    """A workflow type: an ordered list of steps run one after the other.

    `requires_compensation` makes a failed (or cancelled) workflow undo its completed
    steps in reverse order. `input_model`, a pydantic model, validates the input of
    every workflow of this type, whether it was started from Python or by a SQL insert.
    `version` tells definitions of one type apart across deploys: a workflow runs to its
    end under the version it started with, so a change to the steps (a rename, a step
    inserted or moved) is a new version, and the old one stays in the code until no
    workflow of it is left (`workflowd versions`).

    `output` shapes the workflow's final output from its input and its steps' outputs
    (by step name); without it the last step's output is the workflow's. It runs when
    the last step succeeds, before the completion is recorded, and must be quick and
    pure: an error in it fails the workflow like broken step code. `exact_numbers` gives
    step code every JSON number with a fraction (of the input and of earlier steps'
    outputs) as a `decimal.Decimal` with every digit, never a binary float: for money.
    `priority` (-100 to 100, smaller first) is that of its workflows when their start
    names none, a SQL insert's too (the daemons declare it in `workflow_types`).
    `max_concurrency`: at most that many of its workflows hold a lease at once, whatever
    the number of daemons; `rate_limit` ("10/s", "600/min"): at most that many of its
    step starts in any stretch of that period, across the fleet (an operator may set
    others at run time: `workflowd limits`). `fair_by="user_id"`: its due work is claimed
    round-robin across its users, so that one user's backlog does not hold back another's.
    """

    type: str
    steps: Sequence[Step]
    name: str = ""
    description: str = ""
    requires_compensation: bool = False
    max_retries: int = MAX_RETRIES_DEFAULT
    # builtins.type: inside this class body, `type` is the field above.
    input_model: builtins.type[BaseModel] | None = None
    version: int = 1
    output: OutputFn | None = None
    exact_numbers: bool = False
    # The priority of its workflows when a start gives none (smaller runs first).
    priority: int = PRIORITY_DEFAULT
    # At most this many of its workflows hold a lease at once, across every daemon.
    max_concurrency: int | None = None
    # At most this many step starts per period ("10/s"), across every daemon.
    rate_limit: str | None = None
    # Share its due work round-robin between the users of its workflows ("user_id").
    fair_by: str | None = None

    def __post_init__(self) -> None:
        if not TYPE_NAME_PATTERN.fullmatch(self.type):
            raise DefinitionError(
                f"workflow type {self.type!r} must start with a letter and use only "
                "letters, digits, '_', '.', '-' (at most 128 characters)"
            )
        if not self.steps:
            raise DefinitionError(f"workflow {self.type!r} needs at least one step")
        names = [step.name for step in self.steps]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DefinitionError(f"workflow {self.type!r} repeats step names {duplicates}")
        if self.max_retries < 0:
            raise DefinitionError(f"workflow {self.type!r}: max_retries cannot be negative")
        if self.version < 1:
            raise DefinitionError(f"workflow {self.type!r}: version must be 1 or more")
        if self.output is not None and not callable(self.output):
            raise DefinitionError(f"workflow {self.type!r}: output must be callable")
        if problem := priority_problem(self.priority):
            raise DefinitionError(f"workflow {self.type!r}: {problem}")
        if problem := (
            concurrency_problem(self.max_concurrency)
            or rate_limit_problem(self.rate_limit)
            or fair_by_problem(self.fair_by)
        ):
            raise DefinitionError(f"workflow {self.type!r}: {problem}")
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.name:
            object.__setattr__(self, "name", self.type)

    @property
    def limits(self) -> TypeLimits:
        """The limits its definition declares."""
        rate = RateLimit.parse(self.rate_limit) if self.rate_limit is not None else None
        return TypeLimits(self.max_concurrency, rate, self.fair_by)

    def read_json(self, text: str) -> Any:
        """A stored JSON value as this type's step code sees it (`exact_numbers`)."""
        return json.loads(text, parse_float=Decimal) if self.exact_numbers else json.loads(text)

    def validate_input(self, input: Any) -> None:
        """Raise `InputValidationError` with readable messages unless the input fits."""
        if self.input_model is None:
            return
        try:
            self.input_model.model_validate(input)
        except ValidationError as error:
            raise InputValidationError(self.type, _messages(error)) from None


def _messages(error: ValidationError) -> list[str]:
    messages = []
    for detail in error.errors(include_url=False):
        where = ".".join(str(part) for part in detail["loc"]) or "input"
        messages.append(f"{where}: {detail['msg']}")
    return messages
