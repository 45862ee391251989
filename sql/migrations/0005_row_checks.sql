-- What a row must be for a daemon to run it, refused at insert with a message that
-- names the rule (the constraint's name) rather than discovered by every claim.
--
-- input and context are JSON objects: step code reads input as a mapping, and each
-- completion merges a step's output into context by name.
-- input holds at most 1 MiB: a workflow's input is copied into every step row and read
-- at every claim; large payloads belong in a table or an object store, referenced by id.
-- pg_column_size measures the value as it is handed to the table, before compression.
--
-- Rows that already break these rules could never run: the runnable ones fail here,
-- keeping what they held in their error, so the rules hold for every row a daemon will
-- write again. Finished rows are left as they are (NOT VALID skips existing rows).
WITH broken AS (
    SELECT id, state FROM workflows
    WHERE state IN ('pending', 'running', 'compensating')
      AND (jsonb_typeof(input) <> 'object' OR jsonb_typeof(context) <> 'object'
           OR pg_column_size(input) > 1048576)
    FOR UPDATE
),
failed AS (
    UPDATE workflows w
    SET state = 'failed',
        error = jsonb_build_object(
            'type', 'InvalidRow', 'step', '', 'attempt', 0,
            'message', 'the row broke a rule added by migration 0005 (input and context must be JSON '
                       'objects, input at most 1 MiB), so it could never run: the migration failed it',
            'input', CASE WHEN pg_column_size(w.input) <= 1048576 THEN w.input END,
            'context', w.context),
        input = CASE WHEN jsonb_typeof(w.input) = 'object' AND pg_column_size(w.input) <= 1048576
                     THEN w.input ELSE '{}' END,
        context = CASE WHEN jsonb_typeof(w.context) = 'object' THEN w.context ELSE '{}' END,
        completed_at = now(), updated_at = now(),
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL
    FROM broken
    WHERE w.id = broken.id
    RETURNING w.id, w.error
)
INSERT INTO workflow_events (workflow_id, from_state, to_state, error)
SELECT broken.id, broken.state::text, 'failed', failed.error - 'input' - 'context'
FROM broken JOIN failed ON failed.id = broken.id;

ALTER TABLE workflows
    ADD CONSTRAINT workflows_input_is_a_json_object CHECK (jsonb_typeof(input) = 'object') NOT VALID,
    ADD CONSTRAINT workflows_context_is_a_json_object CHECK (jsonb_typeof(context) = 'object') NOT VALID,
    ADD CONSTRAINT workflows_input_at_most_1_mib CHECK (pg_column_size(input) <= 1048576) NOT VALID;
