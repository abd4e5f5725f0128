//! The oncely practice drill: the whole design on one machine, under fire.
//!
//! Starts the inventory API, order-service's relay, billing, fulfillment and audit as separate
//! processes; places orders through the outbox; meanwhile SIGKILLs and restarts the consumers
//! and the relay, keeps audit down for a while, closes every broker connection once and
//! publishes duplicates and poison messages. When everything is drained it prints a report and
//! exits non-zero unless every order has exactly one invoice, one reservation (here and at the
//! API) and one audit row, and the dead-letter queues hold exactly the poison messages.
//!
//!   cargo run -p drill -- --orders 3000

mod broker;
mod faults;
mod fleet;
mod hostile;
mod monitor;
mod plan;
mod produce;
mod proxy;
mod report;

use clap::Parser;
use faults::FaultKind;
use plan::{Plan, Setup};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "drill",
    about = "The oncely practice drill: no loss, no duplicate effect"
)]
struct Cli {
    #[command(flatten)]
    services: oncely_example_messages::Services,
    /// Orders to place.
    #[arg(long, default_value_t = 3000)]
    orders: usize,
    /// Orders placed per second.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Faults to inject (comma-separated; see the list below).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,audit-outage,cut,api"
    )]
    faults: Vec<FaultKind>,
    /// SIGKILLs of a consumer or the relay (kill, relay-kill), each restarted after a pause.
    #[arg(long, default_value_t = 8)]
    kills: usize,
    /// Extra publishes of an order's event with its message id, as a share of the orders.
    #[arg(long, default_value_t = 0.1)]
    duplicate_rate: f64,
    /// Poison messages (invalid JSON, no message id): each must end in every DLQ, once.
    #[arg(long, default_value_t = 4)]
    poison: usize,
    /// Share of inventory API calls answered 503.
    #[arg(long, default_value_t = 0.02)]
    api_fail_rate: f64,
    /// Share of inventory API calls whose response is lost after the reservation is made.
    #[arg(long, default_value_t = 0.02)]
    api_lose_rate: f64,
    /// Run without any fault (same as an empty --faults).
    #[arg(long)]
    no_faults: bool,
    /// Suffix of the exchange and queue names, for runs that must not share the drill's
    /// standard names (tests). Empty: `order.events`, `billing.order-events.q`, ...
    #[arg(long, default_value = "")]
    namespace: String,
    /// Delete the run's exchange and queues at the end (with --namespace).
    #[arg(long)]
    cleanup: bool,
    /// Give up waiting for the drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Give up when nothing has moved for this many seconds after the producers and every
    /// fault are done (a message held for ever, say): the report then shows what is missing.
    #[arg(long, default_value_t = 120)]
    stall_secs: u64,
    /// Seed of the random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Directory of the service binaries (default: the drill's own).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for logs, counters.csv and report.json (default `target/drill/<run>`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    match drill(Cli::parse()).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("drill failed to run: {e:#}");
            std::process::exit(2);
        }
    }
}

/// One run: the plan, the services started from it, the watch until everything is settled,
/// and the report. Ok(false) when an invariant does not hold.
async fn drill(cli: Cli) -> anyhow::Result<bool> {
    oncely_example_messages::exit_with_parent();
    let mut plan = Plan::new(cli)?;
    plan.announce();
    let setup = Setup::start(&plan).await?;
    let outcome = monitor::watch(&plan, &setup).await?;
    let report = report::build(&plan, &setup, &outcome).await?;
    print!("{}", report.render());
    std::fs::write(
        plan.out_dir.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;

    if plan.cli.cleanup && !plan.cli.namespace.is_empty() {
        setup.broker.cleanup(&plan.names).await;
    }
    setup.publisher.close().await;
    setup.broker.close().await;
    Ok(report.ok)
}

/// Prints `text` as a line of its own; on a terminal it first clears the progress bar.
fn note(tty: bool, text: &str) {
    if tty {
        println!("\r\x1b[2K  {text}");
    } else {
        println!("  {text}");
    }
}
