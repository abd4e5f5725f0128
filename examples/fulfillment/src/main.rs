//! Fulfillment: reserves stock for each order through the inventory API, never twice.
//!
//! Run with:
//!   cargo run -p fulfillment -- inventory-api --addr 127.0.0.1:8089   # the simulated API
//!   cargo run -p fulfillment -- run --inventory-url http://127.0.0.1:8089
//!   cargo run -p fulfillment -- reconcile --inventory-url http://127.0.0.1:8089

use anyhow::Context;
use clap::{Parser, Subcommand};
use fulfillment::inventory_api::{Faults, InventoryApi};
use fulfillment::{InventoryClient, ReserveStock};
use oncely::{Consumer, Inbox, PoolOptions};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "fulfillment",
    about = "Fulfillment consumer of the oncely drill"
)]
struct Cli {
    #[command(flatten)]
    services: oncely_example_messages::Services,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct Api {
    /// Base URL of the inventory API.
    #[arg(
        long,
        env = "INVENTORY_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8089"
    )]
    inventory_url: String,
    /// Give up on an API call after this many milliseconds (the call is retried).
    #[arg(long, default_value_t = 1000)]
    api_timeout_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the inbox and fulfillment migrations, then exit.
    Migrate,
    /// Consume fulfillment.order-events.q until Ctrl-C or SIGTERM, reconciling lost responses.
    Run {
        #[command(flatten)]
        api: Api,
        /// Deliveries processed at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Exchange to bind to.
        #[arg(long, default_value = fulfillment::ORDER_EVENTS_EXCHANGE)]
        exchange: String,
        /// Queue to consume.
        #[arg(long, default_value = fulfillment::QUEUE)]
        queue: String,
        /// Name of the broker connection.
        #[arg(long, default_value = fulfillment::CONSUMER)]
        connection_name: String,
        /// Run a reconciliation pass every this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        reconcile_every_ms: u64,
        /// Reconcile operations pending for longer than this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        settle_after_ms: u64,
    },
    /// One reconciliation pass, then exit.
    Reconcile {
        #[command(flatten)]
        api: Api,
        /// Reconcile operations pending for longer than this many milliseconds.
        #[arg(long, default_value_t = 0)]
        settle_after_ms: u64,
    },
    /// Serve the simulated inventory API until Ctrl-C or SIGTERM. Prints
    /// `inventory API listening on http://ADDR` on stdout once it accepts calls.
    InventoryApi {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8089")]
        addr: String,
        /// Share of reservation calls answered 503 before anything is reserved.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Share of reservation calls that reserve but whose response is held back.
        #[arg(long, default_value_t = 0.0)]
        lose_rate: f64,
        /// How long a held-back response waits, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        lose_delay_ms: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = oncely::failpoints_from_env();
    oncely_example_messages::init_tracing("warn,fulfillment=info");
    oncely_example_messages::exit_with_parent();
    let cli = Cli::parse();
    let database_url = &cli.services.database_url;
    match cli.command {
        Command::Migrate => {
            fulfillment::migrate(database_url).await?;
            fulfillment::migrate_inventory_api(database_url).await?;
            println!("migrations applied");
        }
        Command::Run {
            api,
            concurrency,
            exchange,
            queue,
            connection_name,
            reconcile_every_ms,
            settle_after_ms,
        } => {
            fulfillment::migrate(database_url)
                .await
                .context("running migrations")?;
            let client = client(&api)?;
            let inbox = oncely::connect_pool(database_url, &PoolOptions::default());
            let operations = oncely::connect_pool(
                database_url,
                &PoolOptions {
                    max_size: concurrency as u32 + 2,
                    ..PoolOptions::default()
                },
            );
            let policy = fulfillment::retry_policy();
            let consumer = cli
                .services
                .batching(Consumer::builder(
                    ReserveStock::new(operations.clone(), client.clone()),
                    Inbox::new(inbox.clone()),
                ))
                .amqp_url(&cli.services.amqp_url)
                .connection_name(connection_name)
                .topology(
                    cli.services
                        .queues(fulfillment::topology(&exchange, &queue)),
                )
                .retry_policy(policy)
                .concurrency(concurrency)
                .build()?;
            let stats = consumer.live_stats();
            cli.services
                .print_stats(fulfillment::CONSUMER, stats.clone());
            let (every, settle_after) = (
                Duration::from_millis(reconcile_every_ms),
                Duration::from_millis(settle_after_ms),
            );
            // The consumer and the reconciler, with /metrics and /health when METRICS_ADDR is
            // set, and one graceful shutdown on Ctrl-C / SIGTERM.
            oncely::Service::new(fulfillment::CONSUMER)
                .database(inbox)
                .consumer(consumer)
                .task("reconciler", move |stop| async move {
                    let stopped = stop.cancelled_owned();
                    fulfillment::reconcile_loop(operations, client, every, settle_after, stopped)
                        .await;
                    Ok::<(), std::convert::Infallible>(())
                })
                .run()
                .await?;
            let s = stats.snapshot();
            println!(
                "fulfillment stopped: reserved {} orders, {} duplicates skipped, {} retries",
                s.processed, s.duplicates, s.retried
            );
        }
        Command::Reconcile {
            api,
            settle_after_ms,
        } => {
            fulfillment::migrate(database_url).await?;
            let pool = oncely::connect_pool(database_url, &PoolOptions::default());
            let s = fulfillment::reconcile_once(
                &pool,
                &client(&api)?,
                Duration::from_millis(settle_after_ms),
            )
            .await?;
            println!(
                "examined {} pending operations: {} settled from the API, {} not reserved there",
                s.examined, s.settled, s.not_reserved
            );
        }
        Command::InventoryApi {
            addr,
            fail_rate,
            lose_rate,
            lose_delay_ms,
        } => {
            fulfillment::migrate_inventory_api(database_url).await?;
            let pool = oncely::connect_pool(database_url, &PoolOptions::default());
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            let local = listener.local_addr()?;
            let api = InventoryApi::new(
                pool,
                Faults {
                    fail_rate,
                    lose_rate,
                    lose_delay: Duration::from_millis(lose_delay_ms),
                },
            );
            let stats = api.stats();
            println!("inventory API listening on http://{local}");
            api.serve(listener, oncely::shutdown_signal()).await?;
            let s = stats.snapshot();
            println!(
                "inventory API stopped: {} requests, {} reservations, {} replayed",
                s.requests, s.created, s.replayed
            );
        }
    }
    Ok(())
}

fn client(api: &Api) -> anyhow::Result<InventoryClient> {
    Ok(InventoryClient::new(
        &api.inventory_url,
        Duration::from_millis(api.api_timeout_ms),
    )?)
}
