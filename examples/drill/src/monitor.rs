//! Watching a run until it is settled: the producers, the faults as they fall due, the services
//! kept running as a supervisor would, and the live counters on the console and in
//! counters.csv.

use crate::broker::QueueState;
use crate::faults::{self, Fault, FaultKind};
use crate::fleet::Role;
use crate::plan::{Plan, Setup};
use crate::{hostile, note, produce, report};
use anyhow::Context;
use fulfillment::FulfillmentCounts;
use fulfillment::inventory_api::ApiStatsSnapshot;
use oncely::StatsSnapshot;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// What the watch saw, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// Seconds from the start to the end of the wait.
    pub elapsed_s: f64,
    /// Faults injected and services restarted, by label.
    pub tally: BTreeMap<&'static str, usize>,
    /// Messages the hostile producer sent.
    pub hostile_sent: usize,
    /// Duplicate publishes of earlier orders' events.
    pub duplicates_sent: usize,
    /// The inventory API's counters at the end, when it answered.
    pub api: Option<ApiStatsSnapshot>,
}

/// The run's state at one moment: the business tables, the queues and the services' counters.
#[derive(Debug)]
pub struct Sample {
    /// Orders, events, invoices and audit rows.
    pub state: report::State,
    /// Fulfillment's reservations and the API's side of them.
    pub fulfillment: FulfillmentCounts,
    /// The queues' depths, when the broker answered.
    pub queues: Option<QueueState>,
    /// The consumers' counters.
    pub totals: HashMap<Role, StatsSnapshot>,
}

impl Sample {
    /// Reads the state of `plan`'s run; an error when the database cannot be read now.
    pub async fn read(plan: &Plan, setup: &Setup) -> anyhow::Result<Sample> {
        let ids = plan.order_ids();
        let mut conn = setup.pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let state = report::state(&mut conn, &ids).await?;
        let fulfillment = fulfillment::counts(&mut conn, &ids).await?;
        drop(conn);
        Ok(Sample {
            state,
            fulfillment,
            queues: setup.broker.queue_state(&plan.names).await,
            totals: setup.fleet.consumer_totals(),
        })
    }

    /// A counter summed over the consumers.
    pub fn sum(&self, counter: fn(&StatsSnapshot) -> u64) -> u64 {
        self.totals.values().map(counter).sum()
    }

    /// This run's dead letters, on top of what the DLQs held before it.
    pub fn dead_letters(&self, setup: &Setup) -> u32 {
        self.queues
            .as_ref()
            .map(|q| q.dlq.saturating_sub(setup.dlq_before.iter().sum::<u32>()))
            .unwrap_or(0)
    }
}

/// Starts the producers, then watches the run until it is settled, the timeout passes or
/// nothing moves any more; stops the services.
pub async fn watch(plan: &Plan, setup: &Setup) -> anyhow::Result<Outcome> {
    let mut watch = Watch::start(plan, setup)?;
    let deadline = Instant::now() + Duration::from_secs(plan.cli.timeout_secs);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        watch.reap_producers().await?;
        // The drill's own reads ride out the faults it injects: a failed read skips a tick.
        let Ok(sample) = Sample::read(plan, setup).await else {
            continue;
        };
        let slowest = sample
            .state
            .invoices
            .min(sample.fulfillment.reservations)
            .min(sample.state.audit);
        watch.progress = f64::max(
            watch.progress,
            slowest as f64 / plan.expected().max(1) as f64,
        );
        watch.inject_due().await;
        watch.restart_exited().await?;
        watch.show(&sample)?;
        if watch.settled(&sample) {
            break;
        }
        if Instant::now() > deadline {
            note(
                watch.tty,
                &format!("gave up waiting after {} s", plan.cli.timeout_secs),
            );
            break;
        }
        if watch.stalled(&sample) {
            note(
                watch.tty,
                &format!(
                    "gave up waiting: nothing moved for {} s after every producer and fault was done",
                    plan.cli.stall_secs
                ),
            );
            break;
        }
    }
    watch.finish().await
}

/// The watch's state between two ticks.
struct Watch<'a> {
    plan: &'a Plan,
    setup: &'a Setup,
    producer: Option<JoinHandle<anyhow::Result<()>>>,
    hostile_producer: Option<JoinHandle<anyhow::Result<usize>>>,
    hostile_sent: usize,
    duplicates_sent: Arc<AtomicUsize>,
    /// The faults not injected yet, each due at a share of the orders processed by the
    /// slowest consumer.
    faults: std::iter::Peekable<std::vec::IntoIter<(f64, Fault)>>,
    tally: BTreeMap<&'static str, usize>,
    /// Restarts and the ends of faults, running.
    background: Vec<JoinHandle<anyhow::Result<()>>>,
    csv: std::fs::File,
    tty: bool,
    progress: f64,
    last_print: Instant,
    last_csv: Instant,
    settled_since: Option<Instant>,
    last_move: (String, Instant),
}

impl<'a> Watch<'a> {
    /// Starts the producers and schedules the faults.
    fn start(plan: &'a Plan, setup: &'a Setup) -> anyhow::Result<Watch<'a>> {
        let cli = &plan.cli;
        let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
        // Orders through the outbox, with duplicate and poison publishes.
        let duplicates_sent = Arc::new(AtomicUsize::new(0));
        let producer = tokio::spawn(produce::produce(
            setup.pool.clone(),
            setup.publisher.clone(),
            plan.prefix.clone(),
            plan.names.exchange.clone(),
            cli.orders,
            cli.rate.max(1),
            cli.duplicate_rate,
            cli.poison,
            plan.seed ^ 0x5eed,
            duplicates_sent.clone(),
        ));

        // Hostile messages spread over the time the orders take to place, mixed with them.
        let hostile_producer = (!plan.hostile.is_empty()).then(|| {
            let placing = Duration::from_secs_f64(cli.orders as f64 / f64::from(cli.rate.max(1)));
            let every = placing / (plan.hostile.len() as u32 + 1);
            let (url, exchange, messages) = (
                cli.services.amqp_url.clone(),
                plan.names.exchange.clone(),
                plan.hostile.clone(),
            );
            tokio::spawn(async move {
                hostile::publish(&url, &exchange, billing::ORDER_CREATED_V1, messages, every).await
            })
        });

        let faults = faults::schedule(&plan.kinds, cli.kills, &mut rng)
            .into_iter()
            .peekable();
        let mut csv = std::fs::File::create(plan.out_dir.join("counters.csv"))?;
        writeln!(
            csv,
            "elapsed_s,orders,published,invoices,reservations,audit,duplicates,retries,dead_letters"
        )?;
        Ok(Watch {
            plan,
            setup,
            producer: Some(producer),
            hostile_producer,
            hostile_sent: 0,
            duplicates_sent,
            faults,
            tally: BTreeMap::new(),
            background: Vec::new(),
            csv,
            tty: std::io::stdout().is_terminal(),
            progress: 0.0,
            last_print: Instant::now() - Duration::from_secs(10),
            last_csv: Instant::now() - Duration::from_secs(10),
            settled_since: None,
            last_move: (String::new(), Instant::now()),
        })
    }

    /// Collects the producers that are done; an error when one failed.
    async fn reap_producers(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.producer.as_ref()
            && p.is_finished()
            && let Some(p) = self.producer.take()
        {
            p.await.context("the order producer")??;
        }
        if let Some(h) = self.hostile_producer.as_ref()
            && h.is_finished()
            && let Some(h) = self.hostile_producer.take()
        {
            self.hostile_sent = h.await.context("the hostile producer")??;
        }
        Ok(())
    }

    /// Injects the faults whose moment has come.
    async fn inject_due(&mut self) {
        while let Some((at, fault)) = self.faults.peek().copied() {
            if self.progress < at {
                break;
            }
            self.faults.next();
            if let Some(task) =
                faults::inject(fault, self.progress, self.tty, self.plan, self.setup).await
            {
                *self.tally.entry(fault.label()).or_default() += 1;
                self.background.push(task);
            }
        }
    }

    /// As a supervisor would: a service that exits (it cannot reach the database at start,
    /// say) is started again after a second. Too many exits is a bug, not a fault.
    async fn restart_exited(&mut self) -> anyhow::Result<()> {
        let fleet = &self.setup.fleet;
        for role in [Role::Relay, Role::Billing, Role::Fulfillment, Role::Audit] {
            if let Some(status) = fleet.exited(role).await {
                let exits = self.tally.entry("service exits (restarted)").or_default();
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
                    self.tty,
                    &format!("{} exited ({status}): restarting", role.name()),
                );
                let fleet = fleet.clone();
                self.background.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    fleet.start(role, false).await.map(|_| ())
                }));
            }
        }
        Ok(())
    }

    /// The counters: a row of counters.csv each second, the progress line on the console.
    fn show(&mut self, sample: &Sample) -> anyhow::Result<()> {
        let (st, fc) = (&sample.state, &sample.fulfillment);
        let elapsed = self.plan.started.elapsed().as_secs_f64();
        let dlq = sample.dead_letters(self.setup);
        let duplicates = sample.sum(|s| s.duplicates);
        let retries = sample.sum(|s| s.retried);
        if self.last_csv.elapsed() >= Duration::from_secs(1) {
            self.last_csv = Instant::now();
            writeln!(
                self.csv,
                "{elapsed:.1},{},{},{},{},{},{duplicates},{retries},{dlq}",
                st.orders, st.published, st.invoices, fc.reservations, st.audit,
            )?;
        }
        let line = format!(
            "[{}] {:>5.0}s orders {}/{} published {} invoices {} reservations {} audit {} | dup {duplicates} retries {retries} dlq {dlq} faults {}",
            bar(self.progress),
            elapsed,
            st.orders,
            self.plan.orders(),
            st.published,
            st.invoices,
            fc.reservations,
            st.audit,
            self.tally.values().sum::<usize>()
        );
        if self.tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if self.last_print.elapsed() >= Duration::from_secs(5) {
            self.last_print = Instant::now();
            println!("{line}");
        }
        Ok(())
    }

    /// Whether the producers, the faults and their clean-ups are all done.
    fn done(&mut self) -> bool {
        self.producer.is_none()
            && self.hostile_producer.is_none()
            && self.faults.peek().is_none()
            && self.background.iter().all(|r| r.is_finished())
    }

    /// Whether the run has been settled for two seconds in a row: late duplicates would have
    /// shown by then.
    fn settled(&mut self, sample: &Sample) -> bool {
        let (plan, setup) = (self.plan, self.setup);
        let (st, fc) = (&sample.state, &sample.fulfillment);
        let expected = plan.expected();
        let dlq_before = &setup.dlq_before;
        let settled = self.done()
            && st.orders == plan.orders()
            && st.unpublished == 0
            && st.invoices == expected
            && fc.reservations == expected
            && st.audit == expected
            && fc.pending_operations == 0
            // A delivery held through a fault is invisible in the queue's depth until it is
            // settled, or given back when its consumer stops.
            && setup.fleet.in_flight() == 0
            && sample.queues.as_ref().is_some_and(|q| {
                q.waiting == 0
                    && q.per_queue.iter().enumerate().all(|(i, d)| {
                        *d >= dlq_before.get(i).copied().unwrap_or(0)
                            + plan.cli.poison as u32
                            + hostile::dead_letters(&plan.hostile, i) as u32
                    })
            });
        match (settled, self.settled_since) {
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(2) => return true,
            (true, None) => self.settled_since = Some(Instant::now()),
            (true, Some(_)) => {}
            (false, _) => self.settled_since = None,
        }
        false
    }

    /// Whether nothing has moved for `--stall-secs` after the producers and every fault were
    /// done (a message held for ever, say).
    fn stalled(&mut self, sample: &Sample) -> bool {
        // Business state, queue depths and settlements: what moves while anything is left.
        let moved = format!(
            "{:?} {} {} {:?} {} {} {}",
            sample.state,
            sample.fulfillment.reservations,
            sample.fulfillment.pending_operations,
            sample.queues.as_ref().map(|q| (q.dlq, q.waiting)),
            sample.sum(|s| s.processed),
            sample.sum(|s| s.duplicates),
            sample.sum(|s| s.dead_lettered)
        );
        if moved != self.last_move.0 {
            self.last_move = (moved, Instant::now());
            return false;
        }
        self.done() && self.last_move.1.elapsed() >= Duration::from_secs(self.plan.cli.stall_secs)
    }

    /// Waits for the faults' clean-ups, reads the inventory API's counters and stops the
    /// services.
    async fn finish(mut self) -> anyhow::Result<Outcome> {
        if self.tty {
            println!();
        }
        for task in self.background.drain(..) {
            if let Err(e) = task.await? {
                note(false, &format!("a fault's clean-up failed: {e:#}"));
            }
        }
        let elapsed_s = self.plan.started.elapsed().as_secs_f64();
        let api = api_stats(&self.setup.inventory_url).await;
        if let Some(a) = api.filter(|_| self.plan.has(FaultKind::Api)) {
            self.tally.insert(
                "inventory API calls failed (503)",
                a.failed_on_purpose as usize,
            );
            self.tally
                .insert("inventory API responses lost", a.responses_lost as usize);
        }
        self.setup.fleet.stop_all(Duration::from_secs(30)).await;
        if let Some(h) = self.hostile_producer.take() {
            h.abort();
        }
        Ok(Outcome {
            elapsed_s,
            tally: self.tally,
            hostile_sent: self.hostile_sent,
            duplicates_sent: self.duplicates_sent.load(Ordering::Relaxed),
            api,
        })
    }
}

fn bar(progress: f64) -> String {
    let filled = ((progress.clamp(0.0, 1.0)) * 20.0).round() as usize;
    format!("{}{}", "#".repeat(filled), ".".repeat(20 - filled))
}

async fn api_stats(url: &str) -> Option<ApiStatsSnapshot> {
    let client = fulfillment::InventoryClient::new(url, Duration::from_secs(2)).ok()?;
    client.stats().await.ok()
}
