-- Flow control: the limits that hold (workflow_type_limits), their slots and tokens,
-- the statements a claim of limited types runs around claim_granted_workflows, and the
-- operator's commands.
-- Queries, in this order:
--   load_limits
--   provide_slots
--   provide_tokens
--   due_flow_controlled_types
--   lock_slots
--   lock_tokens
--   lock_fair_workflows
--   grant_workflows
--   take_slots
--   spend_tokens
--   list_limits
--   set_limit
--   reset_limit
--   next_flow_rekey
--   begin_flow_rekey
--   rekey_workflows
--   end_first_rekey_pass
--   finish_flow_rekey
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: load_limits
-- The limits that hold for `types` (a daemon's served types), refreshed every few
-- seconds: they tell the daemon whether its claims run the limited path.
SELECT type, max_concurrency, rate_limit, rate_period_seconds, fair_by FROM workflow_type_limits
WHERE type = ANY(%(types)s::text[]) AND (max_concurrency IS NOT NULL OR rate_limit IS NOT NULL OR fair_by IS NOT NULL)
ORDER BY type;

-- name: provide_slots
-- The slots of each limited type of `types`, as many as its limit: a slot that exists
-- is left as it is (ON CONFLICT), one past a lowered limit is never taken (lock_slots).
INSERT INTO workflow_slots (type, slot)
SELECT l.type, n FROM workflow_type_limits l, generate_series(0, l.max_concurrency - 1) n
WHERE l.type = ANY(%(types)s::text[]) AND l.max_concurrency IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM workflow_slots s WHERE s.type = l.type AND s.slot = n)
ON CONFLICT DO NOTHING;

-- name: provide_tokens
-- The rate tokens of each rate-limited type of `types`, as many as its rate (as
-- provide_slots provides slots): a new one was never spent.
INSERT INTO workflow_rate_tokens (type, token)
SELECT l.type, n FROM workflow_type_limits l, generate_series(0, l.rate_limit - 1) n
WHERE l.type = ANY(%(types)s::text[]) AND l.rate_limit IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM workflow_rate_tokens t WHERE t.type = l.type AND t.token = n)
ON CONFLICT DO NOTHING;

-- name: due_flow_controlled_types
-- First of a limited claim's statements, in the claiming transaction: which of `types`
-- have due work (one probe each of workflows_due_flow_controlled_idx), so that a claim
-- locks no slot or token of a type with nothing to start, and a daemon that serves
-- idle limited types beside busy unlimited ones pays one probe a claim for them.
SELECT limited.type FROM unnest(%(types)s::text[]) AS limited (type)
WHERE EXISTS (SELECT FROM workflows w
              WHERE w.type = limited.type AND w.fair_key IS NOT NULL
                AND w.state IN ('pending', 'running', 'compensating') AND w.next_retry_at <= now());

-- name: lock_slots
-- Then, for the types with due work, in the claiming transaction: for each limited
-- type of `types`, lock up to `wanted` slots below its limit that look free in this
-- statement's snapshot (no workflow holds the lease that took them), or whose holder's
-- lease ran out (that workflow is due; only it may take its slot again, since its old
-- holder may still renew a lease nobody took over). SKIP LOCKED: a slot another claimer
-- is taking is skipped. This snapshot may predate another claimer's commit of a slot
-- it locked row by row after: grant_workflows judges the locked slots again, in its own.
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

-- name: lock_tokens
-- In the claiming transaction, for each rate-limited type of `types`: lock up to
-- `wanted` of its tokens below its rate that were last spent at least a period ago,
-- the longest unspent first (workflow_rate_tokens_spent_idx). SKIP LOCKED: a token
-- another claimer is spending is skipped; one it spent and committed after this
-- statement's snapshot is judged again on its newest version once locked, and skipped.
SELECT t.type, t.token
FROM unnest(%(types)s::text[]) AS limited (type)
CROSS JOIN LATERAL (SELECT l.rate_limit, l.rate_period_seconds FROM workflow_type_limits l
                    WHERE l.type = limited.type) l
CROSS JOIN LATERAL (
    SELECT t.type, t.token FROM workflow_rate_tokens t
    WHERE t.type = limited.type AND t.token < l.rate_limit
      AND t.spent_at <= now() - l.rate_period_seconds * interval '1 second'
    ORDER BY t.spent_at
    LIMIT %(wanted)s
    FOR UPDATE OF t SKIP LOCKED
) t;

-- name: lock_fair_workflows
-- In the claiming transaction, for each fair type of `types` (Workflow(fair_by=...)):
-- lock up to `caps` of its due workflows, round-robin across its users. The distinct
-- user keys with due work are found one index probe each (a loose index scan of
-- workflows_due_flow_controlled_idx), from a random point of the key space round to it
-- (two passes: from there up, then from the bottom to there), at most `caps` keys; then
-- each user's most urgent rows, an equal share of the cap each (FOR UPDATE SKIP
-- LOCKED). Returned in the order the grant takes them: by priority, then by turn (each
-- user's first, then each one's second, ...), then by user.
WITH RECURSIVE wanted AS (
    SELECT type, n, floor(random() * 4294967296)::bigint - 2147483648 AS start
    FROM unnest(%(types)s::text[], %(caps)s::int[]) AS c (type, n)
),
keys (type, n, pass, upper, depth, fair_key) AS (
    SELECT wanted.type, n, pass, upper, 1,
           (SELECT w.fair_key FROM workflows w
            WHERE w.type = wanted.type AND w.state IN ('pending', 'running', 'compensating')
              AND w.next_retry_at <= now() AND w.fair_key >= low AND w.fair_key < upper
            ORDER BY w.fair_key LIMIT 1)
    FROM wanted CROSS JOIN LATERAL (VALUES (1, start, 2147483648), (2, -2147483648, start)) AS seed (pass, low, upper)
    UNION ALL
    SELECT keys.type, n, pass, upper, depth + 1,
           (SELECT w.fair_key FROM workflows w
            WHERE w.type = keys.type AND w.state IN ('pending', 'running', 'compensating')
              AND w.next_retry_at <= now() AND w.fair_key > keys.fair_key AND w.fair_key < upper
            ORDER BY w.fair_key LIMIT 1)
    FROM keys WHERE keys.fair_key IS NOT NULL AND depth < n
),
users AS (
    SELECT type, n, fair_key, count(*) OVER (PARTITION BY type) AS found
    FROM (SELECT type, n, fair_key, row_number() OVER (PARTITION BY type ORDER BY pass, fair_key) AS visit
          FROM keys WHERE fair_key IS NOT NULL) visited
    WHERE visit <= n
),
locked AS (
    SELECT w.id, w.type, w.priority, w.next_retry_at, users.fair_key
    FROM users CROSS JOIN LATERAL (
        SELECT id, type, priority, next_retry_at FROM workflows
        WHERE type = users.type AND fair_key = users.fair_key AND state IN ('pending', 'running', 'compensating')
          AND next_retry_at <= now() AND id <> ALL(%(busy)s::uuid[])
          AND workflow_served_key(type, workflow_run_version(version, started_at)) = ANY(%(served)s::text[])
        ORDER BY priority, next_retry_at
        LIMIT ceil(users.n::numeric / users.found)::int
        FOR UPDATE SKIP LOCKED
    ) w
)
SELECT id, type, row_number() OVER (PARTITION BY type ORDER BY priority, turn, fair_key)::int AS fair_order
FROM (SELECT id, type, priority, fair_key,
             row_number() OVER (PARTITION BY type, fair_key ORDER BY priority, next_retry_at) AS turn
      FROM locked) numbered;

-- name: grant_workflows
-- Second statement: which due workflows of the limited types start now, and which of
-- the slots lock_slots locked each takes. `caps`: how many each type may start (the
-- least of its locked slots, its locked tokens and the daemon's room; a type with none
-- is left out). Its snapshot is newer than every slot's last taking (those committed
-- before the locks were granted), so a slot it finds free is free. A slot still held by
-- a workflow whose lease ran out goes to that workflow again (locked here, if it is due
-- and served); the free ones go to the type's due workflows in claim order
-- (workflows_due_flow_controlled_idx), as do a type's tokens when it has no
-- concurrency limit; a fair type's go to the rows lock_fair_workflows locked (`fair`,
-- in its order).
-- The workflows are locked (FOR UPDATE SKIP LOCKED) and numbered in a later CTE, since
-- a locking query cannot number its rows. claim_granted_workflows then claims exactly
-- these, take_slots moves each slot to its workflow's new lease, and spend_tokens
-- stamps a token for each.
WITH cap AS (
    SELECT * FROM unnest(%(cap_types)s::text[], %(caps)s::int[]) AS c (type, n)
),
locked AS (
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
    SELECT w.id, w.type, w.priority, w.next_retry_at, NULL::int AS fair_order
    FROM (SELECT type, CASE WHEN type IN (SELECT type FROM locked)
                            THEN least(n, (SELECT count(*) FROM free WHERE free.type = cap.type)) ELSE n END AS wanted
          FROM cap WHERE type <> ALL(%(fair_types)s::text[])) f
    CROSS JOIN LATERAL (
        SELECT id, type, priority, next_retry_at FROM workflows
        WHERE type = f.type AND state IN ('pending', 'running', 'compensating') AND fair_key IS NOT NULL
          AND next_retry_at <= now() AND workflow_served_key(type, workflow_run_version(version, started_at)) = ANY(%(served)s::text[])
          AND id <> ALL(%(busy)s::uuid[])
        ORDER BY fair_key, priority, next_retry_at
        LIMIT f.wanted
        FOR UPDATE SKIP LOCKED
    ) w
    UNION ALL
    SELECT w.id, w.type, w.priority, w.next_retry_at, fair.fair_order
    FROM unnest(%(fair)s::uuid[], %(fair_orders)s::int[]) AS fair (id, fair_order) JOIN workflows w ON w.id = fair.id
),
numbered AS (
    SELECT id, type, priority, next_retry_at, fair_order,
           row_number() OVER (PARTITION BY type ORDER BY fair_order, priority, next_retry_at) AS n
    FROM waiting WHERE id NOT IN (SELECT id FROM returning_holders)
),
granted AS (
    SELECT id, type, slot, priority, next_retry_at, NULL::int AS fair_order FROM returning_holders
    UNION ALL
    SELECT numbered.id, numbered.type, free.slot, numbered.priority, numbered.next_retry_at, numbered.fair_order
    FROM numbered LEFT JOIN free USING (type, n)
    WHERE free.slot IS NOT NULL OR numbered.type NOT IN (SELECT type FROM locked)
)
-- At most each type's cap, and `limit` in all (the daemon's room), the most urgent first.
SELECT id, type, slot FROM (
    SELECT id, type, slot, priority, next_retry_at,
           row_number() OVER (PARTITION BY type ORDER BY fair_order, priority, next_retry_at) AS rank
    FROM granted
) g JOIN cap USING (type)
WHERE g.rank <= cap.n
ORDER BY priority, next_retry_at
LIMIT %(limit)s;

-- name: take_slots
-- After claim_granted_workflows, in its transaction: each slot granted goes to its
-- workflow's new lease (read from the row the claim just wrote), one primary-key lookup
-- each. (Inside the claim statement, PostgreSQL 18 joined the slots by type alone and
-- read every slot of the type for each workflow: 20 ms a claim with a limit of 1,000.)
UPDATE workflow_slots s SET workflow_id = w.id, lease_token = w.lease_token
FROM unnest(%(types)s::text[], %(slots)s::int[], %(ids)s::uuid[]) AS taken (type, slot, id)
JOIN workflows w ON w.id = taken.id
WHERE s.type = taken.type AND s.slot = taken.slot;

-- name: spend_tokens
-- Last of a limited claim's statements: stamp one locked token for each step started.
UPDATE workflow_rate_tokens t SET spent_at = now()
FROM unnest(%(types)s::text[], %(tokens)s::int[]) AS spent (type, token)
WHERE t.type = spent.type AND t.token = spent.token;

-- name: list_limits
-- Every type with a limit declared or set (or only `type`), with what holds, how many
-- of its workflows hold a lease now, how many steps it started in the last period of
-- its rate, and how much of its work is due.
SELECT l.type, l.max_concurrency, l.declared_max_concurrency, l.rate_limit, l.rate_period_seconds,
       l.declared_rate_limit, l.declared_rate_period_seconds, l.overridden, l.set_by, l.set_at,
       (SELECT count(*) FROM workflows w WHERE w.type = l.type AND w.state IN ('pending', 'running', 'compensating')
          AND w.lease_expires_at > now())::int AS in_flight,
       (SELECT count(*) FROM workflow_rate_tokens t WHERE t.type = l.type AND t.token < l.rate_limit
          AND t.spent_at > now() - l.rate_period_seconds * interval '1 second')::int AS started_in_period,
       (SELECT count(*) FROM workflows w
        WHERE w.type = l.type AND w.state IN ('pending', 'running', 'compensating') AND w.next_retry_at <= now())::int AS due
FROM workflow_type_limits l
WHERE (l.max_concurrency IS NOT NULL OR l.rate_limit IS NOT NULL OR l.overridden)
  AND (%(type)s::text IS NULL OR l.type = %(type)s)
ORDER BY l.type;

-- name: set_limit
-- An operator's limits for a type, each over its definition's (NULL: none, whatever
-- its definition says): the concurrency limit when `concurrency_set`, the rate when
-- `rate_set`; one not set stays as it was.
INSERT INTO workflow_limits AS o (type, concurrency_set, max_concurrency, rate_set, rate_limit, rate_period_seconds, set_by)
VALUES (%(type)s, %(concurrency_set)s, %(max_concurrency)s, %(rate_set)s, %(rate_limit)s, %(rate_period_seconds)s,
        %(set_by)s)
ON CONFLICT (type) DO UPDATE
SET concurrency_set = o.concurrency_set OR excluded.concurrency_set,
    max_concurrency = CASE WHEN excluded.concurrency_set THEN excluded.max_concurrency ELSE o.max_concurrency END,
    rate_set = o.rate_set OR excluded.rate_set,
    rate_limit = CASE WHEN excluded.rate_set THEN excluded.rate_limit ELSE o.rate_limit END,
    rate_period_seconds = CASE WHEN excluded.rate_set THEN excluded.rate_period_seconds ELSE o.rate_period_seconds END,
    set_by = excluded.set_by, set_at = now();

-- name: reset_limit
-- Back to the definition's limits.
DELETE FROM workflow_limits WHERE type = %(type)s;

-- name: next_flow_rekey
-- A request for new keys (workflow_flow_rekeys, migration 0019) that can be worked on
-- now: one whose first pass is not done, or whose last pass may begin, every transaction
-- running when the first began having ended. Locked till the end of this transaction
-- (SKIP LOCKED: daemons work on different ones); a rule changed meanwhile waits for it,
-- then files its request anew.
SELECT type, horizon IS NULL AS new, first_pass_done AS last_pass FROM workflow_flow_rekeys
WHERE NOT first_pass_done OR pg_snapshot_xmin(pg_current_snapshot()) >= pg_snapshot_xmax(horizon)
ORDER BY requested_at
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: begin_flow_rekey
-- The first pass's horizon: this statement's snapshot, taken after the request was
-- locked, so after the change that filed it committed.
UPDATE workflow_flow_rekeys SET horizon = pg_current_snapshot() WHERE type = %(type)s;

-- name: rekey_workflows
-- Up to `batch` of the type's workflows get the key of its rule now. A row locked by
-- a claim or a commit is skipped, for a later batch or the last pass.
WITH stale AS (
    SELECT w.id, k.key FROM {{stale_flow_keys}}
    LIMIT %(batch)s
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE workflows w SET fair_key = stale.key FROM stale WHERE w.id = stale.id;

-- name: end_first_rekey_pass
UPDATE workflow_flow_rekeys SET first_pass_done = true WHERE type = %(type)s;

-- name: finish_flow_rekey
-- The end of the last pass: the request goes once none of its rows is left (one locked
-- by another transaction now waits for the next round).
DELETE FROM workflow_flow_rekeys WHERE type = %(type)s AND NOT EXISTS (SELECT FROM {{stale_flow_keys}});
