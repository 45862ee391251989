-- The workflow engine's schema: the seed's two tables with the columns a queue needs,
-- the append-only event log, the live-worker registry, and the idempotency functions
-- that a raw SQL insert and the Python API share.

CREATE TYPE workflow_state AS ENUM (
    'pending', 'running', 'completed', 'failed', 'cancelled', 'compensating', 'compensated'
);

CREATE TYPE step_state AS ENUM (
    'pending', 'running', 'completed', 'failed', 'skipped', 'compensating', 'compensated'
);

-- Canonical JSON text of a jsonb value, so that key order, white space and the spelling
-- of a number (1.0, 1e3, 1000) never change an idempotency key:
--   objects: keys sorted by code point (COLLATE "C" on UTF-8 bytes), no white space;
--   numbers: the numeric value with trailing fractional zeros trimmed, never an exponent;
--   strings, booleans, null: jsonb's own text form (the same escaping as Python's
--   json.dumps with ensure_ascii=False).
-- engine/idempotency.py reproduces it; a test proves the two agree on awkward inputs.
-- plpgsql rather than SQL because the function recurses.
CREATE FUNCTION workflow_canonical_json(value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    CASE jsonb_typeof(value)
    WHEN 'object' THEN
        RETURN '{' || coalesce(
            (SELECT string_agg(to_json(e.key)::text || ':' || workflow_canonical_json(e.value),
                               ',' ORDER BY e.key COLLATE "C")
               FROM jsonb_each(value) AS e),
            '') || '}';
    WHEN 'array' THEN
        RETURN '[' || coalesce(
            (SELECT string_agg(workflow_canonical_json(a.value), ',' ORDER BY a.position)
               FROM jsonb_array_elements(value) WITH ORDINALITY AS a(value, position)),
            '') || ']';
    WHEN 'number' THEN
        RETURN trim_scale(value::text::numeric)::text;
    ELSE
        RETURN value::text;
    END CASE;
END;
$$;

-- workflow:{type}:{user_id}:{sha256 of the canonical input}; a NULL user id counts as ''.
CREATE FUNCTION workflow_idempotency_key(workflow_type text, user_id text, input jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'workflow:' || workflow_type || ':' || coalesce(user_id, '') || ':'
        || encode(sha256(convert_to(workflow_canonical_json(coalesce(input, '{}'::jsonb)), 'UTF8')), 'hex')
$$;

-- step:{step_name}:{sha256 of the workflow key, a newline, and the canonical step input}.
-- The same key is handed to every attempt of the step, so an outside service can
-- deduplicate a call that a crash made us repeat.
CREATE FUNCTION workflow_step_idempotency_key(workflow_key text, step_name text, step_input jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'step:' || step_name || ':'
        || encode(sha256(convert_to(
               workflow_key || E'\n' || workflow_canonical_json(coalesce(step_input, '{}'::jsonb)),
               'UTF8')), 'hex')
$$;

CREATE TABLE workflows (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Filled in by workflows_before_insert when the caller gives none.
    idempotency_key       text NOT NULL,
    type                  text NOT NULL CHECK (type <> ''),
    state                 workflow_state NOT NULL DEFAULT 'pending',
    user_id               text,
    wallet_address        text,
    input                 jsonb NOT NULL DEFAULT '{}',
    output                jsonb,
    context               jsonb NOT NULL DEFAULT '{}',
    current_step_index    integer NOT NULL DEFAULT 0 CHECK (current_step_index >= 0),
    -- 0 until the definition is known: a row inserted by SQL learns it at its first claim.
    total_steps           integer NOT NULL DEFAULT 0 CHECK (total_steps >= 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    started_at            timestamptz,
    completed_at          timestamptz,
    retry_count           integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    max_retries           integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    requires_compensation boolean NOT NULL DEFAULT false,
    is_compensated        boolean NOT NULL DEFAULT false,
    error                 jsonb,
    -- The queue: when the row is next due, and who holds it until when.
    next_retry_at         timestamptz NOT NULL DEFAULT now(),
    locked_by             text,
    lease_expires_at      timestamptz,
    -- Fencing: every write of a claimed step's result must name the current token.
    lease_token           uuid,
    cancel_requested      boolean NOT NULL DEFAULT false,
    priority              smallint NOT NULL DEFAULT 0,
    CONSTRAINT workflows_idempotency_key_key UNIQUE (idempotency_key)
) WITH (fillfactor = 80);
-- fillfactor leaves room on each page so that updates of unindexed columns (state
-- columns, lease, output) stay HOT and do not touch the indexes.

-- The claim reads only this index: finished rows are not in it, so a million completed
-- workflows cost the claim nothing.
CREATE INDEX workflows_due_idx ON workflows (priority, next_retry_at)
    WHERE state IN ('pending', 'running', 'compensating');

-- Listing and the admin API filter by state and type, newest first.
CREATE INDEX workflows_state_type_created_idx ON workflows (state, type, created_at DESC);
CREATE INDEX workflows_user_id_idx ON workflows (user_id) WHERE user_id IS NOT NULL;

CREATE FUNCTION workflows_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key IS NULL THEN
        NEW.idempotency_key := workflow_idempotency_key(NEW.type, NEW.user_id, NEW.input);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER workflows_before_insert
    BEFORE INSERT ON workflows
    FOR EACH ROW EXECUTE FUNCTION workflows_before_insert();

-- One notification per statement, not per row: a bulk insert of 10,000 workflows wakes
-- the daemons once. The payload is empty: a daemon that wakes claims whatever is due.
CREATE FUNCTION workflows_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('workflowd', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER workflows_notify_insert
    AFTER INSERT ON workflows
    FOR EACH STATEMENT EXECUTE FUNCTION workflows_notify_insert();

CREATE TABLE workflow_steps (
    workflow_id           uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step_index            integer NOT NULL CHECK (step_index >= 0),
    step_name             text NOT NULL,
    state                 step_state NOT NULL DEFAULT 'pending',
    input                 jsonb,
    output                jsonb,
    config                jsonb NOT NULL DEFAULT '{}',
    retry_count           integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    max_retries           integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    requires_compensation boolean NOT NULL DEFAULT false,
    is_compensated        boolean NOT NULL DEFAULT false,
    is_idempotent         boolean NOT NULL DEFAULT true,
    idempotency_key       text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    started_at            timestamptz,
    completed_at          timestamptz,
    next_retry_at         timestamptz,
    error                 jsonb,
    attempt               integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Keyed by the workflow id first, so the table distributes with its workflow
    -- (Citus) and a workflow's steps sit together in the index.
    PRIMARY KEY (workflow_id, step_index)
) WITH (fillfactor = 80);

CREATE TABLE workflow_events (
    workflow_id  uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    id           bigint GENERATED ALWAYS AS IDENTITY,
    -- NULL for a transition of the workflow itself.
    step_index   integer,
    step_name    text,
    -- Text, not an enum: one log holds both workflow and step states.
    from_state   text,
    to_state     text NOT NULL,
    attempt      integer,
    worker_id    text,
    error        jsonb,
    at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, id)
);

CREATE TABLE workflow_workers (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    types         text[] NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);
