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

mod faults;
mod fleet;
mod hostile;
mod proxy;
mod report;

use anyhow::Context;
use clap::Parser;
use faults::{Fault, FaultKind};
use fleet::{Fleet, Role};
use oncely::lapin::Connection;
use oncely::{OutgoingMessage, PoolOptions, Publisher, PublisherOptions, RetryPolicy, Topology};
use proxy::Proxy;
use rand::{Rng, SeedableRng};
use report::Report;
use std::collections::BTreeMap;
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

/// Names of one run's exchange and queues.
#[derive(Debug, Clone)]
struct Names {
    exchange: String,
    billing: Topology,
    fulfillment: Topology,
    audit: Topology,
}

impl Names {
    fn new(namespace: &str, services: &oncely_example_messages::Services) -> Names {
        let n = |base: &str| {
            if namespace.is_empty() {
                base.to_owned()
            } else {
                format!("{base}.{namespace}")
            }
        };
        let exchange = n(oncely_example_messages::ORDER_EVENTS_EXCHANGE);
        Names {
            billing: services.queues(billing_topology(&exchange, &n(billing::QUEUE))),
            fulfillment: services.queues(
                fulfillment::topology(&exchange, &n(fulfillment::QUEUE))
                    .retry_tiers(fulfillment::retry_policy().tiers()),
            ),
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
    oncely_example_messages::exit_with_parent();
    let started = Instant::now();
    let run = format!("{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let prefix = format!("ord-{run}-{}", std::process::id());
    let seed = cli.seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names = Names::new(&cli.namespace, &cli.services);
    let connection_prefix = format!("drill-{}-", std::process::id());
    let out_dir = cli
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/drill").join(&run));
    std::fs::create_dir_all(&out_dir)?;
    let mut kinds = if cli.no_faults {
        Vec::new()
    } else {
        cli.faults.clone()
    };
    kinds.sort();
    kinds.dedup();
    let kind_names: Vec<String> = kinds.iter().map(|k| k.name()).collect();
    let hostile = if kinds.contains(&FaultKind::Hostile) {
        hostile::messages(&prefix)
    } else {
        Vec::new()
    };
    // Valid orders sent by the hostile producer: invoiced, reserved and audited like the others.
    let hostile_orders = hostile::orders(&hostile) as i64;
    let database_url = cli.services.database_url.clone();
    let amqp_url = cli.services.amqp_url.clone();

    println!(
        "drill {run}: {} orders ({prefix}-*){}, faults [{}], duplicate rate {}, {} poison, seed {seed}",
        cli.orders,
        if cli.services.batch > 0 {
            format!(", consumers in batches of {}", cli.services.batch)
        } else {
            String::new()
        },
        kind_names.join(", "),
        cli.duplicate_rate,
        cli.poison
    );
    let broker_version = oncely_example_messages::broker_version().unwrap_or_else(|e| {
        note(false, &format!("the broker's version is unknown: {e}"));
        "unknown".to_owned()
    });
    println!(
        "RabbitMQ {broker_version}, {} queues for billing and fulfillment, quorum for audit",
        cli.services.queue_type
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
    let broker = Broker::new(&amqp_url, &format!("{connection_prefix}observer"));
    {
        let connection = broker.connection().await?;
        for topology in names.all() {
            topology.declare(&connection).await?;
        }
    }
    // DLQs kept from earlier runs: this run's poison comes on top.
    let dlq_before = broker
        .queue_state(&names)
        .await
        .map(|q| q.per_queue)
        .unwrap_or_default();
    let publisher = Arc::new(Publisher::new(
        &amqp_url,
        format!("{connection_prefix}publisher"),
        PublisherOptions::default(),
    ));

    // The services' own URLs: through the proxies when a network fault is asked for, with an
    // application name that lets the drill find their PostgreSQL backends.
    let app_name = proxy::param(&database_url, "application_name")
        .unwrap_or_else(|| format!("drill-{}", std::process::id()));
    let mut service_db_url = proxy::with_param(&database_url, "application_name", &app_name);
    let mut service_amqp_url = amqp_url.clone();
    let mut proxies: Vec<Proxy> = Vec::new();
    if kinds.iter().any(|k| k.needs_proxy()) {
        let amqp_proxy =
            Proxy::start(&proxy::authority(&amqp_url, 5672).context("the host of AMQP_URL")?)
                .await?;
        let pg_proxy = Proxy::start(
            &proxy::authority(&database_url, 5432).context("the host of DATABASE_URL")?,
        )
        .await?;
        // Heartbeats every 5 s: the only way a black-holed AMQP connection is noticed.
        service_amqp_url = proxy::with_param(
            &proxy::via(&amqp_url, amqp_proxy.addr()).context("AMQP_URL")?,
            "heartbeat",
            "5",
        );
        service_db_url = proxy::via(&service_db_url, pg_proxy.addr()).context("DATABASE_URL")?;
        println!(
            "services reach RabbitMQ through {} and PostgreSQL through {}",
            amqp_proxy.addr(),
            pg_proxy.addr()
        );
        proxies = vec![amqp_proxy, pg_proxy];
    }

    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the drill's directory")?
            .to_owned(),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    if kinds.contains(&FaultKind::Failpoints) {
        env.push(("FAILPOINTS".into(), faults::FAILPOINTS.into()));
    }
    let mut fleet = Fleet::new(
        &bin_dir,
        &out_dir,
        env.into_iter()
            .chain([
                ("AMQP_URL".into(), service_amqp_url.clone()),
                ("DATABASE_URL".into(), service_db_url.clone()),
                ("ONCELY_STATS_EVERY_MS".into(), "250".into()),
                // A drill stopped by a signal takes its services with it.
                (oncely_example_messages::EXIT_WITH_PARENT.into(), "1".into()),
                // --batch of the drill runs the consumers in batched mode.
                ("ONCELY_BATCH".into(), cli.services.batch.to_string()),
                ("ONCELY_QUEUE_TYPE".into(), cli.services.queue_type.clone()),
                (
                    "ONCELY_BATCH_WAIT_MS".into(),
                    cli.services.batch_wait_ms.to_string(),
                ),
            ])
            .collect(),
    )?;
    let (fail_rate, lose_rate) = if kinds.contains(&FaultKind::Api) {
        (cli.api_fail_rate, cli.api_lose_rate)
    } else {
        (0.0, 0.0)
    };
    let s = |v: &str| v.to_owned();
    fleet.set_args(
        Role::InventoryApi,
        vec![
            s("--database-url"),
            database_url.clone(),
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

    // Orders through the outbox, with duplicate and poison publishes.
    let duplicates_sent = Arc::new(AtomicUsize::new(0));
    let producer = tokio::spawn(produce(
        pool.clone(),
        publisher.clone(),
        prefix.clone(),
        names.exchange.clone(),
        cli.orders,
        cli.rate.max(1),
        cli.duplicate_rate,
        cli.poison,
        seed ^ 0x5eed,
        duplicates_sent.clone(),
    ));

    // Hostile messages spread over the time the orders take to place, mixed with them.
    let mut hostile_producer = (!hostile.is_empty()).then(|| {
        let placing = Duration::from_secs_f64(cli.orders as f64 / f64::from(cli.rate.max(1)));
        let every = placing / (hostile.len() as u32 + 1);
        let (url, exchange, messages) = (amqp_url.clone(), names.exchange.clone(), hostile.clone());
        tokio::spawn(async move {
            hostile::publish(&url, &exchange, billing::ORDER_CREATED_V1, messages, every).await
        })
    });
    let mut hostile_sent = 0usize;

    // The faults, each due at a share of the orders processed by the slowest consumer.
    let mut faults = faults::schedule(&kinds, cli.kills, &mut rng)
        .into_iter()
        .peekable();
    let mut tally: BTreeMap<&'static str, usize> = BTreeMap::new();

    let csv_path = out_dir.join("counters.csv");
    let mut csv = std::fs::File::create(&csv_path)?;
    writeln!(
        csv,
        "elapsed_s,orders,published,invoices,reservations,audit,duplicates,retries,dead_letters"
    )?;
    let tty = std::io::stdout().is_terminal();
    let mut background: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_csv = Instant::now() - Duration::from_secs(10);
    let mut producer = Some(producer);
    let mut settled_since: Option<Instant> = None;
    let mut last_move = (String::new(), Instant::now());
    let n = cli.orders as i64;
    // Orders every consumer must process once: the placed ones and the hostile producer's.
    let expected = n + hostile_orders;
    let like = format!("{prefix}-");
    let mut progress = 0.0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(p) = producer.as_ref()
            && p.is_finished()
            && let Some(p) = producer.take()
        {
            p.await.context("the order producer")??;
        }
        if let Some(h) = hostile_producer.as_ref()
            && h.is_finished()
            && let Some(h) = hostile_producer.take()
        {
            hostile_sent = h.await.context("the hostile producer")??;
        }
        // The drill's own reads ride out the faults it injects: a failed read skips a tick.
        let observed = async {
            let mut conn = pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let st = report::state(&mut conn, &like).await?;
            let fc = fulfillment::counts(&mut conn, &like).await?;
            anyhow::Ok((st, fc))
        }
        .await;
        let Ok((st, fc)) = observed else {
            continue;
        };
        let queues = broker.queue_state(&names).await;
        let totals = fleet.consumer_totals();
        let sum = |f: fn(&oncely::StatsSnapshot) -> u64| totals.values().map(f).sum::<u64>();
        let slowest = st.invoices.min(fc.reservations).min(st.audit);
        progress = f64::max(progress, slowest as f64 / expected.max(1) as f64);

        while let Some((at, fault)) = faults.peek().copied() {
            if progress < at {
                break;
            }
            faults.next();
            if let Some(task) = inject(
                fault,
                progress,
                tty,
                &fleet,
                &proxies,
                &pool,
                &app_name,
                &connection_prefix,
            )
            .await
            {
                *tally.entry(fault.label()).or_default() += 1;
                background.push(task);
            }
        }
        // As a supervisor would: a service that exits (it cannot reach the database at start,
        // say) is started again after a second. Too many exits is a bug, not a fault.
        for role in [Role::Relay, Role::Billing, Role::Fulfillment, Role::Audit] {
            if let Some(status) = fleet.exited(role).await {
                let exits = tally.entry("service exits (restarted)").or_default();
                *exits += 1;
                if *exits > 300 {
                    anyhow::bail!(
                        "{} keeps exiting ({status}); see {}",
                        role.name(),
                        fleet.log_path(role).display()
                    );
                }
                fleet.kill(role).await;
                note(
                    tty,
                    &format!("{} exited ({status}): restarting", role.name()),
                );
                let fleet = fleet.clone();
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    fleet.start(role, false).await.map(|_| ())
                }));
            }
        }

        let elapsed = started.elapsed().as_secs_f64();
        // This run's dead letters, on top of what the DLQs held before it.
        let dlq = queues
            .as_ref()
            .map(|q| q.dlq.saturating_sub(dlq_before.iter().sum::<u32>()))
            .unwrap_or(0);
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
                dlq
            )?;
        }
        let line = format!(
            "[{}] {:>5.0}s orders {}/{} published {} invoices {} reservations {} audit {} | dup {} retries {} dlq {} faults {}",
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
            dlq,
            tally.values().sum::<usize>()
        );
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!("{line}");
        }

        let settled = producer.is_none()
            && hostile_producer.is_none()
            && faults.peek().is_none()
            && background.iter().all(|r| r.is_finished())
            && st.orders == n
            && st.unpublished == 0
            && st.invoices == expected
            && fc.reservations == expected
            && st.audit == expected
            && fc.pending_operations == 0
            // A delivery held through a fault is invisible in the queue's depth until it is
            // settled, or given back when its consumer stops.
            && fleet.in_flight() == 0
            && queues.as_ref().is_some_and(|q| {
                q.waiting == 0
                    && q.per_queue.iter().enumerate().all(|(i, d)| {
                        *d >= dlq_before.get(i).copied().unwrap_or(0)
                            + cli.poison as u32
                            + hostile::dead_letters(&hostile, i) as u32
                    })
            });
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
        // Business state, queue depths and settlements: what moves while anything is left.
        let moved = format!(
            "{st:?} {} {} {:?} {} {} {}",
            fc.reservations,
            fc.pending_operations,
            queues.as_ref().map(|q| (q.dlq, q.waiting)),
            sum(|s| s.processed),
            sum(|s| s.duplicates),
            sum(|s| s.dead_lettered)
        );
        if moved != last_move.0 {
            last_move = (moved, Instant::now());
        } else if producer.is_none()
            && hostile_producer.is_none()
            && faults.peek().is_none()
            && background.iter().all(|r| r.is_finished())
            && last_move.1.elapsed() >= Duration::from_secs(cli.stall_secs)
        {
            note(
                tty,
                &format!(
                    "gave up waiting: nothing moved for {} s after every producer and fault was done",
                    cli.stall_secs
                ),
            );
            break;
        }
    }
    if tty {
        println!();
    }
    for task in background {
        if let Err(e) = task.await? {
            note(false, &format!("a fault's clean-up failed: {e:#}"));
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let api = api_stats(&inventory_url).await;
    if let Some(a) = api.filter(|_| kinds.contains(&FaultKind::Api)) {
        tally.insert(
            "inventory API calls failed (503)",
            a.failed_on_purpose as usize,
        );
        tally.insert("inventory API responses lost", a.responses_lost as usize);
    }
    fleet.stop_all(Duration::from_secs(30)).await;
    if let Some(h) = hostile_producer.take() {
        h.abort();
    }

    // The report, from the final state.
    let mut conn = pool.get().await?;
    let st = report::state(&mut conn, &like).await?;
    let fc = fulfillment::counts(&mut conn, &like).await?;
    let hostile_ids: Vec<String> = hostile
        .iter()
        .filter_map(|h| h.message_id.clone())
        .collect();
    let processed = report::processed(&mut conn, &hostile_ids).await?;
    drop(conn);
    let queues = broker.queue_state(&names).await.unwrap_or_default();
    let totals = fleet.consumer_totals();
    let sum = |f: fn(&oncely::StatsSnapshot) -> u64| totals.values().map(f).sum::<u64>();
    let mut r = Report {
        run: run.clone(),
        elapsed_s,
        faults: kind_names,
        broker: format!(
            "RabbitMQ {broker_version}, {} queues",
            cli.services.queue_type
        ),
        ..Report::default()
    };
    r.figure("orders", st.orders);
    r.figure("events published", st.published);
    r.figure("invoices", st.invoices);
    r.figure("reservations", fc.reservations);
    r.figure("audit rows", st.audit);
    r.figure("duplicates detected", sum(|s| s.duplicates));
    r.figure("retries", sum(|s| s.retried));
    r.figure(
        "dead letters",
        queues.dlq.saturating_sub(dlq_before.iter().sum::<u32>()),
    );
    r.figure("requeued (infrastructure)", sum(|s| s.requeued));
    r.figure("reconnects", sum(|s| s.reconnects));
    r.figure(
        "duplicate publishes injected",
        duplicates_sent.load(Ordering::Relaxed),
    );
    r.figure("poison messages injected", cli.poison);
    if !hostile.is_empty() {
        r.figure("hostile messages injected", hostile_sent);
        r.figure("of which valid orders (odd header types)", hostile_orders);
    }
    for (label, count) in &tally {
        r.figure(label, *count);
        r.injected.push(((*label).to_owned(), *count));
    }
    if !hostile.is_empty() {
        r.injected
            .push(("hostile messages".to_owned(), hostile_sent));
    }
    if !proxies.is_empty() {
        r.figure(
            "connections through the fault proxy",
            proxies.iter().map(Proxy::accepted).sum::<u64>(),
        );
    }
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
    r.check("invoices (one per order)", expected, st.invoices);
    r.check("reservations (one per order)", expected, fc.reservations);
    r.check(
        "reservations at the inventory API",
        expected,
        fc.api_reservations,
    );
    r.check(
        "orders reserved twice at the API",
        0,
        fc.api_orders_reserved_twice,
    );
    r.check("reservation ids differing from the API", 0, fc.mismatched);
    r.check("reservation calls unsettled", 0, fc.pending_operations);
    r.check("audit rows (one per event)", expected, st.audit);
    // A consumer killed between its DLQ copy's confirm and its ack dead-letters the redelivery
    // again: a second copy of the same message, never a lost one. Count distinct messages.
    // Only this run's messages count: a DLQ kept from earlier runs holds theirs too.
    // Hostile messages are told apart by their marker, whatever their message id became.
    let only_hostile = !hostile.is_empty() && kinds.iter().all(|k| *k == FaultKind::Hostile);
    let consumers = [billing::CONSUMER, fulfillment::CONSUMER, audit::CONSUMER];
    for (i, topology) in names.all().into_iter().enumerate() {
        let dlq = broker
            .dlq_contents(&topology.dlq(), &prefix)
            .await
            .unwrap_or(DlqContents {
                copies: u32::MAX,
                distinct: u32::MAX,
                ..DlqContents::default()
            });
        r.figure(&format!("{} copies", topology.dlq()), dlq.copies);
        if dlq.others > 0 {
            r.figure(
                &format!("{} messages of earlier runs", topology.dlq()),
                dlq.others,
            );
        }
        r.check(
            &format!("{} distinct (poison only)", topology.dlq()),
            cli.poison as i64,
            dlq.distinct,
        );
        if hostile.is_empty() {
            continue;
        }
        let consumer = consumers[i];
        let mut as_expected = 0;
        for h in &hostile {
            let codes = dlq.hostile.get(&h.marker).cloned().unwrap_or_default();
            let done = h
                .message_id
                .as_ref()
                .is_some_and(|id| processed.contains(&(consumer.to_owned(), id.clone())));
            let ok = match h.fates[i] {
                hostile::Fate::DeadLetter(code) => {
                    !codes.is_empty() && codes.iter().all(|c| c == code) && !done
                }
                hostile::Fate::Processed => done && codes.is_empty(),
            };
            if ok {
                as_expected += 1;
            } else {
                println!(
                    "  hostile message {} ({}) at {consumer}: expected {:?}, found dead-lettered with {codes:?}, processed {done}",
                    h.marker, h.what, h.fates[i]
                );
            }
        }
        r.check(
            &format!("{consumer}: hostile messages settled as expected, once"),
            hostile.len() as i64,
            as_expected,
        );
        // Without any other fault nothing may be dead-lettered twice.
        if only_hostile {
            r.check(
                &format!("{} hostile copies (one per message)", topology.dlq()),
                dlq.hostile.len() as i64,
                dlq.hostile.values().map(Vec::len).sum::<usize>(),
            );
        }
    }
    if only_hostile {
        // Nothing hostile may break a connection, loop through the retry queues or be taken
        // for an infrastructure failure and handed back.
        r.check("consumer reconnects", 0, sum(|s| s.reconnects));
        r.check("retries", 0, sum(|s| s.retried));
        r.check(
            "given back as infrastructure failures (requeued)",
            0,
            sum(|s| s.requeued),
        );
    }
    r.check(
        "messages left in work, retry and parking queues",
        0,
        queues.waiting,
    );
    r.ok = r.problems().is_empty();
    print!("{}", r.render());
    std::fs::write(out_dir.join("report.json"), serde_json::to_vec_pretty(&r)?)?;

    if cli.cleanup && !cli.namespace.is_empty() {
        broker.cleanup(&names).await;
    }
    publisher.close().await;
    broker.close().await;
    Ok(r.ok)
}

/// Places `orders` orders through the outbox at `rate` per second; publishes a duplicate of an
/// earlier order's event with probability `duplicate_rate` after each, and `poison` bad
/// messages spread over the run. Rides out database and broker faults by retrying.
#[allow(clippy::too_many_arguments)]
async fn produce(
    pool: oncely::Pool,
    publisher: Arc<Publisher>,
    prefix: String,
    exchange: String,
    orders: usize,
    rate: u32,
    duplicate_rate: f64,
    poison: usize,
    seed: u64,
    duplicates_sent: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let every = (orders / poison.max(1)).max(1);
    for n in 0..orders {
        tick.tick().await;
        let order = order_service::order(&prefix, n);
        retrying("placing an order", || async {
            let mut conn = pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            match order_service::create_order(&mut conn, &order, &exchange).await {
                Ok(()) => Ok(()),
                // Committed by an attempt whose answer was lost.
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        if rng.random_bool(duplicate_rate.clamp(0.0, 1.0)) {
            let earlier = order_service::order(&prefix, rng.random_range(0..=n));
            let (body, properties) = billing::order_message(&earlier);
            publish(&publisher, &exchange, &body, properties).await?;
            duplicates_sent.fetch_add(1, Ordering::Relaxed);
        }
        if poison > 0 && n % every == 0 && n / every < poison {
            let i = n / every;
            let kind = if i.is_multiple_of(2) {
                billing::PoisonKind::InvalidJson
            } else {
                billing::PoisonKind::MissingMessageId
            };
            let (body, properties) = billing::poison_message(&prefix, i, kind);
            publish(&publisher, &exchange, &body, properties).await?;
        }
    }
    Ok(())
}

async fn publish(
    publisher: &Publisher,
    exchange: &str,
    body: &[u8],
    properties: oncely::lapin::BasicProperties,
) -> anyhow::Result<()> {
    retrying("publishing", || async {
        publisher
            .publish(OutgoingMessage {
                exchange,
                routing_key: billing::ORDER_CREATED_V1,
                body,
                properties: properties.clone(),
            })
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Retries `attempt` every 500 ms for up to two minutes.
async fn retrying<F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: still failing after 2 minutes")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Starts `fault`. Returns the task that finishes it (a restart, an alarm lifted), or None when
/// it could not be injected (said on the console).
#[allow(clippy::too_many_arguments)]
async fn inject(
    fault: Fault,
    progress: f64,
    tty: bool,
    fleet: &Arc<Fleet>,
    proxies: &[Proxy],
    pool: &oncely::Pool,
    app_name: &str,
    connection_prefix: &str,
) -> Option<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let at = format!("at {:.0}%", progress * 100.0);
    let done = || Some(tokio::spawn(async { anyhow::Ok(()) }));
    match fault {
        Fault::Kill { role, down } => {
            if !fleet.kill(role).await {
                return None;
            }
            note(
                tty,
                &format!(
                    "SIGKILL {} {at} (back in {:.1} s)",
                    role.name(),
                    down.as_secs_f64()
                ),
            );
            let fleet = fleet.clone();
            Some(tokio::spawn(async move {
                tokio::time::sleep(down).await;
                fleet.start(role, false).await.map(|_| ())
            }))
        }
        Fault::CutConnections => {
            // rabbitmqctl takes seconds: in the background, so the counters keep moving.
            let prefix = connection_prefix.to_owned();
            note(
                tty,
                &format!("closing the services' broker connections {at}"),
            );
            Some(tokio::spawn(async move {
                let closed = tokio::task::spawn_blocking(move || {
                    oncely_example_messages::close_connections_where(
                        |name| {
                            name.starts_with(&prefix)
                                && !name.ends_with("publisher")
                                && !name.ends_with("observer")
                        },
                        "oncely drill: broker closed the connection",
                    )
                })
                .await??;
                anyhow::ensure!(closed > 0, "no broker connection of the services was found");
                Ok(())
            }))
        }
        Fault::BrokerRestart => {
            note(tty, &format!("RabbitMQ stop_app {at}, start_app in 3 s"));
            Some(tokio::spawn(async {
                faults::restart_broker(Duration::from_secs(3))
                    .await
                    .map_err(anyhow::Error::msg)
            }))
        }
        Fault::MemoryAlarm(length) => {
            note(
                tty,
                &format!(
                    "memory alarm {at} for {} s: publishers blocked",
                    length.as_secs()
                ),
            );
            Some(tokio::spawn(async move {
                faults::memory_alarm(length)
                    .await
                    .map_err(anyhow::Error::msg)
            }))
        }
        Fault::PgTerminate => {
            let terminated = async {
                let mut conn = pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                terminate_backends(&mut conn, app_name).await
            }
            .await;
            match terminated {
                Ok(count) => {
                    note(tty, &format!("terminated {count} PostgreSQL backends {at}"));
                    done()
                }
                Err(e) => {
                    note(tty, &format!("could not terminate backends: {e:#}"));
                    None
                }
            }
        }
        Fault::PgRestart => {
            note(tty, &format!("PostgreSQL restart {at}"));
            Some(tokio::spawn(async {
                faults::restart_postgres().await.map_err(anyhow::Error::msg)
            }))
        }
        Fault::Latency(latency) => {
            for p in proxies {
                p.set_latency(latency);
            }
            note(
                tty,
                &format!("network latency {} ms {at}", latency.as_millis()),
            );
            done()
        }
        Fault::ProxyCut => {
            for p in proxies {
                p.cut_all();
            }
            note(tty, &format!("cut every network connection {at}"));
            done()
        }
        Fault::BlackHole(length) => {
            for p in proxies {
                p.set_black_hole(true);
            }
            note(
                tty,
                &format!(
                    "black-holed every network connection {at} for {} s",
                    length.as_secs()
                ),
            );
            let proxies = proxies.to_vec();
            Some(tokio::spawn(async move {
                tokio::time::sleep(length).await;
                for p in &proxies {
                    p.cut_all();
                    p.set_black_hole(false);
                }
                anyhow::Ok(())
            }))
        }
    }
}

async fn terminate_backends(
    conn: &mut diesel_async::AsyncPgConnection,
    app_name: &str,
) -> anyhow::Result<i64> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let c: Count = diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind::<diesel::sql_types::Text, _>(app_name)
    .get_result(conn)
    .await?;
    Ok(c.n)
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

/// What a DLQ holds, as [`Broker::dlq_contents`] reads it.
#[derive(Debug, Default)]
struct DlqContents {
    /// This run's messages other than the hostile ones (poison, and copies of it).
    copies: u32,
    /// The distinct ones among them.
    distinct: u32,
    /// Messages of other runs.
    others: u32,
    /// This run's hostile messages by marker: the error code of each copy.
    hostile: BTreeMap<String, Vec<String>>,
}

/// The drill's own view of the broker: one connection, opened again after a fault closed it.
struct Broker {
    url: String,
    name: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Broker {
    fn new(url: &str, name: &str) -> Broker {
        Broker {
            url: url.to_owned(),
            name: name.to_owned(),
            connection: tokio::sync::Mutex::default(),
        }
    }

    async fn connection(&self) -> anyhow::Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let c = Arc::new(
            tokio::time::timeout(
                Duration::from_secs(10),
                oncely::amqp::connect(&self.url, &self.name, Default::default()),
            )
            .await
            .context("connecting to RabbitMQ")??,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Depth of every queue of the run, or None when the broker cannot be asked now.
    async fn queue_state(&self, names: &Names) -> Option<QueueState> {
        let connection = self.connection().await.ok()?;
        let mut state = QueueState::default();
        for topology in names.all() {
            let dlq = queue_len(&connection, &topology.dlq()).await?;
            state.per_queue.push(dlq);
            state.dlq += dlq;
            for q in topology.queues() {
                if q != topology.dlq() {
                    state.waiting += queue_len(&connection, &q).await?;
                }
            }
        }
        Some(state)
    }

    /// What `queue` holds of this run: its messages (message id, or without one the body,
    /// naming the run's `prefix`), its hostile messages by marker, and how many messages of
    /// other runs. The messages are read without being acked and go back to the queue when the
    /// channel closes.
    async fn dlq_contents(&self, queue: &str, prefix: &str) -> Option<DlqContents> {
        use oncely::lapin::options::BasicGetOptions;
        use oncely::lapin::types::AMQPValue;
        let connection = self.connection().await.ok()?;
        let channel = connection.create_channel().await.ok()?;
        let mut keys = std::collections::HashSet::new();
        let mut contents = DlqContents::default();
        let (mut copies, mut others) = (0u32, 0u32);
        while let Ok(Ok(Some(m))) = tokio::time::timeout(
            Duration::from_secs(5),
            channel.basic_get(queue.into(), BasicGetOptions::default()),
        )
        .await
        {
            let d = m.delivery;
            let header = |name: &str| {
                let value = d.properties.headers().as_ref()?.inner().get(name)?;
                match value {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                }
            };
            match header(hostile::MARKER) {
                Some(marker) if marker.starts_with(prefix) => {
                    let code = header(oncely::headers::ERROR_CODE).unwrap_or_default();
                    contents.hostile.entry(marker).or_default().push(code);
                    continue;
                }
                Some(_) => {
                    others += 1;
                    continue;
                }
                None => {}
            }
            let body = String::from_utf8_lossy(&d.data);
            let key = match d.properties.message_id() {
                Some(id) if id.as_str().contains(prefix) => format!("id:{id}"),
                None if body.contains(prefix) => format!("body:{body}"),
                _ => {
                    others += 1;
                    continue;
                }
            };
            copies += 1;
            keys.insert(key);
        }
        oncely::amqp::close_channel(&channel, 200, "read").await;
        contents.copies = copies;
        contents.distinct = keys.len() as u32;
        contents.others = others;
        Some(contents)
    }

    async fn cleanup(&self, names: &Names) {
        let Ok(connection) = self.connection().await else {
            return;
        };
        // Every consumer's topology shares the one exchange: deleting it twice is harmless.
        for topology in names.all() {
            let _ = topology.delete(&connection).await;
        }
    }

    async fn close(&self) {
        if let Some(c) = self.connection.lock().await.take() {
            oncely::amqp::close_connection(&c, 200, "drill done").await;
        }
    }
}

async fn queue_len(connection: &Connection, queue: &str) -> Option<u32> {
    // The monitor samples every second: a broker slower than this skips a sample.
    tokio::time::timeout(
        Duration::from_secs(5),
        oncely::amqp::queue_depth(connection, queue),
    )
    .await
    .ok()?
    .ok()
    .map(|depth| depth.messages)
}

async fn api_stats(url: &str) -> Option<fulfillment::inventory_api::ApiStatsSnapshot> {
    let client = fulfillment::InventoryClient::new(url, Duration::from_secs(2)).ok()?;
    client.stats().await.ok()
}
