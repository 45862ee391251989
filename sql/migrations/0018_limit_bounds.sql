-- The bounds of the limits are the engine's (engine/limits.py), held by the database too
-- for the rows an operator writes by hand: a concurrency limit of two billion would have
-- the daemons make two billion slots, a rate of two billion as many tokens. The tables
-- hold a row per type: validating them takes no time.
ALTER TABLE workflow_types
    ADD CONSTRAINT workflow_types_max_concurrency_at_most_a_million CHECK (max_concurrency <= 1000000),
    ADD CONSTRAINT workflow_types_rate_limit_at_most_100000 CHECK (rate_limit <= 100000),
    ADD CONSTRAINT workflow_types_rate_period_a_second_to_a_day CHECK (rate_period_seconds BETWEEN 1 AND 86400);

ALTER TABLE workflow_limits
    ADD CONSTRAINT workflow_limits_max_concurrency_at_most_a_million CHECK (max_concurrency <= 1000000),
    ADD CONSTRAINT workflow_limits_rate_limit_at_most_100000 CHECK (rate_limit <= 100000),
    ADD CONSTRAINT workflow_limits_rate_period_a_second_to_a_day CHECK (rate_period_seconds BETWEEN 1 AND 86400);
