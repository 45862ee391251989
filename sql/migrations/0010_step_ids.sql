-- A stable id for every step row, as the seed's schema has (`workflow_steps.id uuid`),
-- so that tools written against the seed's schema find a step by it; and time-ordered
-- ids for new workflows and steps.
--
-- The composite primary key (workflow_id, step_index) stays: the engine reads a
-- workflow's steps together, and that key keeps them together in its index. The id is
-- an extra unique column, filled by its default when a step row is made.
--
-- Ids are UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits. A random
-- (v4) id puts each new workflow, its step rows and its timeline rows on a random page
-- of every index keyed by it, and on a table of millions of rows each of those pages is
-- written in full to the WAL the first time it is touched after a checkpoint; a
-- time-ordered id keeps the new rows together at the end of those indexes. Measured on
-- 100,000 one-step workflows drained beside 1,000,000 finished ones: +26 % workflows/s
-- (bench: large_tables). PostgreSQL 18 has uuidv7(); this function works on 15 and up.
-- The ids say when a workflow was created, to the millisecond; the 74 random bits
-- keep them unguessable.
--
-- Expand only, and quick on a large table: the column is added without a default
-- (adding one that is volatile would rewrite every row), the defaults are set for new
-- rows afterwards, and the unique index is built over NULLs for the rows already there.
-- Those keep a NULL id: `UPDATE workflow_steps SET id = workflow_uuid_v7() WHERE id IS
-- NULL` gives them one, in batches, at a time of the operator's choosing.
CREATE FUNCTION workflow_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    -- A random (v4) uuid with its first 6 bytes replaced by the milliseconds, and its
    -- version nibble turned from 4 (0100) into 7 (0111); the variant bits stay.
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

ALTER TABLE workflows ALTER COLUMN id SET DEFAULT workflow_uuid_v7();

ALTER TABLE workflow_steps ADD COLUMN id uuid;
ALTER TABLE workflow_steps ALTER COLUMN id SET DEFAULT workflow_uuid_v7();
CREATE UNIQUE INDEX workflow_steps_id_key ON workflow_steps (id);
