-- One row per (consumer, message id) that a consumer has seen.
-- status 'processed' is written in the same transaction as the handler's business change;
-- 'failed' is written in a separate short transaction after a rolled-back attempt.
CREATE TABLE message_inbox (
    consumer_name TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('processing', 'processed', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 1,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at  TIMESTAMPTZ,
    error_code    TEXT,
    error_message TEXT,
    PRIMARY KEY (consumer_name, message_id)
);

-- Retention clean-up deletes processed rows by age.
CREATE INDEX message_inbox_processed_at_idx
    ON message_inbox (processed_at)
    WHERE status = 'processed';
