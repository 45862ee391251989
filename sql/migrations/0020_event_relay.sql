-- The timeline as an outbox: the relay (engine/relay.py) publishes every committed
-- workflow_events row to a message broker, in commit order, without a second write path.
--
-- An event's id is taken when it is inserted, not when it commits, so "every id above
-- the last one published" loses the event of a slow transaction that took a lower id and
-- committed later. The relay reads by transaction instead, as PgQ does: `tx` is the
-- inserting transaction's id (the top-level one, even inside a savepoint), and a batch
-- is the events whose transaction is visible in one snapshot but not in the previous one.
-- Visible means finished, so batches follow commit order, nothing is skipped, and a long
-- transaction delays only its own events.
--
-- Added without a default first, so that existing rows are not rewritten (they keep
-- NULL and are never published: the relay starts from the snapshot it takes when it
-- first runs); new rows get the default.
ALTER TABLE workflow_events ADD COLUMN tx xid8;
ALTER TABLE workflow_events ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
CREATE INDEX workflow_events_tx_idx ON workflow_events (tx);

-- Where each relay stands. One row per relay (`name`: the publisher's name, so that a
-- second broker would keep a cursor of its own), written only by the daemon holding the
-- relay's advisory lock, on the connection that holds it: a deposed leader's write fails
-- with its connection, so it can publish again but never move the cursor.
CREATE TABLE workflow_event_relays (
    name              text PRIMARY KEY,
    -- Every event whose transaction is visible in this snapshot is published.
    published         pg_snapshot NOT NULL,
    -- The batch being published: the events visible here and not in `published`.
    -- NULL between batches.
    batch             pg_snapshot,
    -- Within the batch, every event up to this id is published (the batch goes in id
    -- order, which within one workflow is the timeline's order).
    batch_through_id  bigint NOT NULL DEFAULT 0,
    published_count   bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The W3C trace context (`traceparent`) of whoever started the workflow, so that its
-- runs and step attempts, on any daemon, continue the caller's trace. NULL when the
-- starter was not traced; a SQL insert may set it by hand.
ALTER TABLE workflows ADD COLUMN traceparent text;
