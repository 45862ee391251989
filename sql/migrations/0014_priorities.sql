-- Priorities: smaller runs first, from -100 to 100, 0 by default; the claim already
-- walks workflows_due_idx (priority, next_retry_at), so due work goes by priority, then
-- by due time.
--
-- A workflow's priority comes from its start, else from its type's definition
-- (Workflow(priority=...)), else 0. The definitions live in the daemons' code, and a SQL
-- insert knows nothing of them: each daemon declares the priorities of the types it
-- serves in workflow_types when it registers, and the before-insert trigger gives a row
-- inserted without a priority its type's. So the column loses its default: NULL at
-- insert means "the type's".
--
-- Expand only: the previous release always names a priority (0), which the trigger
-- leaves alone. The range is checked for new rows (NOT VALID: every existing row holds
-- 0, and validating would scan the table under a lock).
CREATE TABLE workflow_types (
    type         text PRIMARY KEY,
    -- The priority of the type's definition, as the daemon that registered last declared it.
    priority     smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    declared_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE workflows
    ALTER COLUMN priority DROP DEFAULT,
    ADD CONSTRAINT workflows_priority_from_minus_100_to_100 CHECK (priority BETWEEN -100 AND 100) NOT VALID;

CREATE OR REPLACE FUNCTION workflows_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key IS NULL THEN
        NEW.idempotency_key := workflow_idempotency_key(NEW.type, NEW.user_id, NEW.input);
    END IF;
    IF NEW.priority IS NULL THEN
        NEW.priority := coalesce((SELECT priority FROM workflow_types WHERE type = NEW.type), 0);
    END IF;
    RETURN NEW;
END;
$$;
