-- A stable id for every step row, as the seed's schema has (`workflow_steps.id uuid`),
-- so that tools written against the seed's schema find a step by it.
--
-- The composite primary key (workflow_id, step_index) stays: the engine reads a
-- workflow's steps together, and that key keeps them together in its index. The id is
-- an extra unique column, filled by its default when a step row is made.
--
-- Expand only, and quick on a large table: the column is added without a default
-- (adding one that is volatile would rewrite every row), the default is set for new
-- rows afterwards, and the unique index is built over NULLs for the rows already there.
-- Those keep a NULL id: `UPDATE workflow_steps SET id = gen_random_uuid() WHERE id IS
-- NULL` gives them one, in batches, at a time of the operator's choosing.
ALTER TABLE workflow_steps ADD COLUMN id uuid;
ALTER TABLE workflow_steps ALTER COLUMN id SET DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX workflow_steps_id_key ON workflow_steps (id);
