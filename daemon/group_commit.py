"""Group commit: the step completions of many workflow tasks, written in few transactions.

A workflow task hands its completion over and waits for its own answer. Completions
that arrive while earlier batches are being committed wait for the next batch, so the
batch grows with the load and no timer delays a lone completion: an idle worker commits
at once, a busy one spends one commit on a hundred steps. Each completion in a batch is
still fenced by its own lease token; a lost lease drops only that workflow's write, and
a batch that fails is tried again member by member, so that one bad or unlucky
completion never fails another workflow's.
"""

from __future__ import annotations

import asyncio

from engine.store import Advanced, Completion, Store

# Large enough to amortise a commit over a full worker, small enough to keep one
# statement's locks short.
BATCH_MAX = 200
# Batches committed at once. One: completions that arrive while it commits form the next,
# bigger batch. Two or three batches in flight made smaller ones and cost 10-15 % of
# the steps/s on a 2-core machine, where the database and the daemons share the CPUs.
BATCHES_IN_FLIGHT = 1


class GroupCommit:
    """Batches step completions for one worker."""

    def __init__(self, store: Store, *, worker_id: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self.waiting: list[tuple[Completion, asyncio.Future[Advanced | None]]] = []
        self.committing: set[asyncio.Task[None]] = set()

    async def complete(self, completion: Completion) -> Advanced | None:
        """Commit one step's completion with whatever else is waiting.

        Returns where it left the workflow, or None when its lease was lost. Raises the
        error of its own statement, if that failed; the caller decides whether to try
        again.
        """
        answer: asyncio.Future[Advanced | None] = asyncio.get_running_loop().create_future()
        self.waiting.append((completion, answer))
        self._start_batches()
        return await answer

    def _start_batches(self) -> None:
        while self.waiting and len(self.committing) < BATCHES_IN_FLIGHT:
            batch, self.waiting = self.waiting[:BATCH_MAX], self.waiting[BATCH_MAX:]
            task = asyncio.create_task(self._commit(batch))
            self.committing.add(task)
            task.add_done_callback(self._committed)

    def _committed(self, task: asyncio.Task[None]) -> None:
        self.committing.discard(task)
        self._start_batches()

    async def _commit(
        self,
        batch: list[tuple[Completion, asyncio.Future[Advanced | None]]],
        after: Exception | None = None,
    ) -> None:
        """Commit `batch`; `after`: the error of the batch this member was part of."""
        try:
            rows = await self.store.complete_steps(
                [completion for completion, _ in batch], worker_id=self.worker_id
            )
        except asyncio.CancelledError:
            for _, answer in batch:
                answer.cancel()
            raise
        except Exception as error:
            if len(batch) == 1:
                _, answer = batch[0]
                if not answer.done():
                    answer.set_exception(error)
                return
            # Which member failed it, or was it the moment (a lock timeout, a dropped
            # connection)? Each alone: the others commit, the culprit gets its own error.
            for member in batch:
                await self._commit([member], after=error)
            return
        for completion, answer in batch:
            if answer.done():
                continue
            row = rows.get(completion.workflow_id)
            if row is None and after is not None:
                # Nothing to fence on: a lost lease, or the failed batch landed after all
                # and only its answer was lost. Pass the batch's error on, so that the
                # caller settles which from the rows.
                answer.set_exception(after)
            else:
                answer.set_result(row)
