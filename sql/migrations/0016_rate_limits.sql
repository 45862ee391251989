-- Flow control: a fleet-wide rate limit on a type's step starts
-- (Workflow(rate_limit="10/s")): at most rate_limit starts in any stretch of
-- rate_period_seconds, across every daemon. Excess work stays due and is claimed later.
--
-- A rate of N per period is N rows of workflow_rate_tokens. A token spent at t may be
-- spent again from t + period on, so no window of one period holds more than N starts
-- (a sliding window, exact: a token bucket refilled continuously would let 2N through
-- in the period after an idle one). A claim locks tokens that may be spent (FOR UPDATE
-- SKIP LOCKED, the check made again on the newest row version once locked, so two
-- claimers never spend one token) and stamps one for each step it starts, in its own
-- transaction: a crash spends nothing, and nothing is refunded.
--
-- The override row of workflow_limits now holds each limit on its own: a flag says
-- which the operator set (`workflowd limits set TYPE --concurrency N` leaves the rate as
-- it holds). The rows written before this release set the concurrency only.
--
-- Expand only: new columns, a new table, the view's columns appended.
ALTER TABLE workflow_types
    ADD COLUMN rate_limit integer CHECK (rate_limit > 0),
    ADD COLUMN rate_period_seconds float8 CHECK (rate_period_seconds > 0),
    ADD CONSTRAINT workflow_types_rate_whole CHECK ((rate_limit IS NULL) = (rate_period_seconds IS NULL));

ALTER TABLE workflow_limits
    ADD COLUMN concurrency_set boolean NOT NULL DEFAULT true,
    ADD COLUMN rate_set boolean NOT NULL DEFAULT false,
    ADD COLUMN rate_limit integer CHECK (rate_limit > 0),
    ADD COLUMN rate_period_seconds float8 CHECK (rate_period_seconds > 0),
    ADD CONSTRAINT workflow_limits_rate_whole CHECK ((rate_limit IS NULL) = (rate_period_seconds IS NULL));

CREATE OR REPLACE VIEW workflow_type_limits AS
SELECT named.type,
       CASE WHEN o.concurrency_set THEN o.max_concurrency ELSE t.max_concurrency END AS max_concurrency,
       t.max_concurrency AS declared_max_concurrency,
       o.type IS NOT NULL AS overridden, o.set_by, o.set_at,
       CASE WHEN o.rate_set THEN o.rate_limit ELSE t.rate_limit END AS rate_limit,
       CASE WHEN o.rate_set THEN o.rate_period_seconds ELSE t.rate_period_seconds END AS rate_period_seconds,
       t.rate_limit AS declared_rate_limit, t.rate_period_seconds AS declared_rate_period_seconds
FROM (SELECT type FROM workflow_types UNION SELECT type FROM workflow_limits) named
LEFT JOIN workflow_types t ON t.type = named.type
LEFT JOIN workflow_limits o ON o.type = named.type;

CREATE TABLE workflow_rate_tokens (
    type      text NOT NULL,
    token     integer NOT NULL CHECK (token >= 0),
    spent_at  timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (type, token)
);
-- The claim takes the longest unspent tokens first, and stops at the first spent too
-- recently: a walk as long as the tokens it wants, however many the rate has.
CREATE INDEX workflow_rate_tokens_spent_idx ON workflow_rate_tokens (type, spent_at);
