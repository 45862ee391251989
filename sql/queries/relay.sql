-- The event relay (engine/relay.py): the timeline published in commit order, in
-- snapshot batches (migration 0020). Run only by the daemon holding the relay's lock,
-- on the connection that holds it.
-- Queries, in this order:
--   try_relay_lock
--   end_idle_relay_session
--   open_relay
--   current_snapshot
--   relay_page
--   save_relay_progress
--   relay_lag
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: try_relay_lock
-- A session lock: held as long as the leader's connection lives, so a leader killed
-- or cut off loses it with its connection, and a follower takes it.
SELECT pg_try_advisory_lock(%(lock_id)s);

-- name: end_idle_relay_session
-- The relay's session ends when idle this long, and with it the lock (daemon/relay.py,
-- RELAY_IDLE_SESSION_SECONDS).
SELECT set_config('idle_session_timeout', %(milliseconds)s, false);

-- name: open_relay
-- The relay's cursor, created at its first run: it publishes what commits from then on
-- (events of earlier transactions are history, not news).
WITH created AS (
    INSERT INTO workflow_event_relays (name, published) VALUES (%(name)s, pg_current_snapshot())
    ON CONFLICT (name) DO NOTHING
    RETURNING published, batch, batch_through_id
)
SELECT published::text AS published, batch::text AS batch, batch_through_id FROM created
UNION ALL
SELECT published::text, batch::text, batch_through_id FROM workflow_event_relays WHERE name = %(name)s;

-- name: current_snapshot
-- The next batch's end: every transaction finished by now.
SELECT pg_current_snapshot()::text;

-- name: relay_page
-- The next events of the batch: those whose transaction is visible (finished) in
-- `batch` and was not in `published`, after `after_id`, in id order (within one
-- workflow the timeline's order: each event is inserted from the RETURNING of the
-- update that locked its workflow's row, so a later transition takes a larger id).
-- Not finished in `published` means at or above its xmax (`published_xmax`) or in its
-- list of transactions in progress (`published_xip`): the scan is the range of
-- workflow_events_tx_idx up to the batch's xmax and the few ids of that list. The
-- bounds come as plain xid8 parameters, so that a generic plan estimates them as the
-- narrow ranges they are; and `id + 0`, so that no plan walks the whole primary key
-- (workflow_id, id) for `id > after_id`, as one made on a table of a few rows did.
WITH page AS (
    SELECT e.id, e.workflow_id, e.from_state, e.to_state, e.step_name, e.attempt, e.at
    FROM workflow_events e
    WHERE ((e.tx >= %(published_xmax)s::xid8 AND e.tx < %(batch_xmax)s::xid8)
           OR e.tx = ANY (%(published_xip)s::xid8[]))
      AND pg_visible_in_snapshot(e.tx, %(batch)s::pg_snapshot)
      AND NOT pg_visible_in_snapshot(e.tx, %(published)s::pg_snapshot)
      AND e.id + 0 > %(after_id)s
    ORDER BY e.id
    LIMIT %(limit)s
)
SELECT page.id AS event_id, page.workflow_id, w.type, page.from_state, page.to_state,
       page.step_name, page.attempt, page.at
FROM page JOIN workflows w ON w.id = page.workflow_id
ORDER BY page.id;

-- name: save_relay_progress
-- After the broker confirmed a page: everything visible in `published` is out, and of
-- `batch` (NULL once it is done) everything up to `batch_through_id`.
UPDATE workflow_event_relays
SET published = %(published)s::pg_snapshot,
    batch = %(batch)s::pg_snapshot,
    batch_through_id = %(batch_through_id)s,
    published_count = published_count + %(count)s,
    updated_at = now()
WHERE name = %(name)s;

-- name: relay_lag
-- Committed events not yet published (up to a million of them) and the age of the
-- oldest: those not finished in `published`, less the part of `batch` through
-- `after_id` (bounds as in relay_page). `at` is its transaction's start.
SELECT count(*) AS events,
       coalesce(extract(epoch FROM now() - min(unpublished.at)), 0)::float8 AS seconds
FROM (
    SELECT e.at
    FROM workflow_events e
    WHERE (e.tx >= %(published_xmax)s::xid8 OR e.tx = ANY (%(published_xip)s::xid8[]))
      AND NOT pg_visible_in_snapshot(e.tx, %(published)s::pg_snapshot)
      AND NOT (coalesce(pg_visible_in_snapshot(e.tx, %(batch)s::pg_snapshot), false)
               AND e.id <= %(after_id)s)
    LIMIT 1000000
) unpublished;
