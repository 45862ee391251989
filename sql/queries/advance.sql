-- Advancing: committing completions of steps and of compensations, and reading a
-- workflow back to settle a commit whose answer was lost.
-- Queries, in this order:
--   complete_steps
--   complete_compensation
--   get_step
--   get_step_progress
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: complete_steps
-- Commit the results of many steps in one statement: the group commit of a worker's
-- completions. Each is fenced by its own lease token: the workflow row is locked first
-- (FOR UPDATE re-checks the token on the latest row version), so a completion whose
-- lease was taken over writes nothing and drops out of the result, and only that one.
-- Rows are locked in id order so that two batches, or a batch and the heartbeat, cannot
-- deadlock. In the same statement each workflow advances, the timeline grows, and, when
-- the worker goes straight on, the next step starts under the same lease; otherwise
-- (shutdown, a cancel request) the lease is released and the workflow is due at once.
-- Going on needs a lease that has not run out: past its expiry another worker may
-- claim the workflow at any moment, and must not find a next step already running.
-- The UUID arrays are sent in binary (%%(...)b): psycopg dumps them twice as fast so.
-- Outputs come as JSON text, serialised (and checked) once by the daemon.
-- `workflow_outputs`: a last step's workflow output when its definition shapes one
-- (Workflow.output), else NULL: the last step's output is the workflow's.
WITH batch AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(lease_tokens)b::uuid[], %(step_indexes)s::int[],
                         %(attempts)s::int[], %(outputs)s::text[]::jsonb[], %(go_on)s::bool[],
                         %(workflow_outputs)s::text[]::jsonb[])
        AS b(id, lease_token, step_index, attempt, output, go_on, workflow_output)
),
owner AS (
    SELECT w.id, w.total_steps, b.step_index, b.attempt, b.output, b.workflow_output,
           b.go_on AND NOT w.cancel_requested AND w.lease_expires_at > now() AS go_on
    FROM workflows w JOIN batch b ON b.id = w.id AND b.lease_token = w.lease_token
    ORDER BY w.id
    FOR UPDATE OF w
),
done AS (
    UPDATE workflow_steps s
    SET state = 'completed', output = owner.output, error = NULL, completed_at = now(), updated_at = now()
    FROM owner
    WHERE s.workflow_id = owner.id AND s.step_index = owner.step_index
      AND s.state = 'running' AND s.attempt = owner.attempt
    RETURNING s.workflow_id, s.step_name, s.step_index, owner.attempt, owner.output, owner.workflow_output,
              s.step_index = owner.total_steps - 1 AS was_last,
              owner.go_on AND s.step_index < owner.total_steps - 1 AS go_on
),
advanced AS (
    UPDATE workflows w
    SET current_step_index = w.current_step_index + 1,
        context = w.context || jsonb_build_object(done.step_name, done.output),
        state = CASE WHEN done.was_last THEN 'completed'::workflow_state ELSE w.state END,
        output = CASE WHEN done.was_last THEN coalesce(done.workflow_output, done.output) ELSE w.output END,
        completed_at = CASE WHEN done.was_last THEN now() END,
        updated_at = now(), {{keep_or_release_lease}}
    FROM done
    WHERE w.id = done.workflow_id
    RETURNING w.id, w.state, w.cancel_requested, done.step_index, done.was_last, done.go_on
),
next_started AS (
    UPDATE workflow_steps s
    SET {{start_step}}
    FROM advanced a, LATERAL (SELECT false AS compensating) go
    WHERE a.go_on AND s.workflow_id = a.id AND s.step_index = a.step_index + 1
    RETURNING s.workflow_id, s.step_index, s.step_name, s.attempt, s.retry_count
),
events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id)
    SELECT workflow_id, step_index, step_name, 'running', 'completed', attempt, %(worker_id)s FROM done
    UNION ALL
    SELECT workflow_id, NULL, NULL, 'running', 'completed', NULL, %(worker_id)s FROM done WHERE done.was_last
    UNION ALL
    SELECT workflow_id, step_index, step_name, 'pending', 'running', attempt, %(worker_id)s FROM next_started
)
SELECT a.id, a.was_last, n.step_index AS next_step_index,
       n.attempt AS next_attempt, n.retry_count AS next_retry_count
FROM advanced a LEFT JOIN next_started n ON n.workflow_id = a.id;

-- name: complete_compensation
-- A step's compensation succeeded (or it had none): the step is compensated and the
-- cursor moves down to the next completed step, which starts at once when the worker
-- goes straight on. With nothing left to undo the workflow is compensated. Fenced like
-- complete_steps.
WITH owner AS (
    SELECT id, lease_expires_at FROM workflows
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state::text = 'compensating'  -- by primary key only: plans.sql
    FOR UPDATE
),
below AS (
    SELECT max(step_index) AS step_index FROM workflow_steps
    WHERE workflow_id = %(id)s AND step_index < %(step_index)s AND state = 'completed'
),
done AS (
    UPDATE workflow_steps s
    SET state = 'compensated', is_compensated = true, error = NULL, next_retry_at = NULL, updated_at = now()
    FROM owner, below
    WHERE s.workflow_id = owner.id AND s.step_index = %(step_index)s
      AND s.state = 'compensating' AND s.compensation_attempt = %(attempt)s
    RETURNING s.workflow_id, s.step_name, below.step_index AS next_index,
              %(go_on)s AND below.step_index IS NOT NULL AND owner.lease_expires_at > now() AS go_on
),
advanced AS (
    UPDATE workflows w
    SET current_step_index = coalesce(done.next_index, w.current_step_index),
        state = CASE WHEN done.next_index IS NULL THEN 'compensated'::workflow_state ELSE w.state END,
        is_compensated = done.next_index IS NULL,
        completed_at = CASE WHEN done.next_index IS NULL THEN now() END,
        updated_at = now(), {{keep_or_release_lease}}
    FROM done
    WHERE w.id = done.workflow_id
    RETURNING w.id, w.state, done.next_index, done.go_on
),
next_started AS (
    UPDATE workflow_steps s
    SET {{start_step}}
    FROM advanced a, LATERAL (SELECT true AS compensating) go
    WHERE a.go_on AND s.workflow_id = a.id AND s.step_index = a.next_index
    RETURNING s.step_index, s.step_name, s.compensation_attempt, s.compensation_retry_count
),
events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id)
    SELECT %(id)s, %(step_index)s, done.step_name, 'compensating', 'compensated', %(attempt)s, %(worker_id)s
    FROM done
    UNION ALL
    SELECT %(id)s, NULL, NULL, 'compensating', 'compensated', NULL, %(worker_id)s FROM done WHERE done.next_index IS NULL
    UNION ALL
    SELECT %(id)s, n.step_index, n.step_name, 'completed', 'compensating', n.compensation_attempt, %(worker_id)s
    FROM next_started n
)
SELECT a.id, a.state = 'compensated' AS was_last,
       n.step_index AS next_step_index, n.compensation_attempt AS next_attempt,
       n.compensation_retry_count AS next_retry_count
FROM advanced a LEFT JOIN next_started n ON true;

-- name: get_step
SELECT state::text, attempt, compensation_attempt FROM workflow_steps
WHERE workflow_id = %(id)s AND step_index = %(step_index)s;

-- name: get_step_progress
-- After a connection dropped during a commit, this tells whether the commit landed:
-- the lease, the cursor, and the attempt counters of the step under it (its
-- compensation's while it is compensating).
SELECT w.state::text AS workflow_state, w.lease_token, w.current_step_index, cur.state::text AS step_state,
       CASE WHEN cur.state = 'compensating' THEN cur.compensation_attempt ELSE cur.attempt END AS attempt,
       CASE WHEN cur.state = 'compensating' THEN cur.compensation_retry_count ELSE cur.retry_count END
           AS retry_count
FROM workflows w
LEFT JOIN workflow_steps cur ON cur.workflow_id = w.id AND cur.step_index = w.current_step_index
WHERE w.id = %(id)s;
