-- Operators' and callers' commands: start, cancel, retry, compensate, and the wake-up
-- after them.
-- Queries, in this order:
--   insert_workflow
--   set_priority
--   migrate_version
--   get_workflow_by_start
--   cancel_workflow
--   retry_workflow
--   lock_for_compensation
--   notify_due
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: insert_workflow
-- Start a workflow. The before-insert trigger fills in the idempotency key unless the
-- caller chose one (NULL: computed); a duplicate key inserts nothing and returns no
-- row, and the caller then reads the existing one. A delayed start falls due at its
-- time, or after its delay by the database's clock (never a client's); the claim takes
-- no workflow before next_retry_at. `traceparent`: the starter's W3C trace context
-- (NULL: untraced), which every run of the workflow continues; a duplicate start keeps
-- the first start's.
INSERT INTO workflows (type, version, input, user_id, wallet_address, total_steps, max_retries,
                       requires_compensation, priority, idempotency_key, next_retry_at, traceparent)
VALUES (%(type)s, %(version)s, %(input)s, %(user_id)s, %(wallet_address)s, %(total_steps)s,
        %(max_retries)s, %(requires_compensation)s, %(priority)s, %(idempotency_key)s,
        coalesce(%(start_at)s::timestamptz,
                 now() + coalesce(%(delay_seconds)s::float8, 0) * interval '1 second'),
        %(traceparent)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING *;

-- name: set_priority
-- An operator's new priority for a workflow still to run; its next claim goes by it
-- (workflows_due_idx holds the priority). A finished workflow is left as it is.
UPDATE workflows SET priority = %(priority)s, updated_at = now()
WHERE id = %(id)s AND state::text IN ('pending', 'running', 'compensating')  -- by primary key only: plans.sql
RETURNING *;

-- name: migrate_version
-- Move the workflows of a type still to run from one version of its definition to
-- another whose steps line up (the caller checks the definitions): each goes on at the
-- step it is at, under the other version's code. A workflow whose step is running now
-- finishes that attempt under the code that started it. Returns the ids moved.
UPDATE workflows SET version = %(to_version)s, updated_at = now()
WHERE type = %(type)s AND workflow_run_version(version, started_at) = %(from_version)s
  AND state IN ('pending', 'running', 'compensating')
RETURNING id;

-- name: get_workflow_by_start
-- The workflow a start with these arguments maps to: the one holding the caller's own
-- key, else the computed one. It calls the same SQL function as the insert trigger, so
-- it finds the row whatever the input's key order.
SELECT * FROM workflows
WHERE idempotency_key = coalesce(%(idempotency_key)s::text,
                                 workflow_idempotency_key(%(type)s, %(user_id)s, %(input)s));

-- name: cancel_workflow
-- A pending workflow is cancelled at once (its never-started steps skipped). A running
-- one is flagged and stops at its next step boundary; if it is waiting for a retry it
-- falls due now, so that boundary is now. Other states change nothing (no row).
WITH target AS (
    SELECT id, state FROM workflows WHERE id = %(id)s AND state IN ('pending', 'running') FOR UPDATE
),
changed AS (
    UPDATE workflows w
    SET state = CASE WHEN t.state = 'pending' THEN 'cancelled'::workflow_state ELSE w.state END,
        completed_at = CASE WHEN t.state = 'pending' THEN now() ELSE w.completed_at END,
        cancel_requested = t.state = 'running',
        next_retry_at = CASE WHEN w.locked_by IS NULL THEN now() ELSE w.next_retry_at END,
        updated_at = now()
    FROM target t
    WHERE w.id = t.id
    RETURNING w.id, t.state AS previous_state, w.state,
              -- A pending workflow that ran before (a manual retry) undoes what it did now;
              -- a running one compensates at its step boundary, in the daemon.
              t.state = 'pending' AND w.requires_compensation
                  AND EXISTS (SELECT 1 FROM workflow_steps s WHERE s.workflow_id = w.id AND s.state = 'completed')
                  AS compensate
),
skipped AS (
    UPDATE workflow_steps s SET state = 'skipped', updated_at = now()
    FROM changed c
    WHERE s.workflow_id = c.id AND c.previous_state = 'pending' AND s.state = 'pending'
    RETURNING s.workflow_id, s.step_index, s.step_name
),
events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, actor)
    SELECT id, NULL, NULL, 'pending', 'cancelled', %(actor)s FROM changed WHERE previous_state = 'pending'
    UNION ALL
    SELECT workflow_id, step_index, step_name, 'pending', 'skipped', %(actor)s FROM skipped
)
SELECT id, previous_state, state, compensate FROM changed;

-- name: retry_workflow
-- Resume a failed workflow at its failed step: that step's counters reset, completed
-- steps stay completed (they do not run again). Refused (no row) in any other state,
-- once compensation has begun (the compensate command re-drives that instead), and,
-- unless forced, when the error is one that only an operator may retry (an outcome
-- unknown: the step may have taken effect).
WITH target AS (
    SELECT id, current_step_index FROM workflows
    WHERE id = %(id)s AND state = 'failed'
      AND (%(force)s OR error->>'type' IS DISTINCT FROM %(needs_force)s::text)
      AND NOT EXISTS (SELECT 1 FROM workflow_steps s WHERE s.workflow_id = %(id)s
                      AND s.state IN ('compensating', 'compensated'))
    FOR UPDATE
),
reset_step AS (
    UPDATE workflow_steps s
    SET state = 'pending', retry_count = 0, error = NULL, next_retry_at = NULL, completed_at = NULL,
        updated_at = now()
    FROM target t
    WHERE s.workflow_id = t.id AND s.step_index = t.current_step_index AND s.state = 'failed'
    RETURNING s.workflow_id, s.step_index, s.step_name
),
changed AS (
    UPDATE workflows w
    SET state = 'pending', error = NULL, completed_at = NULL, cancel_requested = false,
        retry_count = w.retry_count + 1, next_retry_at = now(), updated_at = now()
    FROM target t
    WHERE w.id = t.id
    RETURNING w.id
),
events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, actor)
    SELECT id, NULL, NULL, 'failed', 'pending', %(actor)s FROM changed
    UNION ALL
    SELECT workflow_id, step_index, step_name, 'failed', 'pending', %(actor)s FROM reset_step
)
SELECT id FROM changed;

-- name: lock_for_compensation
-- The compensate command: a failed or cancelled workflow, whatever its definition says.
-- A compensation that gave up gets a fresh retry budget for its stuck step.
WITH target AS (
    SELECT id FROM workflows WHERE id = %(id)s AND state IN ('failed', 'cancelled') FOR UPDATE
),
reset AS (
    UPDATE workflow_steps s
    -- A retry time marks the stuck step as scheduled: the claim does not take it for
    -- an interrupted compensation, which would spend a retry.
    SET compensation_retry_count = 0, error = NULL, next_retry_at = now(), updated_at = now()
    FROM target t
    WHERE s.workflow_id = t.id AND s.state = 'compensating'
)
SELECT id FROM target;

-- name: notify_due
-- Wake the daemons after a command made a workflow due (retry, cancel, compensate).
SELECT workflow_wake();
