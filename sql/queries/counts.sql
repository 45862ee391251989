-- The counts of finished workflows that stats read (workflow_finished_counts).
-- Queries, in this order:
--   try_counts_lock
--   counts_age
--   recount_finished
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: try_counts_lock
-- In the recounting transaction: one process at a time recounts.
SELECT pg_try_advisory_xact_lock(%(lock_id)s);

-- name: counts_age
-- Seconds since the last recount; no row when there never was one.
SELECT extract(epoch FROM now() - counted_at)::float8 FROM workflow_finished_counts;

-- name: recount_finished
-- Every finished workflow, by type and state, up to `margin_seconds` ago. The margin is
-- for the transactions still open: a workflow finishes with completed_at = now(), the
-- start of its transaction, and may commit after this count has looked; it is younger
-- than the margin, so stats count it among the workflows finished since (completed_at >
-- counted_through). A finished row without completed_at (edited by hand) counts here.
-- Reads the whole table: it runs without the worker's pins (unpin_hot_plans first).
INSERT INTO workflow_finished_counts AS kept (counted_through, counts)
SELECT cutoff.at, coalesce((
    SELECT jsonb_object_agg(type, states) FROM (
        SELECT type, jsonb_object_agg(state, count) AS states FROM (
            SELECT type, state::text AS state, count(*) AS count FROM workflows
            WHERE state IN ('completed', 'failed', 'cancelled', 'compensated')
              AND (completed_at <= cutoff.at OR completed_at IS NULL)
            GROUP BY type, state
        ) counted GROUP BY type
    ) by_type), '{}')
FROM (SELECT now() - %(margin_seconds)s * interval '1 second' AS at) cutoff
ON CONFLICT (singleton) DO UPDATE
SET counted_through = excluded.counted_through, counted_at = excluded.counted_at, counts = excluded.counts;
