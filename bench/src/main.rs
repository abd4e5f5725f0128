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
use oncely::testing::unique_name;
use report::{Report, Row};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use support::rate;

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
        broker_ceiling(&args, &connection, &mut report).await?;
    }
    if args.runs("pg") || args.runs("oncely") {
        eprintln!(
            "per-message transaction: PostgreSQL ceiling and oncely single mode, side by side"
        );
        for &c in &args.concurrency {
            single_mode(&args, &connection, &mut report, c).await?;
        }
    }
    if args.runs("batched") {
        eprintln!(
            "batched: PostgreSQL ceiling and oncely batched mode, 100 messages per transaction"
        );
        batched(&args, &connection, &mut report).await?;
    }
    if args.runs("relay") {
        eprintln!("outbox relay against raw pipelined confirmed publish");
        relay(&args, &connection, &mut report).await?;
    }
    if args.runs("latency") {
        eprintln!(
            "latency: {} msgs/s for {} s",
            args.latency_rate, args.latency_seconds
        );
        latency(&args, &connection, &mut report).await?;
    }
    if args.runs("memory") {
        eprintln!(
            "memory: consumer child at prefetch {} for {} min",
            args.prefetch, args.soak_minutes
        );
        memory(&args, &connection, &mut report).await?;
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

async fn broker_ceiling(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let queue = format!("{}.q", unique_name("bench_plain"));
    support::declare_plain_queue(connection, &queue).await?;
    let runs = [
        (
            "broker_ack_each",
            "plain lapin consumer, awaited ack per message".to_owned(),
            broker::Acks::EachAwaited,
        ),
        (
            "broker_ack_multiple",
            format!(
                "plain lapin consumer, multiple ack every {}",
                args.ack_every
            ),
            broker::Acks::Multiple(args.ack_every),
        ),
    ];
    let mut result = Ok(());
    for (key, label, acks) in runs {
        let measured = async {
            support::publish_orders(connection, "", &queue, &queue, 0..args.count).await?;
            broker::drain(connection, &queue, args.count, args.prefetch, acks).await
        }
        .await;
        match measured {
            Ok((elapsed, cpu)) => report.push(
                Row::new(
                    key,
                    "broker ceiling",
                    label,
                    rate(args.count, elapsed),
                    "msgs/s",
                )
                .note(format!("prefetch {}; {}", args.prefetch, cpu.describe())),
            ),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    support::delete_queue(connection, &queue).await;
    result
}

/// One figure accumulated over the rounds of a side-by-side measurement.
#[derive(Default)]
struct Tally {
    count: usize,
    elapsed: Duration,
    cpu: Vec<(usize, cpu::PerMessage)>,
}

impl Tally {
    fn add(&mut self, count: usize, elapsed: Duration, cpu: cpu::PerMessage) {
        self.count += count;
        self.elapsed += elapsed;
        self.cpu.push((count, cpu));
    }

    fn rate(&self) -> f64 {
        rate(self.count, self.elapsed)
    }

    fn cpu(&self) -> cpu::PerMessage {
        cpu::PerMessage::weighted(&self.cpu)
    }
}

/// The PostgreSQL ceiling (pipelined and not) and oncely at one concurrency, in `rounds`
/// interleaved rounds so that all three see the same load of a shared machine.
async fn single_mode(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
    concurrency: usize,
) -> anyhow::Result<()> {
    let rounds = args.rounds.max(1);
    let count = (args.count_at(concurrency) / rounds).max(1);
    let shapes = [ceiling::Shape::Pipelined, ceiling::Shape::Sequential];
    let mut pg = [Tally::default(), Tally::default()];
    let mut oncely = Tally::default();
    for _ in 0..rounds {
        if args.runs("pg") {
            for (shape, tally) in shapes.iter().zip(pg.iter_mut()) {
                let schema = support::billing_schema().await?;
                let prefix = unique_name("bench_pg");
                let (elapsed, cpu) =
                    ceiling::per_message(&schema, *shape, concurrency, count, &prefix).await?;
                let invoices = ceiling::count_invoices(schema.url(), &prefix).await?;
                anyhow::ensure!(
                    invoices as usize == count,
                    "ceiling made {invoices} invoices"
                );
                tally.add(count, elapsed, cpu);
            }
        }
        if args.runs("oncely") {
            let drained = single::drain(
                connection,
                &args.amqp_url,
                concurrency,
                args.prefetch,
                count,
                None,
            )
            .await?;
            oncely.add(drained.count, drained.elapsed, drained.cpu);
        }
    }
    let plural = if concurrency == 1 { "" } else { "s" };
    let ceiling_key = format!("pg_txn_c{concurrency}");
    let sequential_key = format!("pg_txn_seq_c{concurrency}");
    if args.runs("pg") {
        for ((key, what, suffix), tally) in [
            (
                &ceiling_key,
                "BEGIN pipelined with the claim; insert; COMMIT (3 round trips)",
                "",
            ),
            (
                &sequential_key,
                "BEGIN; claim; insert; COMMIT (4 round trips)",
                ", unpipelined",
            ),
        ]
        .into_iter()
        .zip(&pg)
        {
            report.push(
                Row::new(
                    key.as_str(),
                    "PostgreSQL ceiling",
                    format!("inbox transaction per message, {concurrency} client{plural}{suffix}"),
                    tally.rate(),
                    "msgs/s",
                )
                .note(format!(
                    "tokio-postgres, prepared; {what}; {}",
                    tally.cpu().describe()
                )),
            );
        }
    }
    if args.runs("oncely") {
        report.push(
            Row::new(
                format!("oncely_single_c{concurrency}"),
                "oncely",
                format!("single-message mode, concurrency {concurrency}"),
                oncely.rate(),
                "msgs/s",
            )
            .against(ceiling_key)
            .also_against(sequential_key)
            .note(format!(
                "billing::create_invoice, prefetch {}; {}",
                args.prefetch,
                oncely.cpu().describe()
            )),
        );
    }
    report.set(
        &format!("cpu_per_message_c{concurrency}"),
        json!({
            "pg_pipelined": cpu_json(&pg[0].cpu()),
            "pg_sequential": cpu_json(&pg[1].cpu()),
            "oncely_single": cpu_json(&oncely.cpu()),
        }),
    );
    Ok(())
}

fn cpu_json(cpu: &cpu::PerMessage) -> serde_json::Value {
    json!({
        "client_us": cpu.client_us.round(),
        "postgres_us": cpu.postgres_us.round(),
        "broker_us": cpu.broker_us.round(),
        "statements_per_message": (cpu.statements * 100.0).round() / 100.0,
    })
}

async fn batched(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    const PER_TRANSACTION: usize = 100;
    for &clients in &args.batch_clients {
        let schema = support::billing_schema().await?;
        let prefix = unique_name("bench_pgb");
        let elapsed = ceiling::batched(
            schema.url(),
            clients,
            args.batch_count,
            PER_TRANSACTION,
            &prefix,
        )
        .await?;
        let invoices = ceiling::count_invoices(schema.url(), &prefix).await?;
        anyhow::ensure!(
            invoices as usize == args.batch_count,
            "batched ceiling made {invoices} invoices"
        );
        report.push(
            Row::new(
                format!("pg_batch{PER_TRANSACTION}_c{clients}"),
                "PostgreSQL ceiling",
                format!(
                    "{PER_TRANSACTION} messages per transaction, {clients} client{}",
                    if clients == 1 { "" } else { "s" }
                ),
                rate(args.batch_count, elapsed),
                "msgs/s",
            )
            .note("multi-row claim and insert (unnest)"),
        );
    }
    // oncely in batched mode: the billing consumer, PER_TRANSACTION deliveries per transaction,
    // `clients` batches at once, against the batched ceiling with as many clients.
    for &clients in &args.batch_clients {
        let drained = single::drain(
            connection,
            &args.amqp_url,
            clients,
            args.prefetch,
            args.batch_count,
            Some(PER_TRANSACTION),
        )
        .await?;
        let value = rate(drained.count, drained.elapsed);
        let versus_single = report
            .value("oncely_single_c16")
            .map(|single| format!("; {:.1}x single mode at concurrency 16", value / single))
            .unwrap_or_default();
        report.push(
            Row::new(
                format!("oncely_batched_c{clients}"),
                "oncely",
                format!(
                    "batched mode, {PER_TRANSACTION} per transaction, {clients} batch{} at once",
                    if clients == 1 { "" } else { "es" }
                ),
                value,
                "msgs/s",
            )
            .against(format!("pg_batch{PER_TRANSACTION}_c{clients}"))
            .also_against("broker_ack_multiple")
            .note(format!(
                "billing::create_invoice, one claim statement and a savepoint per message; {}{versus_single}",
                drained.cpu.describe()
            )),
        );
    }
    Ok(())
}

async fn relay(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let figures = relay::measure(
        connection,
        &args.amqp_url,
        args.count,
        args.relay_batch,
        &args.relays,
    )
    .await?;
    let (raw, raw_cpu) = figures.raw;
    report.push(
        Row::new(
            "raw_confirmed_publish",
            "broker ceiling",
            "raw pipelined confirmed publish",
            rate(args.count, raw),
            "msgs/s",
        )
        .note(format!(
            "lapin, {} confirms outstanding, persistent, mandatory; {}",
            args.relay_batch,
            raw_cpu.describe()
        )),
    );
    let (publisher, publisher_cpu) = figures.publisher;
    report.push(
        Row::new(
            "publisher_batch",
            "oncely",
            "Publisher::publish_batch from memory (the relay's publish step)",
            rate(args.count, publisher),
            "msgs/s",
        )
        .against("raw_confirmed_publish")
        .note(format!(
            "batches of {}; {}",
            args.relay_batch,
            publisher_cpu.describe()
        )),
    );
    let mut cpu = serde_json::Map::new();
    cpu.insert("raw".into(), cpu_json(&raw_cpu));
    cpu.insert("publisher_batch".into(), cpu_json(&publisher_cpu));
    for (instances, elapsed, relay_cpu) in figures.relays {
        report.push(
            Row::new(
                format!("relay_x{instances}"),
                "oncely",
                format!(
                    "outbox relay, {instances} instance{}",
                    if instances == 1 { "" } else { "s" }
                ),
                rate(args.count, elapsed),
                "rows/s",
            )
            .against("raw_confirmed_publish")
            .note(format!(
                "committed rows to confirmed and marked, batch {}; {}",
                args.relay_batch,
                relay_cpu.describe()
            )),
        );
        cpu.insert(format!("relay_x{instances}"), cpu_json(&relay_cpu));
    }
    report.set("cpu_per_message_relay", serde_json::Value::Object(cpu));
    Ok(())
}

async fn latency(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let measured = latency::measure(
        connection,
        &args.amqp_url,
        args.latency_rate,
        args.latency_seconds,
        args.load_concurrency,
        args.prefetch,
    )
    .await?;
    let note = format!(
        "{} msgs at {:.0} msgs/s, concurrency {}, publish to COMMIT",
        measured.count, measured.rate, args.load_concurrency
    );
    for (key, label, value) in [
        ("latency_p50_ms", "end-to-end latency p50", measured.p50),
        ("latency_p99_ms", "end-to-end latency p99", measured.p99),
    ] {
        report.push(Row::new(key, "latency", label, value, "ms").note(note.clone()));
    }
    report.set(
        "latency",
        json!({
            "count": measured.count, "rate": measured.rate, "p50_ms": measured.p50,
            "p90_ms": measured.p90, "p99_ms": measured.p99, "max_ms": measured.max,
        }),
    );
    Ok(())
}

async fn memory(
    args: &Args,
    connection: &lapin::Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.soak_minutes.max(0.1) * 60.0);
    let measured = memory::measure(
        connection,
        &args.amqp_url,
        duration,
        args.load_concurrency,
        args.prefetch,
    )
    .await?;
    let note = format!(
        "{:.1} min, prefetch {}, concurrency {}, {} msgs at {:.0} msgs/s",
        args.soak_minutes, args.prefetch, args.load_concurrency, measured.processed, measured.rate
    );
    report.push(
        Row::new(
            "consumer_peak_rss_mib",
            "memory",
            "consumer peak RSS (VmHWM) under load",
            measured.peak_mib,
            "MiB",
        )
        .note(format!("target < 64 MiB; {note}")),
    );
    report.push(
        Row::new(
            "consumer_rss_growth_mib",
            "memory",
            "RSS growth, last fifth vs second fifth of the run",
            measured.late_mib - measured.early_mib,
            "MiB",
        )
        .note(format!(
            "{:.1} -> {:.1} MiB; flat means about 0",
            measured.early_mib, measured.late_mib
        )),
    );
    let samples: Vec<_> = measured
        .samples
        .iter()
        .map(|s| {
            json!([
                (s.at * 10.0).round() / 10.0,
                (s.rss_mib * 10.0).round() / 10.0
            ])
        })
        .collect();
    report.set(
        "memory",
        json!({ "samples_s_mib": samples, "peak_mib": measured.peak_mib }),
    );
    Ok(())
}
