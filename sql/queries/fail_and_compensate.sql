-- Failing: retries with backoff, failing for good, and compensation's own retries and
-- failure; and a step's snooze, which waits like a retry without being one.
-- Queries, in this order:
--   schedule_retry
--   snooze_step
--   fail_workflow
--   begin_compensation
--   schedule_compensation_retry
--   fail_compensation
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: schedule_retry
-- A failed attempt with retries left: the step waits until now() + backoff, the lease
-- is released, and the poll finds the workflow when it falls due. Fenced like
-- complete_steps.
WITH owner AS (
    SELECT id FROM workflows WHERE id = %(id)s AND lease_token = %(lease_token)s FOR UPDATE
),
failed AS (
    UPDATE workflow_steps s
    SET state = 'failed', retry_count = s.retry_count + 1, error = %(error)s,
        next_retry_at = now() + %(delay_seconds)s * interval '1 second', updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s
      AND s.state = 'running' AND s.attempt = %(attempt)s
    RETURNING s.workflow_id, s.step_name, s.next_retry_at
),
released AS (
    UPDATE workflows w
    SET {{release_lease}},
        -- A cancel request is honoured at once rather than after the backoff.
        next_retry_at = CASE WHEN w.cancel_requested THEN now() ELSE failed.next_retry_at END,
        retry_count = w.retry_count + 1, updated_at = now()
    FROM failed
    WHERE w.id = failed.workflow_id
    RETURNING w.id
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, error)
SELECT %(id)s, %(step_index)s, failed.step_name, 'running', 'failed', %(attempt)s, %(worker_id)s,
       %(error)s::jsonb || jsonb_build_object('traceback', %(traceback)s::text, 'retry_at', failed.next_retry_at)
FROM failed JOIN released ON true
RETURNING id;

-- name: snooze_step
-- A step said "not yet" (engine.Snooze): its attempt took no effect, so the step goes
-- back to pending, due after `seconds`, its retry count untouched (the next claim starts
-- it as it starts any pending step: the attempt count goes on). The lease is released
-- and the workflow falls due with the step (a cancel request at once). The event says
-- until when, in its `error` field as {type: Snoozed, message, until}. Fenced like
-- complete_steps.
WITH owner AS (
    SELECT id FROM workflows WHERE id = %(id)s AND lease_token = %(lease_token)s FOR UPDATE
),
snoozed AS (
    UPDATE workflow_steps s
    SET state = 'pending', next_retry_at = now() + %(seconds)s * interval '1 second', updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s
      AND s.state = 'running' AND s.attempt = %(attempt)s
    RETURNING s.workflow_id, s.step_name, s.next_retry_at
),
released AS (
    UPDATE workflows w
    SET {{release_lease}},
        next_retry_at = CASE WHEN w.cancel_requested THEN now() ELSE snoozed.next_retry_at END,
        updated_at = now()
    FROM snoozed
    WHERE w.id = snoozed.workflow_id
    RETURNING w.id
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, error)
SELECT %(id)s, %(step_index)s, snoozed.step_name, 'running', 'pending', %(attempt)s, %(worker_id)s,
       jsonb_build_object('type', 'Snoozed', 'message', %(reason)s::text, 'until', snoozed.next_retry_at)
FROM snoozed JOIN released ON true
RETURNING id;

-- name: fail_workflow
-- A failure that retries cannot fix (permanent error, retries exhausted, an interrupted
-- step that must not run twice): the step and the workflow fail, the lease is released.
-- The step is running: an attempt that failed, or an interrupted one the claim did not
-- start again (outcome unknown, no retries left); a workflow refused at its first claim
-- has no step rows yet. Fenced like complete_steps.
WITH owner AS (
    SELECT id FROM workflows WHERE id = %(id)s AND lease_token = %(lease_token)s FOR UPDATE
),
failed_step AS (
    UPDATE workflow_steps s
    SET state = 'failed', error = %(error)s, next_retry_at = NULL, completed_at = now(), updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s AND s.state = 'running'
    RETURNING s.workflow_id, s.step_name
),
failed_workflow AS (
    UPDATE workflows w
    SET state = 'failed', error = %(error)s, completed_at = now(), updated_at = now(), {{release_lease}}
    FROM owner
    WHERE w.id = owner.id
    RETURNING w.id
),
events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, error)
    SELECT %(id)s, %(step_index)s::int, failed_step.step_name, 'running', 'failed', %(attempt)s::int, %(worker_id)s,
           %(error)s::jsonb || jsonb_build_object('traceback', %(traceback)s::text)
    FROM failed_step
    UNION ALL
    SELECT %(id)s, NULL, NULL, 'running', 'failed', NULL, %(worker_id)s, %(error)s::jsonb FROM failed_workflow
)
SELECT id FROM failed_workflow;

-- name: begin_compensation
-- After fail_workflow or cancel_at_boundary, in the same transaction, or for an
-- operator's command (`actor`): undo the completed steps (see
-- workflow_begin_compensation in the migrations).
SELECT workflow_begin_compensation(%(id)s, %(worker_id)s, %(actor)s);

-- name: schedule_compensation_retry
-- A compensation attempt failed with retries left: the step stays compensating until
-- now() + backoff; the lease is released. Fenced like complete_steps.
WITH owner AS (
    SELECT id FROM workflows
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state::text = 'compensating'  -- by primary key only: plans.sql
    FOR UPDATE
),
failed AS (
    UPDATE workflow_steps s
    SET compensation_retry_count = s.compensation_retry_count + 1, error = %(error)s,
        next_retry_at = now() + %(delay_seconds)s * interval '1 second', updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s
      AND s.state = 'compensating' AND s.compensation_attempt = %(attempt)s
    RETURNING s.workflow_id, s.step_name, s.next_retry_at
),
released AS (
    UPDATE workflows w
    SET {{release_lease}},
        next_retry_at = failed.next_retry_at, retry_count = w.retry_count + 1, updated_at = now()
    FROM failed
    WHERE w.id = failed.workflow_id
    RETURNING w.id
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, error)
SELECT %(id)s, %(step_index)s, failed.step_name, 'compensating', 'compensating', %(attempt)s, %(worker_id)s,
       %(error)s::jsonb || jsonb_build_object('traceback', %(traceback)s::text, 'retry_at', failed.next_retry_at)
FROM failed JOIN released ON true
RETURNING id;

-- name: fail_compensation
-- A compensation that retries cannot fix: the workflow goes back to failed, needing
-- attention, with an error naming the step whose compensation failed; the step stays
-- compensating, so the compensate command re-drives it from there. Fenced.
WITH owner AS (
    SELECT id FROM workflows
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state::text = 'compensating'  -- by primary key only: plans.sql
    FOR UPDATE
),
stuck AS (
    UPDATE workflow_steps s
    SET error = %(error)s, next_retry_at = NULL, updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s AND s.state = 'compensating'
    RETURNING s.step_name
),
failed_workflow AS (
    UPDATE workflows w
    SET state = 'failed', error = %(error)s, completed_at = now(), updated_at = now(), {{release_lease}}
    FROM owner
    WHERE w.id = owner.id
    RETURNING w.id
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, error)
SELECT %(id)s, %(step_index)s::int, stuck.step_name, 'compensating', 'compensating', %(attempt)s::int, %(worker_id)s,
       %(error)s::jsonb || jsonb_build_object('traceback', %(traceback)s::text)
FROM stuck
UNION ALL
SELECT %(id)s, NULL, NULL, 'compensating', 'failed', NULL, %(worker_id)s, %(error)s::jsonb FROM failed_workflow
RETURNING id;
