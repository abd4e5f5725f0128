//! Where the CPU goes: CPU time of this process, of the PostgreSQL backends serving one bench
//! schema (found by `application_name`), and of RabbitMQ (`beam.smp`, shared with whatever else
//! uses the broker), read from `/proc/<pid>/stat` before and after a measurement.
//!
//! On a machine with two cores for everything, throughput is about the cores divided by the
//! CPU one message costs across these processes: this is the profile of a run.

use std::collections::HashMap;

/// Statements sent through diesel by this process (every connection, the oncely consumer's
/// included): counted by a diesel instrumentation installed with [`count_statements`].
static STATEMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct StatementCounter;

impl diesel::connection::Instrumentation for StatementCounter {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if let diesel::connection::InstrumentationEvent::StartQuery { .. } = event {
            STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Counts every statement of every diesel connection opened from now on.
pub fn count_statements() {
    let _ = diesel::connection::set_default_instrumentation(|| Some(Box::new(StatementCounter)));
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    statements: u64,
    own: f64,
    backends: HashMap<i32, f64>,
    broker: f64,
}

/// CPU per message, microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerMessage {
    /// This process (the driver, or the oncely consumer with lapin and diesel).
    pub client_us: f64,
    /// The PostgreSQL backends of the measured schema.
    pub postgres_us: f64,
    /// RabbitMQ, all of it (other users of the broker included).
    pub broker_us: f64,
    /// Statements per message sent through diesel (the oncely consumer's; 0 for drivers that
    /// do not use diesel).
    pub statements: f64,
}

impl PerMessage {
    /// Sums per-message figures of several rounds weighted by their message counts.
    pub fn weighted(parts: &[(usize, PerMessage)]) -> PerMessage {
        let total: usize = parts.iter().map(|(n, _)| n).sum();
        let avg = |f: fn(&PerMessage) -> f64| {
            parts.iter().map(|(n, p)| *n as f64 * f(p)).sum::<f64>() / (total.max(1) as f64)
        };
        PerMessage {
            client_us: avg(|p| p.client_us),
            postgres_us: avg(|p| p.postgres_us),
            broker_us: avg(|p| p.broker_us),
            statements: avg(|p| p.statements),
        }
    }

    /// The figures for the JSON summary, rounded.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "client_us": self.client_us.round(),
            "postgres_us": self.postgres_us.round(),
            "broker_us": self.broker_us.round(),
            "statements_per_message": (self.statements * 100.0).round() / 100.0,
        })
    }

    /// `client 120 + postgres 300 + broker 80 µs/msg`.
    pub fn describe(&self) -> String {
        let statements = if self.statements > 0.0 {
            format!("; {:.2} statements/msg", self.statements)
        } else {
            String::new()
        };
        format!(
            "CPU/msg: client {:.0} + postgres {:.0} + broker {:.0} µs{statements}",
            self.client_us, self.postgres_us, self.broker_us
        )
    }
}

/// Reads the counters now. `application_name` picks the PostgreSQL backends.
pub async fn snapshot(application_name: &str) -> Snapshot {
    let backends = backend_pids(application_name)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|pid| Some((pid, cpu_seconds(&format!("/proc/{pid}/stat"))?)))
        .collect();
    Snapshot {
        statements: STATEMENTS.load(std::sync::atomic::Ordering::Relaxed),
        own: cpu_seconds("/proc/self/stat").unwrap_or_default(),
        backends,
        broker: broker_pids()
            .iter()
            .filter_map(|pid| cpu_seconds(&format!("/proc/{pid}/stat")))
            .sum(),
    }
}

/// CPU per message between two snapshots. A backend missing from `start` was opened in between
/// and counts from zero.
pub fn per_message(start: &Snapshot, end: &Snapshot, messages: usize) -> PerMessage {
    let per = |seconds: f64| seconds.max(0.0) * 1e6 / messages.max(1) as f64;
    let postgres: f64 = end
        .backends
        .iter()
        .map(|(pid, used)| used - start.backends.get(pid).copied().unwrap_or(0.0))
        .sum();
    PerMessage {
        client_us: per(end.own - start.own),
        postgres_us: per(postgres),
        broker_us: per(end.broker - start.broker),
        statements: end.statements.saturating_sub(start.statements) as f64 / messages.max(1) as f64,
    }
}

async fn backend_pids(application_name: &str) -> anyhow::Result<Vec<i32>> {
    let (client, connection) =
        tokio_postgres::connect(&oncely::testing::database_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

fn broker_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
        .collect()
}

/// utime + stime of a `/proc/<pid>/stat` file, in seconds.
fn cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_seconds("/proc/self/stat").is_some());
    }

    #[test]
    fn new_backends_count_from_zero() {
        let start = Snapshot {
            statements: 0,
            own: 1.0,
            backends: HashMap::from([(1, 2.0)]),
            broker: 5.0,
        };
        let end = Snapshot {
            statements: 4000,
            own: 1.5,
            backends: HashMap::from([(1, 2.5), (2, 0.5)]),
            broker: 5.25,
        };
        let p = per_message(&start, &end, 1000);
        assert_eq!(p.client_us.round(), 500.0);
        assert_eq!(p.postgres_us.round(), 1000.0);
        assert_eq!(p.broker_us.round(), 250.0);
        assert_eq!(p.statements, 4.0);
    }
}
