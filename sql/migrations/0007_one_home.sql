-- One home in SQL for two rules that the queries, the triggers and SQL users share.
--
-- A step's idempotency key is step:{step_name}:{digest}: create_steps builds it from the
-- digest the daemon computes, workflow_step_idempotency_key from the step's input. Both
-- now call workflow_step_key; engine/idempotency.py step_key is the Python twin, and a
-- test compares the two.
CREATE FUNCTION workflow_step_key(step_name text, digest text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'step:' || step_name || ':' || digest
$$;

CREATE OR REPLACE FUNCTION workflow_step_idempotency_key(workflow_key text, step_name text, step_input jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT workflow_step_key(step_name, encode(sha256(convert_to(
               workflow_key || E'\n' || workflow_canonical_json(coalesce(step_input, '{}'::jsonb)),
               'UTF8')), 'hex'))
$$;

-- Waking the daemons: one NOTIFY on the channel they LISTEN on (daemon/wakeup.py
-- CHANNEL, which a test compares), from the insert trigger and from operators' commands.
CREATE FUNCTION workflow_wake() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('workflowd', '')
$$;

CREATE OR REPLACE FUNCTION workflows_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workflow_wake();
    RETURN NULL;
END;
$$;
