//! Order service: creates orders (order row + outbox row in one transaction) and relays their
//! events to RabbitMQ.
//!
//! Run with:
//!   cargo run -p order-service -- create --count 100
//!   cargo run -p order-service -- relay            # until Ctrl-C / SIGTERM
//!   cargo run -p order-service -- run --count 100  # both
//!   METRICS_ADDR=127.0.0.1:9466 cargo run -p order-service -- relay   # with /metrics and /health/*

use clap::{Parser, Subcommand};
use oncely::outbox::{Relay, RelayOptions};
use oncely::{PoolOptions, Publisher, PublisherOptions};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "order-service", about = "Order service of the oncely drill")]
struct Cli {
    #[command(flatten)]
    services: oncely_example_messages::Services,
    /// Exchange events go to.
    #[arg(long, default_value = order_service::ORDER_EVENTS_EXCHANGE)]
    exchange: String,
    /// Name of the relay's broker connection.
    #[arg(long, default_value = "order-service-relay")]
    connection_name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the outbox and orders migrations, then exit.
    Migrate,
    /// Create N orders, each with its event, in one transaction each.
    Create {
        /// How many.
        #[arg(long, default_value_t = 100)]
        count: usize,
    },
    /// Publish outbox events until Ctrl-C or SIGTERM.
    Relay,
    /// Create N orders, then relay until Ctrl-C or SIGTERM.
    Run {
        /// How many.
        #[arg(long, default_value_t = 100)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = oncely::failpoints_from_env();
    oncely_example_messages::init_tracing("warn,order_service=info,oncely_outbox=info");
    oncely_example_messages::exit_with_parent();
    let cli = Cli::parse();
    order_service::migrate(&cli.services.database_url).await?;
    let pool = oncely::connect_pool(&cli.services.database_url, &PoolOptions::default());
    match cli.command {
        Command::Migrate => println!("migrations applied"),
        Command::Create { count } => create(&pool, &cli.exchange, count).await?,
        Command::Relay => relay(&cli, pool).await?,
        Command::Run { count } => {
            create(&pool, &cli.exchange, count).await?;
            relay(&cli, pool).await?;
        }
    }
    Ok(())
}

async fn create(pool: &oncely::Pool, exchange: &str, count: usize) -> anyhow::Result<()> {
    let prefix = format!("ord-{}", std::process::id());
    let mut conn = pool.get().await?;
    for n in 0..count {
        order_service::create_order(&mut conn, &order_service::order(&prefix, n), exchange).await?;
    }
    println!("created {count} orders ({prefix}-*) with their order.created.v1 events");
    Ok(())
}

async fn relay(cli: &Cli, pool: oncely::Pool) -> anyhow::Result<()> {
    declare_exchange(cli).await?;
    let publisher = Arc::new(Publisher::new(
        &cli.services.amqp_url,
        cli.connection_name.as_str(),
        PublisherOptions::default(),
    ));
    let relay = Relay::new(
        &cli.services.database_url,
        publisher.clone(),
        RelayOptions {
            app_id: Some("order-service".to_owned()),
            name: "order-service".to_owned(),
            ..RelayOptions::default()
        },
    );
    tracing::info!("relaying outbox events to {}", cli.exchange);
    let stats = relay.stats();
    // Metrics and health from METRICS_ADDR, one shutdown on Ctrl-C or SIGTERM.
    oncely::Service::new("order-service")
        .database(pool)
        .relay(relay)
        .run()
        .await?;
    publisher.close().await;
    let stats = stats.snapshot();
    println!(
        "relay stopped: published {} failed attempts {} cycles {}",
        stats.published, stats.failed, stats.cycles
    );
    Ok(())
}

/// The order service owns its exchange: declare it (durable topic) before relaying, so events are
/// routable as soon as a consumer binds a queue.
async fn declare_exchange(cli: &Cli) -> anyhow::Result<()> {
    use oncely::lapin::options::ExchangeDeclareOptions;
    let connection = oncely::amqp::connect(
        &cli.services.amqp_url,
        "order-service-setup",
        Default::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            cli.exchange.as_str().into(),
            oncely::lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            Default::default(),
        )
        .await?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}
