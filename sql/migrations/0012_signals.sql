-- External events (signals): what other services send to a workflow, for a step that
-- waits for an event of that name (Step(wait_for_event=...)).
--
-- A sent event is a row, consumed (consumed_at) by the waiting step in the transaction
-- that completes the step with the event's payload as its output: exactly once. An event
-- sent before the workflow reaches its step simply waits here; a second delivery with
-- the same event id is a no-op (the unique key). workflow_send_event wakes a parked
-- workflow: the waiting step parks in the transaction that holds its workflow's row
-- lock, and the insert here needs that row (its foreign key), so a send either commits
-- before the wait looks (the wait finds it) or after the park (the send wakes it).
--
-- Expand only: a new table and a new function, which the previous release never uses.
CREATE TABLE workflow_signals (
    workflow_id   uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    id            bigint GENERATED ALWAYS AS IDENTITY,
    name          text NOT NULL,
    -- The sender's id of the event; by default a digest of its name and payload, so that
    -- a sender that delivers at least once delivers once.
    event_id      text NOT NULL,
    payload       jsonb NOT NULL DEFAULT 'null',
    sent_at       timestamptz NOT NULL DEFAULT now(),
    consumed_at   timestamptz,
    consumed_step integer,
    PRIMARY KEY (workflow_id, id),
    CONSTRAINT workflow_signals_once UNIQUE (workflow_id, name, event_id)
);

-- Send an event to a workflow; true when it is new, false for a duplicate (same event
-- id: a no-op even once the workflow has finished, so that a sender may deliver at
-- least once). A new event to a finished workflow, or to none, is refused.
CREATE FUNCTION workflow_send_event(
    target uuid, event_name text, payload jsonb DEFAULT 'null', event_id text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    found_state workflow_state;
    created boolean;
    key text := coalesce(event_id, md5(event_name || ':' || coalesce(payload, 'null')::text));
BEGIN
    IF EXISTS (SELECT 1 FROM workflow_signals s
               WHERE s.workflow_id = target AND s.name = event_name AND s.event_id = key) THEN
        RETURN false;
    END IF;
    SELECT state INTO found_state FROM workflows WHERE id = target;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no workflow with id %', target USING ERRCODE = 'no_data_found';
    END IF;
    IF found_state IN ('completed', 'failed', 'cancelled', 'compensated') THEN
        RAISE EXCEPTION 'workflow % is %: it takes no more events', target, found_state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    INSERT INTO workflow_signals (workflow_id, name, event_id, payload)
    VALUES (target, event_name, key, coalesce(payload, 'null'))
    ON CONFLICT ON CONSTRAINT workflow_signals_once DO NOTHING
    RETURNING true INTO created;
    -- A workflow parked at a step (its current step pending, nobody holding it) falls
    -- due now; one that is not there yet finds the event when it gets there.
    UPDATE workflows w SET next_retry_at = now()
    WHERE w.id = target AND w.state = 'running' AND w.locked_by IS NULL AND w.next_retry_at > now()
      AND EXISTS (SELECT 1 FROM workflow_steps s WHERE s.workflow_id = w.id
                  AND s.step_index = w.current_step_index AND s.state = 'pending');
    PERFORM pg_notify('workflowd', '');
    RETURN coalesce(created, false);
END;
$$;
