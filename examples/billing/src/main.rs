//! Billing: one invoice per order, whatever RabbitMQ redelivers.
//!
//! Run with:
//!   cargo run -p billing -- demo --count 1000 --duplicate-rate 0.2 --poison 7
//!   cargo run -p billing -- run                 # consume until Ctrl-C / SIGTERM
//!   cargo run -p billing -- publish --count 100 # publish orders to order.events
//!   METRICS_ADDR=127.0.0.1:9464 cargo run -p billing -- run   # with /metrics and /health/*

use anyhow::Context;
use billing::{PublishPlan, create_invoice};
use clap::{Parser, Subcommand};
use oncely::amqp::ConfirmPublisher;
use oncely::{Consumer, Inbox, PoolOptions, StatsSnapshot};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "billing", about = "Billing consumer of the oncely drill")]
struct Cli {
    #[command(flatten)]
    services: oncely_example_messages::Services,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the inbox and billing migrations, then exit.
    Migrate,
    /// Consume billing.order-events.q until Ctrl-C or SIGTERM.
    Run {
        /// Deliveries processed at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Exchange to bind to.
        #[arg(long, default_value = billing::ORDER_EVENTS_EXCHANGE)]
        exchange: String,
        /// Queue to consume.
        #[arg(long, default_value = billing::QUEUE)]
        queue: String,
        /// Name of the broker connection.
        #[arg(long, default_value = billing::CONSUMER)]
        connection_name: String,
        /// Configuration file with a [consumers.billing] section (overrides the flags above).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Publish orders (with duplicates and poison messages) to order.events.
    Publish {
        #[command(flatten)]
        batch: Batch,
    },
    /// Publish a batch, consume until it is settled, print what happened.
    Demo {
        #[command(flatten)]
        batch: Batch,
        /// Deliveries processed at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

#[derive(clap::Args, Debug)]
struct Batch {
    /// Distinct orders.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Extra publishes repeating an order, as a share of `count`.
    #[arg(long, default_value_t = 0.2)]
    duplicate_rate: f64,
    /// Bad messages (invalid JSON, no message id, wrong types, ...).
    #[arg(long, default_value_t = 7)]
    poison: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = oncely::failpoints_from_env();
    oncely_example_messages::init_tracing("warn,billing=info");
    oncely_example_messages::exit_with_parent();
    let cli = Cli::parse();
    billing::migrate(&cli.services.database_url)
        .await
        .context("running migrations")?;
    let pool = oncely::connect_pool(&cli.services.database_url, &PoolOptions::default());
    match cli.command {
        Command::Migrate => println!("migrations applied"),
        Command::Run {
            concurrency,
            exchange,
            queue,
            connection_name,
            config,
        } => {
            let (consumer, pool) = match config {
                Some(path) => {
                    let config = oncely::config::Config::load(&path)?;
                    let pool = oncely::connect_pool(
                        &config.connections.database_url,
                        &PoolOptions::default(),
                    );
                    let consumer = Consumer::builder(create_invoice, Inbox::new(pool.clone()))
                        .amqp_url(&config.connections.amqp_url)
                        .configure(config.consumer(billing::CONSUMER)?)
                        .build()?;
                    (consumer, pool)
                }
                None => {
                    let topology = cli.services.queues(
                        oncely::Topology::new(exchange, queue).bind(billing::ORDER_CREATED_V1),
                    );
                    let consumer = cli
                        .services
                        .batching(consumer(
                            &cli.services.amqp_url,
                            pool.clone(),
                            concurrency,
                            topology,
                        ))
                        .connection_name(connection_name)
                        .build()?;
                    (consumer, pool)
                }
            };
            let stats = consumer.live_stats();
            cli.services.print_stats(billing::CONSUMER, stats.clone());
            // Metrics and health from METRICS_ADDR, one graceful shutdown on Ctrl-C / SIGTERM.
            oncely::Service::new(billing::CONSUMER)
                .database(pool)
                .consumer(consumer)
                .run()
                .await?;
            print_stats(&stats.snapshot());
        }
        Command::Publish { batch } => {
            let prefix = run_prefix();
            let summary = publish(&cli.services.amqp_url, &prefix, &batch).await?;
            println!(
                "published {} messages to {}: {} orders ({prefix}-*), {} duplicates, {} poison",
                summary.total(),
                billing::ORDER_EVENTS_EXCHANGE,
                summary.orders,
                summary.duplicates,
                summary.poison
            );
        }
        Command::Demo {
            batch,
            concurrency,
            timeout_secs,
        } => {
            let _observability = oncely::observability::serve_from_env(&pool).await?;
            demo(
                &cli.services.amqp_url,
                pool,
                batch,
                concurrency,
                timeout_secs,
            )
            .await?
        }
    }
    Ok(())
}

fn consumer(
    amqp_url: &str,
    pool: oncely::Pool,
    concurrency: usize,
    topology: oncely::Topology,
) -> oncely::ConsumerBuilder<create_invoice> {
    Consumer::builder(create_invoice, Inbox::new(pool))
        .amqp_url(amqp_url)
        .topology(topology)
        .concurrency(concurrency)
}

fn run_prefix() -> String {
    format!("ord-{}", chrono::Utc::now().format("%Y%m%d%H%M%S%3f"))
}

async fn publish(
    amqp_url: &str,
    prefix: &str,
    batch: &Batch,
) -> anyhow::Result<billing::PublishSummary> {
    let connection =
        oncely::amqp::connect(amqp_url, "billing-publisher", Default::default()).await?;
    let connection = Arc::new(connection);
    // Declare first, so nothing published before the first consumer start is unroutable.
    billing::topology().declare(&connection).await?;
    let publisher = ConfirmPublisher::new(connection.clone(), Duration::from_secs(5));
    let plan = PublishPlan {
        prefix: prefix.to_owned(),
        orders: batch.count,
        duplicate_rate: batch.duplicate_rate,
        poison: batch.poison,
        seed: 7,
    };
    let summary =
        billing::publish_orders(&publisher, billing::ORDER_EVENTS_EXCHANGE, &plan).await?;
    let _ = connection.close(200, "published".into()).await;
    Ok(summary)
}

async fn demo(
    amqp_url: &str,
    pool: oncely::Pool,
    batch: Batch,
    concurrency: usize,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let prefix = run_prefix();
    let summary = publish(amqp_url, &prefix, &batch).await?;
    println!(
        "published {} messages: {} orders, {} duplicates, {} poison",
        summary.total(),
        summary.orders,
        summary.duplicates,
        summary.poison
    );
    let consumer = consumer(amqp_url, pool.clone(), concurrency, billing::topology())
        .build()?
        .spawn();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout_secs);
    let mut conn = pool.get().await?;
    loop {
        let invoices = billing::count_invoices(&mut conn, &format!("{prefix}-")).await? as usize;
        let stats = consumer.stats();
        if invoices >= summary.orders && stats.settled() as usize >= summary.total() {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "timed out: {invoices} of {} invoices after {timeout_secs}s ({stats:?})",
                summary.orders
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    drop(conn);
    let stats = consumer.stats();
    consumer.shutdown().await?;
    let mut conn = pool.get().await?;
    let invoices = billing::count_invoices(&mut conn, &format!("{prefix}-")).await?;
    println!(
        "consumed in {:.2}s at concurrency {concurrency}",
        elapsed.as_secs_f64()
    );
    println!(
        "invoices created:   {invoices} (orders published: {})",
        summary.orders
    );
    println!("duplicates skipped: {}", stats.duplicates);
    println!(
        "dead-lettered:      {} (to {})",
        stats.dead_lettered,
        billing::topology().dlq()
    );
    print_stats(&stats);
    if invoices as usize != summary.orders {
        anyhow::bail!(
            "expected exactly {} invoices, found {invoices}",
            summary.orders
        );
    }
    Ok(())
}

fn print_stats(stats: &StatsSnapshot) {
    println!(
        "consumer counters: received {} processed {} duplicates {} retried {} dead-lettered {} parked {} requeued {} ack-failures {} reconnects {}",
        stats.received,
        stats.processed,
        stats.duplicates,
        stats.retried,
        stats.dead_lettered,
        stats.parked,
        stats.requeued,
        stats.ack_failures,
        stats.reconnects
    );
}
