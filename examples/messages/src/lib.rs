//! Message types of the oncely practice drill, shared by its services and tests, and the
//! command-line plumbing its binaries share.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Topic exchange the order service publishes to.
pub const ORDER_EVENTS_EXCHANGE: &str = "order.events";

/// Routing key and message type of [`OrderCreated`].
pub const ORDER_CREATED_V1: &str = "order.created.v1";

/// `order.created.v1`: an order was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderCreated {
    /// Order id, e.g. `ord-1`.
    pub order_id: String,
    /// Customer id, e.g. `cus-1`.
    pub customer_id: String,
    /// Amount in the currency's minor unit.
    pub amount_cents: i64,
    /// ISO 4217 code, e.g. `IDR`.
    pub currency: String,
}

impl OrderCreated {
    /// The producer's stable message id for this event: the same order always gets the same id,
    /// so a re-publish is recognised as a duplicate.
    pub fn message_id(&self) -> String {
        format!("{ORDER_CREATED_V1}:{}", self.order_id)
    }
}

/// The `n`th sample order of a run whose order ids start with `prefix` (`<prefix>-<n>`), as
/// the demo, the tests and the benchmarks create them.
pub fn sample_order(prefix: &str, n: usize) -> OrderCreated {
    OrderCreated {
        order_id: format!("{prefix}-{n}"),
        customer_id: format!("cus-{}", n % 97),
        amount_cents: 125_000 + n as i64,
        currency: "IDR".to_owned(),
    }
}

/// The connections every example binary takes: `--amqp-url` / `AMQP_URL` and
/// `--database-url` / `DATABASE_URL`, with the local defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct Services {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/oncely"
    )]
    pub database_url: String,
    /// Print the consumer's counters on stdout every this many milliseconds, as one
    /// `oncely-stats key=value ...` line (0: never). The drill reads them.
    #[arg(
        long,
        env = "ONCELY_STATS_EVERY_MS",
        hide_env_values = true,
        default_value_t = 0
    )]
    pub stats_every_ms: u64,
    /// Batched mode: process up to this many deliveries per transaction (0: one at a time).
    #[arg(
        long,
        env = "ONCELY_BATCH",
        hide_env_values = true,
        default_value_t = 0
    )]
    pub batch: usize,
    /// Batched mode: a batch waits at most this many milliseconds to fill.
    #[arg(
        long,
        env = "ONCELY_BATCH_WAIT_MS",
        hide_env_values = true,
        default_value_t = 20
    )]
    pub batch_wait_ms: u64,
    /// Queue type of the billing and fulfillment queues: classic or quorum (audit's is always
    /// quorum). The drill runs on RabbitMQ 4 with quorum.
    #[arg(
        long,
        env = "ONCELY_QUEUE_TYPE",
        hide_env_values = true,
        default_value = "classic",
        value_parser = ["classic", "quorum"]
    )]
    pub queue_type: String,
}

impl Services {
    /// `builder` in batched mode when `--batch` is set.
    pub fn batching<H: oncely::Handler>(
        &self,
        builder: oncely::ConsumerBuilder<H>,
    ) -> oncely::ConsumerBuilder<H> {
        if self.batch == 0 {
            return builder;
        }
        builder.batch(self.batch, Duration::from_millis(self.batch_wait_ms))
    }

    /// `topology` with the queue type of `--queue-type`.
    pub fn queues(&self, topology: oncely::Topology) -> oncely::Topology {
        if self.queue_type == "quorum" {
            topology.queue_type(oncely::QueueType::Quorum)
        } else {
            topology
        }
    }

    /// Starts printing `stats` every `--stats-every-ms`, when it is set.
    pub fn print_stats(&self, consumer: &str, stats: Arc<oncely::amqp::ConsumerStats>) {
        if self.stats_every_ms == 0 {
            return;
        }
        let every = Duration::from_millis(self.stats_every_ms);
        let consumer = consumer.to_owned();
        tokio::spawn(async move {
            loop {
                println!("{}", stats_line(&consumer, &stats.snapshot()));
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// `oncely-stats consumer=NAME received=.. processed=.. ...`: one consumer's counters on one line.
pub fn stats_line(consumer: &str, s: &oncely::StatsSnapshot) -> String {
    format!(
        "oncely-stats consumer={consumer} received={} processed={} duplicates={} retried={} \
         dead_lettered={} parked={} requeued={} held={} in_flight={} reconnects={}",
        s.received,
        s.processed,
        s.duplicates,
        s.retried,
        s.dead_lettered,
        s.parked,
        s.requeued,
        s.held,
        s.in_flight,
        s.reconnects
    )
}

/// Reads a [`stats_line`] back: the consumer name and its counters.
pub fn parse_stats_line(line: &str) -> Option<(String, oncely::StatsSnapshot)> {
    let rest = line.trim().strip_prefix("oncely-stats ")?;
    let mut consumer = None;
    let mut s = oncely::StatsSnapshot::default();
    for pair in rest.split_whitespace() {
        let (key, value) = pair.split_once('=')?;
        if key == "consumer" {
            consumer = Some(value.to_owned());
            continue;
        }
        let n: u64 = value.parse().ok()?;
        match key {
            "received" => s.received = n,
            "processed" => s.processed = n,
            "duplicates" => s.duplicates = n,
            "retried" => s.retried = n,
            "dead_lettered" => s.dead_lettered = n,
            "parked" => s.parked = n,
            "requeued" => s.requeued = n,
            "held" => s.held = n,
            "in_flight" => s.in_flight = n,
            "reconnects" => s.reconnects = n,
            _ => {}
        }
    }
    Some((consumer?, s))
}

/// Why broker connections could not be closed.
#[derive(Debug)]
pub struct CloseConnectionsError(pub String);

impl std::fmt::Display for CloseConnectionsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "closing broker connections with rabbitmqctl: {}", self.0)
    }
}

impl std::error::Error for CloseConnectionsError {}

/// Closes, from the broker's side (`rabbitmqctl close_connection`, as an operator or a broker
/// failover would), every connection whose client-given name (without oncely's `@host:port`
/// suffix) satisfies `matches`. Returns how
/// many were closed. Needs `rabbitmqctl` on this machine, talking to the broker in use.
pub fn close_connections_where(
    matches: impl Fn(&str) -> bool,
    reason: &str,
) -> Result<usize, CloseConnectionsError> {
    // Plain output: `<pid>\t[{"capabilities",[..]},{"connection_name","NAME"},..]` per line.
    let output = std::process::Command::new(rabbitmqctl_program())
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .map_err(|e| CloseConnectionsError(e.to_string()))?;
    if !output.status.success() {
        return Err(CloseConnectionsError(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    let mut closed = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((pid, properties)) = line.split_once('\t') else {
            continue;
        };
        let Some(name) = properties
            .split("{\"connection_name\",\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        // oncely names a connection `NAME@host:port` after the node it reached.
        let name = name.rsplit_once('@').map_or(name, |(base, _)| base);
        if !matches(name) {
            continue;
        }
        let status = std::process::Command::new(rabbitmqctl_program())
            .args(["close_connection", pid, reason, "-q"])
            .status()
            .map_err(|e| CloseConnectionsError(e.to_string()))?;
        if status.success() {
            closed += 1;
        }
    }
    Ok(closed)
}

/// The variable the drill and the fault suite set on what they start: the process then exits
/// when the one that started it is gone.
pub const EXIT_WITH_PARENT: &str = "ONCELY_EXIT_WITH_PARENT";

/// When [`EXIT_WITH_PARENT`] is set, exits this process (code 3) once the process that started
/// it is gone, so that a drill or a fault suite stopped by a signal leaves no service behind to
/// work on the shared tables of later runs. Call it from within a tokio runtime, at start.
pub fn exit_with_parent() {
    #[cfg(unix)]
    if std::env::var_os(EXIT_WITH_PARENT).is_some() {
        let parent = std::os::unix::process::parent_id();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if std::os::unix::process::parent_id() != parent {
                    eprintln!("the process that started this one is gone: exiting");
                    std::process::exit(3);
                }
            }
        });
    }
}

/// The `rabbitmqctl` that talks to the broker in use: `ONCELY_RABBITMQCTL` when set (the fault
/// suite on RabbitMQ 4 points it at `scripts/rabbitmq4-ctl`), else `rabbitmqctl` on the `PATH`.
pub fn rabbitmqctl_program() -> String {
    std::env::var("ONCELY_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned())
}

/// The version of the broker `rabbitmqctl_program` talks to (`4.0.5`), or why it is unknown.
pub fn broker_version() -> Result<String, String> {
    let output = std::process::Command::new(rabbitmqctl_program())
        .args(["eval", "rabbit_misc:version()."])
        .output()
        .map_err(|e| format!("{}: {e}", rabbitmqctl_program()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim()
        .trim_matches('"')
        .to_owned())
}

/// Logs to stderr, filtered by `RUST_LOG`, or by `default_filter` when it is not set (lapin's
/// own lines off, as in [`oncely::DEFAULT_LOG_FILTER`]: oncely logs each connection failure once).
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| format!("{default_filter},lapin=off").into()),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_of_the_design_decodes() {
        let o: OrderCreated = serde_json::from_str(
            r#"{"order_id": "ord-1", "customer_id": "cus-1", "amount_cents": 125000, "currency": "IDR"}"#,
        )
        .expect("decodes");
        assert_eq!(o.amount_cents, 125_000);
        assert_eq!(o.message_id(), "order.created.v1:ord-1");
    }

    #[test]
    fn a_stats_line_reads_back() {
        let s = oncely::StatsSnapshot {
            received: 9,
            processed: 5,
            duplicates: 2,
            retried: 1,
            dead_lettered: 1,
            parked: 0,
            requeued: 3,
            held: 4,
            in_flight: 2,
            ack_failures: 0,
            reconnects: 1,
        };
        let line = stats_line("billing", &s);
        assert_eq!(parse_stats_line(&line), Some(("billing".to_owned(), s)));
        assert_eq!(parse_stats_line("billing stopped"), None);
    }
}
