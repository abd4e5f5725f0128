//! Memory of the consumer under load: the billing consumer runs as a child process (this very
//! binary, `consumer-child`), its queue kept full, and its RSS read from `/proc/<pid>/status`
//! once a second.

use crate::Args;
use crate::report::{Report, Row};
use crate::support::{Route, Scratch, billing_schema, on_scratch, queue_depth};
use billing::ORDER_CREATED_V1;
use lapin::Connection;
use oncely::{Consumer, Inbox, PoolOptions, Topology};
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// The memory section's rows: the consumer child's peak RSS under load and its growth.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    let measured = on_scratch(connection, args, "bench_memory", Route::OrderCreated, run).await?;
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
/// What the child consumer is given.
#[derive(clap::Args, Debug, Clone)]
pub struct ChildArgs {
    /// Exchange of the topology.
    #[arg(long)]
    pub exchange: String,
    /// Queue consumed.
    #[arg(long)]
    pub queue: String,
    /// Database URL (the bench schema).
    #[arg(long)]
    pub database_url: String,
    /// RabbitMQ URL.
    #[arg(long)]
    pub amqp_url: String,
    /// Deliveries processed at once.
    #[arg(long)]
    pub concurrency: usize,
    /// Broker prefetch.
    #[arg(long)]
    pub prefetch: u16,
}

/// The child: the billing consumer until its stdin closes.
pub async fn child(args: ChildArgs) -> anyhow::Result<()> {
    let pool = oncely::connect_pool(
        &args.database_url,
        &PoolOptions {
            max_size: (args.concurrency as u32).max(1) * 2,
            ..PoolOptions::default()
        },
    );
    let topology = Topology::new(&args.exchange, &args.queue).bind(ORDER_CREATED_V1);
    let consumer = Consumer::builder(billing::create_invoice, Inbox::new(pool))
        .amqp_url(&args.amqp_url)
        .connection_name(format!("{}-consumer", args.queue))
        .topology(topology)
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .build()
        .expect("valid consumer settings");
    consumer
        .run(async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        })
        .await?;
    Ok(())
}

/// One RSS sample.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the load started.
    pub at: f64,
    /// Resident set, MiB.
    pub rss_mib: f64,
}

/// The result of a memory run.
#[derive(Debug, Clone)]
pub struct Memory {
    /// Peak resident set of the child (`VmHWM`), MiB.
    pub peak_mib: f64,
    /// Highest RSS in the second fifth of the run (after warm-up), MiB.
    pub early_mib: f64,
    /// Highest RSS in the last fifth of the run, MiB.
    pub late_mib: f64,
    /// Messages the child processed per second on average.
    pub rate: f64,
    /// Messages processed.
    pub processed: i64,
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// Runs the consumer child with `args.prefetch` and `args.load_concurrency` for
/// `args.soak_minutes`, keeping at least `2 * prefetch` messages ready in its queue.
async fn run(scratch: Scratch<'_>) -> anyhow::Result<Memory> {
    let args = scratch.args;
    let duration = Duration::from_secs_f64(args.soak_minutes.max(0.1) * 60.0);
    let (concurrency, prefetch) = (args.load_concurrency, args.prefetch);
    let (connection, topology, name) = (scratch.connection, &scratch.topology, &scratch.name);
    let schema = billing_schema().await?;
    let refill = usize::from(prefetch).max(500) * 4;
    let mut published = 0;
    scratch.publish(name, 0..refill).await?;
    published += refill;

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("consumer-child")
        .args(["--exchange", topology.exchange()])
        .args(["--queue", topology.queue()])
        .args(["--database-url", schema.url()])
        .args(["--amqp-url", &args.amqp_url])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--prefetch", &prefetch.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("child exited at once"))?;

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < duration {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("consumer child exited early: {status}");
        }
        if started.elapsed() >= next_sample {
            let (rss, _) = read_status(pid)?;
            samples.push(Sample {
                at: started.elapsed().as_secs_f64(),
                rss_mib: rss,
            });
            next_sample += Duration::from_secs(1);
        }
        if (queue_depth(connection, topology.queue()).await? as usize) < refill / 2 {
            scratch.publish(name, published..published + refill).await?;
            published += refill;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, peak) = read_status(pid)?;
    let elapsed = started.elapsed();
    // Closing stdin stops the child gracefully.
    drop(child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }

    let pool = oncely::connect_pool(schema.url(), &PoolOptions::default());
    let mut conn = pool.get().await?;
    let processed = billing::count_invoices(&mut conn, name).await?;
    let window = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|s| s.at >= from * elapsed.as_secs_f64() && s.at <= to * elapsed.as_secs_f64())
            .map(|s| s.rss_mib)
            .fold(0.0, f64::max)
    };
    Ok(Memory {
        peak_mib: peak,
        early_mib: window(0.2, 0.4),
        late_mib: window(0.8, 1.0),
        rate: processed as f64 / elapsed.as_secs_f64(),
        processed,
        samples,
    })
}

/// `(VmRSS, VmHWM)` of a process, MiB.
fn read_status(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
