//! oncely's `billing` consumer (`billing::create_invoice`): single-message mode (one inbox
//! transaction per delivery, `concurrency` deliveries at once) or batched mode (`batch`
//! deliveries per transaction, `concurrency` batches at once).

use crate::cpu;
use crate::support::{billing_schema, on_scratch_topology, publish_to_topology, wait_until};
use lapin::Connection;
use oncely::{Consumer, Inbox, PoolOptions, Topology};
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
/// pool's first connections are then behind it). Checks one invoice per order.
pub async fn drain(
    connection: &Connection,
    amqp_url: &str,
    concurrency: usize,
    prefetch: u16,
    count: usize,
    batch: Option<usize>,
) -> anyhow::Result<Drained> {
    on_scratch_topology(connection, "bench_single", |topology, name| async move {
        measure(
            connection,
            amqp_url,
            &topology,
            &name,
            concurrency,
            prefetch,
            count,
            batch,
        )
        .await
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    connection: &Connection,
    amqp_url: &str,
    topology: &Topology,
    prefix: &str,
    concurrency: usize,
    prefetch: u16,
    count: usize,
    batch: Option<usize>,
) -> anyhow::Result<Drained> {
    let warmup = (concurrency * 4).max(100);
    let total = warmup + count;
    publish_to_topology(connection, topology, prefix, 0..total).await?;

    let schema = billing_schema().await?;
    let pool = oncely::connect_pool(
        schema.url(),
        &PoolOptions {
            max_size: (concurrency as u32).max(1) * 2,
            ..PoolOptions::default()
        },
    );
    let mut builder = Consumer::builder(billing::create_invoice, Inbox::new(pool.clone()))
        .amqp_url(amqp_url)
        .connection_name(format!("{prefix}-consumer"))
        .topology(topology.clone())
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
