//! An event to publish, and writing it inside the caller's transaction.

use crate::schema::outbox_message;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use oncely_core::{Metadata, headers};
use serde::Serialize;
use serde_json::{Map, Value};

/// An event to write to the outbox.
#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = outbox_message)]
pub struct NewOutboxMessage {
    /// The message id: stable for this event, so a re-publish is recognised as a duplicate.
    pub id: String,
    /// Kind of the aggregate the event belongs to (`order`).
    pub aggregate_type: String,
    /// The aggregate (`ord-1`). Events of one aggregate are published in enqueue order.
    pub aggregate_id: String,
    /// Message type (`order.created.v1`), the AMQP `type` property.
    pub event_type: String,
    /// Exchange to publish to.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// JSON body.
    pub payload: Value,
    /// Headers: strings, integers and booleans. `correlation_id` becomes the AMQP property.
    pub headers: Value,
}

impl NewOutboxMessage {
    /// An event with `payload` serialised to JSON and no headers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: &impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        Ok(NewOutboxMessage {
            id: id.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload: serde_json::to_value(payload)?,
            headers: Value::Object(Map::new()),
        })
    }

    /// Adds a header (e.g. `tenant_id`, `causation_id`, `correlation_id`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        if let Value::Object(map) = &mut self.headers {
            map.insert(name.into(), value.into());
        }
        self
    }

    /// Marks the event as caused by the handled message `cause`: its correlation id (or, when it
    /// has none, its message id), `causation_id` = its message id, and its W3C `traceparent`.
    /// Headers already set are kept. [`enqueue`] does this by itself inside a handler; call it
    /// when you enqueue from another task.
    ///
    /// ```
    /// # use oncely_outbox::NewOutboxMessage;
    /// # use oncely_core::Metadata;
    /// let mut handled = Metadata::with_message_id("order.created.v1:ord-1");
    /// handled.correlation_id = Some("req-42".into());
    /// let event = NewOutboxMessage::new("invoice.created.v1:ord-1", "invoice", "ord-1",
    ///     "invoice.created.v1", "billing.events", "invoice.created.v1", &serde_json::json!({}))?
    ///     .caused_by(&handled);
    /// assert_eq!(event.headers["correlation_id"], "req-42");
    /// assert_eq!(event.headers["causation_id"], "order.created.v1:ord-1");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn caused_by(mut self, cause: &Metadata) -> Self {
        if !self.headers.is_object() {
            self.headers = Value::Object(Map::new());
        }
        if let Value::Object(map) = &mut self.headers {
            let mut set = |name: &str, value: &str| {
                map.entry(name.to_owned())
                    .or_insert_with(|| Value::String(value.to_owned()));
            };
            set("correlation_id", cause.caused_correlation_id());
            set(headers::CAUSATION_ID, &cause.message_id);
            if let Some(traceparent) = &cause.traceparent {
                set(headers::TRACEPARENT, traceparent);
            }
        }
        self
    }
}

/// `message` marked as caused by the message the current task handles, if any.
fn stamped(message: &NewOutboxMessage) -> Option<NewOutboxMessage> {
    oncely_amqp::current_cause().map(|cause| message.clone().caused_by(&cause))
}

/// Writes `message` through `conn`, inside whatever transaction the caller has open: it commits
/// or rolls back with the business change. A second enqueue of the same id is a unique violation.
///
/// Inside a handler, the event is marked as caused by the handled message (see
/// [`NewOutboxMessage::caused_by`]).
pub async fn enqueue(conn: &mut AsyncPgConnection, message: &NewOutboxMessage) -> QueryResult<()> {
    let stamped = stamped(message);
    diesel::insert_into(outbox_message::table)
        .values(stamped.as_ref().unwrap_or(message))
        .execute(conn)
        .await
        .map(|_| ())
}

/// Writes several events in one statement, inside the caller's transaction; they keep their
/// order (per aggregate) as given.
pub async fn enqueue_many(
    conn: &mut AsyncPgConnection,
    messages: &[NewOutboxMessage],
) -> QueryResult<()> {
    let stamped: Option<Vec<NewOutboxMessage>> = messages.iter().map(stamped).collect();
    diesel::insert_into(outbox_message::table)
        .values(stamped.as_deref().unwrap_or(messages))
        .execute(conn)
        .await
        .map(|_| ())
}
