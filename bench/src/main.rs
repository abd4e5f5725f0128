//! The oncely benchmark suite: every oncely figure next to its ceiling, measured side by side in
//! one run on one machine, printed as a table and written as a JSON summary.
//!
//! - PostgreSQL ceiling: the billing inbox transaction driven straight with tokio-postgres,
//!   per message at each concurrency, and 100 messages per transaction (multi-row statements);
//! - broker ceiling: a plain lapin consumer that only acks (awaited per message, and `multiple`);
//! - oncely single-message mode with the billing handler at each concurrency;
//! - outbox relay against a raw pipelined confirmed publish;
//! - publish-to-commit latency at a fixed rate;
//! - RSS of the consumer (a child process) under load at prefetch 500, and whether it stays flat.
//!
//! Run with: ./scripts/bench   (or: cargo run --release -p oncely-bench -- --help)

mod batched;
mod broker;
mod ceiling;
mod cpu;
mod latency;
mod memory;
mod relay;
mod report;
mod single;
mod support;

use anyhow::Context;
use clap::{Parser, Subcommand};
use report::Report;
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "oncely benchmark suite: oncely against its ceilings, side by side")]
struct Args {
    /// Messages per throughput measurement (concurrency 1 runs use a fifth of it).
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Messages of each batched PostgreSQL ceiling run.
    #[arg(long, default_value_t = 100_000)]
    batch_count: usize,
    /// Interleaved rounds of each per-message comparison (ceiling, then oncely, again).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrencies of the per-message runs.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32")]
    concurrency: Vec<usize>,
    /// Clients of the batched PostgreSQL ceiling.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batch_clients: Vec<usize>,
    /// Broker prefetch of every consumer.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// The plain consumer's `multiple` ack covers this many deliveries.
    #[arg(long, default_value_t = 100)]
    ack_every: usize,
    /// Rows per relay cycle, and confirms outstanding (the raw publish gets the same window).
    #[arg(long, default_value_t = 1000)]
    relay_batch: usize,
    /// Relay instances to measure (each with its own publisher connection).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    relays: Vec<usize>,
    /// Publish rate of the latency run.
    #[arg(long, default_value_t = 500)]
    latency_rate: u32,
    /// Length of the latency run.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// Consumer concurrency of the latency and memory runs.
    #[arg(long, default_value_t = 16)]
    load_concurrency: usize,
    /// Length of the memory run under load; 10 for a soak.
    #[arg(long, default_value_t = 1.0)]
    soak_minutes: f64,
    /// Sections to run: broker, pg, oncely, batched, relay, latency, memory.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "broker,pg,oncely,batched,relay,latency,memory"
    )]
    only: Vec<String>,
    /// Where the JSON summary goes.
    #[arg(long, default_value = "target/bench/summary.json")]
    json: PathBuf,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand, Debug)]
enum Child {
    /// The consumer of the memory run (started by the suite itself).
    #[command(hide = true)]
    ConsumerChild(memory::ChildArgs),
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only.iter().any(|s| s == section)
    }

    /// Messages of a per-message run at `concurrency`.
    fn count_at(&self, concurrency: usize) -> usize {
        if concurrency <= 1 {
            (self.count / 5).max(1)
        } else {
            self.count
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(Child::ConsumerChild(child)) = args.child {
        return memory::child(child).await;
    }
    cpu::count_statements();
    let mut report = Report::default();
    report.set("run", environment(&args).await);
    let connection = support::amqp(&args.amqp_url, "oncely-bench").await?;

    if args.runs("broker") {
        eprintln!("broker ceiling: plain lapin, ack only");
        broker::section(&args, &connection, &mut report).await?;
    }
    if args.runs("pg") || args.runs("oncely") {
        eprintln!(
            "per-message transaction: PostgreSQL ceiling and oncely single mode, side by side"
        );
        for &c in &args.concurrency {
            single::section(&args, &connection, &mut report, c).await?;
        }
    }
    if args.runs("batched") {
        eprintln!(
            "batched: PostgreSQL ceiling and oncely batched mode, 100 messages per transaction"
        );
        batched::section(&args, &connection, &mut report).await?;
    }
    if args.runs("relay") {
        eprintln!("outbox relay against raw pipelined confirmed publish");
        relay::section(&args, &connection, &mut report).await?;
    }
    if args.runs("latency") {
        eprintln!(
            "latency: {} msgs/s for {} s",
            args.latency_rate, args.latency_seconds
        );
        latency::section(&args, &connection, &mut report).await?;
    }
    if args.runs("memory") {
        eprintln!(
            "memory: consumer child at prefetch {} for {} min",
            args.prefetch, args.soak_minutes
        );
        memory::section(&args, &connection, &mut report).await?;
    }
    let _ = connection.close(200, "bench done".into()).await;

    println!("{}", report.table());
    report
        .write_json(&args.json)
        .with_context(|| format!("write {}", args.json.display()))?;
    println!("JSON summary: {}", args.json.display());
    Ok(())
}

/// Date, machine and settings, for the summary.
async fn environment(args: &Args) -> serde_json::Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    let postgres = postgres_version().await.ok();
    json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "cores": cores,
        "memory": memory,
        "postgres": postgres,
        "args": format!("{args:?}"),
    })
}

async fn postgres_version() -> anyhow::Result<String> {
    let (client, connection) =
        tokio_postgres::connect(&oncely::testing::database_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client.query_one("SHOW server_version", &[]).await?.get(0))
}
