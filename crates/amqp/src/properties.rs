//! From AMQP properties and headers to the contract's [`RawMetadata`], and back for copies.

use crate::transport::{INVALID_UTF8_HEADER, UNREADABLE_HEADERS_HEADER};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use oncely_core::{HeaderValue, RawMetadata, Reason, headers};

const CONTRACT_HEADERS: [&str; 5] = [
    headers::CAUSATION_ID,
    headers::TENANT_ID,
    headers::IDEMPOTENCY_KEY,
    headers::ATTEMPT,
    headers::TRACEPARENT,
];

/// Longest reason text written to a header.
const MAX_REASON_CHARS: usize = 1000;

/// Reads what the contract needs from a delivery's properties.
pub fn raw_metadata(
    properties: &BasicProperties,
    redelivered: bool,
    body_len: usize,
) -> RawMetadata {
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    let headers = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(name, _)| CONTRACT_HEADERS.contains(&name.as_str()))
                .map(|(name, value)| (name.as_str().to_owned(), header_value(value)))
                .collect()
        })
        .unwrap_or_default();
    RawMetadata {
        message_id: text(properties.message_id()),
        correlation_id: text(properties.correlation_id()),
        content_type: text(properties.content_type()),
        app_id: text(properties.app_id()),
        message_type: text(properties.kind()),
        timestamp: *properties.timestamp(),
        headers,
        redelivered,
        body_len,
        invalid_utf8: invalid_utf8_fields(properties),
        delivery_count: read_delivery_count(properties),
        unreadable_headers: properties
            .headers()
            .as_ref()
            .is_some_and(|t| t.inner().contains_key(UNREADABLE_HEADERS_HEADER)),
    }
}

/// The fields the transport found not to be UTF-8 (see [`crate::open_connection`]): the names
/// in its marker table. A marker of another shape (set by a producer) still counts, as
/// `x-oncely-invalid-utf8`, so that it cannot slip past the contract.
fn invalid_utf8_fields(properties: &BasicProperties) -> Vec<String> {
    match properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(INVALID_UTF8_HEADER))
    {
        None => Vec::new(),
        Some(AMQPValue::FieldTable(marks)) if !marks.inner().is_empty() => marks
            .inner()
            .keys()
            .map(|name| name.as_str().to_owned())
            .collect(),
        Some(_) => vec![INVALID_UTF8_HEADER.to_owned()],
    }
}

/// The broker's `x-delivery-count` header (quorum queues, from the second delivery on): how
/// many times the message was handed out before. Any integer type is read; anything else is
/// taken as absent.
pub fn read_delivery_count(properties: &BasicProperties) -> Option<u64> {
    properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(DELIVERY_COUNT))
        .and_then(|v| match header_value(v) {
            HeaderValue::Integer(n) => u64::try_from(n).ok(),
            _ => None,
        })
}

/// The header a quorum queue counts earlier deliveries in.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// The `x-oncely-attempt` header as a number, 1 when absent or unreadable.
pub fn read_attempt(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(headers::ATTEMPT))
        .and_then(|v| match header_value(v) {
            HeaderValue::Integer(n) => u32::try_from(n).ok(),
            _ => None,
        })
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

fn header_value(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::Text(text.to_owned()),
            Err(_) => HeaderValue::Other("non-UTF-8 string"),
        },
        AMQPValue::ShortShortInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::ShortInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::ShortUInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::LongInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::LongUInt(n) => HeaderValue::Integer(i64::from(*n)),
        AMQPValue::LongLongInt(n) => HeaderValue::Integer(*n),
        AMQPValue::Boolean(_) => HeaderValue::Other("boolean"),
        AMQPValue::Float(_) | AMQPValue::Double(_) => HeaderValue::Other("float"),
        AMQPValue::DecimalValue(_) => HeaderValue::Other("decimal"),
        AMQPValue::FieldArray(_) => HeaderValue::Other("array"),
        AMQPValue::Timestamp(_) => HeaderValue::Other("timestamp"),
        AMQPValue::FieldTable(_) => HeaderValue::Other("table"),
        AMQPValue::ByteArray(_) => HeaderValue::Other("bytes"),
        AMQPValue::Void => HeaderValue::Other("void"),
    }
}

/// Where a copy goes and what it says about its failure.
pub(crate) struct CopyHeaders<'a> {
    pub attempt: u32,
    pub reason: &'a Reason,
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Dead letters and parked messages carry the time of failure; retries do not need it.
    pub final_copy: bool,
}

/// The original's headers without the broker's `x-delivery-count`: that count belongs to the
/// original's life in its queue, and a copy that kept it would come back (from a delay queue, a
/// DLQ replay, a republish of a held message) already at oncely's delivery limit.
pub fn headers_without_delivery_count(original: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in original.headers().iter().flat_map(|t| t.inner()) {
        if name.as_str() != DELIVERY_COUNT {
            table.insert(name.clone(), value.clone());
        }
    }
    table
}

/// The original's properties unchanged but for the broker's delivery count: a held message
/// republished to its queue's tail is the same message, starting its count afresh.
pub(crate) fn republish_properties(original: &BasicProperties) -> BasicProperties {
    original
        .clone()
        .with_headers(headers_without_delivery_count(original))
}

/// The original's properties (same message id and everything else) with oncely's headers.
pub(crate) fn copy_properties(original: &BasicProperties, h: CopyHeaders<'_>) -> BasicProperties {
    let mut table = headers_without_delivery_count(original);
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    table.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(h.attempt)),
    );
    table.insert(headers::ERROR_CODE.into(), long(&h.reason.code));
    let reason: String = h.reason.message.chars().take(MAX_REASON_CHARS).collect();
    table.insert(headers::REASON.into(), long(&reason));
    table.insert(headers::ORIGINAL_QUEUE.into(), long(h.queue));
    if !table.inner().contains_key(headers::ORIGINAL_EXCHANGE) {
        table.insert(headers::ORIGINAL_EXCHANGE.into(), long(h.exchange));
        table.insert(headers::ORIGINAL_ROUTING_KEY.into(), long(h.routing_key));
    }
    if h.final_copy {
        table.insert(
            headers::FAILED_AT.into(),
            long(&chrono::Utc::now().to_rfc3339()),
        );
    }
    original.clone().with_headers(table).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn props_with(headers: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(k.into(), v);
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_content_type("application/json".into())
            .with_app_id("order-service".into())
            .with_type("order.created.v1".into())
            .with_timestamp(1_700_000_000)
            .with_headers(t)
    }

    #[test]
    fn properties_and_contract_headers_are_read() {
        let p = props_with(vec![
            ("tenant_id", AMQPValue::LongString("t-1".into())),
            ("causation_id", AMQPValue::ShortString("m-0".into())),
            ("x-oncely-attempt", AMQPValue::ShortShortUInt(3)),
            ("something-else", AMQPValue::Boolean(true)),
        ]);
        let raw = raw_metadata(&p, true, 42);
        assert_eq!(raw.message_id.as_deref(), Some("m-1"));
        assert_eq!(raw.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(raw.content_type.as_deref(), Some("application/json"));
        assert_eq!(raw.app_id.as_deref(), Some("order-service"));
        assert_eq!(raw.message_type.as_deref(), Some("order.created.v1"));
        assert_eq!(raw.timestamp, Some(1_700_000_000));
        assert!(raw.redelivered);
        assert_eq!(raw.body_len, 42);
        assert_eq!(raw.headers.len(), 3, "unrelated headers are not carried");
        assert!(
            raw.headers
                .contains(&("x-oncely-attempt".into(), HeaderValue::Integer(3)))
        );
        assert_eq!(read_attempt(&p), 3);
    }

    #[test]
    fn headers_of_unexpected_types_keep_their_type_name() {
        let p = props_with(vec![
            ("tenant_id", AMQPValue::FieldTable(FieldTable::default())),
            (
                "idempotency_key",
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
            ),
        ]);
        let raw = raw_metadata(&p, false, 0);
        assert!(
            raw.headers
                .contains(&("tenant_id".into(), HeaderValue::Other("table")))
        );
        assert!(raw.headers.contains(&(
            "idempotency_key".into(),
            HeaderValue::Other("non-UTF-8 string")
        )));
    }

    #[test]
    fn transport_markers_become_contract_fields() {
        let mut marks = FieldTable::default();
        marks.insert("message_id".into(), AMQPValue::ByteArray(vec![0xff].into()));
        marks.insert("headers.k?".into(), AMQPValue::Void);
        let p = props_with(vec![
            (INVALID_UTF8_HEADER, AMQPValue::FieldTable(marks)),
            (UNREADABLE_HEADERS_HEADER, AMQPValue::Void),
        ]);
        let raw = raw_metadata(&p, false, 0);
        assert_eq!(raw.invalid_utf8, vec!["headers.k?", "message_id"]);
        assert!(raw.unreadable_headers);

        let p = props_with(vec![(INVALID_UTF8_HEADER, AMQPValue::Boolean(true))]);
        assert_eq!(
            raw_metadata(&p, false, 0).invalid_utf8,
            vec![INVALID_UTF8_HEADER]
        );
        let clean = raw_metadata(&props_with(vec![]), false, 0);
        assert!(clean.invalid_utf8.is_empty() && !clean.unreadable_headers);
    }

    #[test]
    fn attempt_defaults_to_one() {
        assert_eq!(read_attempt(&BasicProperties::default()), 1);
        let p = props_with(vec![(
            "x-oncely-attempt",
            AMQPValue::LongString("2".into()),
        )]);
        assert_eq!(read_attempt(&p), 1);
    }

    #[test]
    fn a_republished_held_message_is_the_same_message_with_a_fresh_delivery_count() {
        let p = props_with(vec![
            ("tenant_id", AMQPValue::LongString("t-1".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(7)),
        ]);
        let again = republish_properties(&p);
        assert_eq!(again.message_id(), p.message_id());
        assert_eq!(read_delivery_count(&again), None);
        let tenant = again
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get("tenant_id").cloned());
        assert_eq!(tenant, Some(AMQPValue::LongString("t-1".into())));
    }

    #[test]
    fn copies_keep_the_message_id_and_carry_reason_headers() {
        let p = props_with(vec![
            ("tenant_id", AMQPValue::LongString("t-1".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(7)),
        ]);
        assert_eq!(read_delivery_count(&p), Some(7));
        let reason = Reason::new("db.unique_violation", "x".repeat(5000));
        let copy = copy_properties(
            &p,
            CopyHeaders {
                attempt: 2,
                reason: &reason,
                queue: "billing.q",
                exchange: "order.events",
                routing_key: "order.created.v1",
                final_copy: true,
            },
        );
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(*copy.delivery_mode(), Some(2));
        let h = copy.headers().clone().unwrap_or_default();
        let get = |k: &str| h.inner().get(k).cloned();
        assert_eq!(get("x-oncely-attempt"), Some(AMQPValue::LongLongInt(2)));
        assert_eq!(
            get("x-oncely-error-code"),
            Some(AMQPValue::LongString("db.unique_violation".into()))
        );
        match get("x-oncely-reason") {
            Some(AMQPValue::LongString(s)) => assert_eq!(s.as_bytes().len(), 1000),
            other => panic!("unexpected {other:?}"),
        }
        assert!(get("x-oncely-failed-at").is_some());
        assert_eq!(get("tenant_id"), Some(AMQPValue::LongString("t-1".into())));
        assert_eq!(
            get("x-delivery-count"),
            None,
            "the broker's count stays behind"
        );
        assert_eq!(read_delivery_count(&BasicProperties::default()), None);
    }
}
