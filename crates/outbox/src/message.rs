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
    /// Starts an event: every part is named, none is positional.
    ///
    /// ```
    /// # use oncely_outbox::NewOutboxMessage;
    /// let event = NewOutboxMessage::builder()
    ///     .id("order.created.v1:ord-1") // the message id: stable per event
    ///     .aggregate("order", "ord-1") // its events go out in enqueue order
    ///     .event_type("order.created.v1") // the AMQP `type`, and the routing key by default
    ///     .exchange("order.events")
    ///     .payload(&serde_json::json!({"order_id": "ord-1"}))
    ///     .build()?;
    /// assert_eq!(event.routing_key, "order.created.v1");
    /// # Ok::<(), oncely_outbox::MessageError>(())
    /// ```
    pub fn builder() -> NewOutboxMessageBuilder {
        NewOutboxMessageBuilder::default()
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
    /// let event = NewOutboxMessage::builder()
    ///     .id("invoice.created.v1:ord-1")
    ///     .aggregate("invoice", "ord-1")
    ///     .event_type("invoice.created.v1")
    ///     .exchange("billing.events")
    ///     .payload(&serde_json::json!({}))
    ///     .build()?
    ///     .caused_by(&handled);
    /// assert_eq!(event.headers["correlation_id"], "req-42");
    /// assert_eq!(event.headers["causation_id"], "order.created.v1:ord-1");
    /// # Ok::<(), oncely_outbox::MessageError>(())
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

/// Builds a [`NewOutboxMessage`]; see [`NewOutboxMessage::builder`].
#[derive(Debug, Default)]
#[must_use = "call `build()` to get the message"]
pub struct NewOutboxMessageBuilder {
    id: Option<String>,
    aggregate: Option<(String, String)>,
    event_type: Option<String>,
    exchange: Option<String>,
    routing_key: Option<String>,
    payload: Option<Result<Value, serde_json::Error>>,
}

impl NewOutboxMessageBuilder {
    /// The message id: stable for this event, so a re-publish is recognised as a duplicate.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The aggregate the event belongs to: its kind (`order`) and id (`ord-1`). Events of one
    /// aggregate are published in enqueue order.
    pub fn aggregate(mut self, kind: impl Into<String>, id: impl Into<String>) -> Self {
        self.aggregate = Some((kind.into(), id.into()));
        self
    }

    /// The message type (`order.created.v1`), the AMQP `type` property.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// The exchange to publish to.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// The routing key; the event type when not set.
    pub fn routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_key = Some(routing_key.into());
        self
    }

    /// The body, serialised to JSON (a failure is reported by [`build`](Self::build)).
    pub fn payload(mut self, payload: &impl Serialize) -> Self {
        self.payload = Some(serde_json::to_value(payload));
        self
    }

    /// The event, with no headers yet: [`NewOutboxMessage::header`] adds them. Fails when a
    /// part other than the routing key is missing, or the payload does not serialise.
    pub fn build(self) -> Result<NewOutboxMessage, MessageError> {
        let id = self.id.ok_or(MessageError::Missing("id"))?;
        let (aggregate_type, aggregate_id) =
            self.aggregate.ok_or(MessageError::Missing("aggregate"))?;
        let event_type = self.event_type.ok_or(MessageError::Missing("event_type"))?;
        let exchange = self.exchange.ok_or(MessageError::Missing("exchange"))?;
        let payload = self.payload.ok_or(MessageError::Missing("payload"))??;
        Ok(NewOutboxMessage {
            id,
            aggregate_type,
            aggregate_id,
            routing_key: self.routing_key.unwrap_or_else(|| event_type.clone()),
            event_type,
            exchange,
            payload,
            headers: Value::Object(Map::new()),
        })
    }
}

/// Why [`NewOutboxMessageBuilder::build`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A required part was not given.
    #[error("outbox message without {0}")]
    Missing(&'static str),
    /// The payload does not serialise to JSON.
    #[error("outbox message payload is not JSON: {0}")]
    Payload(#[from] serde_json::Error),
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
