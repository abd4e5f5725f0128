//! One TOML file (with environment overrides) for connections and consumers.
//!
//! ```toml
//! [connections]
//! amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"   # or several nodes, comma-separated
//! database_url = "postgres://postgres@127.0.0.1:5432/oncely"
//!
//! [consumers.billing]
//! queue = "billing.order-events.q"
//! exchange = "order.events"
//! bindings = ["order.created.v1"]
//! prefetch = 32
//! concurrency = 8
//! queue_type = "quorum"        # or "classic"
//! delivery_limit = 20          # quorum only: oncely dead-letters at this x-delivery-count
//!                              # (Q's x-delivery-limit is this + 10, the broker's backstop)
//! max_attempts = 5
//! retry_tiers = ["1s", "10s", "1m"]
//! handler_timeout = "30s"
//! max_delay = "1h"
//! strict_order = false        # true: one delivery at a time, x-single-active-consumer on Q
//! batch_size = 0               # > 0: batched mode, this many deliveries per transaction
//! batch_wait = "20ms"          # batched mode: longest wait for a batch to fill
//! ```
//!
//! Environment overrides: `AMQP_URL` and `DATABASE_URL` for the connections, and
//! `ONCELY_<CONSUMER>_<KEY>` for a consumer's key (`ONCELY_BILLING_CONCURRENCY=4`; the consumer
//! name upper-cased, other characters than letters and digits as `_`); every key of a section has
//! its variable, as both come from one serde-derived type. Every error names the key (or
//! variable) at fault.

use crate::{QueueType, RetryPolicy, Topology};
use oncely_amqp::{BatchOptions, ConsumerOptions, LOCAL_AMQP_URL};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's text, with line and column.
        message: String,
    },
    /// A key has a bad value, is unknown, or is missing.
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted key, e.g. `consumers.billing.prefetch`.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// No consumer of that name.
    #[error("no [consumers.{0}] section")]
    NoSuchConsumer(String),
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    connections: Connections,
    #[serde(default)]
    consumers: BTreeMap<String, ConsumerSection>,
}

/// One `[consumers.<name>]` section as written. Its fields are the file's keys and, upper-cased,
/// the `ONCELY_<CONSUMER>_<KEY>` variables ([`field_names`]); the values have the runtime's
/// types (durations through humantime-serde, [`QueueType`] by its lower-case name). A key left
/// out is `None`: its default is the runtime's, applied in [`check_consumer`] because some
/// depend on other keys (strict order and batched mode change the prefetch and concurrency).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerSection {
    queue: String,
    exchange: String,
    #[serde(default)]
    bindings: Vec<String>,
    prefetch: Option<u16>,
    concurrency: Option<usize>,
    #[serde(default)]
    queue_type: QueueType,
    delivery_limit: Option<u32>,
    max_attempts: Option<u32>,
    retry_tiers: Option<Vec<humantime_serde::Serde<Duration>>>,
    #[serde(default, with = "humantime_serde")]
    handler_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_delay: Option<Duration>,
    #[serde(default)]
    strict_order: bool,
    batch_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    batch_wait: Option<Duration>,
}

/// The field names serde's derive gives `T` (the keys `deny_unknown_fields` accepts), read by
/// asking `T` to deserialize itself from a deserializer that only notes them.
fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor, value};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, value::Error> {
            Err(value::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, value::Error> {
            *self.0 = fields;
            Err(value::Error::custom("only the field names were asked for"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Connection settings, the `[connections]` section. `Debug` shows the URLs without their
/// passwords.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// PostgreSQL URL.
    pub database_url: String,
}

impl Default for Connections {
    /// The documented defaults: the broker and the database of a development machine.
    fn default() -> Self {
        Connections {
            amqp_url: LOCAL_AMQP_URL.to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/oncely".to_owned(),
        }
    }
}

impl std::fmt::Debug for Connections {
    // By hand: a configuration is printed in logs and test failures, and the URLs may carry
    // passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("amqp_url", &oncely_core::RedactedUrl(&self.amqp_url))
            .field(
                "database_url",
                &oncely_core::RedactedUrl(&self.database_url),
            )
            .finish()
    }
}

/// One consumer's settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    /// Its name (the section's).
    pub name: String,
    /// Queue, exchange, bindings, queue type, delivery limit and delay tiers.
    pub topology: Topology,
    /// Prefetch.
    pub prefetch: u16,
    /// Concurrency.
    pub concurrency: usize,
    /// Attempts and delay tiers.
    pub retry_policy: RetryPolicy,
    /// Handler timeout.
    pub handler_timeout: Option<Duration>,
    /// Longest delay of a delayed publish.
    pub max_delay: Option<Duration>,
    /// Strict per-queue order.
    pub strict_order: bool,
    /// Batched mode: deliveries per transaction and the longest wait for a batch to fill.
    /// `None`: one delivery at a time.
    pub batch: Option<(usize, Duration)>,
}

/// The whole file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Connections.
    pub connections: Connections,
    /// Consumers by name.
    pub consumers: BTreeMap<String, ConsumerSettings>,
}

impl Config {
    /// Reads `path`, applies the process environment, checks everything.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text, |k| {
            std::env::var(k).ok()
        })
    }

    /// Parses `text` (named `origin` in errors) with `env` as the environment.
    pub fn parse(
        origin: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: syntax_message(text, &e),
        })?;
        apply_env(&mut table, &env);
        let file: File = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| invalid(e.path().to_string(), problem(e.inner())))?;
        let mut connections = file.connections;
        if let Some(url) = env("AMQP_URL") {
            connections.amqp_url = url;
        }
        if let Some(url) = env("DATABASE_URL") {
            connections.database_url = url;
        }
        let consumers = file
            .consumers
            .into_iter()
            .map(|(name, c)| check_consumer(&name, c).map(|s| (name, s)))
            .collect::<Result<_, _>>()?;
        Ok(Config {
            connections,
            consumers,
        })
    }

    /// The settings of consumer `name`.
    pub fn consumer(&self, name: &str) -> Result<&ConsumerSettings, ConfigError> {
        self.consumers
            .get(name)
            .ok_or_else(|| ConfigError::NoSuchConsumer(name.to_owned()))
    }
}

fn env_prefix(consumer: &str) -> String {
    let upper: String = consumer
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("ONCELY_{upper}_")
}

/// `ONCELY_<CONSUMER>_<KEY>` values, read as TOML values (`4`, `true`, `["1s"]`) or as strings.
/// Every key of a section has one: the keys are [`ConsumerSection`]'s field names.
fn apply_env(table: &mut toml::Table, env: &impl Fn(&str) -> Option<String>) {
    let Some(toml::Value::Table(consumers)) = table.get_mut("consumers") else {
        return;
    };
    for (name, section) in consumers.iter_mut() {
        let toml::Value::Table(section) = section else {
            continue;
        };
        for &key in field_names::<ConsumerSection>() {
            let var = format!("{}{}", env_prefix(name), key.to_ascii_uppercase());
            if let Some(raw) = env(&var) {
                let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .unwrap_or(toml::Value::String(raw));
                section.insert(key.to_owned(), value);
            }
        }
    }
}

/// serde's text for a bad value, with the form expected where the value is a duration.
fn problem(error: &toml::de::Error) -> String {
    error.to_string().replacen(
        "expected a duration",
        "expected a duration such as \"30s\", \"5m\" or \"1h 30m\"",
        1,
    )
}

fn check_consumer(name: &str, raw: ConsumerSection) -> Result<ConsumerSettings, ConfigError> {
    let key = |k: &str| format!("consumers.{name}.{k}");
    for (k, v) in [("queue", &raw.queue), ("exchange", &raw.exchange)] {
        if v.trim().is_empty() || v.len() > 255 {
            return Err(invalid(key(k), "must be 1 to 255 bytes"));
        }
    }
    // The defaults and the rules are the runtime's own (`ConsumerOptions::set_flow`).
    let strict = raw.strict_order;
    let batch_options = raw
        .batch_size
        .filter(|n| *n > 0)
        .map(|max_messages| BatchOptions {
            max_messages,
            max_wait: raw.batch_wait.unwrap_or(Duration::from_millis(20)),
        });
    let mut options = ConsumerOptions::new(name, LOCAL_AMQP_URL, Topology::new("e", "q"));
    options.set_flow(raw.concurrency, raw.prefetch, batch_options, strict);
    options
        .validate()
        .map_err(|e| invalid(key(e.setting), e.problem))?;
    let (concurrency, prefetch) = (options.concurrency, options.prefetch);
    if raw.delivery_limit.is_some() && raw.queue_type != QueueType::Quorum {
        return Err(invalid(
            key("delivery_limit"),
            "only quorum queues support x-delivery-limit; set queue_type = \"quorum\"",
        ));
    }
    let defaults = RetryPolicy::default();
    let tiers = match raw.retry_tiers {
        Some(tiers) => tiers.into_iter().map(|t| t.into_inner()).collect(),
        None => defaults.tiers().to_vec(),
    };
    let max_attempts = raw.max_attempts.unwrap_or(defaults.max_attempts());
    let retry_policy = RetryPolicy::try_new(max_attempts, tiers.clone()).map_err(|e| {
        let k = if max_attempts == 0 {
            "max_attempts"
        } else {
            "retry_tiers"
        };
        invalid(key(k), e.to_string())
    })?;
    let mut topology = Topology::new(raw.exchange, raw.queue)
        .queue_type(raw.queue_type)
        .retry_tiers(&tiers)
        .single_active_consumer(strict);
    for binding in raw.bindings {
        topology = topology.bind(binding);
    }
    if let Some(limit) = raw.delivery_limit {
        topology = topology.delivery_limit(limit);
    }
    Ok(ConsumerSettings {
        name: name.to_owned(),
        topology,
        prefetch,
        concurrency,
        retry_policy,
        handler_timeout: raw.handler_timeout,
        max_delay: raw.max_delay,
        strict_order: strict,
        batch: batch_options.map(|b| (b.max_messages, b.max_wait)),
    })
}

/// The parser's text and where, without the snippet of the file it would quote: the line may
/// hold a database URL with its password.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [connections]
        amqp_url = "amqp://u:p@rabbit:5672/%2f"

        [consumers.billing]
        queue = "billing.order-events.q"
        exchange = "order.events"
        bindings = ["order.created.v1"]
        queue_type = "quorum"
        delivery_limit = 20
        max_attempts = 4
        retry_tiers = ["1s", "30s"]
        handler_timeout = "15s"
    "#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.toml", text, no_env)
    }

    fn error_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn a_full_consumer_section_is_read_and_checked() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.connections.amqp_url, "amqp://u:p@rabbit:5672/%2f");
        assert_eq!(
            c.connections.database_url,
            "postgres://postgres@127.0.0.1:5432/oncely"
        );
        let b = c.consumer("billing").expect("billing");
        assert_eq!(b.topology.queue(), "billing.order-events.q");
        assert_eq!(b.topology.routing_keys(), ["order.created.v1"]);
        assert_eq!(
            b.topology.tiers(),
            [Duration::from_secs(1), Duration::from_secs(30)]
        );
        assert_eq!(b.retry_policy.max_attempts(), 4);
        assert_eq!(b.handler_timeout, Some(Duration::from_secs(15)));
        assert_eq!((b.prefetch, b.concurrency, b.strict_order), (32, 8, false));
        assert!(matches!(
            c.consumer("nobody"),
            Err(ConfigError::NoSuchConsumer(_))
        ));
    }

    #[test]
    fn environment_overrides_connections_and_consumer_keys() {
        let env = |k: &str| match k {
            "DATABASE_URL" => Some("postgres://elsewhere/db".to_owned()),
            "ONCELY_BILLING_CONCURRENCY" => Some("3".to_owned()),
            "ONCELY_BILLING_RETRY_TIERS" => Some(r#"["5s"]"#.to_owned()),
            "ONCELY_BILLING_HANDLER_TIMEOUT" => Some("2m".to_owned()),
            _ => None,
        };
        let c = Config::parse("t", GOOD, env).expect("valid");
        let b = c.consumer("billing").expect("billing");
        assert_eq!(c.connections.database_url, "postgres://elsewhere/db");
        assert_eq!(b.concurrency, 3);
        assert_eq!(b.topology.tiers(), [Duration::from_secs(5)]);
        assert_eq!(b.handler_timeout, Some(Duration::from_secs(120)));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let section = "[consumers.billing]\nqueue = \"q\"\nexchange = \"e\"\n";
        assert_eq!(
            error_key(&format!("{section}prefetch = \"lots\"")),
            "consumers.billing.prefetch"
        );
        assert_eq!(
            error_key(&format!("{section}prefetch = 0")),
            "consumers.billing.prefetch"
        );
        assert_eq!(
            error_key(&format!("{section}concurrency = 0")),
            "consumers.billing.concurrency"
        );
        assert_eq!(
            error_key(&format!("{section}concurrency = 8\nprefetch = 4")),
            "consumers.billing.prefetch"
        );
        assert_eq!(
            error_key(&format!("{section}strict_order = true\nbatch_size = 10")),
            "consumers.billing.strict_order"
        );
        assert_eq!(
            error_key(&format!("{section}strict_order = true\nconcurrency = 4")),
            "consumers.billing.strict_order"
        );
        assert!(
            parse(&format!("{section}strict_order = true")).is_ok(),
            "strict order alone runs one at a time"
        );
        assert_eq!(
            error_key(&format!("{section}prefetc = 3")),
            "consumers.billing.prefetc"
        );
        assert_eq!(
            error_key(&format!("{section}queue_type = \"lazy\"")),
            "consumers.billing.queue_type"
        );
        assert_eq!(
            error_key(&format!("{section}delivery_limit = 5")),
            "consumers.billing.delivery_limit"
        );
        assert_eq!(
            error_key(&format!("{section}retry_tiers = [\"1s\", \"soon\"]")),
            "consumers.billing.retry_tiers[1]"
        );
        assert_eq!(
            error_key(&format!("{section}retry_tiers = [\"1s\", \"1s\"]")),
            "consumers.billing.retry_tiers"
        );
        assert_eq!(
            error_key(&format!("{section}max_attempts = 0")),
            "consumers.billing.max_attempts"
        );
        assert_eq!(
            error_key(&format!("{section}handler_timeout = \"x\"")),
            "consumers.billing.handler_timeout"
        );
        assert_eq!(
            error_key("[consumers.billing]\nexchange = \"e\""),
            "consumers.billing"
        );
        assert_eq!(error_key("[connection]\namqp_url = \"x\""), "connection");
    }

    #[test]
    fn unknown_key_error_says_which_key() {
        let err = parse("[consumers.billing]\nqueue = \"q\"\nexchange = \"e\"\nprefetc = 3")
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `prefetc`"), "{err}");
    }

    #[test]
    fn a_syntax_error_does_not_quote_the_line_it_is_on() {
        let text = "[connections]\ndatabase_url = \"postgres://app:s3cret@db/x\" oops\n";
        match parse(text) {
            Err(e @ ConfigError::Syntax { .. }) => {
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains("s3cret"), "{shown}");
                assert!(shown.contains("line 2"), "{shown}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn broken_toml_is_a_syntax_error_with_its_position() {
        match parse("[consumers.billing\nqueue = 1") {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("line 1"), "{message}")
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn batched_mode_is_read_with_room_in_the_prefetch() {
        let c = parse(&format!(
            "{GOOD}\nbatch_size = 100\nbatch_wait = \"50ms\"\n"
        ))
        .expect("valid");
        let b = c.consumer("billing").expect("billing");
        assert_eq!(b.batch, Some((100, Duration::from_millis(50))));
        assert_eq!(b.prefetch, 800, "100 per batch x concurrency 8");
        let plain = parse(GOOD).expect("valid");
        assert_eq!(plain.consumer("billing").expect("billing").batch, None);
        let env = |var: &str| (var == "ONCELY_BILLING_BATCH_SIZE").then(|| "10".to_owned());
        let c = Config::parse("test.toml", GOOD, env).expect("valid");
        let b = c.consumer("billing").expect("billing");
        assert_eq!(b.batch, Some((10, Duration::from_millis(20))));
        assert_eq!(
            error_key(&format!("{GOOD}\nbatch_size = 10\nbatch_wait = \"soon\"\n")),
            "consumers.billing.batch_wait"
        );
    }

    #[test]
    fn every_consumer_key_can_be_overridden_from_the_environment() {
        let keys = field_names::<ConsumerSection>();
        assert!(
            keys.contains(&"queue") && keys.contains(&"batch_wait"),
            "{keys:?}"
        );
        for key in keys {
            // An inline table is a value no key accepts: the error proves the variable reached
            // the key it is named after.
            let var = format!("ONCELY_BILLING_{}", key.to_ascii_uppercase());
            let env = |v: &str| (v == var).then(|| "{ a = 1 }".to_owned());
            match Config::parse("t", GOOD, env) {
                Err(ConfigError::Invalid { key: at, .. }) => {
                    assert_eq!(at, format!("consumers.billing.{key}"), "{var}")
                }
                other => panic!("{var} was not applied: {other:?}"),
            }
        }
        let env = |v: &str| (v == "ONCELY_BILLING_QUEUE_TYPE").then(|| "classic".to_owned());
        assert_eq!(
            match Config::parse("t", GOOD, env) {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("expected delivery_limit refused on classic, got {other:?}"),
            },
            "consumers.billing.delivery_limit"
        );
    }

    #[test]
    fn every_consumer_key_is_documented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let doc = std::fs::read_to_string(path).expect("docs/configuration.md");
        for key in field_names::<ConsumerSection>() {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "{key} is not in {path}"
            );
        }
    }

    #[test]
    fn a_bad_duration_names_its_key_and_the_form_expected() {
        let section = "[consumers.billing]\nqueue = \"q\"\nexchange = \"e\"\n";
        for (text, at) in [
            (
                "handler_timeout = \"soon\"",
                "consumers.billing.handler_timeout",
            ),
            ("max_delay = 30", "consumers.billing.max_delay"),
            (
                "retry_tiers = [\"1s\", \"1 fortnight\"]",
                "consumers.billing.retry_tiers[1]",
            ),
        ] {
            match parse(&format!("{section}{text}")) {
                Err(ConfigError::Invalid { key, problem }) => {
                    assert_eq!(key, at);
                    assert!(problem.contains("expected a duration"), "{problem}");
                    assert!(problem.contains("\"30s\""), "{problem}");
                }
                other => panic!("expected {at} refused, got {other:?}"),
            }
        }
        let env = |v: &str| (v == "ONCELY_BILLING_BATCH_WAIT").then(|| "soon".to_owned());
        match Config::parse("t", &format!("{section}batch_size = 5"), env) {
            Err(err @ ConfigError::Invalid { .. }) => assert!(
                err.to_string()
                    .starts_with("consumers.billing.batch_wait: invalid value: string \"soon\""),
                "{err}"
            ),
            other => panic!("expected batch_wait refused, got {other:?}"),
        }
    }
}
