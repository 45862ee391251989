-- Nonces of the accounts that sign deployments, so that deployments never double.
--
-- contract_deployment version 2 signs its transaction in one step and sends it in
-- another: the signed transaction is stored with the first step's output before
-- anything is sent, and a retried send re-sends those very bytes, which a node that
-- already has them answers with the same hash. The nonce is allocated here, in the
-- signing step's own transaction, so that deployments running at once from one account
-- never sign two transactions with the same nonce (each waits for the other's row lock)
-- and an allocation counts only if the signed transaction was stored with it.
--
-- Expand only: a new table, which the previous release never reads.
CREATE TABLE chain_nonces (
    chain_id   bigint NOT NULL,
    -- Lower-case hex, 0x-prefixed.
    address    text NOT NULL,
    -- The next nonce to sign with; the node's own count of the account's pending
    -- transactions wins when it is ahead (transactions sent by other tools).
    next_nonce bigint NOT NULL CHECK (next_nonce >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, address)
);
