-- The worker's own bookkeeping: its leases (heartbeat, release at shutdown) and its row
-- in the registry.
-- Queries, in this order:
--   renew_leases
--   release_leases
--   register_worker
--   stop_worker
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

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
SET {{release_lease}}, next_retry_at = now(), updated_at = now()
FROM unnest(%(ids)s::uuid[], %(lease_tokens)s::uuid[]) AS lease(id, token)
WHERE w.id = lease.id AND w.lease_token = lease.token AND w.locked_by = %(worker_id)s
RETURNING w.id;

-- name: register_worker
-- A daemon's registration also declares the priorities of the types it serves, for the
-- rows inserted by SQL without one (the before-insert trigger reads workflow_types), and
-- their concurrency and rate limits and what their work is shared by
-- (workflow_type_limits; the trigger reads fair_by too).
WITH declared AS (
    INSERT INTO workflow_types AS t (type, priority, max_concurrency, rate_limit, rate_period_seconds, fair_by)
    SELECT * FROM unnest(%(types)s::text[], %(priorities)s::smallint[], %(max_concurrency)s::int[],
                         %(rate_limits)s::int[], %(rate_periods)s::float8[], %(fair_by)s::text[])
    ON CONFLICT (type) DO UPDATE
    SET priority = excluded.priority, max_concurrency = excluded.max_concurrency,
        rate_limit = excluded.rate_limit, rate_period_seconds = excluded.rate_period_seconds,
        fair_by = excluded.fair_by, declared_at = now()
    WHERE (t.priority, t.max_concurrency, t.rate_limit, t.rate_period_seconds, t.fair_by)
          IS DISTINCT FROM (excluded.priority, excluded.max_concurrency, excluded.rate_limit,
                            excluded.rate_period_seconds, excluded.fair_by)
)
INSERT INTO workflow_workers (id, host, pid, types, served, concurrency)
VALUES (%(worker_id)s, %(host)s, %(pid)s, %(types)s, %(served)s, %(concurrency)s)
ON CONFLICT (id) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, types = EXCLUDED.types, served = EXCLUDED.served,
    concurrency = EXCLUDED.concurrency,
    started_at = now(), last_seen_at = now(), stopped_at = NULL;

-- name: stop_worker
UPDATE workflow_workers SET stopped_at = now(), last_seen_at = now() WHERE id = %(worker_id)s;
