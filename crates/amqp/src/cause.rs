//! The message being handled, as the cause of the messages published while handling it.
//!
//! The consumer runtime runs each handler inside [`with_cause`]; every publish made from that
//! task through a [`crate::ConfirmPublisher`] (or [`crate::Publisher`]) then carries the handled
//! message's correlation id, its message id as `causation_id` and its W3C `traceparent`, unless
//! the publisher set them itself. Work spawned onto other tasks leaves the scope: use
//! [`caused_by`] there.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString, ShortString};
use oncely_core::{Metadata, headers};
use std::future::Future;

tokio::task_local! {
    static CAUSE: Metadata;
}

/// Runs `work` with `cause` as the message being handled.
pub async fn with_cause<F: Future>(cause: Metadata, work: F) -> F::Output {
    CAUSE.scope(cause, work).await
}

/// The message being handled by the current task, if any.
pub fn current_cause() -> Option<Metadata> {
    CAUSE.try_with(Metadata::clone).ok()
}

/// `properties` of a message caused by `cause`: correlation id (the cause's, or its message id
/// when it has none), `causation_id` header (the cause's message id) and `traceparent` header
/// (copied when the cause has one). Values the properties already hold are kept.
///
/// ```
/// use oncely_amqp::{caused_by, lapin::BasicProperties};
/// use oncely_core::Metadata;
/// let mut cause = Metadata::with_message_id("m-1");
/// cause.correlation_id = Some("c-1".into());
/// let p = caused_by(BasicProperties::default(), &cause);
/// assert_eq!(p.correlation_id().as_ref().map(|c| c.as_str()), Some("c-1"));
/// ```
pub fn caused_by(properties: BasicProperties, cause: &Metadata) -> BasicProperties {
    let mut properties = properties;
    if properties.correlation_id().is_none()
        && let Ok(id) = ShortString::try_new(cause.caused_correlation_id().to_owned())
    {
        properties = properties.with_correlation_id(id);
    }
    let mut table = properties.headers().clone().unwrap_or_default();
    let mut add = |name: &str, value: &str| {
        if !table.inner().contains_key(name) {
            table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
    };
    add(headers::CAUSATION_ID, &cause.message_id);
    if let Some(traceparent) = &cause.traceparent {
        add(headers::TRACEPARENT, traceparent);
    }
    properties.with_headers(table)
}

/// [`caused_by`] with the current task's cause, if any.
pub(crate) fn stamp(properties: BasicProperties) -> BasicProperties {
    match CAUSE.try_with(|cause| caused_by(properties.clone(), cause)) {
        Ok(stamped) => stamped,
        Err(_) => properties,
    }
}
