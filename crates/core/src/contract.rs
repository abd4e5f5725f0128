//! The message contract: which AMQP properties and headers oncely reads, and how they are checked.

use serde::de::DeserializeOwned;
use std::fmt;

/// Header names of the contract and of the headers oncely writes on retries and dead letters.
pub mod headers {
    /// Id of the message whose handling caused this one.
    pub const CAUSATION_ID: &str = "causation_id";
    /// Tenant the message belongs to.
    pub const TENANT_ID: &str = "tenant_id";
    /// Key a handler passes to external systems so that they deduplicate too.
    pub const IDEMPOTENCY_KEY: &str = "idempotency_key";
    /// Delivery attempt of this copy, starting at 1; written by oncely on retries.
    pub const ATTEMPT: &str = "x-oncely-attempt";
    /// Machine-readable code of the failure that sent the message to a retry, DLQ or parking queue.
    pub const ERROR_CODE: &str = "x-oncely-error-code";
    /// Human-readable reason of that failure.
    pub const REASON: &str = "x-oncely-reason";
    /// Queue the message failed on.
    pub const ORIGINAL_QUEUE: &str = "x-oncely-original-queue";
    /// Exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-oncely-original-exchange";
    /// Routing key the message was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-oncely-original-routing-key";
    /// RFC 3339 time at which the message was dead-lettered or parked.
    pub const FAILED_AT: &str = "x-oncely-failed-at";
    /// W3C trace context (`00-<trace id>-<parent id>-<flags>`), carried so that the spans of one
    /// message join across services.
    pub const TRACEPARENT: &str = "traceparent";
    /// Added by oncely's transport to a message whose short strings (properties, header names,
    /// exchange, routing key) were not UTF-8: a table from field name (`message_id`,
    /// `headers.<name>`, ...) to the original bytes, which the placeholders in the message
    /// replaced.
    pub const INVALID_UTF8: &str = "x-oncely-invalid-utf8";
    /// Added by oncely's transport in place of a headers table that could not be read: the
    /// original table's bytes.
    pub const UNREADABLE_HEADERS: &str = "x-oncely-unreadable-headers";
    /// Added by oncely's transport when the frame had no room left for the original headers
    /// next to its markers, so they were dropped.
    pub const HEADERS_DROPPED: &str = "x-oncely-headers-dropped";
}

/// A header value as the transport saw it, reduced to what the contract needs.
///
/// The AMQP layer maps its own value types onto this; anything that is neither text nor an
/// integer keeps only its type name, so that a violation can say what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Text (AMQP short or long string; long strings that are not UTF-8 are `Other`).
    Text(String),
    /// Any integer type.
    Integer(i64),
    /// Any other type, by name (`"bool"`, `"field-table"`, `"bytes"`, ...).
    Other(&'static str),
}

impl HeaderValue {
    fn type_name(&self) -> &'static str {
        match self {
            HeaderValue::Text(_) => "string",
            HeaderValue::Integer(_) => "integer",
            HeaderValue::Other(name) => name,
        }
    }
}

/// What the transport knows about a message before it is checked against the contract.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMetadata {
    /// `message_id` property.
    pub message_id: Option<String>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `content_type` property.
    pub content_type: Option<String>,
    /// `app_id` property.
    pub app_id: Option<String>,
    /// `type` property.
    pub message_type: Option<String>,
    /// `timestamp` property, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Contract headers found on the message (other headers are not carried here).
    pub headers: Vec<(String, HeaderValue)>,
    /// Whether the broker flagged the delivery as redelivered.
    pub redelivered: bool,
    /// Size of the body in bytes.
    pub body_len: usize,
    /// Fields whose bytes were not UTF-8 as the producer sent them (`message_id`, `type`,
    /// `routing_key`, `headers.<name>`, ...). The transport replaced them with placeholders so
    /// that the message could be read at all; such a message breaks the contract.
    pub invalid_utf8: Vec<String>,
    /// Whether the headers table could not be read (unknown value type, bad length, nesting
    /// too deep); the transport kept its bytes aside.
    pub unreadable_headers: bool,
    /// How many times the broker has handed this message out before (`x-delivery-count`,
    /// quorum queues; absent on the first delivery).
    pub delivery_count: Option<u64>,
}

/// Bounds the contract enforces; the defaults suit most deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractLimits {
    /// Longest accepted message id, in bytes. Default 200.
    pub max_message_id_bytes: usize,
    /// Longest accepted text header of the contract, in bytes. Default 200.
    pub max_header_bytes: usize,
    /// Largest accepted body, in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// A delivery the broker has already handed out this many times
    /// ([`RawMetadata::delivery_count`]) is dead-lettered with code `delivery_limit` before any
    /// handler runs: a message that kept crashing the process, or kept coming back, reaches
    /// `Q.dlq` with oncely's reason headers before the queue's own (higher) `x-delivery-limit`
    /// would dead-letter it without them. `None` (the default): no limit.
    pub max_deliveries: Option<u32>,
}

impl Default for ContractLimits {
    fn default() -> Self {
        ContractLimits {
            max_message_id_bytes: 200,
            max_header_bytes: 200,
            max_body_bytes: 1024 * 1024,
            max_deliveries: None,
        }
    }
}

/// A message that broke the contract. Such a message is dead-lettered at once, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContractViolation {
    /// The `message_id` property is absent.
    #[error("message has no message_id property")]
    MissingMessageId,
    /// The `message_id` property is empty or whitespace.
    #[error("message_id is blank")]
    BlankMessageId,
    /// The `message_id` property is longer than allowed.
    #[error("message_id is {len} bytes long, at most {max} are allowed")]
    MessageIdTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The `message_id` property holds a NUL byte, which PostgreSQL text (the inbox's key)
    /// cannot store.
    #[error("message_id contains a NUL byte at byte {at}; the inbox cannot store it")]
    MessageIdHasNul {
        /// Byte offset of the first NUL.
        at: usize,
    },
    /// The content type is not JSON.
    #[error("content type {found:?} is not supported, expected application/json")]
    UnsupportedContentType {
        /// The content type the message carried.
        found: String,
    },
    /// A contract header has the wrong type or is too long.
    #[error("header {name:?} is invalid: {problem}")]
    InvalidHeader {
        /// Header name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The body is larger than allowed.
    #[error("body is {len} bytes, at most {max} are allowed")]
    BodyTooLarge {
        /// Body size in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Properties, header names, the exchange or the routing key were not UTF-8 as sent.
    #[error("not valid UTF-8 as sent: {}", fields.join(", "))]
    InvalidUtf8 {
        /// The fields, by name (`message_id`, `type`, `headers.<name>`, ...).
        fields: Vec<String>,
    },
    /// The headers table could not be read at all.
    #[error(
        "the headers table cannot be read (unknown value type, bad length or nesting too deep)"
    )]
    UnreadableHeaders,
    /// The broker has handed this message out [`ContractLimits::max_deliveries`] times already
    /// (it kept crashing the consumer or kept being given back).
    #[error("delivered {count} times before, the limit is {limit}")]
    DeliveryLimit {
        /// Previous deliveries (`x-delivery-count`).
        count: u64,
        /// The limit.
        limit: u32,
    },
    /// The body is not valid JSON for the expected type.
    #[error("body does not decode into {type_name}: {error}")]
    UndecodableBody {
        /// The Rust type the body was decoded into.
        type_name: &'static str,
        /// The serde error text, with line and column.
        error: String,
    },
}

impl ContractViolation {
    /// Stable machine-readable code, written to the `x-oncely-error-code` header.
    pub fn code(&self) -> &'static str {
        match self {
            ContractViolation::MissingMessageId => "contract.missing_message_id",
            ContractViolation::BlankMessageId => "contract.blank_message_id",
            ContractViolation::MessageIdTooLong { .. } => "contract.message_id_too_long",
            ContractViolation::MessageIdHasNul { .. } => "contract.invalid_message_id",
            ContractViolation::UnsupportedContentType { .. } => "contract.unsupported_content_type",
            ContractViolation::InvalidHeader { .. } => "contract.invalid_header",
            ContractViolation::BodyTooLarge { .. } => "contract.body_too_large",
            ContractViolation::UndecodableBody { .. } => "contract.undecodable_body",
            ContractViolation::InvalidUtf8 { .. } => "contract.invalid_utf8",
            ContractViolation::UnreadableHeaders => "contract.unreadable_headers",
            // The broker's own dead-letter reason for the same thing.
            ContractViolation::DeliveryLimit { .. } => "delivery_limit",
        }
    }
}

/// The validated contract fields of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Producer-generated id, stable across retries: the deduplication key.
    pub message_id: String,
    /// Correlation id, to propagate to messages published while handling this one.
    pub correlation_id: Option<String>,
    /// Id of the message whose handling caused this one.
    pub causation_id: Option<String>,
    /// Producer (`app_id`).
    pub producer: Option<String>,
    /// Message type / schema, e.g. `order.created.v1`.
    pub message_type: Option<String>,
    /// When the event occurred, seconds since the Unix epoch.
    pub occurred_at: Option<u64>,
    /// Tenant id.
    pub tenant_id: Option<String>,
    /// Idempotency key for external calls.
    pub idempotency_key: Option<String>,
    /// Delivery attempt of this copy (1 for the first; raised by oncely's retries).
    pub attempt: u32,
    /// Whether the broker flagged this delivery as redelivered.
    pub redelivered: bool,
    /// W3C `traceparent` header, when present and well-formed (a malformed one is ignored, as the
    /// W3C recommendation asks, never a reason to reject the message).
    pub traceparent: Option<String>,
}

impl Metadata {
    /// Checks `raw` against the contract and `limits`.
    ///
    /// A missing content type is accepted as JSON (many producers leave it out; the body is
    /// still checked); any other media type than `application/json` is a violation.
    pub fn from_raw(
        raw: RawMetadata,
        limits: &ContractLimits,
    ) -> Result<Metadata, ContractViolation> {
        // First: every other field may be a placeholder standing for bytes that were not text,
        // the message id included, which must never become a deduplication key.
        if !raw.invalid_utf8.is_empty() {
            return Err(ContractViolation::InvalidUtf8 {
                fields: raw.invalid_utf8,
            });
        }
        if raw.unreadable_headers {
            return Err(ContractViolation::UnreadableHeaders);
        }
        if let (Some(count), Some(limit)) = (raw.delivery_count, limits.max_deliveries)
            && count >= u64::from(limit)
        {
            return Err(ContractViolation::DeliveryLimit { count, limit });
        }
        let message_id = match raw.message_id {
            None => return Err(ContractViolation::MissingMessageId),
            Some(id) if id.trim().is_empty() => return Err(ContractViolation::BlankMessageId),
            Some(id) if id.len() > limits.max_message_id_bytes => {
                return Err(ContractViolation::MessageIdTooLong {
                    len: id.len(),
                    max: limits.max_message_id_bytes,
                });
            }
            Some(id) => match id.bytes().position(|b| b == 0) {
                Some(at) => return Err(ContractViolation::MessageIdHasNul { at }),
                None => id,
            },
        };
        if let Some(content_type) = raw.content_type.as_ref().filter(|c| !is_json(c)) {
            return Err(ContractViolation::UnsupportedContentType {
                found: content_type.clone(),
            });
        }
        if raw.body_len > limits.max_body_bytes {
            return Err(ContractViolation::BodyTooLarge {
                len: raw.body_len,
                max: limits.max_body_bytes,
            });
        }
        let mut metadata = Metadata {
            message_id,
            correlation_id: raw.correlation_id,
            causation_id: None,
            producer: raw.app_id,
            message_type: raw.message_type,
            occurred_at: raw.timestamp,
            tenant_id: None,
            idempotency_key: None,
            attempt: 1,
            redelivered: raw.redelivered,
            traceparent: None,
        };
        for (name, value) in raw.headers {
            match name.as_str() {
                headers::CAUSATION_ID => {
                    metadata.causation_id = Some(text_header(&name, value, limits)?)
                }
                headers::TENANT_ID => metadata.tenant_id = Some(text_header(&name, value, limits)?),
                headers::IDEMPOTENCY_KEY => {
                    metadata.idempotency_key = Some(text_header(&name, value, limits)?)
                }
                headers::ATTEMPT => metadata.attempt = attempt_header(&name, value)?,
                headers::TRACEPARENT => {
                    metadata.traceparent = match value {
                        HeaderValue::Text(text) if is_traceparent(&text) => Some(text),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        Ok(metadata)
    }

    /// A metadata with only a message id, for tests and hand-built envelopes.
    pub fn with_message_id(message_id: impl Into<String>) -> Metadata {
        Metadata {
            message_id: message_id.into(),
            correlation_id: None,
            causation_id: None,
            producer: None,
            message_type: None,
            occurred_at: None,
            tenant_id: None,
            idempotency_key: None,
            attempt: 1,
            redelivered: false,
            traceparent: None,
        }
    }

    /// The trace id of the `traceparent` header (32 hex digits), if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().and_then(|t| t.get(3..35))
    }

    /// The correlation id of messages caused by this one: its own correlation id, or, when it
    /// has none, its message id (the first message of a conversation starts it).
    pub fn caused_correlation_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.message_id)
    }
}

/// True for a W3C trace context `traceparent` of version 00:
/// `00-<32 lowercase hex, not all zero>-<16 lowercase hex, not all zero>-<2 hex>`.
///
/// ```
/// assert!(oncely_core::is_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
/// assert!(!oncely_core::is_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
/// assert!(!oncely_core::is_traceparent("garbage"));
/// ```
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if *version == "00" && hex(trace, 32) && not_zero(trace)
            && hex(parent, 16) && not_zero(parent) && hex(flags, 2))
}

fn is_json(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/json")
}

fn text_header(
    name: &str,
    value: HeaderValue,
    limits: &ContractLimits,
) -> Result<String, ContractViolation> {
    match value {
        HeaderValue::Text(text) if text.len() > limits.max_header_bytes => {
            Err(ContractViolation::InvalidHeader {
                name: name.to_owned(),
                problem: format!(
                    "{} bytes long, at most {} are allowed",
                    text.len(),
                    limits.max_header_bytes
                ),
            })
        }
        // Contract headers travel on into the database (causation ids, outbox headers), where
        // text cannot hold a NUL byte.
        HeaderValue::Text(text) if text.contains('\0') => Err(ContractViolation::InvalidHeader {
            name: name.to_owned(),
            problem: "contains a NUL byte".to_owned(),
        }),
        HeaderValue::Text(text) => Ok(text),
        other => Err(ContractViolation::InvalidHeader {
            name: name.to_owned(),
            problem: format!("expected a string, found {}", other.type_name()),
        }),
    }
}

fn attempt_header(name: &str, value: HeaderValue) -> Result<u32, ContractViolation> {
    match value {
        HeaderValue::Integer(n) if n >= 1 => {
            u32::try_from(n).map_err(|_| ContractViolation::InvalidHeader {
                name: name.to_owned(),
                problem: format!("attempt {n} is out of range"),
            })
        }
        HeaderValue::Integer(n) => Err(ContractViolation::InvalidHeader {
            name: name.to_owned(),
            problem: format!("attempt must be at least 1, found {n}"),
        }),
        other => Err(ContractViolation::InvalidHeader {
            name: name.to_owned(),
            problem: format!("expected an integer, found {}", other.type_name()),
        }),
    }
}

/// A validated message: its [`Metadata`] and its decoded payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope<T> {
    /// Contract fields.
    pub metadata: Metadata,
    /// The decoded body.
    pub payload: T,
}

impl<T: fmt::Debug> fmt::Debug for Envelope<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("metadata", &self.metadata)
            .field("payload", &self.payload)
            .finish()
    }
}

impl<T> Envelope<T> {
    /// Wraps an already decoded payload.
    pub fn new(metadata: Metadata, payload: T) -> Self {
        Envelope { metadata, payload }
    }

    /// The deduplication key.
    pub fn message_id(&self) -> &str {
        &self.metadata.message_id
    }
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Decodes a JSON body into `T`; the error carries serde's text (with line and column).
    pub fn decode(metadata: Metadata, body: &[u8]) -> Result<Envelope<T>, ContractViolation> {
        serde_json::from_slice(body)
            .map(|payload| Envelope { metadata, payload })
            .map_err(|e| ContractViolation::UndecodableBody {
                type_name: std::any::type_name::<T>(),
                error: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: &str) -> RawMetadata {
        RawMetadata {
            message_id: Some(id.to_owned()),
            content_type: Some("application/json".to_owned()),
            ..RawMetadata::default()
        }
    }

    fn check(raw: RawMetadata) -> Result<Metadata, ContractViolation> {
        Metadata::from_raw(raw, &ContractLimits::default())
    }

    #[test]
    fn complete_message_maps_every_contract_field() {
        let mut r = raw("m-1");
        r.correlation_id = Some("c-1".into());
        r.app_id = Some("order-service".into());
        r.message_type = Some("order.created.v1".into());
        r.timestamp = Some(1_700_000_000);
        r.redelivered = true;
        r.headers = vec![
            ("causation_id".into(), HeaderValue::Text("m-0".into())),
            ("tenant_id".into(), HeaderValue::Text("t-1".into())),
            ("idempotency_key".into(), HeaderValue::Text("k-1".into())),
            ("x-oncely-attempt".into(), HeaderValue::Integer(3)),
            ("unrelated".into(), HeaderValue::Other("bool")),
        ];
        let m = check(r).expect("valid");
        assert_eq!(m.message_id, "m-1");
        assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(m.causation_id.as_deref(), Some("m-0"));
        assert_eq!(m.producer.as_deref(), Some("order-service"));
        assert_eq!(m.message_type.as_deref(), Some("order.created.v1"));
        assert_eq!(m.occurred_at, Some(1_700_000_000));
        assert_eq!(m.tenant_id.as_deref(), Some("t-1"));
        assert_eq!(m.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(m.attempt, 3);
        assert!(m.redelivered);
    }

    #[test]
    fn traceparent_is_kept_when_well_formed_and_ignored_otherwise() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut r = raw("m");
        r.headers = vec![("traceparent".into(), HeaderValue::Text(good.into()))];
        let m = check(r).expect("valid");
        assert_eq!(m.traceparent.as_deref(), Some(good));
        assert_eq!(m.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            HeaderValue::Text("00-xyz-00f067aa0ba902b7-01".into()),
            HeaderValue::Integer(7),
        ] {
            let mut r = raw("m");
            r.headers = vec![("traceparent".into(), bad)];
            assert_eq!(check(r).expect("still valid").traceparent, None);
        }
    }

    #[test]
    fn caused_messages_take_the_correlation_id_or_start_one() {
        let mut m = Metadata::with_message_id("m-1");
        assert_eq!(m.caused_correlation_id(), "m-1");
        m.correlation_id = Some("c-1".into());
        assert_eq!(m.caused_correlation_id(), "c-1");
    }

    #[test]
    fn fields_that_were_not_utf8_are_a_violation_before_anything_else() {
        let mut r = raw("m-?");
        r.invalid_utf8 = vec!["message_id".into(), "headers.k?".into()];
        r.unreadable_headers = true;
        let err = check(r).expect_err("violation");
        assert_eq!(err.code(), "contract.invalid_utf8");
        assert_eq!(
            err.to_string(),
            "not valid UTF-8 as sent: message_id, headers.k?"
        );
        let r = RawMetadata {
            unreadable_headers: true,
            ..RawMetadata::default()
        };
        assert_eq!(
            check(r).expect_err("violation").code(),
            "contract.unreadable_headers"
        );
    }

    #[test]
    fn a_message_delivered_up_to_the_limit_is_dead_lettered_before_any_handler() {
        let limits = ContractLimits {
            max_deliveries: Some(3),
            ..ContractLimits::default()
        };
        let mut r = raw("m-1");
        r.delivery_count = Some(2);
        assert!(Metadata::from_raw(r.clone(), &limits).is_ok());
        r.delivery_count = Some(3);
        let err = Metadata::from_raw(r.clone(), &limits).expect_err("over the limit");
        assert_eq!(err.code(), "delivery_limit");
        assert_eq!(err, ContractViolation::DeliveryLimit { count: 3, limit: 3 });
        // Without a limit the count is only information.
        assert!(check(r).is_ok());
    }

    #[test]
    fn missing_message_id_is_a_violation() {
        let r = RawMetadata::default();
        assert_eq!(check(r), Err(ContractViolation::MissingMessageId));
    }

    #[test]
    fn blank_message_id_is_a_violation() {
        assert_eq!(check(raw("  \t")), Err(ContractViolation::BlankMessageId));
        assert_eq!(check(raw("")), Err(ContractViolation::BlankMessageId));
    }

    #[test]
    fn message_id_over_200_bytes_is_a_violation_and_200_is_fine() {
        assert!(check(raw(&"a".repeat(200))).is_ok());
        assert_eq!(
            check(raw(&"a".repeat(201))),
            Err(ContractViolation::MessageIdTooLong { len: 201, max: 200 })
        );
    }

    #[test]
    fn message_id_with_a_nul_byte_is_a_violation() {
        let violation = check(raw("ord-\0-1"));
        assert_eq!(violation, Err(ContractViolation::MessageIdHasNul { at: 4 }));
        assert_eq!(
            violation.map_err(|v| v.code()),
            Err("contract.invalid_message_id")
        );
    }

    #[test]
    fn contract_header_with_a_nul_byte_is_a_violation() {
        let mut r = raw("m");
        r.headers
            .push(("tenant_id".into(), HeaderValue::Text("t\0".into())));
        assert!(matches!(
            check(r),
            Err(ContractViolation::InvalidHeader { name, .. }) if name == "tenant_id"
        ));
    }

    #[test]
    fn content_type_must_be_json_when_present() {
        let mut r = raw("m");
        r.content_type = Some("text/plain".into());
        assert_eq!(
            check(r),
            Err(ContractViolation::UnsupportedContentType {
                found: "text/plain".into()
            })
        );
        let mut r = raw("m");
        r.content_type = Some("Application/JSON; charset=utf-8".into());
        assert!(check(r).is_ok());
        let mut r = raw("m");
        r.content_type = None;
        assert!(check(r).is_ok());
    }

    #[test]
    fn body_over_the_limit_is_a_violation() {
        let mut r = raw("m");
        r.body_len = 2 * 1024 * 1024;
        assert_eq!(
            check(r),
            Err(ContractViolation::BodyTooLarge {
                len: 2 * 1024 * 1024,
                max: 1024 * 1024
            })
        );
    }

    #[test]
    fn contract_header_of_wrong_type_is_a_violation() {
        let mut r = raw("m");
        r.headers = vec![("tenant_id".into(), HeaderValue::Other("field-table"))];
        let err = check(r).expect_err("invalid");
        assert_eq!(err.code(), "contract.invalid_header");
        assert!(
            err.to_string()
                .contains("expected a string, found field-table"),
            "{err}"
        );
    }

    #[test]
    fn oversized_contract_header_is_a_violation() {
        let mut r = raw("m");
        r.headers = vec![(
            "idempotency_key".into(),
            HeaderValue::Text("k".repeat(10_000)),
        )];
        let err = check(r).expect_err("invalid");
        assert!(err.to_string().contains("10000 bytes long"), "{err}");
    }

    #[test]
    fn attempt_header_must_be_a_positive_integer() {
        for bad in [
            HeaderValue::Integer(0),
            HeaderValue::Integer(-4),
            HeaderValue::Integer(i64::MAX),
            HeaderValue::Text("2".into()),
        ] {
            let mut r = raw("m");
            r.headers = vec![("x-oncely-attempt".into(), bad.clone())];
            assert!(
                matches!(check(r), Err(ContractViolation::InvalidHeader { .. })),
                "{bad:?}"
            );
        }
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Order {
        order_id: String,
        amount_cents: i64,
    }

    #[test]
    fn body_decodes_into_the_payload() {
        let env: Envelope<Order> = Envelope::decode(
            Metadata::with_message_id("m"),
            br#"{"order_id":"o-1","amount_cents":5}"#,
        )
        .expect("decodes");
        assert_eq!(env.message_id(), "m");
        assert_eq!(
            env.payload,
            Order {
                order_id: "o-1".into(),
                amount_cents: 5
            }
        );
    }

    #[test]
    fn undecodable_body_carries_the_serde_error_text() {
        let err = Envelope::<Order>::decode(Metadata::with_message_id("m"), b"not json")
            .expect_err("fails");
        match &err {
            ContractViolation::UndecodableBody { type_name, error } => {
                assert!(type_name.ends_with("Order"));
                assert!(error.contains("line 1 column"), "{error}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Envelope::<Order>::decode(
            Metadata::with_message_id("m"),
            br#"{"order_id":1,"amount_cents":"x"}"#,
        )
        .expect_err("wrong field types");
        assert!(err.to_string().contains("invalid type"), "{err}");
    }
}
