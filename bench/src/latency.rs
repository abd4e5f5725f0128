//! End-to-end latency at a fixed moderate rate: publish an order, and see when the transaction
//! that created its invoice committed.
//!
//! The commit time comes from a deferred constraint trigger on `invoices` (in the bench's own
//! schema only): it fires at COMMIT, inside the committing transaction, and records
//! `clock_timestamp()`. The publish time is taken just before `basic_publish`. Both clocks are
//! this machine's.

use crate::Args;
use crate::report::{Report, Row};
use crate::support::{Route, Scratch, billing_schema, on_scratch, wait_until};
use billing::{ORDER_CREATED_V1, order, order_properties};
use lapin::Connection;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use oncely::{Consumer, Inbox, PoolOptions, Topology};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::NoTls;

const COMMIT_CLOCK: &str = "
CREATE TABLE bench_commit (order_id TEXT PRIMARY KEY, committed_at TIMESTAMPTZ NOT NULL);
CREATE FUNCTION bench_commit_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_commit VALUES (NEW.order_id, clock_timestamp());
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_commit_time AFTER INSERT ON invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_commit_time();";

/// The latency section's rows: p50 and p99 from publish to commit at `args.latency_rate`.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let measured = on_scratch(connection, args, "bench_latency", Route::OrderCreated, run).await?;
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

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Messages measured.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
    /// Rate actually reached by the publisher.
    pub rate: f64,
}

/// Publishes `args.latency_rate` orders per second for `args.latency_seconds` to a billing
/// consumer with `args.load_concurrency` and `args.prefetch`, and measures publish-to-commit of
/// each.
async fn run(scratch: Scratch<'_>) -> anyhow::Result<Latency> {
    let args = scratch.args;
    let (rate, seconds) = (args.latency_rate, args.latency_seconds);
    let (concurrency, prefetch) = (args.load_concurrency, args.prefetch);
    let (connection, topology, name) = (scratch.connection, &scratch.topology, &scratch.name);
    let schema = billing_schema().await?;
    let (client, db_connection) = tokio_postgres::connect(schema.url(), NoTls).await?;
    tokio::spawn(db_connection);
    client.batch_execute(COMMIT_CLOCK).await?;

    let pool = oncely::connect_pool(
        schema.url(),
        &PoolOptions {
            max_size: (concurrency as u32).max(1) * 2,
            ..PoolOptions::default()
        },
    );
    let consumer = Consumer::builder(billing::create_invoice, Inbox::new(pool))
        .amqp_url(&args.amqp_url)
        .connection_name(format!("{name}-consumer"))
        .topology(topology.clone())
        .concurrency(concurrency)
        .prefetch(prefetch)
        .build()
        .expect("valid consumer settings")
        .spawn();
    let warmup = 100;
    scratch.publish(&format!("{name}_warm"), 0..warmup).await?;
    wait_until("latency warm-up", Duration::from_secs(120), || {
        consumer.stats().settled() as usize >= warmup
    })
    .await?;

    let count = (u64::from(rate) * seconds) as usize;
    let prefix = format!("{name}_lat");
    let (sent, elapsed) = paced_publish(connection, topology, &prefix, count, rate).await?;
    wait_until("latency drain", Duration::from_secs(600), || {
        consumer.stats().settled() as usize >= warmup + count
    })
    .await?;
    consumer.shutdown().await?;

    let rows = client
        .query(
            "SELECT order_id, (extract(epoch FROM committed_at) * 1000000)::int8 \
             FROM bench_commit WHERE order_id LIKE $1",
            &[&format!("{prefix}-%")],
        )
        .await?;
    let mut latencies: Vec<f64> = rows
        .iter()
        .filter_map(|row| {
            let order_id: String = row.get(0);
            let committed: i64 = row.get(1);
            sent.get(&order_id)
                .map(|sent| (committed - sent) as f64 / 1000.0)
        })
        .collect();
    anyhow::ensure!(
        latencies.len() == count,
        "expected {count} commit times, found {}",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        count,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
        rate: count as f64 / elapsed.as_secs_f64(),
    })
}

/// Publishes `count` orders at `rate` per second; the publish time of each (µs since the epoch)
/// by order id, and how long publishing took.
async fn paced_publish(
    connection: &Connection,
    topology: &Topology,
    prefix: &str,
    count: usize,
    rate: u32,
) -> anyhow::Result<(HashMap<String, i64>, Duration)> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = HashMap::with_capacity(count);
    let mut pending = VecDeque::new();
    let started = std::time::Instant::now();
    for n in 0..count {
        ticks.tick().await;
        let o = order(prefix, n);
        let body = serde_json::to_vec(&o)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
        sent.insert(o.order_id.clone(), now);
        pending.push_back(
            channel
                .basic_publish(
                    topology.exchange().into(),
                    ORDER_CREATED_V1.into(),
                    BasicPublishOptions::default(),
                    &body,
                    order_properties(&o).with_delivery_mode(2),
                )
                .await?,
        );
        while pending.len() > 1000
            && let Some(confirm) = pending.pop_front()
        {
            anyhow::ensure!(confirm.await?.is_ack(), "broker refused a message");
        }
    }
    let elapsed = started.elapsed();
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "broker refused a message");
    }
    let _ = channel.close(200, "published".into()).await;
    Ok((sent, elapsed))
}
