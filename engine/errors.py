"""The errors the engine raises and the ones step code raises to steer it."""

from __future__ import annotations

from uuid import UUID

# The error type of a workflow failed because a step that must not run twice was
# interrupted: it may or may not have taken effect, so only an operator who checked
# may retry it (with force).
OUTCOME_UNKNOWN = "OutcomeUnknown"


class WorkflowEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class PermanentError(WorkflowEngineError):
    """Raised by step code for a failure that another attempt cannot fix.

    The step fails at once, without retries (a rejected transaction, an invalid
    address), instead of spending its retry budget on a certain failure.
    """


class NotExecuted(WorkflowEngineError):
    """Raised by step code to say that this attempt did not take effect.

    The one failure after which a step that is not idempotent is tried again: the
    service refused the call before acting on it, the request never left. Any other
    failure of such a step (a timeout, a dropped connection, an unexpected error) leaves
    its outcome unknown, and it is not run again.
    """


# The longest a step may snooze at once: longer waits snooze again.
SNOOZE_SECONDS_MAX = 7 * 86_400.0


class Snooze(WorkflowEngineError):
    """Raised (or returned) by step code to say "not yet, check again in `seconds`".

    The attempt took no effect (so even a step that must not run twice runs again): the
    step goes back to pending, due after `seconds`, the workflow's lease is released (no
    worker slot is held while it waits), and no retry is spent. Each snooze is an
    attempt (`ctx.attempt` counts them) and a `running -> pending` event in the timeline;
    a step that may wait for ever should give up after some attempts (PermanentError).
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        if not 0 < seconds <= SNOOZE_SECONDS_MAX:
            raise ValueError(
                f"a snooze lasts more than 0 and at most {SNOOZE_SECONDS_MAX:g} seconds, not {seconds}"
            )
        self.seconds = float(seconds)
        self.reason = reason or f"not yet: check again in {seconds:g} s"
        super().__init__(self.reason)


class DefinitionError(WorkflowEngineError):
    """A workflow definition is malformed, or two definitions claim one type name."""


class UnstorableValueError(WorkflowEngineError, ValueError):
    """A value PostgreSQL cannot store: NaN or infinity in JSON, or a NUL character in text."""


class InputValidationError(WorkflowEngineError):
    """A workflow's input does not match its definition's input model."""

    def __init__(self, workflow_type: str, messages: list[str]) -> None:
        self.workflow_type = workflow_type
        self.messages = messages
        super().__init__(f"invalid input for workflow type {workflow_type!r}: " + "; ".join(messages))


class IllegalTransitionError(WorkflowEngineError):
    """A state change that the state machine does not allow."""

    def __init__(
        self, kind: str, source: str, target: str, allowed: frozenset[str], reason: str | None = None
    ) -> None:
        self.kind = kind
        self.source = source
        self.target = target
        choices = ", ".join(sorted(allowed)) or "nothing (it is final)"
        because = reason or f"from {source} it may go to {choices}"
        super().__init__(f"a {kind} cannot go from {source} to {target}; {because}")


class InvalidStartTimeError(WorkflowEngineError, ValueError):
    """A delayed start's time is unusable: no time zone, a negative or endless delay, or
    both a time and a delay."""


class InvalidPriorityError(WorkflowEngineError, ValueError):
    """A priority out of range (engine.definitions.priority_problem)."""


class InvalidLimitError(WorkflowEngineError, ValueError):
    """A concurrency limit that is not a whole number, 1 or more."""


class PriorityRefusedError(WorkflowEngineError):
    """A new priority for a finished workflow, which no daemon will claim again."""


class EventRefusedError(WorkflowEngineError):
    """An event sent to a workflow that is finished: nothing will wait for it."""


class UnservedTypeError(WorkflowEngineError):
    """A start of a type that no definition in reach defines and no live worker serves:
    it would wait forever, so the CLI and the HTTP API refuse it unless told otherwise."""

    def __init__(self, workflow_type: str, served: list[str]) -> None:
        self.workflow_type = workflow_type
        self.served = served
        choices = ", ".join(served) or "none (no live worker, no definition here)"
        super().__init__(
            f"no definition here and no live worker serves workflow type {workflow_type!r}; "
            f"served types: {choices} (to start it anyway, for a worker yet to come: "
            '--allow-unserved, or "allow_unserved": true over HTTP)'
        )


class VersionMismatchError(WorkflowEngineError):
    """Workflows cannot move between two versions of a definition: one is unknown here, or
    their steps do not line up."""


class IdempotencyKeyConflictError(WorkflowEngineError):
    """A start reuses an idempotency key that belongs to a different start.

    A key names one start: the same type, user and input. Reusing it for another is a
    mistake of the caller, refused rather than answered with the other workflow.
    """

    def __init__(self, key: str, workflow_id: UUID, differences: list[str]) -> None:
        self.key = key
        self.workflow_id = workflow_id
        self.differences = differences
        super().__init__(
            f"idempotency key {key!r} already belongs to workflow {workflow_id}, started with a "
            f"different {' and '.join(differences)}; use a new key for a different start"
        )


class WorkflowNotFoundError(WorkflowEngineError):
    """No workflow has the given id."""

    def __init__(self, workflow_id: object) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"no workflow with id {workflow_id}")


class InvalidWorkflowIdError(WorkflowEngineError, ValueError):
    """A workflow id that is not a UUID."""


class MigrationError(WorkflowEngineError):
    """The database schema cannot be brought up to date safely."""
