-- Events written in the same transaction as the business change, published by the relay.
CREATE TABLE outbox_message (
    id               TEXT PRIMARY KEY,  -- the message id consumers deduplicate on
    seq              BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,  -- enqueue order
    aggregate_type   TEXT NOT NULL,
    aggregate_id     TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    exchange         TEXT NOT NULL,
    routing_key      TEXT NOT NULL,
    payload          JSONB NOT NULL,
    headers          JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at     TIMESTAMPTZ,
    publish_attempts INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The relay's claim: heads of each aggregate's unpublished events, due first.
CREATE INDEX outbox_message_unpublished_idx
    ON outbox_message (aggregate_type, aggregate_id, seq) WHERE published_at IS NULL;
-- Walks pending rows in order without stepping over the published ones kept for retention.
CREATE INDEX outbox_message_pending_seq_idx
    ON outbox_message (seq) WHERE published_at IS NULL;
-- Retention clean-up.
CREATE INDEX outbox_message_published_at_idx
    ON outbox_message (published_at) WHERE published_at IS NOT NULL;

-- Wakes relays (LISTEN oncely_outbox) when events are committed.
CREATE FUNCTION oncely_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('oncely_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_message_notify
    AFTER INSERT ON outbox_message
    FOR EACH STATEMENT EXECUTE FUNCTION oncely_outbox_notify();
