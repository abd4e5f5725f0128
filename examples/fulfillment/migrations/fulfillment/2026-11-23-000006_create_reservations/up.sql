-- One row per order whose stock fulfillment tried to reserve, written (and committed) BEFORE
-- the call to the inventory API, so a call whose response is lost is never forgotten.
CREATE TABLE reservation_operations (
    order_id        TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'succeeded', 'failed')),
    calls           INT NOT NULL DEFAULT 0,
    last_error      TEXT,
    reservation_id  TEXT,
    settled_by      TEXT CHECK (settled_by IN ('handler', 'reconciler')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX reservation_operations_pending
    ON reservation_operations (updated_at) WHERE status = 'pending';

-- The business effect: at most one reservation per order.
CREATE TABLE reservations (
    order_id       TEXT PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    sku            TEXT NOT NULL,
    quantity       INT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
