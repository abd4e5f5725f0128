//! The drill's child processes: started, SIGKILLed, restarted and stopped, with the counters
//! each incarnation printed on its stdout.

use anyhow::{Context, bail};
use oncely::StatsSnapshot;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A service of the drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The simulated inventory API.
    InventoryApi,
    /// The order service's outbox relay.
    Relay,
    /// Billing consumer.
    Billing,
    /// Fulfillment consumer.
    Fulfillment,
    /// Audit consumer.
    Audit,
}

impl Role {
    /// Name in logs and connection names.
    pub fn name(self) -> &'static str {
        match self {
            Role::InventoryApi => "inventory-api",
            Role::Relay => "relay",
            Role::Billing => "billing",
            Role::Fulfillment => "fulfillment",
            Role::Audit => "audit",
        }
    }

    /// The executable.
    pub fn binary(self) -> &'static str {
        match self {
            Role::InventoryApi | Role::Fulfillment => "fulfillment",
            Role::Relay => "order-service",
            Role::Billing => "billing",
            Role::Audit => "audit",
        }
    }
}

type StatsByIncarnation = HashMap<(Role, u32), StatsSnapshot>;

/// The running services.
#[derive(Debug)]
pub struct Fleet {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    args: HashMap<Role, Vec<String>>,
    role_env: HashMap<Role, Vec<(String, String)>>,
    running: tokio::sync::Mutex<HashMap<Role, Child>>,
    incarnations: Mutex<HashMap<Role, u32>>,
    stats: Arc<Mutex<StatsByIncarnation>>,
}

impl Fleet {
    /// A fleet running the binaries of `bin_dir`, logging to `log_dir`, with `env` set.
    pub fn new(
        bin_dir: &Path,
        log_dir: &Path,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Fleet> {
        for binary in ["billing", "fulfillment", "audit", "order-service"] {
            let path = bin_dir.join(binary);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the drill's services first \
                     (cargo build -p billing -p fulfillment -p audit -p order-service), \
                     or give their directory with --bin-dir",
                    path.display()
                );
            }
        }
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Fleet {
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            env,
            args: HashMap::new(),
            role_env: HashMap::new(),
            running: tokio::sync::Mutex::default(),
            incarnations: Mutex::default(),
            stats: Arc::default(),
        })
    }

    /// The command line of `role` (after the binary).
    pub fn set_args(&mut self, role: Role, args: Vec<String>) {
        self.args.insert(role, args);
    }

    /// Environment variables of `role` only, set over the fleet's own.
    pub fn set_env(&mut self, role: Role, env: Vec<(String, String)>) {
        self.role_env.insert(role, env);
    }

    /// Where `role` logs.
    pub fn log_path(&self, role: Role) -> PathBuf {
        self.log_dir.join(format!("{}.log", role.name()))
    }

    /// Starts `role`. Its stdout is read for `oncely-stats` lines; everything it writes goes
    /// to its log file. Returns the first line it printed when `first_line` is asked for (the
    /// inventory API prints its address there).
    pub async fn start(&self, role: Role, first_line: bool) -> anyhow::Result<Option<String>> {
        let incarnation = {
            let mut all = lock(&self.incarnations);
            let n = all.entry(role).or_insert(0);
            *n += 1;
            *n
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(role))
            .with_context(|| format!("opening {}", self.log_path(role).display()))?;
        let mut command = Command::new(self.bin_dir.join(role.binary()));
        command
            .args(self.args.get(&role).into_iter().flatten())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(
                self.role_env
                    .get(&role)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k, v)),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", role.name()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<String>();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            use std::io::Write;
            let mut log = log;
            let mut lines = BufReader::new(stdout).lines();
            let mut first_tx = Some(first_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(line.clone());
                }
                match oncely_example_messages::parse_stats_line(&line) {
                    Some((_, snapshot)) => {
                        lock(&stats).insert((role, incarnation), snapshot);
                    }
                    None => {
                        let _ = writeln!(log, "{line}");
                    }
                }
            }
        });
        self.running.lock().await.insert(role, child);
        if !first_line {
            return Ok(None);
        }
        match tokio::time::timeout(Duration::from_secs(60), first_rx).await {
            Ok(Ok(line)) => Ok(Some(line)),
            _ => bail!(
                "{} printed nothing within 60 s; see {}",
                role.name(),
                self.log_path(role).display()
            ),
        }
    }

    /// SIGKILLs `role`, as a crash or an OOM kill would: no shutdown, no acks, no clean-up.
    /// Returns false when it was not running (still down from an earlier kill).
    pub async fn kill(&self, role: Role) -> bool {
        let child = self.running.lock().await.remove(&role);
        let Some(mut child) = child else {
            return false;
        };
        child.start_kill().ok();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        true
    }

    /// Whether `role` exited by itself (it should not).
    pub async fn exited(&self, role: Role) -> Option<std::process::ExitStatus> {
        let mut running = self.running.lock().await;
        running
            .get_mut(&role)
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Sends SIGTERM to every service and waits up to `timeout` for each; kills what is left.
    pub async fn stop_all(&self, timeout: Duration) {
        let mut running = self.running.lock().await;
        for child in running.values() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for (role, mut child) in running.drain() {
            if tokio::time::timeout(timeout, child.wait()).await.is_err() {
                eprintln!("{} did not stop within {timeout:?}: killed", role.name());
                child.start_kill().ok();
                let _ = child.wait().await;
            }
        }
    }

    /// Deliveries the running consumers have in hand (held ones included), from the last line
    /// each running incarnation printed: those settle, or go back to the queue, later.
    pub fn in_flight(&self) -> u64 {
        let current = lock(&self.incarnations).clone();
        lock(&self.stats)
            .iter()
            .filter(|((role, incarnation), _)| current.get(role) == Some(incarnation))
            .map(|(_, s)| s.in_flight)
            .sum()
    }

    /// The consumers' counters summed over every incarnation (the last line each printed;
    /// an incarnation SIGKILLed loses at most the last interval's counts).
    pub fn consumer_totals(&self) -> HashMap<Role, StatsSnapshot> {
        let mut totals: HashMap<Role, StatsSnapshot> = HashMap::new();
        for ((role, _), s) in lock(&self.stats).iter() {
            let t = totals.entry(*role).or_default();
            t.received += s.received;
            t.processed += s.processed;
            t.duplicates += s.duplicates;
            t.retried += s.retried;
            t.dead_lettered += s.dead_lettered;
            t.parked += s.parked;
            t.requeued += s.requeued;
            t.reconnects += s.reconnects;
        }
        totals
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
