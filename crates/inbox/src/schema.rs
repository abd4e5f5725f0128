//! Diesel schema of the inbox table, kept in step with `migrations/inbox` by a test.

diesel::table! {
    /// One row per (consumer, message id) seen.
    message_inbox (consumer_name, message_id) {
        /// Consumer that handled the message.
        consumer_name -> Text,
        /// Producer-generated message id.
        message_id -> Text,
        /// `processed` or `failed` (`processing` is reserved).
        status -> Text,
        /// How many times the handler ran for this message.
        attempts -> Int4,
        /// When the message was first seen.
        received_at -> Timestamptz,
        /// When the processing transaction committed.
        processed_at -> Nullable<Timestamptz>,
        /// Code of the last failure.
        error_code -> Nullable<Text>,
        /// Text of the last failure.
        error_message -> Nullable<Text>,
    }
}
