//! What the drill observes, and the final report.

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
