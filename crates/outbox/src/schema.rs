//! Diesel schema of the outbox table (kept in step with `migrations/outbox`).

diesel::table! {
    outbox_message (id) {
        id -> Text,
        seq -> Int8,
        aggregate_type -> Text,
        aggregate_id -> Text,
        event_type -> Text,
        exchange -> Text,
        routing_key -> Text,
        payload -> Jsonb,
        headers -> Jsonb,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        publish_attempts -> Int4,
        last_error -> Nullable<Text>,
        next_attempt_at -> Timestamptz,
    }
}
