-- Cron schedules (migration 0011): firing due ticks, and managing schedules.
-- Queries, in this order:
--   database_now
--   due_schedules
--   schedule_fired
--   put_schedule
--   list_schedules
--   get_schedule
--   set_schedule_enabled
--   remove_schedule
-- Each is a named block; Store methods carry the same names. Parameters are always
-- bound (%(name)s), never formatted into the text.

-- name: database_now
SELECT clock_timestamp();

-- name: due_schedules
-- In the firing transaction: the schedules due now, locked, those another daemon is
-- firing skipped. `now` is the transaction's: the database's clock decides, no daemon's.
SELECT name, cron, timezone, type, input, user_id, missed, next_fire_at, now() AS now
FROM workflow_schedules
WHERE enabled AND next_fire_at <= now()
ORDER BY next_fire_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: schedule_fired
-- The cursor moves in the transaction that started the ticks' workflows.
UPDATE workflow_schedules
SET next_fire_at = %(next_fire_at)s, last_fired_at = coalesce(%(fired_at)s, last_fired_at),
    last_workflow_id = coalesce(%(workflow_id)s, last_workflow_id), last_fired_by = %(worker_id)s,
    updated_at = now()
WHERE name = %(name)s;

-- name: put_schedule
-- Add a schedule, or change one. Its next tick stays as it was unless the times changed
-- (cron or time zone), so that a daemon's start, which declares the schedules of its
-- code again, neither skips nor repeats a tick. Paused stays paused.
INSERT INTO workflow_schedules (name, cron, timezone, type, input, user_id, missed, declared, next_fire_at)
VALUES (%(name)s, %(cron)s, %(timezone)s, %(type)s, %(input)s, %(user_id)s, %(missed)s, %(declared)s,
        %(next_fire_at)s)
ON CONFLICT (name) DO UPDATE
SET next_fire_at = CASE WHEN (workflow_schedules.cron, workflow_schedules.timezone)
                             IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone)
                        THEN EXCLUDED.next_fire_at ELSE workflow_schedules.next_fire_at END,
    cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, type = EXCLUDED.type, input = EXCLUDED.input,
    user_id = EXCLUDED.user_id, missed = EXCLUDED.missed, declared = EXCLUDED.declared, updated_at = now()
RETURNING *;

-- name: list_schedules
SELECT * FROM workflow_schedules ORDER BY name;

-- name: get_schedule
SELECT * FROM workflow_schedules WHERE name = %(name)s;

-- name: set_schedule_enabled
-- Pause, or resume: a resumed schedule fires from its next tick after now, not every
-- tick it missed while paused.
UPDATE workflow_schedules
SET enabled = %(enabled)s, next_fire_at = coalesce(%(next_fire_at)s, next_fire_at), updated_at = now()
WHERE name = %(name)s
RETURNING *;

-- name: remove_schedule
DELETE FROM workflow_schedules WHERE name = %(name)s RETURNING name;
