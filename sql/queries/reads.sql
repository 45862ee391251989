-- Reads for the service, the admin API, the CLI and the metrics.
-- Queries, in this order:
--   get_workflow
--   get_steps
--   get_steps_of
--   list_workflows
--   count_workflows
--   get_timeline
--   count_by_type_and_state
--   count_all_by_type_and_state
--   recent_outcomes
--   count_stuck_workflows
--   queue_depth
--   type_flow
--   live_workers
--   unserved_work
--   definition_versions
--   search_workflows
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: get_workflow
SELECT * FROM workflows WHERE id = %(id)s;

-- name: get_steps
SELECT * FROM workflow_steps WHERE workflow_id = %(id)s ORDER BY step_index;

-- name: get_steps_of
-- The steps of several workflows (a page of a list), by workflow, in order.
SELECT * FROM workflow_steps WHERE workflow_id = ANY(%(ids)s) ORDER BY workflow_id, step_index;

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

-- name: get_timeline
SELECT id, workflow_id, step_index, step_name, from_state, to_state, attempt, worker_id, actor, error, at
FROM workflow_events WHERE workflow_id = %(id)s ORDER BY id;

-- name: count_by_type_and_state
-- The workflows of the given ids.
SELECT type, state::text AS state, count(*) AS count FROM workflows
WHERE id = ANY(%(ids)s::uuid[])
GROUP BY type, state ORDER BY type, state;

-- name: count_all_by_type_and_state
-- All workflows, without reading every finished one: the runnable ones counted live
-- (workflows_state_type_created_idx), the finished ones from the last recount
-- (workflow_finished_counts, sql/queries/counts.sql) plus those finished since it
-- (workflows_finished_idx). No row for the finished states before the first recount.
WITH kept AS (SELECT counted_through, counts FROM workflow_finished_counts)
SELECT type, state, sum(count)::bigint AS count FROM (
    SELECT type, state::text AS state, count(*) AS count FROM workflows
    WHERE state IN ('pending', 'running', 'compensating')
    GROUP BY type, state
    UNION ALL
    SELECT by_type.key, by_state.key, by_state.value::bigint
    FROM kept, jsonb_each(kept.counts) by_type, jsonb_each_text(by_type.value) by_state
    UNION ALL
    -- A scalar subquery, so that the time bounds the index scan (a join would not).
    SELECT type, state::text, count(*) FROM workflows
    WHERE state IN ('completed', 'failed', 'cancelled', 'compensated')
      AND completed_at > (SELECT counted_through FROM workflow_finished_counts)
    GROUP BY type, state
) counted
GROUP BY type, state ORDER BY type, state;

-- name: recent_outcomes
-- The outcomes of the last hour, through workflows_finished_idx (one range a state).
SELECT count(*) FILTER (WHERE state = 'completed' AND completed_at > now() - interval '1 minute') AS completed_last_minute,
       count(*) FILTER (WHERE state = 'failed' AND completed_at > now() - interval '1 minute') AS failed_last_minute,
       count(*) FILTER (WHERE state = 'completed') AS completed_last_hour,
       count(*) FILTER (WHERE state = 'failed') AS failed_last_hour,
       (SELECT extract(epoch FROM now() - min(next_retry_at))::float8 FROM workflows
         WHERE state IN ('pending', 'running', 'compensating') AND next_retry_at <= now()) AS oldest_due_age_seconds
FROM workflows
WHERE state IN ('completed', 'failed') AND completed_at > now() - interval '1 hour';

-- name: count_stuck_workflows
-- Workflows no daemon will claim as they stand: running or compensating, but due (or
-- leased) further ahead than any write of the engine puts them, which is a lease or a
-- backoff, minutes at most. Only a row edited by hand gets here; an operator repairs it
-- (UPDATE workflows SET next_retry_at = now() ...) or cancels it. Stats and the
-- workflowd_stuck_workflows gauge report them.
-- A snoozed step (pending at the current index of a running workflow) waits as long as
-- it asked to: not stuck.
SELECT count(*) FROM workflows w
WHERE w.state IN ('running', 'compensating') AND w.next_retry_at > now() + interval '1 hour'
  AND NOT EXISTS (SELECT 1 FROM workflow_steps s WHERE s.workflow_id = w.id
                  AND s.step_index = w.current_step_index AND s.state = 'pending');

-- name: queue_depth
-- Runnable workflows by type and state, for the workflowd_queue_depth gauge.
SELECT type, state::text, count(*) FROM workflows
WHERE state IN ('pending', 'running', 'compensating') GROUP BY type, state;

-- name: type_flow
-- Each type with runnable work or a limit, as flow control sees it: its workflows
-- holding a lease and its concurrency limit, its rate and the steps it started in the
-- rate's last period, its due workflows, how many of those a limit holds back now
-- (throttled: all of them while the type is at its concurrency limit or has spent its
-- rate), and how long the oldest has been due. Due work that is not throttled and
-- grows old is waiting for capacity, or stuck; throttled work is limited.
WITH runnable AS (
    SELECT type, count(*) FILTER (WHERE lease_expires_at > now()) AS in_flight,
           count(*) FILTER (WHERE next_retry_at <= now()) AS due,
           min(next_retry_at) FILTER (WHERE next_retry_at <= now()) AS oldest_due_at
    FROM workflows WHERE state IN ('pending', 'running', 'compensating') GROUP BY type
),
flow AS (
    SELECT coalesce(r.type, l.type) AS type, coalesce(r.in_flight, 0)::int AS in_flight, l.max_concurrency,
           l.rate_limit, l.rate_period_seconds,
           (SELECT count(*) FROM workflow_rate_tokens t WHERE t.type = l.type AND t.token < l.rate_limit
              AND t.spent_at > now() - l.rate_period_seconds * interval '1 second')::int AS started_in_period,
           coalesce(r.due, 0)::int AS due, extract(epoch FROM now() - r.oldest_due_at)::float8 AS oldest_due_age_seconds
    FROM runnable r
    FULL JOIN (SELECT * FROM workflow_type_limits WHERE max_concurrency IS NOT NULL OR rate_limit IS NOT NULL) l
        ON l.type = r.type
)
SELECT type, in_flight, max_concurrency, rate_limit, rate_period_seconds, started_in_period, due,
       CASE WHEN in_flight >= max_concurrency OR started_in_period >= rate_limit THEN due ELSE 0 END AS throttled,
       oldest_due_age_seconds
FROM flow ORDER BY type;

-- name: live_workers
SELECT id, host, pid, types, concurrency, started_at, last_seen_at FROM workflow_workers
WHERE stopped_at IS NULL AND last_seen_at > now() - %(stale_seconds)s * interval '1 second'
ORDER BY started_at;

-- name: unserved_work
-- Due work that no live worker serves, by served key (workflow_served_key: `type` for
-- workflows with no version yet, `type@N` for version N), and how much: it waits, never
-- fails, until a daemon serving that type and version starts. A worker of the release
-- before versions (served NULL) is taken to serve its types' unversioned workflows.
WITH live AS (
    SELECT unnest(coalesce(served, types)) AS served FROM workflow_workers
    WHERE stopped_at IS NULL AND last_seen_at > now() - %(stale_seconds)s * interval '1 second'
)
SELECT workflow_served_key(type, workflow_run_version(version, started_at)) AS served, count(*) AS workflows
FROM workflows
WHERE state IN ('pending', 'running', 'compensating') AND next_retry_at <= now()
  AND workflow_served_key(type, workflow_run_version(version, started_at)) NOT IN (SELECT served FROM live)
GROUP BY 1
ORDER BY 1;

-- name: definition_versions
-- Each type's versions in the database: workflows still to run and finished ones, and
-- how many live workers serve each. A version with nothing left to run can leave the
-- code. Reads every workflow: an operator's question, not a dashboard's.
WITH live AS (
    SELECT unnest(coalesce(served, types)) AS served FROM workflow_workers
    WHERE stopped_at IS NULL AND last_seen_at > now() - %(stale_seconds)s * interval '1 second'
)
SELECT type, version,
       count(*) FILTER (WHERE state IN ('pending', 'running', 'compensating')) AS in_flight,
       count(*) FILTER (WHERE state NOT IN ('pending', 'running', 'compensating')) AS finished,
       (SELECT count(*) FROM live WHERE live.served = workflow_served_key(type, version)) AS served_by
FROM (SELECT type, workflow_run_version(version, started_at) AS version, state FROM workflows) w
GROUP BY type, version
ORDER BY type, version NULLS FIRST;

-- name: search_workflows
-- Exact matches on the indexed columns; PostgreSQL ORs the index scans.
SELECT * FROM workflows
WHERE id = %(id)s OR idempotency_key = %(q)s OR type = %(q)s OR user_id = %(q)s OR wallet_address = %(q)s
ORDER BY created_at DESC, id
LIMIT %(limit)s;
