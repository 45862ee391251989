-- Parts: rules that several queries share, written once here and included where a
-- query names them as {{part_name}} (engine/sqlfiles.py expands them when it loads the
-- queries, so the database sees plain SQL and each query keeps its own plan).
-- Parts, in this order:
--   start_step
--   release_lease
--   keep_or_release_lease
--   claim_shape
--   claim_and_start
--   claim_result
--   stale_flow_keys
-- The first three are SET lists, the aliases they read given in their comments; the
-- next three are the common body of the two claims (sql/queries/claim.sql); the last is
-- the rows a rekey of flow control works on (sql/queries/limits.sql).

-- name: start_step
-- Starting a step, in the claim (the step under the cursor) and in a commit that goes
-- straight on (the next step): the attempt is on the books before its code runs.
-- Forward the step goes running with attempt + 1; in a compensating workflow it goes
-- compensating with compensation_attempt + 1. A step found already started was
-- interrupted (its worker died or lost the lease), and that spends a retry like a
-- failed attempt: forward, a step still running; compensating, one still compensating
-- with no retry scheduled. Reads `s` (the step) and `go.compensating` (the direction).
-- (A true condition cast to int counts 1; none of these conditions can be NULL.)
state = CASE WHEN go.compensating THEN 'compensating'::step_state ELSE 'running'::step_state END,
attempt = s.attempt + (NOT go.compensating)::int,
compensation_attempt = s.compensation_attempt + go.compensating::int,
retry_count = s.retry_count + (s.state = 'running')::int,
compensation_retry_count = s.compensation_retry_count + (s.state = 'compensating' AND s.next_retry_at IS NULL)::int,
started_at = coalesce(s.started_at, now()), next_retry_at = NULL, updated_at = now()

-- name: release_lease
-- Letting go of a workflow: nobody holds it, and the lease token that fenced its
-- writes is gone with the lease, so a late write from the old holder matches nothing.
locked_by = NULL, lease_token = NULL, lease_expires_at = NULL

-- name: keep_or_release_lease
-- After a commit the worker either goes straight on to the next step under the same
-- lease, or lets go and leaves the workflow due at once (shutdown, a cancel request, a
-- lease that ran out: past its expiry another worker may claim the workflow at any
-- moment, and must not find a next step already running). Going on keeps the lease as
-- it is (the heartbeat renews it): left unchanged, the indexed next_retry_at lets the
-- update be HOT. Reads `w` (the workflow) and `done.go_on`.
locked_by = CASE WHEN done.go_on THEN w.locked_by END,
lease_token = CASE WHEN done.go_on THEN w.lease_token END,
lease_expires_at = CASE WHEN done.go_on THEN w.lease_expires_at END,
next_retry_at = CASE WHEN done.go_on THEN w.next_retry_at ELSE now() END

-- name: claim_shape
-- The shape of each type and version the claiming daemon serves, for the workflows it
-- claims for the first time (see claim_due_workflows).
shape AS (
    SELECT * FROM unnest(%(shape_types)s::text[], %(shape_versions)s::int[], %(shape_totals)s::int[],
                         %(shape_max_retries)s::int[], %(shape_compensation)s::bool[])
        AS s(type, version, total_steps, max_retries, requires_compensation)
)

-- name: claim_and_start
-- The claim of the rows of `due`, and the start of their current steps, with their
-- timeline (see claim_due_workflows). The 'running' of the claimed state needs no cast:
-- a CASE resolves an untyped literal to the type of its other branch (w.state), and
-- the claim has no bytes to spare under its 4 KB.
claimed AS (
    UPDATE workflows w
    SET locked_by = %(worker_id)s,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + %(lease_seconds)s * interval '1 second',
        next_retry_at = now() + %(lease_seconds)s * interval '1 second',
        state = CASE WHEN w.state = 'pending' THEN 'running' ELSE w.state END,
        started_at = coalesce(w.started_at, now()),
        updated_at = now(),
        version = coalesce(s.version, w.version),
        total_steps = coalesce(s.total_steps, w.total_steps),
        max_retries = coalesce(s.max_retries, w.max_retries),
        requires_compensation = coalesce(s.requires_compensation, w.requires_compensation)
    FROM due LEFT JOIN shape s
        ON due.started_at IS NULL AND s.type = due.type
       AND s.version = coalesce(due.run_version, (SELECT max(n.version) FROM shape n WHERE n.type = s.type))
    WHERE w.id = due.id
    RETURNING w.*, due.previous_state, due.due_at, coalesce(s.version, due.run_version) AS run_version
),
started AS (
    UPDATE workflow_steps s
    SET {{start_step}}
    FROM claimed c, LATERAL (SELECT c.state = 'compensating' AS compensating) go
    WHERE s.workflow_id = c.id AND s.step_index = c.current_step_index
      AND CASE WHEN go.compensating
               THEN s.state = 'completed'
                    OR (s.state = 'compensating'
                        AND (s.next_retry_at IS NOT NULL OR s.compensation_retry_count < s.max_retries))
               ELSE NOT c.cancel_requested
                    AND (s.state IN ('pending', 'failed')
                         OR (s.state = 'running' AND s.is_idempotent AND s.retry_count < s.max_retries)) END
    RETURNING s.workflow_id, s.step_index, s.step_name, s.state,
              CASE WHEN go.compensating THEN s.compensation_attempt ELSE s.attempt END AS attempt,
              CASE WHEN go.compensating THEN s.compensation_retry_count ELSE s.retry_count END AS retry_count
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

-- name: claim_result
-- What a claim returns (see claim_due_workflows). `traceparent`: the trace context the
-- run's spans continue (daemon/tracing.py).
SELECT c.id, c.type, c.run_version AS version, c.state::text, c.previous_state::text, c.input::text AS input_text,
       c.context::text AS context_text, c.user_id, c.wallet_address, c.idempotency_key,
       c.current_step_index, c.lease_token, c.cancel_requested, c.traceparent,
       extract(epoch FROM now() - c.due_at)::float8 AS pickup_lag_seconds,
       prev.state::text AS previous_step_state, prev.is_idempotent AS step_is_idempotent,
       coalesce(st.attempt, prev.attempt) AS attempt, coalesce(st.retry_count, prev.retry_count) AS retry_count,
       st.workflow_id IS NOT NULL AS step_started
FROM claimed c
LEFT JOIN workflow_steps prev ON prev.workflow_id = c.id AND prev.step_index = c.current_step_index
LEFT JOIN started st ON st.workflow_id = c.id

-- name: stale_flow_keys
-- The unfinished workflows (`w`) of the type `type` whose fair_key is not the one their
-- type's rule gives now (`k.key`, workflow_flow_key): what a rekey request of
-- migration 0019 is for. A FROM list and its WHERE; found through
-- workflows_state_type_created_idx, one range per unfinished state.
workflows w
LEFT JOIN (SELECT * FROM workflow_type_limits WHERE type = %(type)s) l ON true
CROSS JOIN LATERAL (SELECT workflow_flow_key(l.max_concurrency, l.rate_limit, l.fair_by, w.user_id) AS key) k
WHERE w.type = %(type)s AND w.state IN ('pending', 'running', 'compensating') AND w.fair_key IS DISTINCT FROM k.key
