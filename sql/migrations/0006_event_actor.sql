-- Who asked for a transition: the operator behind a cancel, retry or compensate command
-- ("admin-api:10.0.0.7", "cli:alice"). NULL for what a worker did on its own (its id is
-- in worker_id). Nullable without a default: adding it rewrites no row.
ALTER TABLE workflow_events ADD COLUMN actor text;

-- workflow_begin_compensation of 0002, taking the actor of an operator's command as a
-- third argument. It defaults to NULL, so the two-argument calls of the workers keep
-- working; the old function is dropped rather than overloaded, so that a call with two
-- arguments cannot be ambiguous. The body is 0002's but for the actor.
DROP FUNCTION workflow_begin_compensation(uuid, text);

CREATE FUNCTION workflow_begin_compensation(workflow uuid, worker text, actor text DEFAULT NULL)
RETURNS workflow_state
LANGUAGE plpgsql AS $$
DECLARE
    previous workflow_state;
    cursor_index integer;
BEGIN
    SELECT state INTO previous FROM workflows WHERE id = workflow;
    SELECT max(step_index) INTO cursor_index FROM workflow_steps
    WHERE workflow_id = workflow AND state IN ('completed', 'compensating');

    INSERT INTO workflow_events (workflow_id, from_state, to_state, worker_id, actor)
    VALUES (workflow, previous::text, 'compensating', worker, actor);
    IF cursor_index IS NULL THEN
        UPDATE workflows
        SET state = 'compensated', is_compensated = true, completed_at = now(), updated_at = now(),
            locked_by = NULL, lease_token = NULL, lease_expires_at = NULL
        WHERE id = workflow;
        INSERT INTO workflow_events (workflow_id, from_state, to_state, worker_id, actor)
        VALUES (workflow, 'compensating', 'compensated', worker, actor);
        RETURN 'compensated';
    END IF;
    UPDATE workflows
    SET state = 'compensating', current_step_index = cursor_index, next_retry_at = now(),
        completed_at = NULL, updated_at = now(),
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL
    WHERE id = workflow;
    RETURN 'compensating';
END;
$$;
