"""The counts of finished workflows that stats read, kept so that stats need not count
a table of millions on every call.

`recount_finished` counts every finished workflow once, into workflow_finished_counts
(sql/queries/counts.sql); stats add the workflows finished since and count the runnable
ones live (count_all_by_type_and_state). Every daemon tries every
RECOUNT_INTERVAL_SECONDS, and one recounts (an advisory lock and the age of the
last count); a reader that finds no recount, or one so old that no daemon makes them,
recounts itself. Retried and pruned workflows stay in the finished counts until the
next recount; a prune recounts when it is done.
"""

from __future__ import annotations

from engine.store import Store

COUNTS_LOCK_ID = int.from_bytes(b"wfcount!", "big")
# Longer than any transaction of the engine lasts: see the recount_finished query.
RECOUNT_MARGIN_SECONDS = 60.0
# A recount of ten million rows takes about a second of one core: once a minute is
# little, and what finished since is counted exactly anyway.
RECOUNT_INTERVAL_SECONDS = 60.0
# A reader recounts when the last recount is older than this: no daemon is recounting.
ABANDONED_COUNTS_SECONDS = 10 * RECOUNT_INTERVAL_SECONDS


async def recount_finished(store: Store, *, older_than: float) -> bool:
    """Recount, unless another process is recounting or the last recount is younger than
    `older_than` seconds; whether this call did."""
    async with store.transaction() as tx:
        if not await tx.try_counts_lock(COUNTS_LOCK_ID):
            return False
        age = await tx.counts_age()
        if age is not None and age < older_than:
            return False
        await tx.unpin_hot_plans()
        await tx.recount_finished(margin_seconds=RECOUNT_MARGIN_SECONDS)
        return True


async def counts_are_abandoned(store: Store) -> bool:
    """Whether no recount was ever made, or none lately: nobody keeps the counts."""
    age = await store.counts_age()
    return age is None or age > ABANDONED_COUNTS_SECONDS
