-- Cron schedules: a workflow started at every tick of a cron expression.
--
-- Every daemon looks for due schedules (next_fire_at <= now()) and claims them with
-- FOR UPDATE SKIP LOCKED; it starts each due tick's workflow, with the explicit
-- idempotency key schedule:{name}:{tick in UTC, RFC 3339}, and moves next_fire_at on,
-- in one transaction. The row lock makes a tick fire once however many daemons look;
-- the key makes a tick start one workflow even if a schedule's row were fired twice; and
-- the cursor commits with the start, so a daemon killed in between fires nothing and
-- the tick stays due for the next. No leader is needed.
--
-- Expand only: a new table, which the previous release never reads.
CREATE TABLE workflow_schedules (
    name             text PRIMARY KEY,
    -- Five fields, or six with seconds last (croniter's reading), in `timezone`.
    cron             text NOT NULL,
    timezone         text NOT NULL DEFAULT 'UTC',
    type             text NOT NULL,
    input            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(input) = 'object'),
    user_id          text,
    -- After an outage: fire the newest missed tick once ('latest') or each ('all').
    missed           text NOT NULL DEFAULT 'latest' CHECK (missed IN ('latest', 'all')),
    enabled          boolean NOT NULL DEFAULT true,
    -- Declared in code (engine.Schedule), upserted at each daemon's start; or added at
    -- run time (CLI, HTTP, SQL).
    declared         boolean NOT NULL DEFAULT false,
    next_fire_at     timestamptz NOT NULL,
    last_fired_at    timestamptz,
    last_workflow_id uuid,
    last_fired_by    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workflow_schedules_due_idx ON workflow_schedules (next_fire_at) WHERE enabled;
