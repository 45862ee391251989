-- The engine's queries, one named block each. Store methods carry the same names.
-- Parameters are always bound (%(name)s), never formatted into the text.

-- name: insert_workflow
-- Start a workflow. The before-insert trigger fills in the idempotency key unless the
-- caller chose one (NULL: computed); a duplicate key inserts nothing and returns no
-- row, and the caller then reads the existing one.
INSERT INTO workflows (type, input, user_id, wallet_address, total_steps, max_retries,
                       requires_compensation, priority, idempotency_key)
VALUES (%(type)s, %(input)s, %(user_id)s, %(wallet_address)s, %(total_steps)s,
        %(max_retries)s, %(requires_compensation)s, %(priority)s, %(idempotency_key)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING *;

-- name: get_workflow_by_start
-- The workflow a start with these arguments maps to: the one holding the caller's own
-- key, else the computed one. It calls the same SQL function as the insert trigger, so
-- it finds the row whatever the input's key order.
SELECT * FROM workflows
WHERE idempotency_key = coalesce(%(idempotency_key)s::text,
                                 workflow_idempotency_key(%(type)s, %(user_id)s, %(input)s));

-- name: get_workflow
SELECT * FROM workflows WHERE id = %(id)s;

-- name: get_steps
SELECT * FROM workflow_steps WHERE workflow_id = %(id)s ORDER BY step_index;

-- name: list_workflows
-- Newest first; id breaks ties so that pages never overlap.
SELECT * FROM workflows
WHERE (%(state)s::workflow_state IS NULL OR state = %(state)s::workflow_state)
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text)
ORDER BY created_at DESC, id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_workflows
SELECT count(*) FROM workflows
WHERE (%(state)s::workflow_state IS NULL OR state = %(state)s::workflow_state)
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text);

-- name: claiming_transaction
-- Opens the claiming transaction, in the same round trip as BEGIN (a text without
-- parameters may hold several statements). The only good plan for the claim is to walk
-- workflows_due_idx in order and stop after `limit` rows; with stale statistics (right
-- after a bulk insert, before autovacuum analyses the table) the planner believes a
-- handful of rows are due and instead collects every due row through bitmap scans and
-- sorts them, a cost that grows with the queue (9 ms instead of 0.05 ms with 10,000 due
-- rows). Without bitmap scans and sorts the ordered index walk is the only plan left.
-- Local to the transaction (set_config's third argument).
BEGIN;
SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true)

-- name: claim_due_workflows
-- Claim a batch of due workflows in one statement and start their current steps.
-- SKIP LOCKED lets many daemons claim at once without waiting on each other's rows.
-- Claiming moves next_retry_at to the lease's expiry, so a crashed worker's rows simply
-- fall due again when the lease runs out: the lease is the rescue, there is no rescuer.
-- The current step starts in the same statement, so an attempt is on the books before
-- its code runs: a forward step goes running (attempt + 1); in a compensating workflow
-- the step under the cursor goes compensating (compensation_attempt + 1). A forward
-- step found already running was interrupted (its worker died or lost the lease); a
-- non-idempotent one is not started again: the caller fails it as "outcome unknown".
-- An interrupted attempt spends a retry like a failed one (its worker died, maybe
-- because of the step itself), so a step that kills its process on every attempt ends
-- when its retries do: with none left it is not started, and the caller fails it. An
-- interrupted compensation is one still compensating with no retry scheduled.
-- A workflow whose cancel was requested starts nothing: the caller cancels it at this
-- step boundary. `busy`: workflows an earlier attempt of which may still be running in
-- this process (a timed-out step in a thread), never claimed by it until that ends.
-- The final SELECT reads the statement's snapshot, so `prev` holds the step as it was
-- before this claim. input and context come as text: the caller decodes each row on
-- its own, so that one row Python cannot read fails alone instead of the whole claim.
WITH due AS (
    SELECT id, state AS previous_state, next_retry_at AS due_at
    FROM workflows
    WHERE state IN ('pending', 'running', 'compensating')
      AND next_retry_at <= now()
      AND type = ANY(%(types)s::text[])
      AND id <> ALL(%(busy)s::uuid[])
    ORDER BY priority, next_retry_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE workflows w
    SET locked_by = %(worker_id)s,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + %(lease_seconds)s * interval '1 second',
        next_retry_at = now() + %(lease_seconds)s * interval '1 second',
        state = CASE WHEN w.state = 'pending' THEN 'running'::workflow_state ELSE w.state END,
        started_at = coalesce(w.started_at, now()),
        updated_at = now()
    FROM due
    WHERE w.id = due.id
    RETURNING w.*, due.previous_state, due.due_at
),
started AS (
    UPDATE workflow_steps s
    SET state = CASE WHEN c.state = 'compensating' THEN 'compensating'::step_state ELSE 'running'::step_state END,
        attempt = s.attempt + CASE WHEN c.state = 'compensating' THEN 0 ELSE 1 END,
        compensation_attempt = s.compensation_attempt + CASE WHEN c.state = 'compensating' THEN 1 ELSE 0 END,
        retry_count = s.retry_count + CASE WHEN s.state = 'running' THEN 1 ELSE 0 END,
        compensation_retry_count = s.compensation_retry_count
            + CASE WHEN s.state = 'compensating' AND s.next_retry_at IS NULL THEN 1 ELSE 0 END,
        started_at = coalesce(s.started_at, now()), next_retry_at = NULL, updated_at = now()
    FROM claimed c
    WHERE s.workflow_id = c.id AND s.step_index = c.current_step_index
      AND CASE WHEN c.state = 'compensating'
               THEN s.state = 'completed'
                    OR (s.state = 'compensating'
                        AND (s.next_retry_at IS NOT NULL OR s.compensation_retry_count < s.max_retries))
               ELSE NOT c.cancel_requested
                    AND (s.state IN ('pending', 'failed')
                         OR (s.state = 'running' AND s.is_idempotent AND s.retry_count < s.max_retries)) END
    RETURNING s.workflow_id, s.step_index, s.step_name, s.state,
              CASE WHEN c.state = 'compensating' THEN s.compensation_attempt ELSE s.attempt END AS attempt,
              CASE WHEN c.state = 'compensating' THEN s.compensation_retry_count ELSE s.retry_count END AS retry_count
),
workflow_events AS (
    INSERT INTO workflow_events (workflow_id, from_state, to_state, worker_id)
    SELECT id, 'pending', 'running', %(worker_id)s FROM claimed WHERE previous_state = 'pending'
),
step_events AS (
    INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id)
    SELECT st.workflow_id, st.step_index, st.step_name, prev.state::text, st.state::text, st.attempt, %(worker_id)s
    FROM started st
    JOIN workflow_steps prev ON prev.workflow_id = st.workflow_id AND prev.step_index = st.step_index
)
SELECT c.id, c.type, c.state::text, c.previous_state::text, c.input::text AS input_text,
       c.context::text AS context_text, c.user_id, c.wallet_address, c.idempotency_key,
       c.current_step_index, c.lease_token, c.cancel_requested,
       extract(epoch FROM now() - c.due_at)::float8 AS pickup_lag_seconds,
       prev.state::text AS previous_step_state, prev.is_idempotent AS step_is_idempotent,
       coalesce(st.attempt, prev.attempt) AS attempt, coalesce(st.retry_count, prev.retry_count) AS retry_count,
       st.workflow_id IS NOT NULL AS step_started
FROM claimed c
LEFT JOIN workflow_steps prev ON prev.workflow_id = c.id AND prev.step_index = c.current_step_index
LEFT JOIN started st ON st.workflow_id = c.id;

-- name: create_steps
-- The step rows of workflows claimed for the first time (a workflow inserted by SQL has
-- none), in bulk, with step 0 already started; and the workflows' shape. The rows come
-- from the definitions of the types (one array element per step of a type, not per step
-- of every workflow). A step's idempotency key is built from its name and the digest of
-- the workflow's input, which the daemon computes (engine/idempotency.py, the same
-- function as workflow_step_idempotency_key, as a test proves) and hands to the steps.
WITH fresh AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(digests)s::text[]) AS f(id, digest)
),
definition AS (
    SELECT * FROM unnest(%(types)s::text[], %(step_indexes)s::int[], %(step_names)s::text[],
                         %(max_retries)s::int[], %(idempotent)s::bool[], %(compensable)s::bool[],
                         %(configs)s::jsonb[])
        AS d(type, step_index, step_name, max_retries, is_idempotent, requires_compensation, config)
),
shape AS (
    SELECT * FROM unnest(%(shape_types)s::text[], %(shape_totals)s::int[], %(shape_max_retries)s::int[],
                         %(shape_compensation)s::bool[])
        AS s(type, total_steps, max_retries, requires_compensation)
),
inserted AS (
    INSERT INTO workflow_steps (workflow_id, step_index, step_name, state, input, config, max_retries,
                                requires_compensation, is_idempotent, idempotency_key, attempt, started_at)
    SELECT f.id, d.step_index, d.step_name,
           CASE WHEN d.step_index = 0 THEN 'running'::step_state ELSE 'pending'::step_state END,
           w.input, d.config, d.max_retries, d.requires_compensation, d.is_idempotent,
           'step:' || d.step_name || ':' || f.digest,
           CASE WHEN d.step_index = 0 THEN 1 ELSE 0 END,
           CASE WHEN d.step_index = 0 THEN now() END
    FROM fresh f
    -- No fence needed: this runs in the claiming transaction, which holds the rows' locks.
    JOIN workflows w ON w.id = f.id
    JOIN definition d ON d.type = w.type
    RETURNING workflow_id, step_index, step_name, state
),
shaped AS (
    UPDATE workflows w
    SET total_steps = shape.total_steps, max_retries = shape.max_retries,
        requires_compensation = shape.requires_compensation
    FROM fresh f, shape
    WHERE w.id = f.id AND shape.type = w.type
      -- A workflow started through the API has its shape already: no new row version.
      AND (w.total_steps, w.max_retries, w.requires_compensation)
          IS DISTINCT FROM (shape.total_steps, shape.max_retries, shape.requires_compensation)
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id)
SELECT workflow_id, step_index, step_name, 'pending', 'running', 1, %(worker_id)s
FROM inserted WHERE state = 'running';

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
WITH batch AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(lease_tokens)b::uuid[], %(step_indexes)s::int[],
                         %(attempts)s::int[], %(outputs)s::text[]::jsonb[], %(go_on)s::bool[])
        AS b(id, lease_token, step_index, attempt, output, go_on)
),
owner AS (
    SELECT w.id, w.total_steps, b.step_index, b.attempt, b.output,
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
    RETURNING s.workflow_id, s.step_name, s.step_index, owner.attempt, owner.output,
              s.step_index = owner.total_steps - 1 AS was_last,
              owner.go_on AND s.step_index < owner.total_steps - 1 AS go_on
),
advanced AS (
    UPDATE workflows w
    SET current_step_index = w.current_step_index + 1,
        context = w.context || jsonb_build_object(done.step_name, done.output),
        state = CASE WHEN done.was_last THEN 'completed'::workflow_state ELSE w.state END,
        output = CASE WHEN done.was_last THEN done.output ELSE w.output END,
        completed_at = CASE WHEN done.was_last THEN now() END,
        locked_by = CASE WHEN done.go_on THEN w.locked_by END,
        lease_token = CASE WHEN done.go_on THEN w.lease_token END,
        -- Going on keeps the lease as it is (the heartbeat renews it): left unchanged,
        -- the indexed next_retry_at lets this update be HOT.
        lease_expires_at = CASE WHEN done.go_on THEN w.lease_expires_at END,
        next_retry_at = CASE WHEN done.go_on THEN w.next_retry_at ELSE now() END,
        updated_at = now()
    FROM done
    WHERE w.id = done.workflow_id
    RETURNING w.id, w.state, w.cancel_requested, done.step_index, done.was_last, done.go_on
),
next_started AS (
    UPDATE workflow_steps s
    SET state = 'running', attempt = s.attempt + 1, started_at = coalesce(s.started_at, now()),
        next_retry_at = NULL, updated_at = now()
    FROM advanced a
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
    SET locked_by = NULL, lease_token = NULL, lease_expires_at = NULL,
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
    SET state = 'failed', error = %(error)s, completed_at = now(),
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
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

-- name: cancel_at_boundary
-- A claimed workflow whose cancel was requested stops here, between two steps: it is
-- cancelled, its steps that never started are skipped, and its lease is released.
-- Runs in the claiming transaction, which holds the row.
WITH cancelled AS (
    UPDATE workflows
    SET state = 'cancelled', completed_at = now(), updated_at = now(),
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'running'
    RETURNING id
),
skipped AS (
    UPDATE workflow_steps s
    SET state = 'skipped', updated_at = now()
    FROM cancelled
    WHERE s.workflow_id = cancelled.id AND s.state = 'pending'
    RETURNING s.step_index, s.step_name
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, worker_id)
SELECT %(id)s, NULL, NULL, 'running', 'cancelled', %(worker_id)s FROM cancelled
UNION ALL
SELECT %(id)s, step_index, step_name, 'pending', 'skipped', %(worker_id)s FROM skipped
RETURNING id;

-- name: complete_compensation
-- A step's compensation succeeded (or it had none): the step is compensated and the
-- cursor moves down to the next completed step, which starts at once when the worker
-- goes straight on. With nothing left to undo the workflow is compensated. Fenced like
-- complete_steps.
WITH owner AS (
    SELECT id, lease_expires_at FROM workflows
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'compensating'
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
        locked_by = CASE WHEN done.go_on THEN w.locked_by END,
        lease_token = CASE WHEN done.go_on THEN w.lease_token END,
        -- Going on keeps the lease as it is (the heartbeat renews it): left unchanged,
        -- the indexed next_retry_at lets this update be HOT.
        lease_expires_at = CASE WHEN done.go_on THEN w.lease_expires_at END,
        next_retry_at = CASE WHEN done.go_on THEN w.next_retry_at ELSE now() END,
        updated_at = now()
    FROM done
    WHERE w.id = done.workflow_id
    RETURNING w.id, w.state, done.next_index, done.go_on
),
next_started AS (
    UPDATE workflow_steps s
    SET state = 'compensating', compensation_attempt = s.compensation_attempt + 1, updated_at = now()
    FROM advanced a
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

-- name: schedule_compensation_retry
-- A compensation attempt failed with retries left: the step stays compensating until
-- now() + backoff; the lease is released. Fenced like complete_steps.
WITH owner AS (
    SELECT id FROM workflows
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'compensating'
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
    SET locked_by = NULL, lease_token = NULL, lease_expires_at = NULL,
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
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'compensating'
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
    SET state = 'failed', error = %(error)s, completed_at = now(),
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
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

-- name: renew_leases
-- The heartbeat: one statement renews every in-flight lease of this worker and marks
-- the worker alive. It never waits: a row locked right now (its completion is being
-- committed, an operator's command holds it) is skipped and comes back with renewed
-- false, still ours; it is renewed at the next beat. A workflow missing from the
-- result has lost its lease. The cancel flags tell running steps about cancel requests.
WITH alive AS (
    UPDATE workflow_workers SET last_seen_at = now() WHERE id = %(worker_id)s
),
ours AS (
    -- Found by primary key (no index on the lease columns).
    SELECT w.id, w.cancel_requested FROM workflows w
    JOIN unnest(%(ids)s::uuid[], %(lease_tokens)s::uuid[]) AS lease(id, token)
        ON w.id = lease.id AND w.lease_token = lease.token
    WHERE w.locked_by = %(worker_id)s
),
held AS (
    SELECT w.id FROM workflows w JOIN ours ON ours.id = w.id
    ORDER BY w.id
    FOR UPDATE OF w SKIP LOCKED
),
renewed AS (
    UPDATE workflows w
    SET lease_expires_at = now() + %(lease_seconds)s * interval '1 second',
        next_retry_at = now() + %(lease_seconds)s * interval '1 second'
    FROM held
    WHERE w.id = held.id
    RETURNING w.id, w.cancel_requested
)
SELECT id, cancel_requested, true AS renewed FROM renewed
UNION ALL
SELECT id, cancel_requested, false FROM ours WHERE id NOT IN (SELECT id FROM held);

-- name: release_leases
-- Shutdown: give back the leases this worker still holds, due at once for another worker.
UPDATE workflows w
SET locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, next_retry_at = now(), updated_at = now()
FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::uuid[]) AS lease(id, token)
WHERE w.id = lease.id AND w.lease_token = lease.token AND w.locked_by = %(worker_id)s
RETURNING w.id;

-- name: register_worker
INSERT INTO workflow_workers (id, host, pid, types, concurrency)
VALUES (%(worker_id)s, %(host)s, %(pid)s, %(types)s, %(concurrency)s)
ON CONFLICT (id) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, types = EXCLUDED.types, concurrency = EXCLUDED.concurrency,
    started_at = now(), last_seen_at = now(), stopped_at = NULL;

-- name: stop_worker
UPDATE workflow_workers SET stopped_at = now(), last_seen_at = now() WHERE id = %(worker_id)s;

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

-- name: notify_due
-- Wake the daemons after a command made a workflow due (retry, cancel, compensate).
SELECT pg_notify('workflowd', '');

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

-- name: get_timeline
SELECT id, workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, actor, error, at
FROM workflow_events WHERE workflow_id = %(id)s ORDER BY id;

-- name: count_by_type_and_state
-- All workflows, or only those of the given ids.
SELECT type, state::text AS state, count(*) AS count FROM workflows
WHERE %(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[])
GROUP BY type, state ORDER BY type, state;

-- name: recent_outcomes
SELECT count(*) FILTER (WHERE state = 'completed' AND completed_at > now() - interval '1 minute') AS completed_last_minute,
       count(*) FILTER (WHERE state = 'failed' AND completed_at > now() - interval '1 minute') AS failed_last_minute,
       count(*) FILTER (WHERE state = 'completed') AS completed_last_hour,
       count(*) FILTER (WHERE state = 'failed') AS failed_last_hour,
       (SELECT extract(epoch FROM now() - min(next_retry_at))::float8 FROM workflows
         WHERE state IN ('pending', 'running', 'compensating') AND next_retry_at <= now()) AS oldest_due_age_seconds
FROM workflows
WHERE completed_at > now() - interval '1 hour';

-- name: count_stuck_workflows
-- Workflows no daemon will claim as they stand: running or compensating, but due (or
-- leased) further ahead than any write of the engine puts them, which is a lease or a
-- backoff, minutes at most. Only a row edited by hand gets here; an operator repairs it
-- (UPDATE workflows SET next_retry_at = now() ...) or cancels it. Stats and the
-- workflowd_stuck_workflows gauge report them.
SELECT count(*) FROM workflows
WHERE state IN ('running', 'compensating') AND next_retry_at > now() + interval '1 hour';

-- name: queue_depth
-- Runnable workflows by type and state, for the workflowd_queue_depth gauge.
SELECT type, state::text, count(*) FROM workflows
WHERE state IN ('pending', 'running', 'compensating') GROUP BY type, state;

-- name: live_workers
SELECT id, host, pid, types, concurrency, started_at, last_seen_at FROM workflow_workers
WHERE stopped_at IS NULL AND last_seen_at > now() - %(stale_seconds)s * interval '1 second'
ORDER BY started_at;

-- name: unserved_types
-- Types with due work that no live worker serves: such workflows wait forever until a
-- daemon with their definition starts.
SELECT DISTINCT type FROM workflows
WHERE state IN ('pending', 'running', 'compensating') AND next_retry_at <= now()
EXCEPT
SELECT unnest(types) FROM workflow_workers
WHERE stopped_at IS NULL AND last_seen_at > now() - %(stale_seconds)s * interval '1 second'
ORDER BY 1;

-- name: search_workflows
-- Exact matches on the indexed columns; PostgreSQL ORs the index scans.
SELECT * FROM workflows
WHERE id = %(id)s OR idempotency_key = %(q)s OR type = %(q)s OR user_id = %(q)s OR wallet_address = %(q)s
ORDER BY created_at DESC, id
LIMIT %(limit)s;
