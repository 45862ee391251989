-- External events: the wait of a step declared with wait_for_event (migration 0012).
-- Queries, in this order:
--   lock_for_wait
--   take_event
--   send_event
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: lock_for_wait
-- In the waiting transaction, first: the workflow's row, fenced by the lease token and
-- locked, so that a send (whose insert needs this row) commits either before take_event
-- looks, which then finds it, or after this transaction parks the workflow, which the
-- send then wakes. Also whether the wait's timeout, counted from the step's first start,
-- is over, and how long is left (NULL without a timeout). No row: the lease was lost.
SELECT s.started_at + %(timeout)s * interval '1 second' <= now() AS timed_out,
       extract(epoch FROM s.started_at + %(timeout)s * interval '1 second' - now())::float8 AS seconds_left
FROM workflows w
JOIN workflow_steps s ON s.workflow_id = w.id AND s.step_index = %(step_index)s
WHERE w.id = %(id)s AND w.lease_token = %(lease_token)s
FOR UPDATE OF w;

-- name: take_event
-- In a statement of its own after lock_for_wait (a new snapshot): the oldest event of
-- the name not yet consumed, consumed by this step; its payload as text (the definition
-- reads it, exact numbers and all). Commits with the step's completion, or not at all.
UPDATE workflow_signals SET consumed_at = now(), consumed_step = %(step_index)s
WHERE workflow_id = %(id)s
  AND id = (SELECT id FROM workflow_signals
            WHERE workflow_id = %(id)s AND name = %(name)s AND consumed_at IS NULL
            ORDER BY id LIMIT 1 FOR UPDATE)
RETURNING payload::text AS payload_text;

-- name: send_event
SELECT workflow_send_event(%(id)s, %(name)s, %(payload)s, %(event_id)s) AS created;
