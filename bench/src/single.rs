//! oncely's `billing` consumer (`billing::create_invoice`): single-message mode (one inbox
//! transaction per delivery, `concurrency` deliveries at once) or batched mode (`batch`
//! deliveries per transaction, `concurrency` batches at once).

use crate::report::{Report, Row};
use crate::support::{Route, Scratch, billing_schema, counted, on_scratch, rate, wait_until};
use crate::{Args, ceiling, cpu};
use lapin::Connection;
use oncely::testing::unique_name;
use oncely::{Consumer, Inbox, PoolOptions};
use serde_json::json;
use std::time::{Duration, Instant};

/// One measured drain.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// Messages timed (warm-up excluded).
    pub count: usize,
    /// Their time.
    pub elapsed: Duration,
    /// CPU per message.
    pub cpu: cpu::PerMessage,
}

/// Fills a fresh queue with `warmup + count` orders, starts the billing consumer, and times the
/// `count` deliveries after the warm-up ones settled (connections, topology declaration and the
/// pool's first connections are then behind it). Checks one invoice per order. The consumer's
/// prefetch is `args.prefetch`.
pub async fn drain(
    connection: &Connection,
    args: &Args,
    concurrency: usize,
    count: usize,
    batch: Option<usize>,
) -> anyhow::Result<Drained> {
    let route = Route::OrderCreated;
    on_scratch(connection, args, "bench_single", route, |scratch| {
        measure(scratch, concurrency, count, batch)
    })
    .await
}

async fn measure(
    scratch: Scratch<'_>,
    concurrency: usize,
    count: usize,
    batch: Option<usize>,
) -> anyhow::Result<Drained> {
    let prefetch = scratch.args.prefetch;
    let prefix = scratch.name.as_str();
    let warmup = (concurrency * 4).max(100);
    let total = warmup + count;
    scratch.publish(prefix, 0..total).await?;

    let schema = billing_schema().await?;
    let pool = oncely::connect_pool(
        schema.url(),
        &PoolOptions {
            max_size: (concurrency as u32).max(1) * 2,
            ..PoolOptions::default()
        },
    );
    let mut builder = Consumer::builder(billing::create_invoice, Inbox::new(pool.clone()))
        .amqp_url(&scratch.args.amqp_url)
        .connection_name(format!("{prefix}-consumer"))
        .topology(scratch.topology.clone())
        .concurrency(concurrency)
        .prefetch(prefetch);
    if let Some(size) = batch {
        // Room for every batch to fill.
        let prefetch = prefetch.max((size * concurrency).min(u16::MAX as usize) as u16);
        builder = builder
            .batch(size, Duration::from_millis(20))
            .prefetch(prefetch);
    }
    let consumer = builder.build().expect("valid consumer settings").spawn();
    let limit = Duration::from_secs(600);
    wait_until("warm-up", limit, || {
        consumer.stats().settled() as usize >= warmup
    })
    .await?;
    let cpu_before = cpu::snapshot(schema.name()).await;
    let started = Instant::now();
    let settled_before = consumer.stats().settled() as usize;
    wait_until("oncely drain", limit, || {
        consumer.stats().settled() as usize >= total
    })
    .await?;
    let elapsed = started.elapsed();
    let cpu_after = cpu::snapshot(schema.name()).await;
    let settled = consumer.stats().settled() as usize - settled_before;
    consumer.shutdown().await?;

    let mut conn = pool.get().await?;
    let invoices = billing::count_invoices(&mut conn, prefix).await?;
    anyhow::ensure!(
        invoices as usize == total,
        "expected {total} invoices from oncely, found {invoices}"
    );
    Ok(Drained {
        count: settled,
        elapsed,
        cpu: cpu::per_message(&cpu_before, &cpu_after, settled),
    })
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

/// The per-message section's rows at one concurrency: the PostgreSQL ceiling (pipelined and
/// not) and oncely, in `rounds` interleaved rounds so that all three see the same load of a
/// shared machine.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
    concurrency: usize,
) -> anyhow::Result<()> {
    let rounds = args.rounds.max(1);
    let count = (args.count_at(concurrency) / rounds).max(1);
    let mut pg = [Tally::default(), Tally::default()];
    let mut oncely = Tally::default();
    for _ in 0..rounds {
        if args.runs("pg") {
            ceiling_round(concurrency, count, &mut pg).await?;
        }
        if args.runs("oncely") {
            let drained = drain(connection, args, concurrency, count, None).await?;
            oncely.add(drained.count, drained.elapsed, drained.cpu);
        }
    }
    let clients = counted(concurrency, "client", "clients");
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
                    format!("inbox transaction per message, {clients}{suffix}"),
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
            "pg_pipelined": pg[0].cpu().json(),
            "pg_sequential": pg[1].cpu().json(),
            "oncely_single": oncely.cpu().json(),
        }),
    );
    Ok(())
}

/// One round of the PostgreSQL ceiling, pipelined then sequential, each on a fresh schema.
async fn ceiling_round(
    concurrency: usize,
    count: usize,
    pg: &mut [Tally; 2],
) -> anyhow::Result<()> {
    let shapes = [ceiling::Shape::Pipelined, ceiling::Shape::Sequential];
    for (shape, tally) in shapes.iter().zip(pg.iter_mut()) {
        let schema = billing_schema().await?;
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
    Ok(())
}
