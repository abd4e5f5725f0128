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

mod fleet;
mod report;

use anyhow::Context;
use clap::Parser;
use fleet::{Fleet, Role};
use oncely::{ConfirmPublisher, PoolOptions, RetryPolicy, Topology};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use report::Report;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    /// SIGKILLs of a consumer or the relay (each restarted after a short pause).
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
    /// Run without any fault (kills, cuts, API failures).
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
    /// Seed of the random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Directory of the service binaries (default: the drill's own).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for logs, counters.csv and report.json (default target/drill/<run>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// Names of one run's exchange and queues.
#[derive(Debug, Clone)]
struct Names {
    exchange: String,
    billing: Topology,
    fulfillment: Topology,
    audit: Topology,
}

impl Names {
    fn new(namespace: &str) -> Names {
        let n = |base: &str| {
            if namespace.is_empty() {
                base.to_owned()
            } else {
                format!("{base}.{namespace}")
            }
        };
        let exchange = n(oncely_example_messages::ORDER_EVENTS_EXCHANGE);
        Names {
            billing: billing_topology(&exchange, &n(billing::QUEUE)),
            fulfillment: fulfillment::topology(&exchange, &n(fulfillment::QUEUE))
                .retry_tiers(fulfillment::retry_policy().tiers()),
            audit: audit::topology(&exchange, &n(audit::QUEUE))
                .retry_tiers(RetryPolicy::default().tiers()),
            exchange,
        }
    }

    fn all(&self) -> [&Topology; 3] {
        [&self.billing, &self.fulfillment, &self.audit]
    }
}

fn billing_topology(exchange: &str, queue: &str) -> Topology {
    Topology::new(exchange, queue)
        .bind(billing::ORDER_CREATED_V1)
        .retry_tiers(RetryPolicy::default().tiers())
}

/// A fault, due when the slowest consumer has processed `at` of the orders.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill { role: Role, down: Duration },
    CutConnections,
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

async fn drill(cli: Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let run = format!("{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let prefix = format!("ord-{run}-{}", std::process::id());
    let seed = cli.seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names = Names::new(&cli.namespace);
    let connection_prefix = format!("drill-{}-", std::process::id());
    let out_dir = cli
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/drill").join(&run));
    std::fs::create_dir_all(&out_dir)?;
    let database_url = cli.services.database_url.clone();
    let amqp_url = cli.services.amqp_url.clone();

    println!(
        "drill {run}: {} orders ({prefix}-*), {} kills, duplicate rate {}, {} poison, seed {seed}",
        cli.orders,
        if cli.no_faults { 0 } else { cli.kills },
        cli.duplicate_rate,
        cli.poison
    );
    println!(
        "logs, counters.csv and report.json in {}",
        out_dir.display()
    );

    // Migrations once, before any service starts (they would race each other otherwise).
    billing::migrate(&database_url).await?;
    fulfillment::migrate(&database_url).await?;
    fulfillment::migrate_inventory_api(&database_url).await?;
    audit::migrate(&database_url).await?;
    order_service::migrate(&database_url).await?;
    let pool = oncely::connect_pool(&database_url, &PoolOptions::default());

    // Every queue bound before the first event exists, so none is routed to only some of them.
    let connection = Arc::new(
        oncely::connect(
            &amqp_url,
            &format!("{connection_prefix}publisher"),
            Default::default(),
        )
        .await
        .context("connecting to RabbitMQ")?,
    );
    for topology in names.all() {
        topology.declare(&connection).await?;
    }
    let publisher = ConfirmPublisher::new(connection.clone(), Duration::from_secs(10));

    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the drill's directory")?
            .to_owned(),
    };
    let mut fleet = Fleet::new(
        &bin_dir,
        &out_dir,
        vec![
            ("AMQP_URL".into(), amqp_url.clone()),
            ("DATABASE_URL".into(), database_url.clone()),
            ("ONCELY_STATS_EVERY_MS".into(), "250".into()),
        ],
    )?;
    let (fail_rate, lose_rate) = if cli.no_faults {
        (0.0, 0.0)
    } else {
        (cli.api_fail_rate, cli.api_lose_rate)
    };
    let s = |v: &str| v.to_owned();
    fleet.set_args(
        Role::InventoryApi,
        vec![
            s("inventory-api"),
            s("--addr"),
            s("127.0.0.1:0"),
            s("--fail-rate"),
            fail_rate.to_string(),
            s("--lose-rate"),
            lose_rate.to_string(),
            s("--lose-delay-ms"),
            s("2500"),
        ],
    );
    let first = fleet
        .start(Role::InventoryApi, true)
        .await?
        .unwrap_or_default();
    let inventory_url = first
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .with_context(|| format!("inventory API said {first:?}"))?
        .to_owned();
    let conn_name = |role: Role| format!("{connection_prefix}{}", role.name());
    fleet.set_args(
        Role::Relay,
        vec![
            s("--exchange"),
            names.exchange.clone(),
            s("--connection-name"),
            conn_name(Role::Relay),
            s("relay"),
        ],
    );
    fleet.set_args(
        Role::Billing,
        vec![
            s("run"),
            s("--exchange"),
            names.exchange.clone(),
            s("--queue"),
            names.billing.queue().to_owned(),
            s("--connection-name"),
            conn_name(Role::Billing),
        ],
    );
    fleet.set_args(
        Role::Fulfillment,
        vec![
            s("run"),
            s("--inventory-url"),
            inventory_url.clone(),
            s("--exchange"),
            names.exchange.clone(),
            s("--queue"),
            names.fulfillment.queue().to_owned(),
            s("--connection-name"),
            conn_name(Role::Fulfillment),
        ],
    );
    fleet.set_args(
        Role::Audit,
        vec![
            s("--exchange"),
            names.exchange.clone(),
            s("--queue"),
            names.audit.queue().to_owned(),
            s("--connection-name"),
            conn_name(Role::Audit),
            s("run"),
        ],
    );
    let fleet = Arc::new(fleet);
    for role in [Role::Relay, Role::Billing, Role::Fulfillment, Role::Audit] {
        fleet.start(role, false).await?;
    }

    // Orders through the outbox, with duplicate publishes of events already placed.
    let placed = Arc::new(AtomicUsize::new(0));
    let duplicates_sent = Arc::new(AtomicUsize::new(0));
    let producer = {
        let pool = pool.clone();
        let prefix = prefix.clone();
        let exchange = names.exchange.clone();
        let placed = placed.clone();
        let duplicates_sent = duplicates_sent.clone();
        let (orders, rate, duplicate_rate, poison) =
            (cli.orders, cli.rate.max(1), cli.duplicate_rate, cli.poison);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::spawn(async move {
            let mut conn = pool.get().await?;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            for n in 0..orders {
                tick.tick().await;
                let order = order_service::order(&prefix, n);
                order_service::create_order(&mut conn, &order, &exchange).await?;
                placed.store(n + 1, Ordering::Relaxed);
                if rng.random_bool(duplicate_rate.clamp(0.0, 1.0)) {
                    let earlier = order_service::order(&prefix, rng.random_range(0..=n));
                    billing::publish_order(&publisher, &exchange, &earlier).await?;
                    duplicates_sent.fetch_add(1, Ordering::Relaxed);
                }
                if poison > 0 && n % (orders / poison).max(1) == 0 {
                    let i = n / (orders / poison).max(1);
                    if i < poison {
                        let kind = if i % 2 == 0 {
                            billing::PoisonKind::InvalidJson
                        } else {
                            billing::PoisonKind::MissingMessageId
                        };
                        billing::publish_poison(&publisher, &exchange, &prefix, i, kind).await?;
                    }
                }
            }
            anyhow::Ok(())
        })
    };

    // The faults, each due at a share of the orders processed by the slowest consumer.
    let mut faults: Vec<(f64, Fault)> = Vec::new();
    if !cli.no_faults {
        let mut victims = vec![Role::Billing, Role::Fulfillment, Role::Audit, Role::Relay];
        for k in 0..cli.kills {
            if k % victims.len() == 0 {
                victims.shuffle(&mut rng);
            }
            let role = victims[k % victims.len()];
            let down = Duration::from_millis(rng.random_range(200..1500));
            faults.push((rng.random_range(0.05..0.85), Fault::Kill { role, down }));
        }
        // Audit down long enough for events to pile up in its quorum queue.
        faults.push((
            0.3,
            Fault::Kill {
                role: Role::Audit,
                down: Duration::from_secs(5),
            },
        ));
        faults.push((0.5, Fault::CutConnections));
        faults.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let mut faults = faults.into_iter().peekable();

    let csv_path = out_dir.join("counters.csv");
    let mut csv = std::fs::File::create(&csv_path)?;
    writeln!(
        csv,
        "elapsed_s,orders,published,invoices,reservations,audit,duplicates,retries,dead_letters"
    )?;
    let tty = std::io::stdout().is_terminal();
    let mut kills = 0usize;
    let mut cuts = 0usize;
    let mut restarts: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_csv = Instant::now() - Duration::from_secs(10);
    let mut producer = Some(producer);
    let mut settled_since: Option<Instant> = None;
    let n = cli.orders as i64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(p) = producer.as_ref()
            && p.is_finished()
            && let Some(p) = producer.take()
        {
            p.await.context("the order producer")??;
        }
        let mut conn = pool.get().await?;
        let st = report::state(&mut conn, &format!("{prefix}-")).await?;
        let fc = fulfillment::counts(&mut conn, &format!("{prefix}-")).await?;
        drop(conn);
        let totals = fleet.consumer_totals();
        let sum = |f: fn(&oncely::StatsSnapshot) -> u64| totals.values().map(f).sum::<u64>();
        let dead = dead_letters(&connection, &names).await;
        let slowest = st.invoices.min(fc.reservations).min(st.audit);
        let progress = slowest as f64 / n.max(1) as f64;

        while let Some((at, fault)) = faults.peek().copied() {
            if progress < at {
                break;
            }
            faults.next();
            match fault {
                Fault::Kill { role, down } => {
                    if !fleet.kill(role).await {
                        continue;
                    }
                    kills += 1;
                    note(
                        tty,
                        &format!(
                            "SIGKILL {} at {:.0}% (back in {:.1} s)",
                            role.name(),
                            progress * 100.0,
                            down.as_secs_f64()
                        ),
                    );
                    let fleet = fleet.clone();
                    restarts.push(tokio::spawn(async move {
                        tokio::time::sleep(down).await;
                        fleet.start(role, false).await.map(|_| ())
                    }));
                }
                Fault::CutConnections => {
                    let prefix = connection_prefix.clone();
                    let closed = tokio::task::spawn_blocking(move || {
                        oncely_example_messages::close_connections_where(
                            |name| name.starts_with(&prefix) && !name.ends_with("publisher"),
                            "oncely drill: broker closed the connection",
                        )
                    })
                    .await?;
                    match closed {
                        Ok(count) => {
                            cuts += 1;
                            note(
                                tty,
                                &format!(
                                    "closed {count} broker connections at {:.0}%",
                                    progress * 100.0
                                ),
                            );
                        }
                        Err(e) => note(tty, &format!("could not close connections: {e}")),
                    }
                }
            }
        }
        for role in [Role::Relay, Role::Billing, Role::Fulfillment, Role::Audit] {
            if let Some(status) = fleet.exited(role).await {
                anyhow::bail!(
                    "{} exited by itself ({status}); see {}",
                    role.name(),
                    fleet.log_path(role).display()
                );
            }
        }

        let elapsed = started.elapsed().as_secs_f64();
        if last_csv.elapsed() >= Duration::from_secs(1) {
            last_csv = Instant::now();
            writeln!(
                csv,
                "{elapsed:.1},{},{},{},{},{},{},{},{}",
                st.orders,
                st.published,
                st.invoices,
                fc.reservations,
                st.audit,
                sum(|s| s.duplicates),
                sum(|s| s.retried),
                dead.dlq
            )?;
        }
        let line = format!(
            "[{}] {:>5.0}s orders {}/{} published {} invoices {} reservations {} audit {} | dup {} retries {} dlq {} kills {}",
            bar(progress),
            elapsed,
            st.orders,
            n,
            st.published,
            st.invoices,
            fc.reservations,
            st.audit,
            sum(|s| s.duplicates),
            sum(|s| s.retried),
            dead.dlq,
            kills
        );
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!("{line}");
        }

        let settled = producer.is_none()
            && faults.peek().is_none()
            && restarts.iter().all(|r| r.is_finished())
            && st.orders == n
            && st.unpublished == 0
            && st.invoices == n
            && fc.reservations == n
            && st.audit == n
            && fc.pending_operations == 0
            && dead.waiting == 0
            && dead.per_queue.iter().all(|d| *d >= cli.poison as u32);
        // Settled for two seconds in a row: late duplicates would have shown by then.
        match (settled, settled_since) {
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(2) => break,
            (true, None) => settled_since = Some(Instant::now()),
            (true, Some(_)) => {}
            (false, _) => settled_since = None,
        }
        if Instant::now() > deadline {
            note(
                tty,
                &format!("gave up waiting after {} s", cli.timeout_secs),
            );
            break;
        }
    }
    if tty {
        println!();
    }
    for r in restarts {
        r.await??;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let api = api_stats(&inventory_url).await;
    fleet.stop_all(Duration::from_secs(30)).await;

    // The report, from the final state.
    let mut conn = pool.get().await?;
    let st = report::state(&mut conn, &format!("{prefix}-")).await?;
    let fc = fulfillment::counts(&mut conn, &format!("{prefix}-")).await?;
    drop(conn);
    let dead = dead_letters(&connection, &names).await;
    let totals = fleet.consumer_totals();
    let sum = |f: fn(&oncely::StatsSnapshot) -> u64| totals.values().map(f).sum::<u64>();
    let mut r = Report {
        run: run.clone(),
        elapsed_s,
        ..Report::default()
    };
    r.figure("orders", st.orders);
    r.figure("events published", st.published);
    r.figure("invoices", st.invoices);
    r.figure("reservations", fc.reservations);
    r.figure("audit rows", st.audit);
    r.figure("duplicates detected", sum(|s| s.duplicates));
    r.figure("retries", sum(|s| s.retried));
    r.figure("dead letters", dead.dlq);
    r.figure("requeued (infrastructure)", sum(|s| s.requeued));
    r.figure(
        "duplicate publishes injected",
        duplicates_sent.load(Ordering::Relaxed),
    );
    r.figure("poison messages injected", cli.poison);
    r.figure("SIGKILLs", kills);
    r.figure("broker connection cuts", cuts);
    r.figure("inventory API calls", fc.api_calls);
    r.figure(
        "inventory API replays",
        api.map(|a| a.replayed).unwrap_or(0),
    );
    r.figure(
        "inventory API lost responses",
        api.map(|a| a.responses_lost).unwrap_or(0),
    );
    r.figure("settled by reconciliation", fc.settled_by_reconciler);
    r.check("orders placed", n, st.orders);
    r.check("events published", n, st.published);
    r.check("events left in the outbox", 0, st.unpublished);
    r.check("invoices (one per order)", n, st.invoices);
    r.check("reservations (one per order)", n, fc.reservations);
    r.check("reservations at the inventory API", n, fc.api_reservations);
    r.check(
        "orders reserved twice at the API",
        0,
        fc.api_orders_reserved_twice,
    );
    r.check("reservation ids differing from the API", 0, fc.mismatched);
    r.check("reservation calls unsettled", 0, fc.pending_operations);
    r.check("audit rows (one per event)", n, st.audit);
    for (topology, count) in names.all().iter().zip(&dead.per_queue) {
        r.check(
            &format!("{} (poison only)", topology.dlq()),
            cli.poison as i64,
            *count,
        );
    }
    r.check(
        "messages left in work, retry and parking queues",
        0,
        dead.waiting,
    );
    r.ok = r.problems().is_empty();
    print!("{}", r.render());
    std::fs::write(out_dir.join("report.json"), serde_json::to_vec_pretty(&r)?)?;

    if cli.cleanup && !cli.namespace.is_empty() {
        cleanup(&connection, &names).await;
    }
    oncely::close_connection(&connection, 200, "drill done").await;
    Ok(r.ok)
}

fn bar(progress: f64) -> String {
    let filled = ((progress.clamp(0.0, 1.0)) * 20.0).round() as usize;
    format!("{}{}", "#".repeat(filled), ".".repeat(20 - filled))
}

fn note(tty: bool, text: &str) {
    if tty {
        println!("\r\x1b[2K  {text}");
    } else {
        println!("  {text}");
    }
}

#[derive(Debug, Default)]
struct QueueState {
    /// Messages in each topology's DLQ, in [`Names::all`] order.
    per_queue: Vec<u32>,
    /// Their sum.
    dlq: u32,
    /// Messages ready in work, delay and parking queues.
    waiting: u32,
}

async fn dead_letters(connection: &oncely::lapin::Connection, names: &Names) -> QueueState {
    let mut state = QueueState::default();
    for topology in names.all() {
        let dlq = queue_len(connection, &topology.dlq()).await;
        state.per_queue.push(dlq);
        state.dlq += dlq;
        for q in topology.queues() {
            if q != topology.dlq() {
                state.waiting += queue_len(connection, &q).await;
            }
        }
    }
    state
}

async fn queue_len(connection: &oncely::lapin::Connection, queue: &str) -> u32 {
    use oncely::lapin::options::QueueDeclareOptions;
    let Ok(channel) = connection.create_channel().await else {
        return u32::MAX;
    };
    let n = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            Default::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(u32::MAX);
    if channel.status().connected() {
        oncely::close_channel(&channel, 200, "counted").await;
    }
    n
}

async fn api_stats(url: &str) -> Option<fulfillment::inventory_api::ApiStatsSnapshot> {
    let client = fulfillment::InventoryClient::new(url, Duration::from_secs(2)).ok()?;
    client.stats().await.ok()
}

async fn cleanup(connection: &oncely::lapin::Connection, names: &Names) {
    use oncely::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for topology in names.all() {
        for q in topology.queues() {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = channel
        .exchange_delete(
            names.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    oncely::close_channel(&channel, 200, "cleaned up").await;
}
