-- One invoice per order, whatever is redelivered: the unique order_id is the last line of
-- defence behind the inbox.
CREATE TABLE invoices (
    invoice_id   BIGSERIAL PRIMARY KEY,
    order_id     TEXT UNIQUE NOT NULL,
    customer_id  TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
