-- Flow control: fairness between users (Workflow(fair_by="user_id")). The due work of a
-- fair type is claimed round-robin across its users, within a priority, so that one
-- user's hundred thousand queued workflows delay another user's first by about one
-- claim batch, not by a hundred thousand.
--
-- Each row of a fair type carries its user's key (fair_key: a hash of its user_id,
-- written by the before-insert trigger from the fair_by its type's daemons declared in
-- workflow_types); a row of any other type carries 0. The claim of a fair type walks the
-- distinct keys that have due work, one index probe per key, from a random point of the
-- key space and round it, and takes the head of each user's queue in turn
-- (lock_fair_workflows). Nothing is counted or kept per user, so nothing drifts.
--
-- workflows_due_by_type_idx gains the key before the priority: for a type whose rows all
-- carry 0 its order is the order it had. (A row inserted before its type became fair
-- keeps 0, and counts as one more user.)
--
-- Expand only but for that index, which is replaced (the previous release's limited
-- claim finds its rows through the new one, by the same leading column): a column with
-- a constant default (no table rewrite), a column of workflow_types, the view's column
-- appended, the trigger that fills the new column.
ALTER TABLE workflow_types
    ADD COLUMN fair_by text CHECK (fair_by IN ('user_id'));

ALTER TABLE workflows ADD COLUMN fair_key integer NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW workflow_type_limits AS
SELECT named.type,
       CASE WHEN o.concurrency_set THEN o.max_concurrency ELSE t.max_concurrency END AS max_concurrency,
       t.max_concurrency AS declared_max_concurrency,
       o.type IS NOT NULL AS overridden, o.set_by, o.set_at,
       CASE WHEN o.rate_set THEN o.rate_limit ELSE t.rate_limit END AS rate_limit,
       CASE WHEN o.rate_set THEN o.rate_period_seconds ELSE t.rate_period_seconds END AS rate_period_seconds,
       t.rate_limit AS declared_rate_limit, t.rate_period_seconds AS declared_rate_period_seconds,
       t.fair_by
FROM (SELECT type FROM workflow_types UNION SELECT type FROM workflow_limits) named
LEFT JOIN workflow_types t ON t.type = named.type
LEFT JOIN workflow_limits o ON o.type = named.type;

CREATE OR REPLACE FUNCTION workflows_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    declared workflow_types%ROWTYPE;
BEGIN
    IF NEW.idempotency_key IS NULL THEN
        NEW.idempotency_key := workflow_idempotency_key(NEW.type, NEW.user_id, NEW.input);
    END IF;
    SELECT * INTO declared FROM workflow_types WHERE type = NEW.type;
    NEW.priority := coalesce(NEW.priority, declared.priority, 0);
    NEW.fair_key := CASE WHEN declared.fair_by = 'user_id' THEN hashtext(coalesce(NEW.user_id, '')) ELSE 0 END;
    RETURN NEW;
END;
$$;

CREATE INDEX workflows_due_by_type_and_key_idx ON workflows (type, fair_key, priority, next_retry_at)
    WHERE state IN ('pending', 'running', 'compensating');
DROP INDEX workflows_due_by_type_idx;
