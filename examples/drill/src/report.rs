//! What the drill observes, and the final report.

use crate::broker::{DlqContents, QueueState};
use crate::faults::FaultKind;
use crate::hostile::Fate;
use crate::monitor::{Outcome, Sample};
use crate::plan::{Plan, Setup};
use crate::proxy::Proxy;
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use std::collections::HashSet;

/// The business state of one run, read from PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName, Serialize)]
pub struct State {
    /// Orders placed.
    #[diesel(sql_type = BigInt)]
    pub orders: i64,
    /// Their events published by the relay (confirmed, marked).
    #[diesel(sql_type = BigInt)]
    pub published: i64,
    /// Events still in the outbox.
    #[diesel(sql_type = BigInt)]
    pub unpublished: i64,
    /// Invoices (billing).
    #[diesel(sql_type = BigInt)]
    pub invoices: i64,
    /// Audit rows.
    #[diesel(sql_type = BigInt)]
    pub audit: i64,
}

/// Reads [`State`] for orders whose ids start with `prefix`.
pub async fn state(
    conn: &mut AsyncPgConnection,
    prefix: &str,
) -> Result<State, diesel::result::Error> {
    diesel::sql_query(
        "SELECT \
           (SELECT count(*) FROM orders WHERE order_id LIKE $1) AS orders, \
           (SELECT count(*) FROM outbox_message \
              WHERE aggregate_id LIKE $1 AND published_at IS NOT NULL) AS published, \
           (SELECT count(*) FROM outbox_message \
              WHERE aggregate_id LIKE $1 AND published_at IS NULL) AS unpublished, \
           (SELECT count(*) FROM invoices WHERE order_id LIKE $1) AS invoices, \
           (SELECT count(*) FROM audit_events WHERE order_id LIKE $1) AS audit",
    )
    .bind::<Text, _>(format!("{prefix}%"))
    .get_result(conn)
    .await
}

/// The (consumer, message id) pairs among `message_ids` that an inbox holds as processed.
pub async fn processed(
    conn: &mut AsyncPgConnection,
    message_ids: &[String],
) -> Result<HashSet<(String, String)>, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        consumer_name: String,
        #[diesel(sql_type = Text)]
        message_id: String,
    }
    if message_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT consumer_name, message_id FROM message_inbox \
         WHERE message_id = ANY($1) AND status = 'processed'",
    )
    .bind::<Array<Text>, _>(message_ids)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.consumer_name, r.message_id))
        .collect())
}

/// One invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// The value it must have.
    pub expected: i64,
    /// The value found.
    pub actual: i64,
    /// Whether they agree.
    pub ok: bool,
}

/// The final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Run id.
    pub run: String,
    /// Fault kinds asked for.
    pub faults: Vec<String>,
    /// The broker the run met: its version and the queue type of the work queues.
    pub broker: String,
    /// Faults injected, by kind, with how many times.
    pub injected: Vec<(String, usize)>,
    /// Whether every check passed.
    pub ok: bool,
    /// Figures, in display order.
    pub figures: Vec<(String, i64)>,
    /// Invariants.
    pub checks: Vec<Check>,
    /// Seconds from start to the end of the wait.
    pub elapsed_s: f64,
}

impl Report {
    /// Adds a figure.
    pub fn figure(&mut self, name: &str, value: impl TryInto<i64>) {
        self.figures
            .push((name.to_owned(), value.try_into().unwrap_or(i64::MAX)));
    }

    /// Adds an invariant.
    pub fn check(&mut self, name: &str, expected: i64, actual: impl TryInto<i64>) {
        let actual = actual.try_into().unwrap_or(i64::MAX);
        self.checks.push(Check {
            name: name.to_owned(),
            expected,
            actual,
            ok: expected == actual,
        });
    }

    /// The checks that failed.
    pub fn problems(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// The table and the verdict, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self
            .figures
            .iter()
            .map(|(n, _)| n.len())
            .chain(self.checks.iter().map(|c| c.name.len()))
            .max()
            .unwrap_or(10);
        out.push_str(&format!(
            "\ndrill {} ({:.1} s) on {}\n\n",
            self.run, self.elapsed_s, self.broker
        ));
        out.push_str(&format!("{:<width$}  {:>10}\n", "figure", "value"));
        out.push_str(&format!("{:-<width$}  {:->10}\n", "", ""));
        for (name, value) in &self.figures {
            out.push_str(&format!("{name:<width$}  {value:>10}\n"));
        }
        out.push_str(&format!(
            "\n{:<width$}  {:>10}  {:>10}  result\n",
            "invariant", "expected", "actual"
        ));
        out.push_str(&format!(
            "{:-<width$}  {:->10}  {:->10}  ------\n",
            "", "", ""
        ));
        for c in &self.checks {
            out.push_str(&format!(
                "{:<width$}  {:>10}  {:>10}  {}\n",
                c.name,
                c.expected,
                c.actual,
                if c.ok { "ok" } else { "WRONG" }
            ));
        }
        out.push('\n');
        if self.ok {
            out.push_str("OK: no loss, no duplicate effect\n");
        } else {
            out.push_str("FAILED:\n");
            for c in self.problems() {
                out.push_str(&format!(
                    "  {}: expected {}, found {}\n",
                    c.name, c.expected, c.actual
                ));
            }
        }
        out
    }
}

/// What the report is built from: the plan, what was started, what the watch saw and the
/// final state.
struct Facts<'a> {
    plan: &'a Plan,
    setup: &'a Setup,
    outcome: &'a Outcome,
    last: Sample,
    queues: QueueState,
}

/// The report of a run, from its final state: figures that explain it and the invariants
/// that prove it.
pub async fn build(plan: &Plan, setup: &Setup, outcome: &Outcome) -> anyhow::Result<Report> {
    let ids = plan.order_ids();
    let mut conn = setup.pool.get().await?;
    let st = state(&mut conn, &ids).await?;
    let fc = fulfillment::counts(&mut conn, &ids).await?;
    let hostile_ids: Vec<String> = plan
        .hostile
        .iter()
        .filter_map(|h| h.message_id.clone())
        .collect();
    let processed = processed(&mut conn, &hostile_ids).await?;
    drop(conn);
    let queues = setup
        .broker
        .queue_state(&plan.names)
        .await
        .unwrap_or_default();
    let facts = Facts {
        plan,
        setup,
        outcome,
        last: Sample {
            state: st,
            fulfillment: fc,
            queues: None,
            totals: setup.fleet.consumer_totals(),
        },
        queues,
    };
    let mut r = Report {
        run: plan.run.clone(),
        elapsed_s: outcome.elapsed_s,
        faults: plan.kind_names(),
        broker: format!(
            "RabbitMQ {}, {} queues",
            plan.broker_version, plan.cli.services.queue_type
        ),
        ..Report::default()
    };
    facts.figures(&mut r);
    facts.checks(&mut r);
    facts.dlq_checks(&mut r, &processed).await;
    facts.hostile_run_checks(&mut r);
    r.check(
        "messages left in work, retry and parking queues",
        0,
        facts.queues.waiting,
    );
    r.ok = r.problems().is_empty();
    Ok(r)
}

impl Facts<'_> {
    /// Figures that explain the run; they prove nothing.
    fn figures(&self, r: &mut Report) {
        let (plan, outcome) = (self.plan, self.outcome);
        let (st, fc) = (&self.last.state, &self.last.fulfillment);
        r.figure("orders", st.orders);
        r.figure("events published", st.published);
        r.figure("invoices", st.invoices);
        r.figure("reservations", fc.reservations);
        r.figure("audit rows", st.audit);
        r.figure("duplicates detected", self.last.sum(|s| s.duplicates));
        r.figure("retries", self.last.sum(|s| s.retried));
        r.figure(
            "dead letters",
            self.queues
                .dlq
                .saturating_sub(self.setup.dlq_before.iter().sum::<u32>()),
        );
        r.figure("requeued (infrastructure)", self.last.sum(|s| s.requeued));
        r.figure("reconnects", self.last.sum(|s| s.reconnects));
        r.figure("duplicate publishes injected", outcome.duplicates_sent);
        r.figure("poison messages injected", plan.cli.poison);
        if !plan.hostile.is_empty() {
            r.figure("hostile messages injected", outcome.hostile_sent);
            r.figure(
                "of which valid orders (odd header types)",
                plan.hostile_orders(),
            );
        }
        for (label, count) in &outcome.tally {
            r.figure(label, *count);
            r.injected.push(((*label).to_owned(), *count));
        }
        if !plan.hostile.is_empty() {
            r.injected
                .push(("hostile messages".to_owned(), outcome.hostile_sent));
        }
        if !self.setup.proxies.is_empty() {
            r.figure(
                "connections through the fault proxy",
                self.setup.proxies.iter().map(Proxy::accepted).sum::<u64>(),
            );
        }
        r.figure("inventory API calls", fc.api_calls);
        r.figure(
            "inventory API replays",
            outcome.api.map(|a| a.replayed).unwrap_or(0),
        );
        r.figure(
            "inventory API lost responses",
            outcome.api.map(|a| a.responses_lost).unwrap_or(0),
        );
        r.figure("settled by reconciliation", fc.settled_by_reconciler);
    }

    /// One effect per order, read from the business tables and the inventory API's own.
    fn checks(&self, r: &mut Report) {
        let (n, expected) = (self.plan.orders(), self.plan.expected());
        let (st, fc) = (&self.last.state, &self.last.fulfillment);
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
    }

    /// Whether the hostile producer's messages are the only fault of the run.
    fn only_hostile(&self) -> bool {
        let plan = self.plan;
        !plan.hostile.is_empty() && plan.kinds.iter().all(|k| *k == FaultKind::Hostile)
    }

    /// What each DLQ holds. A consumer killed between its DLQ copy's confirm and its ack
    /// dead-letters the redelivery again: a second copy of the same message, never a lost one.
    /// Count distinct messages. Only this run's messages count: a DLQ kept from earlier runs
    /// holds theirs too. Hostile messages are told apart by their marker, whatever their message
    /// id became.
    async fn dlq_checks(&self, r: &mut Report, processed: &HashSet<(String, String)>) {
        let plan = self.plan;
        let consumers = [billing::CONSUMER, fulfillment::CONSUMER, audit::CONSUMER];
        for (i, topology) in plan.names.all().into_iter().enumerate() {
            let dlq = self
                .setup
                .broker
                .dlq_contents(&topology.dlq(), &plan.prefix)
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
                plan.cli.poison as i64,
                dlq.distinct,
            );
            if plan.hostile.is_empty() {
                continue;
            }
            self.hostile_checks(r, i, consumers[i], &dlq, processed);
            // Without any other fault nothing may be dead-lettered twice.
            if self.only_hostile() {
                r.check(
                    &format!("{} hostile copies (one per message)", topology.dlq()),
                    dlq.hostile.len() as i64,
                    dlq.hostile.values().map(Vec::len).sum::<usize>(),
                );
            }
        }
    }

    /// Whether every hostile message met its fate at `consumer` (number `i`), once.
    fn hostile_checks(
        &self,
        r: &mut Report,
        i: usize,
        consumer: &str,
        dlq: &DlqContents,
        processed: &HashSet<(String, String)>,
    ) {
        let hostile = &self.plan.hostile;
        let mut as_expected = 0;
        for h in hostile {
            let codes = dlq.hostile.get(&h.marker).cloned().unwrap_or_default();
            let done = h
                .message_id
                .as_ref()
                .is_some_and(|id| processed.contains(&(consumer.to_owned(), id.clone())));
            let ok = match h.fates[i] {
                Fate::DeadLetter(code) => {
                    !codes.is_empty() && codes.iter().all(|c| c == code) && !done
                }
                Fate::Processed => done && codes.is_empty(),
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
    }

    /// With hostile messages as the only fault: nothing hostile may break a connection, loop
    /// through the retry queues or be taken for an infrastructure failure and handed back.
    fn hostile_run_checks(&self, r: &mut Report) {
        if !self.only_hostile() {
            return;
        }
        r.check("consumer reconnects", 0, self.last.sum(|s| s.reconnects));
        r.check("retries", 0, self.last.sum(|s| s.retried));
        r.check(
            "given back as infrastructure failures (requeued)",
            0,
            self.last.sum(|s| s.requeued),
        );
    }
}
