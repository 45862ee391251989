"""Retention: which finished workflows are deleted, and when.

Completed, cancelled and compensated workflows go once they have been finished for
`finished_seconds`; failed ones, which wait for an operator, after `failed_seconds`;
None keeps them forever. Each goes with its steps and timeline, in small batches, each
batch in a transaction holding an advisory lock, so that one process at a time prunes
and no batch holds its locks for long. The daemons prune on their own (one at a time);
`workflowd prune` does the same by hand.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.counts import recount_finished
from engine.states import WorkflowState
from engine.store import Store

RETENTION_LOCK_ID = int.from_bytes(b"wfprune!", "big")
FINISHED_STATES = (WorkflowState.COMPLETED, WorkflowState.CANCELLED, WorkflowState.COMPENSATED)
SECONDS_A_DAY = 86_400.0
PRUNE_BATCH_DEFAULT = 500
# Between batches: the claims and completions of the daemons go first.
PRUNE_PAUSE_SECONDS = 0.05
# A worker row is a record of a process; a week after it stopped it tells nobody anything.
WORKER_RETENTION_SECONDS = 7 * SECONDS_A_DAY
WORKERS = "workers"


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished workflows stay: seconds after they finished, None for ever."""

    finished_seconds: float | None
    failed_seconds: float | None
    workers_seconds: float = WORKER_RETENTION_SECONDS

    @classmethod
    def from_days(cls, finished_days: float, failed_days: float) -> RetentionPolicy:
        """The settings' form: days, 0 keeping them for ever."""
        return cls(
            finished_seconds=finished_days * SECONDS_A_DAY or None,
            failed_seconds=failed_days * SECONDS_A_DAY or None,
        )

    def classes(self) -> Iterator[tuple[list[str], float]]:
        """(states, age in seconds) of each class of workflows that is pruned at all."""
        if self.finished_seconds is not None:
            yield [state.value for state in FINISHED_STATES], self.finished_seconds
        if self.failed_seconds is not None:
            yield [WorkflowState.FAILED.value], self.failed_seconds


async def prune_batch(store: Store, policy: RetentionPolicy, batch: int) -> Counter[str] | None:
    """One batch of each finished state, in one transaction; None when another process
    is pruning. Counts by state, and `workers`; a state that fills its batch has more."""
    async with store.transaction() as tx:
        if not await tx.try_retention_lock(RETENTION_LOCK_ID):
            return None
        removed: Counter[str] = Counter()
        for states, age in policy.classes():
            for state in states:
                removed[state] = await tx.prune_workflows(state=state, age_seconds=age, batch=batch)
        removed[WORKERS] = await tx.prune_workers(age_seconds=policy.workers_seconds)
        return +removed


@dataclass
class Pruned:
    """What a prune deleted, by state (and `workers`), and whether it stopped early
    because another process was pruning."""

    removed: Counter[str] = field(default_factory=Counter)
    busy: bool = False


async def prune(store: Store, policy: RetentionPolicy, *, batch: int = PRUNE_BATCH_DEFAULT) -> Pruned:
    """Batches until nothing is left to prune, or another process prunes; then the
    counts of stats are recounted, without the workflows that went."""
    pruned = Pruned()
    while (removed := await prune_batch(store, policy, batch)) is not None:
        pruned.removed.update(removed)
        if all(count < batch for name, count in removed.items() if name != WORKERS):
            break  # no state filled its batch: nothing older is left
        await asyncio.sleep(PRUNE_PAUSE_SECONDS)
    else:
        pruned.busy = True
    if any(count for name, count in pruned.removed.items() if name != WORKERS):
        await recount_finished(store, older_than=0)
    return pruned


async def prunable(store: Store, policy: RetentionPolicy) -> Counter[str]:
    """What `prune` would delete now, by state (a dry run; workers not counted)."""
    counted: Counter[str] = Counter()
    for states, age in policy.classes():
        counted.update(await store.count_prunable(states=states, age_seconds=age))
    return counted
