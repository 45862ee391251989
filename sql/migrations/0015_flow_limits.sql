-- Flow control: a fleet-wide limit on how many workflows of a type hold a lease at once
-- (Workflow(max_concurrency=N)), enforced by the claim across every daemon.
--
-- A type's limit comes from its definition, which each daemon declares in
-- workflow_types when it registers, unless an operator set one at run time in
-- workflow_limits (`workflowd limits set`, /admin/limits): a row there is the operator's
-- word on that type, and its NULL means no limit. workflow_type_limits is what holds.
--
-- A limit of N is N rows of workflow_slots. A slot is held while the workflow it names
-- still holds the lease that took it (same lease_token): every release of a lease (a
-- finish, a snooze, a failure, a shutdown, a lease taken over) frees the slot without
-- a write of its own, so no path of the engine can leak one and no reaper is needed. A
-- slot is taken in the claim's transaction after it was locked (FOR UPDATE SKIP LOCKED:
-- claimers skip each other's) and found free in a later statement's snapshot, so two
-- claimers never take one slot (docs/architecture.md, 2.6).
--
-- Expand only: new columns, tables and a view, which the previous release never reads.
-- Its daemons claim limited types without limits while a fleet is upgraded.
ALTER TABLE workflow_types
    ADD COLUMN max_concurrency integer CHECK (max_concurrency > 0);

CREATE TABLE workflow_limits (
    type             text PRIMARY KEY,
    max_concurrency  integer CHECK (max_concurrency > 0),
    set_by           text,
    set_at           timestamptz NOT NULL DEFAULT now()
);

-- Every type named in either table, each looked up in both by its key (not a FULL JOIN,
-- which only a hash or merge join can run: the claim's pinned plans have neither).
CREATE VIEW workflow_type_limits AS
SELECT named.type,
       CASE WHEN o.type IS NULL THEN t.max_concurrency ELSE o.max_concurrency END AS max_concurrency,
       t.max_concurrency AS declared_max_concurrency,
       o.type IS NOT NULL AS overridden, o.set_by, o.set_at
FROM (SELECT type FROM workflow_types UNION SELECT type FROM workflow_limits) named
LEFT JOIN workflow_types t ON t.type = named.type
LEFT JOIN workflow_limits o ON o.type = named.type;

CREATE TABLE workflow_slots (
    type         text NOT NULL,
    slot         integer NOT NULL CHECK (slot >= 0),
    workflow_id  uuid,
    lease_token  uuid,
    PRIMARY KEY (type, slot)
) WITH (fillfactor = 50);
-- fillfactor: taking a slot updates unindexed columns only, which stays HOT.

-- A limited type's due work, in claim order: the claim of a limited type looks for its
-- own rows, which the due index, ordered across types, would find only by walking past
-- every due row of other types ahead of them.
CREATE INDEX workflows_due_by_type_idx ON workflows (type, priority, next_retry_at)
    WHERE state IN ('pending', 'running', 'compensating');
