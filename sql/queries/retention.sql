-- Retention: finished workflows, with their steps and timeline, once they have been
-- finished for long enough; and the rows of workers long gone.
-- Queries, in this order:
--   try_retention_lock
--   prune_workflows
--   count_prunable
--   prune_workers
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: try_retention_lock
-- In the pruning transaction: one process at a time prunes (the lock ends with it).
SELECT pg_try_advisory_xact_lock(%(lock_id)s);

-- name: prune_workflows
-- One batch: the oldest workflows in `state` finished more than `age_seconds` ago,
-- deleted with their steps and timeline (ON DELETE CASCADE; both tables are keyed by
-- workflow id first). One state at a time: it walks that state's part of
-- workflows_finished_idx from its oldest end and stops after `batch` rows, reading no
-- row of another state; it never touches the claim's index (finished rows are not in
-- it). SKIP LOCKED: a row an operator is retrying right now is left for next time.
-- The ledgers (portfolio_movements, reward_grants, ...) are business records, kept.
WITH doomed AS (
    SELECT id FROM workflows
    WHERE state = %(state)s::workflow_state
      AND completed_at < now() - %(age_seconds)s * interval '1 second'
    ORDER BY completed_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM workflows w USING doomed
WHERE w.id = doomed.id;

-- name: count_prunable
-- What prune_workflows would delete, by state, for a dry run.
SELECT state::text AS state, count(*) AS count FROM workflows
WHERE completed_at < now() - %(age_seconds)s * interval '1 second'
  AND state = ANY(%(states)s::workflow_state[])
GROUP BY state;

-- name: prune_workers
-- Workers that stopped, or were last seen, more than `age_seconds` ago.
DELETE FROM workflow_workers
WHERE coalesce(stopped_at, last_seen_at) < now() - %(age_seconds)s * interval '1 second';
