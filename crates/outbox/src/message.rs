//! An event to publish, and writing it inside the caller's transaction.

use crate::schema::outbox_message;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
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
}

/// Writes `message` through `conn`, inside whatever transaction the caller has open: it commits
/// or rolls back with the business change. A second enqueue of the same id is a unique violation.
pub async fn enqueue(conn: &mut AsyncPgConnection, message: &NewOutboxMessage) -> QueryResult<()> {
    diesel::insert_into(outbox_message::table)
        .values(message)
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
    diesel::insert_into(outbox_message::table)
        .values(messages)
        .execute(conn)
        .await
        .map(|_| ())
}
