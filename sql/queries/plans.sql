-- The hot path's plans: the same whatever the statistics say.
-- Queries, in this order:
--   pin_hot_plans
--   unpin_hot_plans
--   pin_counting_plans
-- Each is a named block, without parameters. pin_hot_plans is one statement
-- (set_config, not SET), so that it can travel in a pipeline with the statement after it.

-- name: pin_hot_plans
-- Every statement the worker runs finds its rows through an index (a batch of ids, a
-- workflow's steps, the due index in order), and a nested loop of index lookups is the
-- right plan for it at any table size. The planner does not always see that: idle
-- daemons on a nearly empty table cache generic plans (psycopg prepares a statement on
-- its fifth run) that seq-scan workflows and workflow_steps and hash-join them against
-- the batch, and a burst of 20,000 rows then makes each batch read the whole table,
-- until autovacuum analyzes it a minute later (a drain 2-20x slower). Without sequential
-- scans, hash joins and merge joins, index lookups are the only plans left, whatever the
-- statistics and whatever the table held when the plan was made. The worker's sessions
-- set these once, when the pool opens them (daemon/process.py); the claim also turns off
-- bitmap scans and sorts in its own transaction (claiming_transaction). Nothing the
-- worker runs needs a scan of a whole table: tests/integration/test_plans.py proves each
-- hot statement's cached plan after the tables were analyzed nearly empty. One more
-- trap the pins cannot close: a workflow fetched by id whose state is also checked may
-- be looked for through the listing index on state, which the statistics of an empty
-- table make look as cheap as the primary key; those statements compare `state::text`,
-- which no index holds, so that only the primary key can find the row.
-- And generic plans always: under the pins a generic plan is as good as a custom one,
-- but the planner, seeing an unnest of a parameter as 10 rows where a custom plan sees
-- the real length, would judge the generic plan of create_steps too dear and plan it
-- again on every run (about 0.5 ms each, a fifth of an idle claim's time).
-- And no JIT: a plan node the pins disable still runs where nothing else can (the
-- sorts of a limited claim's window functions, under claiming_transaction), priced at
-- 10^10, which takes the statement over jit_above_cost; it was then compiled on every
-- run (40 ms each, a limited type's drain at half the speed of an unlimited one's).
SELECT set_config('enable_seqscan', 'off', false), set_config('enable_hashjoin', 'off', false),
       set_config('enable_mergejoin', 'off', false), set_config('plan_cache_mode', 'force_generic_plan', false),
       set_config('jit', 'off', false)

-- name: unpin_hot_plans
-- A transactional step's own SQL plans as the database is configured, not under the
-- worker's pins: its transaction opens with this, and runs pin_hot_plans again, in one
-- round trip with the engine's completion, before that completion plans in it (a
-- session-wide setting made in a transaction outlives it when it commits; when it rolls
-- back, the session is back to the pins anyway).
SET LOCAL enable_seqscan TO DEFAULT;
SET LOCAL enable_hashjoin TO DEFAULT;
SET LOCAL enable_mergejoin TO DEFAULT;
SET LOCAL plan_cache_mode TO DEFAULT;
SET LOCAL jit TO DEFAULT

-- name: pin_counting_plans
-- The count of stats (count_all_by_type_and_state) in its transaction: its part for the
-- workflows finished since the last recount compares completed_at with a time the
-- planner cannot see (a column of another table), guesses a third of the table, and on
-- ten million rows read them all (3.3 s, JIT compiling included) where
-- workflows_finished_idx finds the few finished since in a millisecond. Without
-- sequential scans the index is the plan; without JIT and parallel workers, no compile
-- and no worker start (5 ms) are paid for a guess. Local to the transaction.
SELECT set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true),
       set_config('max_parallel_workers_per_gather', '0', true)
