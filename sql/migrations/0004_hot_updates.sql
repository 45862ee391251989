-- Room on every page for HOT updates. A workflow row gets a new version at each
-- transition, and its step rows at each attempt; an update that changes no indexed
-- column (a workflow's shape, going straight on to the next step, every step-row
-- update) is HOT only if the new version fits on the same page. Measured with 5,000
-- three-step workflows drained by two daemons: at fillfactor 80, 28 % of the workflow
-- updates and 64 % of the step updates were HOT; at 50, 43 % (of at most 60 %: a claim
-- and a completion change indexed columns) and 98 %. Applies to pages written from now
-- on; VACUUM FULL or pg_repack rewrites older ones.
ALTER TABLE workflows SET (fillfactor = 50);
ALTER TABLE workflow_steps SET (fillfactor = 50);
