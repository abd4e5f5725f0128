-- Every event audit has seen, once.
CREATE TABLE audit_events (
    message_id  TEXT PRIMARY KEY,
    event_type  TEXT,
    order_id    TEXT,
    payload     JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
