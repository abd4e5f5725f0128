//! `oncely`: operate oncely consumers and outboxes.
//!
//! Exit codes: 0 success; 1 failure (a service unreachable, a query failed, a bad configuration
//! file); 2 bad usage; 3 refused (e.g. the migration is already in the target directory);
//! 4 `topology check` found missing or mismatched queues.

mod dlq;
mod migrations;
mod purge_floor;
mod stats;
mod topology;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "oncely",
    version,
    about = "Operate oncely consumers and outboxes"
)]
struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/oncely"
    )]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write oncely's tables into your service's Diesel migrations.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
    /// Declare or check the queues of the consumers in a configuration file.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Inspect and replay dead letters and parked messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inbox statistics and retention.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// Outbox statistics.
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Subcommand, Debug)]
enum MigrationsCommand {
    /// Write migration folders (up.sql, down.sql) for the inbox and/or outbox tables; both
    /// when neither flag is given. Refuses to write a table that is already there.
    Generate {
        /// Your migrations directory.
        #[arg(long, default_value = "migrations")]
        dir: std::path::PathBuf,
        /// The inbox table (`message_inbox`).
        #[arg(long)]
        inbox: bool,
        /// The outbox table (`outbox_message`).
        #[arg(long)]
        outbox: bool,
    },
    /// Apply the pending migrations of a Diesel migrations directory (folders of up.sql and
    /// down.sql), as `diesel migration run` would, without diesel_cli or libpq.
    Run {
        /// The migrations directory.
        #[arg(long, default_value = "migrations")]
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Declare every consumer's exchange, queue, bindings, delay queues, DLQ and parking lot
    /// (idempotent; a conflicting queue is reported with the differing argument).
    Declare {
        /// The configuration file.
        #[arg(long, default_value = "oncely.toml")]
        config: std::path::PathBuf,
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
    },
    /// Report missing queues and queues with other arguments than configured, changing
    /// nothing. Exit code 4 when there is something to report.
    Check {
        /// The configuration file.
        #[arg(long, default_value = "oncely.toml")]
        config: std::path::PathBuf,
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Count and show the oldest messages of QUEUE.dlq (or QUEUE.parking), leaving them in place.
    List {
        /// The consumer queue Q (its `Q.dlq` is listed).
        queue: String,
        /// How many messages to show.
        #[arg(long, default_value_t = 10)]
        last: usize,
        /// `dlq` or `parking`.
        #[arg(long, value_enum, default_value_t = dlq::Source::Dlq)]
        from: dlq::Source,
    },
    /// Move messages from QUEUE.dlq (or QUEUE.parking) back to QUEUE, keeping their message id:
    /// each is published with a confirm and only then acked from the dead-letter queue.
    Replay {
        /// The consumer queue Q.
        queue: String,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Show what would be replayed; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// `dlq` or `parking`.
        #[arg(long, value_enum, default_value_t = dlq::Source::Dlq)]
        from: dlq::Source,
    },
}

#[derive(Subcommand, Debug)]
enum InboxCommand {
    /// Rows per consumer and status, oldest and newest.
    Stats {
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
    },
    /// Delete processed rows older than the given age, in bounded batches (safe while consumers
    /// run). A message redelivered after its row is gone is processed again: keep the age above
    /// the longest a message can wait in a queue, a delay queue or the DLQ. An age below one day,
    /// or below the longest retry tier of the configuration file, is refused without `--force`.
    Purge {
        /// Age, e.g. `30d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// The configuration file whose retry tiers set the shortest age accepted. Default:
        /// `oncely.toml` when it exists in the working directory.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Purge even below the safe floor (ids purged can be processed again).
        #[arg(long)]
        force: bool,
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Rows per statement.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Unpublished count, oldest unpublished age, attempts, published count.
    Stats,
}

/// Closes an AMQP connection, bounded (see `oncely::amqp::close_connection`).
pub(crate) async fn close(connection: &oncely::lapin::Connection) {
    oncely::amqp::close_connection(connection, 200, "done").await;
}

/// A failure with its exit code.
#[derive(Debug)]
pub(crate) struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// `topology check` found differences.
#[derive(Debug)]
pub(crate) struct Mismatch(pub usize);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} problem(s) found", self.0)
    }
}

impl std::error::Error for Mismatch {}

/// Refuses a purge age below the floor (see `purge_floor`) unless forced.
fn check_purge_age(
    older_than: Duration,
    config: Option<std::path::PathBuf>,
    force: bool,
    consumer: Option<&str>,
) -> anyhow::Result<()> {
    let default = std::path::Path::new("oncely.toml");
    let config = match config {
        Some(path) => Some(oncely::config::Config::load(path)?),
        None if default.exists() => Some(oncely::config::Config::load(default)?),
        None => None,
    };
    let floor = purge_floor::purge_floor(config.as_ref(), consumer);
    if older_than >= floor.age {
        return Ok(());
    }
    if force {
        eprintln!(
            "oncely: warning: purging below the safe floor of {floor}: a message redelivered or replayed after its row is gone is processed again"
        );
        return Ok(());
    }
    Err(Refused(format!(
        "--older-than {} is below the safe floor of {floor}: a message redelivered or replayed after its inbox row is purged is processed again; pass --force to purge anyway",
        humantime::format_duration(older_than)
    ))
    .into())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrations(MigrationsCommand::Generate { dir, inbox, outbox }) => {
            let both = !inbox && !outbox;
            migrations::generate(&dir, inbox || both, outbox || both)
        }
        Command::Migrations(MigrationsCommand::Run { dir }) => {
            migrations::run(&cli.database_url, &dir).await
        }
        Command::Topology(TopologyCommand::Declare { config, consumer }) => {
            topology::declare(&config, consumer.as_deref()).await
        }
        Command::Topology(TopologyCommand::Check { config, consumer }) => {
            topology::check(&config, consumer.as_deref()).await
        }
        Command::Dlq(DlqCommand::List { queue, last, from }) => {
            dlq::list(&cli.amqp_url, &queue, from, last).await
        }
        Command::Dlq(DlqCommand::Replay {
            queue,
            limit,
            rate,
            dry_run,
            from,
        }) => dlq::replay(&cli.amqp_url, &queue, from, limit, rate, dry_run).await,
        Command::Inbox(InboxCommand::Stats { consumer }) => {
            stats::inbox(&cli.database_url, consumer.as_deref()).await
        }
        Command::Inbox(InboxCommand::Purge {
            older_than,
            config,
            force,
            consumer,
            batch,
        }) => match check_purge_age(older_than, config, force, consumer.as_deref()) {
            Ok(()) => stats::purge(&cli.database_url, older_than, consumer.as_deref(), batch).await,
            Err(e) => Err(e),
        },
        Command::Outbox(OutboxCommand::Stats) => stats::outbox(&cli.database_url).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Mismatch>().is_some() => {
            eprintln!("oncely: {e}");
            ExitCode::from(4)
        }
        Err(e) if e.downcast_ref::<Refused>().is_some() => {
            eprintln!("oncely: refused: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("oncely: {e:#}");
            ExitCode::from(1)
        }
    }
}
