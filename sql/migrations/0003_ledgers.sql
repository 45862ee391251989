-- The built-in workflow types keep their books in the same database, written by
-- transactional steps, so each entry commits exactly once with the step that makes it.

-- Positions per user and token; every change is a movement, one per (workflow, step, kind).
CREATE TABLE portfolio_positions (
    user_id    text NOT NULL,
    token      text NOT NULL,
    amount     numeric NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, token)
);

CREATE TABLE portfolio_movements (
    workflow_id uuid NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('trade', 'reversal')),
    user_id     text NOT NULL,
    token       text NOT NULL,
    delta       numeric NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, kind, token)
);

-- One grant per workflow; a compensation revokes it.
CREATE TABLE reward_grants (
    workflow_id uuid PRIMARY KEY,
    user_id     text NOT NULL,
    amount      numeric NOT NULL CHECK (amount > 0),
    reason      text NOT NULL,
    status      text NOT NULL DEFAULT 'granted' CHECK (status IN ('granted', 'revoked')),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- What the indexing workflows record.
CREATE TABLE indexed_contracts (
    address          text PRIMARY KEY,
    name             text NOT NULL,
    transaction_hash text NOT NULL,
    block_number     bigint NOT NULL,
    workflow_id      uuid NOT NULL,
    indexed_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE indexed_events (
    block_number     bigint NOT NULL,
    log_index        integer NOT NULL,
    transaction_hash text NOT NULL,
    address          text NOT NULL,
    data             text NOT NULL,
    PRIMARY KEY (block_number, log_index)
);
