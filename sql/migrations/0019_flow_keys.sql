-- Flow control costs nothing to the types it does not control. Until now every runnable
-- row was in workflows_due_by_type_and_key_idx, which only the claim of limited and fair
-- types reads: one more index entry at each insert, claim and retry of every workflow,
-- most of the 14 % that unlimited drains had lost (README, Figures, flow control).
--
-- Now a row's fair_key is NULL unless its type is flow-controlled (a concurrency limit,
-- a rate or fair_by, declared or set: workflow_type_limits), and the index holds only
-- rows with a key. The key follows the type's rule (workflow_flow_key): NULL without
-- flow control, the user's hash for a fair type, 0 for any other limited type.
--
-- A row gets its key when it is inserted, or reopened (a retry or a compensation of a
-- finished workflow). When a type's rule changes (a daemon declares a new definition, an
-- operator sets or resets a limit), a trigger files a request in workflow_flow_rekeys
-- and the daemons give the type's unfinished rows their new key (engine/flow.py, rekey):
-- straight away, and once more when every transaction running then has ended.
-- A writer that read the old rule has an xid by then (the key's triggers take one before
-- they read), so the second pass finds its row committed. Nothing waits on a lock for
-- this, and no writer is slowed (docs/architecture.md, 2.6).
--
-- Expand only, but for the index, replaced by its narrower self: the previous release's
-- fair claim still finds its rows through it; its claim of other limited types, which
-- does not say fair_key IS NOT NULL, reads another index while a fleet is upgraded.
ALTER TABLE workflows ALTER COLUMN fair_key DROP NOT NULL, ALTER COLUMN fair_key DROP DEFAULT;

-- The key a row of a type with these limits gets: one home for the rule.
CREATE FUNCTION workflow_flow_key(max_concurrency integer, rate_limit integer, fair_by text, user_id text)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN fair_by = 'user_id' THEN hashtext(coalesce(user_id, ''))
                WHEN max_concurrency IS NOT NULL OR rate_limit IS NOT NULL THEN 0 END
$$;

CREATE TABLE workflow_flow_rekeys (
    type             text PRIMARY KEY,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    -- The snapshot taken when the first pass began: the last pass waits until every
    -- transaction running in it has ended.
    horizon          pg_snapshot,
    first_pass_done  boolean NOT NULL DEFAULT false
);

-- The view gains each type's declared priority, so that the before-insert trigger reads
-- what it needs of a type in one lookup.
CREATE OR REPLACE VIEW workflow_type_limits AS
SELECT named.type,
       CASE WHEN o.concurrency_set THEN o.max_concurrency ELSE t.max_concurrency END AS max_concurrency,
       t.max_concurrency AS declared_max_concurrency,
       o.type IS NOT NULL AS overridden, o.set_by, o.set_at,
       CASE WHEN o.rate_set THEN o.rate_limit ELSE t.rate_limit END AS rate_limit,
       CASE WHEN o.rate_set THEN o.rate_period_seconds ELSE t.rate_period_seconds END AS rate_period_seconds,
       t.rate_limit AS declared_rate_limit, t.rate_period_seconds AS declared_rate_period_seconds,
       t.fair_by, t.priority
FROM (SELECT type FROM workflow_types UNION SELECT type FROM workflow_limits) named
LEFT JOIN workflow_types t ON t.type = named.type
LEFT JOIN workflow_limits o ON o.type = named.type;

CREATE OR REPLACE FUNCTION workflows_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    declared workflow_type_limits%ROWTYPE;
BEGIN
    IF NEW.idempotency_key IS NULL THEN
        NEW.idempotency_key := workflow_idempotency_key(NEW.type, NEW.user_id, NEW.input);
    END IF;
    PERFORM pg_current_xact_id();  -- before the rule is read (see above)
    SELECT * INTO declared FROM workflow_type_limits WHERE type = NEW.type;
    NEW.priority := coalesce(NEW.priority, declared.priority, 0);
    NEW.fair_key := workflow_flow_key(declared.max_concurrency, declared.rate_limit, declared.fair_by, NEW.user_id);
    RETURN NEW;
END;
$$;

CREATE FUNCTION workflows_before_reopen() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    NEW.fair_key := (SELECT workflow_flow_key(l.max_concurrency, l.rate_limit, l.fair_by, NEW.user_id)
                     FROM workflow_type_limits l WHERE l.type = NEW.type);
    RETURN NEW;
END;
$$;

-- Only a finished workflow made runnable again: no other update calls it.
CREATE TRIGGER workflows_before_reopen
    BEFORE UPDATE OF state ON workflows
    FOR EACH ROW
    WHEN (OLD.state NOT IN ('pending', 'running', 'compensating')
          AND NEW.state IN ('pending', 'running', 'compensating'))
    EXECUTE FUNCTION workflows_before_reopen();

CREATE FUNCTION workflow_flow_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO workflow_flow_rekeys (type) VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.type ELSE NEW.type END)
    ON CONFLICT (type) DO UPDATE SET requested_at = now(), horizon = NULL, first_pass_done = false;
    RETURN NULL;
END;
$$;

CREATE TRIGGER workflow_types_flow_declared
    AFTER INSERT ON workflow_types
    FOR EACH ROW
    WHEN (NEW.max_concurrency IS NOT NULL OR NEW.rate_limit IS NOT NULL OR NEW.fair_by IS NOT NULL)
    EXECUTE FUNCTION workflow_flow_changed();

CREATE TRIGGER workflow_types_flow_changed
    AFTER UPDATE ON workflow_types
    FOR EACH ROW
    WHEN ((OLD.max_concurrency IS NULL AND OLD.rate_limit IS NULL, OLD.fair_by)
          IS DISTINCT FROM (NEW.max_concurrency IS NULL AND NEW.rate_limit IS NULL, NEW.fair_by))
    EXECUTE FUNCTION workflow_flow_changed();

CREATE TRIGGER workflow_limits_flow_set
    AFTER INSERT OR DELETE ON workflow_limits
    FOR EACH ROW EXECUTE FUNCTION workflow_flow_changed();

CREATE TRIGGER workflow_limits_flow_changed
    AFTER UPDATE ON workflow_limits
    FOR EACH ROW
    WHEN ((OLD.concurrency_set, OLD.max_concurrency IS NULL, OLD.rate_set, OLD.rate_limit IS NULL)
          IS DISTINCT FROM (NEW.concurrency_set, NEW.max_concurrency IS NULL, NEW.rate_set, NEW.rate_limit IS NULL))
    EXECUTE FUNCTION workflow_flow_changed();

CREATE INDEX workflows_due_flow_controlled_idx ON workflows (type, fair_key, priority, next_retry_at)
    WHERE state IN ('pending', 'running', 'compensating') AND fair_key IS NOT NULL;
DROP INDEX workflows_due_by_type_and_key_idx;

-- Every declared type's rows get the key of its rule (rows of types without flow control
-- leave the index as the daemons get to them).
INSERT INTO workflow_flow_rekeys (type) SELECT type FROM workflow_types UNION SELECT type FROM workflow_limits;
