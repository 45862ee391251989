-- The engine's queries, one named block each. Store methods carry the same names.
-- Parameters are always bound (%(name)s), never formatted into the text.

-- name: insert_workflow
-- Start a workflow. The before-insert trigger fills in the idempotency key; a duplicate
-- key inserts nothing and returns no row, and the caller then reads the existing one.
INSERT INTO workflows (type, input, user_id, wallet_address, total_steps, max_retries,
                       requires_compensation, priority)
VALUES (%(type)s, %(input)s, %(user_id)s, %(wallet_address)s, %(total_steps)s,
        %(max_retries)s, %(requires_compensation)s, %(priority)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING *;

-- name: get_workflow_by_start
-- The workflow a start with these arguments maps to. It calls the same SQL function
-- as the insert trigger, so it finds the row whatever the input's key order.
SELECT * FROM workflows
WHERE idempotency_key = workflow_idempotency_key(%(type)s, %(user_id)s, %(input)s);

-- name: get_workflow
SELECT * FROM workflows WHERE id = %(id)s;

-- name: get_steps
SELECT * FROM workflow_steps WHERE workflow_id = %(id)s ORDER BY step_index;

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

-- name: workflow_idempotency_key
SELECT workflow_idempotency_key(%(type)s, %(user_id)s, %(input)s);

-- name: step_idempotency_key
SELECT workflow_step_idempotency_key(%(workflow_key)s, %(step_name)s, %(step_input)s);

-- name: canonical_json
SELECT workflow_canonical_json(%(value)s);
