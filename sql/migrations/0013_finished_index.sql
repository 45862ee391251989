-- Finished workflows by state, oldest finish first: the walk of retention and the
-- recent outcomes of stats, each for one state at a time.
--
-- workflows_completed_at_idx held every finished row in finish order, whatever its
-- state. Retention's failed class walked it from its oldest end past every completed
-- row finished before the failed ones it wanted (the state is read from the table), so
-- pruning a table of mostly completed rows ran at about a thousand rows a second. Keyed
-- by state first, the walk of one state reads that state's rows and no other.
--
-- The old index goes in the same migration: a completion writes one finish index, as
-- before. The previous release's queries still run without it (their plans read this
-- one), only its stats scan more of it while a fleet is upgraded.
CREATE INDEX workflows_finished_idx ON workflows (state, completed_at) WHERE completed_at IS NOT NULL;
DROP INDEX workflows_completed_at_idx;

-- Stats count finished workflows without reading them all. A table of ten million rows
-- takes a second to count, too long for every call of a dashboard's stats; the counts
-- of the finished states are kept here instead, one row, recounted by one daemon every
-- minute (engine/counts.py). Stats add to it the workflows finished since
-- `counted_through` (found through workflows_finished_idx) and count the runnable ones
-- live, so each number is exact but for workflows retried or pruned since the last
-- recount.
CREATE TABLE workflow_finished_counts (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Every finished workflow with completed_at up to this time is in `counts`.
    counted_through  timestamptz NOT NULL,
    counted_at       timestamptz NOT NULL DEFAULT now(),
    -- {"type": {"state": count}}
    counts           jsonb NOT NULL
);
