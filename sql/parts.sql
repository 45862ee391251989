-- Parts: rules that several queries share, written once here and included where a
-- query names them as {{part_name}} (engine/sqlfiles.py expands them when it loads the
-- queries, so the database sees plain SQL and each query keeps its own plan).
-- Parts, in this order:
--   start_step
--   release_lease
--   keep_or_release_lease
-- Each part is the text of a SET list; the aliases it reads are given in its comment.

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
