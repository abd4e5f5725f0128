-- The simulated external inventory API's own storage: one reservation per Idempotency-Key.
CREATE TABLE inventory_api_reservations (
    idempotency_key TEXT PRIMARY KEY,
    reservation_id  TEXT NOT NULL UNIQUE,
    order_id        TEXT NOT NULL,
    sku             TEXT NOT NULL,
    quantity        INT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX inventory_api_reservations_order ON inventory_api_reservations (order_id);
