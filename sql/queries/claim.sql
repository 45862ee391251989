-- Claiming: the claiming transaction, the claim itself, the step rows of first claims,
-- and a cancel honoured at the step boundary.
-- Queries, in this order:
--   claiming_transaction
--   claim_due_workflows
--   claim_granted_workflows
--   create_steps
--   cancel_at_boundary
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

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
-- The current step starts in the same statement (start_step in sql/parts.sql). A
-- forward step found already running was interrupted (its worker died or lost the
-- lease); a non-idempotent one is not started again: the caller fails it as "outcome
-- unknown". An interrupted attempt spends a retry like a failed one (its worker died,
-- maybe because of the step itself), so a step that kills its process on every attempt
-- ends when its retries do: with none left it is not started, and the caller fails it.
-- An interrupted compensation is one still compensating with no retry scheduled.
-- `served`: the type and version keys this daemon serves (workflow_served_key of
-- workflow_run_version), so that a workflow meets only the version of its definition it
-- started under.
-- A workflow whose cancel was requested starts nothing: the caller cancels it at this
-- step boundary. `busy`: workflows an earlier attempt of which may still be running in
-- this process (a timed-out step in a thread), never claimed by it until that ends.
-- A workflow never started before (inserted by SQL, it has no version and no shape yet)
-- takes the shape of the version it will run in the same row version as its claim, not
-- in a second one (`shape`: one element per type and version this daemon serves, from
-- its definitions; a row without a version runs the newest). create_steps then makes
-- its step rows. (The claim must stay under 4 KB as sent: tests/unit/test_sqlfiles.py.)
-- The final SELECT reads the statement's snapshot, so `prev` holds the step as it was
-- before this claim. input and context come as text: the caller decodes each row on
-- its own, so that one row Python cannot read fails alone instead of the whole claim.
WITH {{claim_shape}},
due AS (
    SELECT id, type, state AS previous_state, next_retry_at AS due_at, started_at,
           workflow_run_version(version, started_at) AS run_version
    FROM workflows
    WHERE state IN ('pending', 'running', 'compensating')
      AND next_retry_at <= now()
      AND workflow_served_key(type, workflow_run_version(version, started_at)) = ANY(%(served)s::text[])
      AND id <> ALL(%(busy)s::uuid[])
    ORDER BY priority, next_retry_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
{{claim_and_start}}
{{claim_result}};

-- name: claim_granted_workflows
-- The claim of limited and fair types: the workflows grant_workflows chose (locked by it
-- in this transaction), claimed as claim_due_workflows claims; take_slots then moves
-- each slot granted to its workflow's new lease, which holds it from the commit on.
WITH {{claim_shape}},
due AS (
    SELECT id, type, state AS previous_state, next_retry_at AS due_at, started_at,
           workflow_run_version(version, started_at) AS run_version
    FROM workflows
    WHERE id = ANY(%(granted)s::uuid[])
),
{{claim_and_start}}
{{claim_result}};

-- name: create_steps
-- The step rows of workflows claimed for the first time (a workflow inserted by SQL has
-- none), in bulk, under the version the claim gave the row (its own, or the newest the
-- daemon serves when a SQL insert left it NULL), with step 0 already started (an
-- insert cannot run start_step on the rows it writes: test_one_home proves the row equal
-- to the part's). The claim gave the workflows their version and shape. The rows come
-- from the definitions (one array element per step of a type's version, not per step of
-- every workflow). A step's idempotency key is built from its name and the digest of the
-- workflow's input (workflow_step_key), which the daemon computes (engine/idempotency.py,
-- the same function as workflow_step_idempotency_key, as a test proves) and hands to the
-- steps.
WITH fresh AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(digests)s::text[]) AS f(id, digest)
),
definition AS (
    SELECT * FROM unnest(%(types)s::text[], %(type_versions)s::int[], %(step_indexes)s::int[],
                         %(step_names)s::text[], %(max_retries)s::int[], %(idempotent)s::bool[],
                         %(compensable)s::bool[], %(configs)s::jsonb[])
        AS d(type, version, step_index, step_name, max_retries, is_idempotent, requires_compensation, config)
),
inserted AS (
    INSERT INTO workflow_steps (workflow_id, step_index, step_name, state, input, config, max_retries,
                                requires_compensation, is_idempotent, idempotency_key, attempt, started_at)
    SELECT f.id, d.step_index, d.step_name,
           CASE WHEN d.step_index = 0 THEN 'running'::step_state ELSE 'pending'::step_state END,
           w.input, d.config, d.max_retries, d.requires_compensation, d.is_idempotent,
           workflow_step_key(d.step_name, f.digest),
           CASE WHEN d.step_index = 0 THEN 1 ELSE 0 END,
           CASE WHEN d.step_index = 0 THEN now() END
    FROM fresh f
    -- No fence needed: this runs in the claiming transaction, which holds the rows' locks.
    JOIN workflows w ON w.id = f.id
    JOIN definition d ON d.type = w.type AND d.version = workflow_run_version(w.version, w.started_at)
    RETURNING workflow_id, step_index, step_name, state
)
INSERT INTO workflow_events (workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id)
SELECT workflow_id, step_index, step_name, 'pending', 'running', 1, %(worker_id)s
FROM inserted WHERE state = 'running';

-- name: cancel_at_boundary
-- A claimed workflow whose cancel was requested stops here, between two steps: it is
-- cancelled, its steps that never started are skipped, and its lease is released.
-- Runs in the claiming transaction, which holds the row.
WITH cancelled AS (
    UPDATE workflows
    SET state = 'cancelled', completed_at = now(), updated_at = now(), {{release_lease}}
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND state::text = 'running'  -- by primary key only: plans.sql
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
