//! Audit: keeps every order event, once.
//!
//! Run with:
//!   cargo run -p audit -- run      # consume audit.order-events.q until Ctrl-C / SIGTERM
//!   cargo run -p audit -- count    # events kept
//!   METRICS_ADDR=127.0.0.1:9465 cargo run -p audit -- run   # with /metrics and /health/*

use clap::{Parser, Subcommand};
use oncely::{Consumer, Inbox, PoolOptions};

#[derive(Parser, Debug)]
#[command(name = "audit", about = "Audit consumer of the oncely drill")]
struct Cli {
    #[command(flatten)]
    services: oncely_example_messages::Services,
    /// Exchange to bind to.
    #[arg(long, default_value = audit::ORDER_EVENTS_EXCHANGE)]
    exchange: String,
    /// Queue to consume.
    #[arg(long, default_value = audit::QUEUE)]
    queue: String,
    /// Name of the broker connection.
    #[arg(long, default_value = audit::CONSUMER)]
    connection_name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the inbox and audit migrations, then exit.
    Migrate,
    /// Consume until Ctrl-C or SIGTERM.
    Run,
    /// Print how many events are kept.
    Count,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = oncely::failpoints_from_env();
    oncely_example_messages::init_tracing("warn,audit=info");
    oncely_example_messages::exit_with_parent();
    let cli = Cli::parse();
    audit::migrate(&cli.services.database_url).await?;
    let pool = oncely::connect_pool(&cli.services.database_url, &PoolOptions::default());
    match cli.command {
        Command::Migrate => println!("migrations applied"),
        Command::Run => {
            let consumer = cli
                .services
                .batching(Consumer::builder(
                    audit::record_event,
                    Inbox::new(pool.clone()),
                ))
                .amqp_url(&cli.services.amqp_url)
                .connection_name(&cli.connection_name)
                .topology(audit::topology(&cli.exchange, &cli.queue))
                .build()?;
            let stats = consumer.live_stats();
            cli.services.print_stats(audit::CONSUMER, stats.clone());
            oncely::Service::new(audit::CONSUMER)
                .database(pool)
                .consumer(consumer)
                .run()
                .await?;
            let s = stats.snapshot();
            println!(
                "audit stopped: kept {} events, {} duplicates skipped",
                s.processed, s.duplicates
            );
        }
        Command::Count => {
            let mut conn = pool.get().await?;
            println!("{}", audit::count_events(&mut conn).await?);
        }
    }
    Ok(())
}
