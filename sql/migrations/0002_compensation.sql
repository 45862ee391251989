-- Compensation (sagas) keeps its own attempt and retry counters on each step, so the
-- forward attempts stay on the books beside the compensating ones.
ALTER TABLE workflow_steps
    ADD COLUMN compensation_attempt integer NOT NULL DEFAULT 0 CHECK (compensation_attempt >= 0),
    ADD COLUMN compensation_retry_count integer NOT NULL DEFAULT 0 CHECK (compensation_retry_count >= 0);

-- Start (or resume) compensating a workflow: its completed steps are undone in reverse
-- order, so the cursor (current_step_index) goes to the highest step still to undo
-- (completed, or stuck compensating after its compensation gave up). With nothing to
-- undo the workflow is compensated at once. The caller holds the row (a lease or a
-- FOR UPDATE); every transition is appended to the timeline here, in its transaction.
CREATE FUNCTION workflow_begin_compensation(workflow uuid, worker text) RETURNS workflow_state
LANGUAGE plpgsql AS $$
DECLARE
    previous workflow_state;
    cursor_index integer;
BEGIN
    SELECT state INTO previous FROM workflows WHERE id = workflow;
    SELECT max(step_index) INTO cursor_index FROM workflow_steps
    WHERE workflow_id = workflow AND state IN ('completed', 'compensating');

    INSERT INTO workflow_events (workflow_id, from_state, to_state, worker_id)
    VALUES (workflow, previous::text, 'compensating', worker);
    IF cursor_index IS NULL THEN
        UPDATE workflows
        SET state = 'compensated', is_compensated = true, completed_at = now(), updated_at = now(),
            locked_by = NULL, lease_token = NULL, lease_expires_at = NULL
        WHERE id = workflow;
        INSERT INTO workflow_events (workflow_id, from_state, to_state, worker_id)
        VALUES (workflow, 'compensating', 'compensated', worker);
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

-- Search by wallet address and by type (the admin API's search and listing).
CREATE INDEX workflows_wallet_address_idx ON workflows (wallet_address) WHERE wallet_address IS NOT NULL;
CREATE INDEX workflows_type_created_idx ON workflows (type, created_at DESC);
-- Completions and failures of the last minute and hour (stats).
CREATE INDEX workflows_completed_at_idx ON workflows (completed_at) WHERE completed_at IS NOT NULL;
