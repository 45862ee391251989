-- Flow control: the limits that hold (workflow_type_limits), their slots, the two
-- statements a claim of limited types runs before claim_due_workflows, and the
-- operator's commands.
-- Queries, in this order:
--   load_limits
--   provide_slots
--   lock_slots
--   grant_slots
--   list_limits
--   set_limit
--   reset_limit
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: load_limits
-- The limits that hold for `types` (a daemon's served types), refreshed every few
-- seconds: they tell the daemon whether its claims run the limited path.
SELECT type, max_concurrency FROM workflow_type_limits
WHERE type = ANY(%(types)s::text[]) AND max_concurrency IS NOT NULL
ORDER BY type;

-- name: provide_slots
-- The slots of each limited type of `types`, as many as its limit: a slot that exists
-- is left as it is (ON CONFLICT), one past a lowered limit is never taken (lock_slots).
INSERT INTO workflow_slots (type, slot)
SELECT l.type, n FROM workflow_type_limits l, generate_series(0, l.max_concurrency - 1) n
WHERE l.type = ANY(%(types)s::text[]) AND l.max_concurrency IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM workflow_slots s WHERE s.type = l.type AND s.slot = n)
ON CONFLICT DO NOTHING;

-- name: lock_slots
-- First of a limited claim's statements, in the claiming transaction: for each limited
-- type of `types`, lock up to `wanted` slots below its limit that look free in this
-- statement's snapshot (no workflow holds the lease that took them), or whose holder's
-- lease ran out (that workflow is due; only it may take its slot again, since its old
-- holder may still renew a lease nobody took over). SKIP LOCKED: a slot another claimer
-- is taking is skipped. This snapshot may predate another claimer's commit of a slot
-- it locked row by row after: grant_slots judges the locked slots again, in its own.
SELECT s.type, s.slot
FROM unnest(%(types)s::text[]) AS limited (type)
CROSS JOIN LATERAL (
    SELECT s.type, s.slot FROM workflow_slots s
    WHERE s.type = limited.type
      AND s.slot < (SELECT l.max_concurrency FROM workflow_type_limits l WHERE l.type = limited.type)
      AND NOT EXISTS (SELECT 1 FROM workflows w
                      WHERE w.id = s.workflow_id AND w.lease_token = s.lease_token AND w.lease_expires_at > now())
    ORDER BY s.slot
    LIMIT %(wanted)s
    FOR UPDATE OF s SKIP LOCKED
) s;

-- name: grant_slots
-- Second statement: which due workflows get which of the slots lock_slots locked. Its
-- snapshot is newer than every slot's last taking (those committed before the locks
-- were granted), so a slot it finds free is free. A slot still held by a workflow whose
-- lease ran out goes to that workflow again (locked here, if it is due and served); the
-- free ones go to the type's due workflows in claim order (workflows_due_by_type_idx).
-- The workflows are locked (FOR UPDATE SKIP LOCKED) and numbered in a later CTE, since
-- a locking query cannot number its rows. claim_due_workflows then claims exactly
-- these (claim_granted_workflows), which moves each slot to its workflow's new lease.
WITH locked AS (
    SELECT s.type, s.slot, h.id AS holder
    FROM unnest(%(slot_types)s::text[], %(slots)s::int[]) AS l (type, slot)
    JOIN workflow_slots s ON s.type = l.type AND s.slot = l.slot
    LEFT JOIN workflows h ON h.id = s.workflow_id AND h.lease_token = s.lease_token
),
free AS (
    SELECT type, slot, row_number() OVER (PARTITION BY type ORDER BY slot) AS n
    FROM locked WHERE holder IS NULL
),
returning_holders AS (
    SELECT w.id, w.type, w.priority, w.next_retry_at, locked.slot FROM workflows w JOIN locked ON locked.holder = w.id
    WHERE w.lease_expires_at <= now() AND w.state IN ('pending', 'running', 'compensating')
      AND w.next_retry_at <= now() AND w.id <> ALL(%(busy)s::uuid[])
      AND workflow_served_key(w.type, workflow_run_version(w.version, w.started_at)) = ANY(%(served)s::text[])
    FOR UPDATE OF w SKIP LOCKED
),
waiting AS (
    SELECT w.id, w.type, w.priority, w.next_retry_at
    FROM (SELECT type, count(*) AS wanted FROM free GROUP BY type) f
    CROSS JOIN LATERAL (
        SELECT id, type, priority, next_retry_at FROM workflows
        WHERE type = f.type AND state IN ('pending', 'running', 'compensating') AND next_retry_at <= now()
          AND workflow_served_key(type, workflow_run_version(version, started_at)) = ANY(%(served)s::text[])
          AND id <> ALL(%(busy)s::uuid[])
        ORDER BY priority, next_retry_at
        LIMIT f.wanted
        FOR UPDATE SKIP LOCKED
    ) w
),
numbered AS (
    SELECT id, type, priority, next_retry_at,
           row_number() OVER (PARTITION BY type ORDER BY priority, next_retry_at) AS n
    FROM waiting WHERE id NOT IN (SELECT id FROM returning_holders)
)
-- At most `limit` in all (the daemon's free slots), the most urgent first.
SELECT id, type, slot FROM (
    SELECT id, type, slot, priority, next_retry_at FROM returning_holders
    UNION ALL
    SELECT numbered.id, numbered.type, free.slot, numbered.priority, numbered.next_retry_at
    FROM numbered JOIN free USING (type, n)
) granted
ORDER BY priority, next_retry_at
LIMIT %(limit)s;

-- name: list_limits
-- Every type with a limit declared or set (or only `type`), with what holds, how many
-- of its slots are held now, and how much of its work is due (workflows_due_by_type_idx).
SELECT l.type, l.max_concurrency, l.declared_max_concurrency, l.overridden, l.set_by, l.set_at,
       (SELECT count(*) FROM workflow_slots s JOIN workflows w ON w.id = s.workflow_id AND w.lease_token = s.lease_token
        WHERE s.type = l.type)::int AS in_flight,
       (SELECT count(*) FROM workflows w
        WHERE w.type = l.type AND w.state IN ('pending', 'running', 'compensating') AND w.next_retry_at <= now())::int AS due
FROM workflow_type_limits l
WHERE (l.max_concurrency IS NOT NULL OR l.overridden) AND (%(type)s::text IS NULL OR l.type = %(type)s)
ORDER BY l.type;

-- name: set_limit
-- An operator's limit for a type (NULL: none, whatever its definition says).
INSERT INTO workflow_limits AS o (type, max_concurrency, set_by)
VALUES (%(type)s, %(max_concurrency)s, %(set_by)s)
ON CONFLICT (type) DO UPDATE SET max_concurrency = excluded.max_concurrency, set_by = excluded.set_by, set_at = now();

-- name: reset_limit
-- Back to the definition's limit.
DELETE FROM workflow_limits WHERE type = %(type)s;
