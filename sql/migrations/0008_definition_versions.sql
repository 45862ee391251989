-- Definition versions, for rolling upgrades with workflows in flight.
--
-- A workflow runs under one version of its type's definition, recorded in `version` when
-- it is started through the API or the CLI (the newest version the starting side knows),
-- or at its first claim when a SQL insert left it NULL (the newest version the claiming
-- daemon serves). A daemon claims only the versions it serves, so a renamed, inserted or
-- reordered step never meets a workflow started under another version.
--
-- Expand only: both columns are nullable without a default (adding them rewrites no row)
-- and nothing the previous release reads or writes changes, so its daemons keep working
-- beside the new ones while a fleet is upgraded.
ALTER TABLE workflows ADD COLUMN version integer;
ALTER TABLE workflows ADD CONSTRAINT workflows_version_is_positive CHECK (version >= 1) NOT VALID;

-- What a worker serves, as served keys (workflow_served_key): `type` for workflows with
-- no version yet, `type@N` for version N. NULL for a worker of the previous release,
-- which serves every version of its `types`.
ALTER TABLE workflow_workers ADD COLUMN served text[];

-- The version a workflow runs under: its own; or, for one the previous release first
-- claimed (its steps made, its version not recorded: started_at is set), version 1, the
-- only one that release knew; or none yet (NULL): the claimer's newest.
CREATE FUNCTION workflow_run_version(version integer, started_at timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(version, CASE WHEN started_at IS NOT NULL THEN 1 END)
$$;

-- One home for the served key: the claim, the unserved-work report and the workers'
-- registrations build it here; engine/registry.py served_key is the Python twin, and a
-- test compares the two.
CREATE FUNCTION workflow_served_key(type text, version integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN version IS NULL THEN type ELSE type || '@' || version END
$$;
