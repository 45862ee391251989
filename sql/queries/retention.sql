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
-- One batch: the oldest finished workflows of `states` finished more than `age_seconds`
-- ago, deleted with their steps and timeline (ON DELETE CASCADE; both tables are keyed
-- by workflow id first). It walks workflows_completed_at_idx from its oldest end and
-- stops after `batch` rows; it never touches the claim's index (finished rows are not
-- in it). SKIP LOCKED: a row an operator is retrying right now is left for next time.
-- The ledgers (portfolio_movements, reward_grants, ...) are business records, kept.
WITH doomed AS (
    SELECT id FROM workflows
    WHERE completed_at < now() - %(age_seconds)s * interval '1 second'
      AND state = ANY(%(states)s::workflow_state[])
    ORDER BY completed_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM workflows w USING doomed
WHERE w.id = doomed.id
RETURNING w.state::text AS state;

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
