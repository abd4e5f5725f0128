//! The hostile producer (`--faults hostile`): messages no lapin producer can send, published
//! through the hand-written AMQP client onto the drill's exchange between the orders, and what
//! each consumer must do with each of them.
//!
//! Every hostile message carries [`MARKER`], so that its dead letters are counted apart from
//! the poison messages and from earlier runs' dead letters, whatever its message id became.

use oncely_example_messages::OrderCreated;
use oncely_raw_amqp::{RawProperties, RawPublisher, RawTable, RawValue};
use std::time::{Duration, Instant};

/// The header naming a hostile message: `<run prefix>-hostile-<n>`.
pub const MARKER: &str = "x-drill-hostile";

/// What one consumer must do with a hostile message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// In the consumer's `Q.dlq` with this error code, never processed.
    DeadLetter(&'static str),
    /// Processed (inbox row `processed`), never dead-lettered.
    Processed,
}

/// One hostile message and the fate it must meet at each consumer.
#[derive(Debug, Clone)]
pub struct Hostile {
    /// Its [`MARKER`] value.
    pub marker: String,
    /// What is wrong with it (or odd about it), for the report.
    pub what: String,
    /// Its message id when it is one an inbox can hold (UTF-8, no NUL), to find it processed.
    pub message_id: Option<String>,
    /// A valid order whose only oddity is its headers: one more order to invoice, reserve
    /// and audit.
    pub order: Option<OrderCreated>,
    /// At billing, fulfillment and audit, in the drill's order of consumers.
    pub fates: [Fate; 3],
    /// Properties as sent, bytes and all.
    pub properties: RawProperties,
    /// Body as sent.
    pub body: Vec<u8>,
}

use Fate::{DeadLetter, Processed};

/// The run's hostile messages. Those that are not orders carry the body of a good order whose
/// id is outside the run's prefix (`hostile-<prefix>-<n>`), so that the only thing wrong with
/// them is what is named, and a wrongly processed one shows without touching the order counts.
pub fn messages(prefix: &str) -> Vec<Hostile> {
    let mut out = broken(prefix);
    out.extend(odd_headers(prefix, out.len()));
    out
}

/// Messages with something wrong in their properties or body, each with its fate.
fn broken(prefix: &str) -> Vec<Hostile> {
    let mut out = Vec::new();
    let mut add = |what: &str,
                   message_id: Vec<u8>,
                   fates: [Fate; 3],
                   edit: &dyn Fn(&mut RawProperties),
                   body: Option<Vec<u8>>| {
        let n = out.len();
        let marker = format!("{prefix}-hostile-{n}");
        let mut properties = order_properties(message_id.clone());
        properties.headers = Some(RawTable::default().with(
            MARKER.as_bytes().to_vec(),
            RawValue::LongString(marker.clone().into_bytes()),
        ));
        edit(&mut properties);
        let body = body.unwrap_or_else(|| {
            order_body(&OrderCreated {
                order_id: format!("hostile-{prefix}-{n}"),
                customer_id: "cus-hostile".into(),
                amount_cents: 125_000,
                currency: "IDR".into(),
            })
        });
        out.push(Hostile {
            marker,
            what: what.to_owned(),
            // PostgreSQL text holds no NUL: such an id can never be in an inbox.
            message_id: String::from_utf8(message_id)
                .ok()
                .filter(|id| !id.contains('\0')),
            order: None,
            fates,
            properties,
            body,
        });
    };
    let id = |n: &str| format!("hostile:{prefix}-{n}").into_bytes();
    let bytes = |mut id: Vec<u8>| {
        id.extend_from_slice(b"-\xff\xfe");
        id
    };
    let all_dlq = |code| [DeadLetter(code); 3];
    let utf8 = all_dlq("contract.invalid_utf8");
    let undecodable = all_dlq("contract.undecodable_body");
    add("message_id not UTF-8", bytes(id("id")), utf8, &|_| {}, None);
    add(
        "type not UTF-8",
        id("type"),
        utf8,
        &|p| p.kind = Some(b"order.created.\xc3(".to_vec()),
        None,
    );
    add(
        "correlation_id not UTF-8",
        id("correlation"),
        utf8,
        &|p| p.correlation_id = Some(b"corr-\xff".to_vec()),
        None,
    );
    add(
        "app_id not UTF-8",
        id("app"),
        utf8,
        &|p| p.app_id = Some(b"order-\xfe-service".to_vec()),
        None,
    );
    add(
        "header name not UTF-8",
        id("header-name"),
        utf8,
        &|p| {
            if let Some(h) = p.headers.take() {
                p.headers = Some(h.with(
                    b"tenant\xff".to_vec(),
                    RawValue::LongString(b"t-1".to_vec()),
                ));
            }
        },
        None,
    );
    // Valid UTF-8, but no system downstream (PostgreSQL text, C strings, logs) takes it whole.
    add(
        "NUL byte in message_id",
        id("nul-\0-x"),
        all_dlq("contract.invalid_message_id"),
        &|_| {},
        None,
    );
    // Decoded fine; billing's text column and audit's jsonb refuse the NUL (a data error,
    // permanent: dead-lettered once, never retried); fulfillment never stores the customer.
    add(
        "NUL in a JSON string (customer_id)",
        id("json-nul"),
        [DeadLetter("db.error"), Processed, DeadLetter("db.error")],
        &|_| {},
        Some(
            format!(
                r#"{{"order_id":"hostile-{prefix}-json-nul","customer_id":"cus-\u0000-x","amount_cents":125000,"currency":"IDR"}}"#
            )
            .into_bytes(),
        ),
    );
    add(
        "body not UTF-8",
        id("body-bytes"),
        undecodable,
        &|_| {},
        Some({
            let mut b =
                format!(r#"{{"order_id":"hostile-{prefix}-body","customer_id":"cus-"#).into_bytes();
            b.extend_from_slice(b"\xff\xfe\",\"amount_cents\":1,\"currency\":\"IDR\"}");
            b
        }),
    );
    add(
        "empty body",
        id("empty"),
        undecodable,
        &|_| {},
        Some(Vec::new()),
    );
    // Audit keeps any JSON event; billing and fulfillment need an order.
    add(
        "valid JSON, not an order",
        id("not-an-order"),
        [
            DeadLetter("contract.undecodable_body"),
            DeadLetter("contract.undecodable_body"),
            Processed,
        ],
        &|_| {},
        Some(br#"{"greeting":"not an order","items":[1,2,3]}"#.to_vec()),
    );
    out
}

/// Valid orders with header values of every odd type, in a header the contract does not read:
/// processed like any other order. Their markers are numbered from `first`.
fn odd_headers(prefix: &str, first: usize) -> Vec<Hostile> {
    let odd: [(&str, RawValue); 6] = [
        ("decimal (D)", RawValue::Decimal(2, 12_345)),
        ("timestamp (T)", RawValue::Timestamp(1_700_000_000)),
        (
            "nested table (F)",
            RawValue::Table(
                RawTable::default()
                    .with(
                        "inner",
                        RawValue::Table(RawTable::default().with("deep", RawValue::Void)),
                    )
                    .with("bytes", RawValue::Bytes(vec![0, 0xff])),
            ),
        ),
        ("byte array (x)", RawValue::Bytes(vec![0xff, 0x00, 0xfe])),
        ("void (V)", RawValue::Void),
        (
            "array (A)",
            RawValue::Array(vec![
                RawValue::I64(1),
                RawValue::Decimal(0, 1),
                RawValue::Array(vec![RawValue::Void, RawValue::Bool(true)]),
            ]),
        ),
    ];
    let mut out = Vec::new();
    for (i, (kind, value)) in odd.into_iter().enumerate() {
        let order = oncely_example_messages::sample_order(&format!("{prefix}-odd"), i);
        let marker = format!("{prefix}-hostile-{}", first + i);
        let mut properties = order_properties(order.message_id().into_bytes());
        properties.headers = Some(
            RawTable::default()
                .with(
                    MARKER.as_bytes().to_vec(),
                    RawValue::LongString(marker.clone().into_bytes()),
                )
                .with("x-odd", value),
        );
        out.push(Hostile {
            marker,
            what: format!("valid order, header of type {kind}"),
            message_id: Some(order.message_id()),
            body: order_body(&order),
            order: Some(order),
            fates: [Processed; 3],
            properties,
        });
    }
    out
}

/// How many of `messages` are orders to count among the run's orders.
pub fn orders(messages: &[Hostile]) -> usize {
    messages.iter().filter(|h| h.order.is_some()).count()
}

/// How many of `messages` must end in the DLQ of consumer number `consumer`.
pub fn dead_letters(messages: &[Hostile], consumer: usize) -> usize {
    messages
        .iter()
        .filter(|h| matches!(h.fates[consumer], DeadLetter(_)))
        .count()
}

fn order_properties(message_id: Vec<u8>) -> RawProperties {
    RawProperties {
        kind: Some(
            oncely_example_messages::ORDER_CREATED_V1
                .as_bytes()
                .to_vec(),
        ),
        app_id: Some(b"hostile-producer".to_vec()),
        ..RawProperties::json(message_id)
    }
}

fn order_body(order: &OrderCreated) -> Vec<u8> {
    serde_json::to_vec(order).unwrap_or_default()
}

/// Publishes `messages` to `exchange` under `routing_key` through the hand-written client, one
/// every `every`, each confirmed; connects again and retries for up to two minutes when the
/// broker goes away. A message whose confirm was lost may be sent twice: the checks count
/// markers, not copies, except in a run without any other fault.
pub async fn publish(
    amqp_url: &str,
    exchange: &str,
    routing_key: &str,
    messages: Vec<Hostile>,
    every: Duration,
) -> anyhow::Result<usize> {
    // The raw client knows plain URLs only: no query (heartbeat, ...).
    let url = amqp_url.split('?').next().unwrap_or(amqp_url);
    let mut connection: Option<RawPublisher> = None;
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    let mut sent = 0;
    for message in &messages {
        tick.tick().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let attempt = async {
                let raw = match connection.as_mut() {
                    Some(raw) => raw,
                    None => connection.insert(RawPublisher::connect(url).await?),
                };
                raw.publish(
                    exchange.as_bytes(),
                    routing_key.as_bytes(),
                    &message.properties,
                    &message.body,
                )
                .await
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(())) => break,
                failed => {
                    connection = None;
                    if Instant::now() > deadline {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        anyhow::bail!(
                            "publishing hostile message {} ({}): {why}",
                            message.marker,
                            message.what
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        sent += 1;
    }
    if let Some(raw) = connection {
        let _ = raw.close().await;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hostile_message_is_marked_once_and_its_fates_add_up() {
        let messages = messages("ord-x");
        let markers: std::collections::HashSet<_> =
            messages.iter().map(|h| h.marker.clone()).collect();
        assert_eq!(markers.len(), messages.len());
        assert_eq!(orders(&messages), 6);
        // Everything but the odd-header orders dead-letters at billing.
        assert_eq!(dead_letters(&messages, 0), messages.len() - 6);
        // The id that is not UTF-8 and the one with a NUL can never be in an inbox.
        assert_eq!(
            messages.iter().filter(|h| h.message_id.is_none()).count(),
            2
        );
        for h in &messages {
            let marked = h.properties.headers.as_ref().is_some_and(|t| {
                t.0.iter().any(|(name, value)| {
                    name == MARKER.as_bytes()
                        && *value == RawValue::LongString(h.marker.clone().into_bytes())
                })
            });
            assert!(marked, "{} carries its marker", h.what);
        }
    }
}
