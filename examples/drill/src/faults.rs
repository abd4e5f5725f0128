//! The faults the drill injects, when, and how.

use crate::fleet::Role;
use crate::note;
use crate::plan::{Plan, Setup};
use rand::Rng;
use rand::seq::SliceRandom;
use std::time::Duration;

/// A kind of fault, as chosen with `--faults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// SIGKILL billing, fulfillment, audit or the relay at random moments (`--kills` times),
    /// each restarted 0.2-1.5 s later.
    Kill,
    /// SIGKILL the relay only, `--kills` times: events confirmed but not yet marked are
    /// published again.
    RelayKill,
    /// Audit down for 5 s while events pile up in its quorum queue.
    AuditOutage,
    /// `rabbitmqctl close_connection` on every connection of the services, once.
    Cut,
    /// `rabbitmqctl stop_app`, 3 s, `start_app`: the whole broker goes away and comes back.
    BrokerRestart,
    /// A memory alarm (`set_vm_memory_high_watermark 0`) for 5 s: every publisher is blocked.
    MemoryAlarm,
    /// `pg_terminate_backend` on every connection of the services, three times.
    PgTerminate,
    /// PostgreSQL restarted (`pg_ctlcluster ... restart`), once. Local clusters only.
    PgRestart,
    /// 30 ms added to every packet between the services and RabbitMQ / PostgreSQL for a while.
    ProxyLatency,
    /// Every TCP connection of the services to RabbitMQ / PostgreSQL cut, twice.
    ProxyCut,
    /// Every connection of the services black-holed for 15 s (open, but no byte moves; only
    /// heartbeats and timeouts notice), then cut.
    HalfOpen,
    /// The services die (abort) at precise points through oncely's fail points: before a
    /// commit, after a commit before its ack, after a DLQ copy before its ack, with a publish
    /// sent but unconfirmed, and in the relay after confirms before marking. Needs the services
    /// built with `--features failpoints` (scripts/faults does).
    Failpoints,
    /// The inventory API answers `--api-fail-rate` of calls 503 and loses `--api-lose-rate` of
    /// responses after reserving.
    Api,
    /// A producer that is not lapin (the hand-written client) publishes, between the orders,
    /// messages no lapin producer can send: short strings and a header name that are not UTF-8,
    /// a NUL in a message id and in a JSON string, bodies that are not orders, and valid orders
    /// with header values of every odd type. See `hostile.rs` for each one's expected fate.
    Hostile,
}

impl FaultKind {
    /// Whether the services must reach RabbitMQ and PostgreSQL through the drill's proxies.
    pub fn needs_proxy(self) -> bool {
        matches!(
            self,
            FaultKind::ProxyLatency | FaultKind::ProxyCut | FaultKind::HalfOpen
        )
    }

    /// Name, as on the command line.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// One fault event.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// SIGKILL, restart after `down`.
    Kill { role: Role, down: Duration },
    /// rabbitmqctl close_connection on the services' connections.
    CutConnections,
    /// stop_app, wait, start_app.
    BrokerRestart,
    /// Memory alarm for a while.
    MemoryAlarm(Duration),
    /// pg_terminate_backend on the services' connections.
    PgTerminate,
    /// PostgreSQL restart.
    PgRestart,
    /// Proxy latency on or off.
    Latency(Duration),
    /// Proxy cut of every connection.
    ProxyCut,
    /// Black hole for a while, then cut.
    BlackHole(Duration),
}

impl Fault {
    /// The kind it belongs to, for the tally.
    pub fn label(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "SIGKILL",
            Fault::CutConnections => "broker connections closed",
            Fault::BrokerRestart => "broker restart",
            Fault::MemoryAlarm(_) => "memory alarm",
            Fault::PgTerminate => "PostgreSQL backends terminated",
            Fault::PgRestart => "PostgreSQL restart",
            Fault::Latency(_) => "network latency change",
            Fault::ProxyCut => "network connections cut",
            Fault::BlackHole(_) => "half-open connections",
        }
    }
}

/// The faults of `kinds`, each at the share of orders processed when it is due, in order.
pub fn schedule(kinds: &[FaultKind], kills: usize, rng: &mut impl Rng) -> Vec<(f64, Fault)> {
    let mut faults: Vec<(f64, Fault)> = Vec::new();
    let kill = |victims: &mut Vec<Role>, rng: &mut dyn rand::RngCore, faults: &mut Vec<_>| {
        for k in 0..kills {
            if k % victims.len() == 0 {
                victims.shuffle(rng);
            }
            let role = victims[k % victims.len()];
            let down = Duration::from_millis(rng.random_range(200..1500));
            faults.push((rng.random_range(0.05..0.85), Fault::Kill { role, down }));
        }
    };
    for kind in kinds {
        match kind {
            FaultKind::Kill => kill(
                &mut vec![Role::Billing, Role::Fulfillment, Role::Audit, Role::Relay],
                rng,
                &mut faults,
            ),
            FaultKind::RelayKill => kill(&mut vec![Role::Relay], rng, &mut faults),
            FaultKind::AuditOutage => faults.push((
                0.3,
                Fault::Kill {
                    role: Role::Audit,
                    down: Duration::from_secs(5),
                },
            )),
            FaultKind::Cut => faults.push((0.5, Fault::CutConnections)),
            FaultKind::BrokerRestart => faults.push((0.4, Fault::BrokerRestart)),
            FaultKind::MemoryAlarm => {
                faults.push((0.25, Fault::MemoryAlarm(Duration::from_secs(5))))
            }
            FaultKind::PgTerminate => {
                for at in [0.2, 0.45, 0.7] {
                    faults.push((at, Fault::PgTerminate));
                }
            }
            FaultKind::PgRestart => faults.push((0.55, Fault::PgRestart)),
            FaultKind::ProxyLatency => {
                faults.push((0.1, Fault::Latency(Duration::from_millis(30))));
                faults.push((0.6, Fault::Latency(Duration::ZERO)));
            }
            FaultKind::ProxyCut => {
                faults.push((0.35, Fault::ProxyCut));
                faults.push((0.65, Fault::ProxyCut));
            }
            FaultKind::HalfOpen => faults.push((0.75, Fault::BlackHole(Duration::from_secs(15)))),
            FaultKind::Api | FaultKind::Failpoints | FaultKind::Hostile => {}
        }
    }
    faults.sort_by(|a, b| a.0.total_cmp(&b.0));
    faults
}

/// `FAILPOINTS` for the services: the chance, at each pass, that the process aborts there.
pub const FAILPOINTS: &str = "oncely::before_commit=0.5%return;\
oncely::after_commit=0.5%return;\
oncely::after_dead_letter_publish=25%return;\
oncely::publish_before_confirm=0.5%return;\
oncely::relay_after_confirm=2%return";

/// Runs `rabbitmqctl` with `args`; its stdout, or why it failed.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(oncely_example_messages::rabbitmqctl_program())
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Stops the broker's application, waits `down`, starts it again.
pub async fn restart_broker(down: Duration) -> Result<(), String> {
    blocking(|| rabbitmqctl(&["stop_app"]).map(|_| ())).await?;
    tokio::time::sleep(down).await;
    // start_app must happen whatever: retry it a few times.
    let mut last = Ok(());
    for _ in 0..5 {
        last = blocking(|| rabbitmqctl(&["start_app"]).map(|_| ())).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    last
}

/// Raises a memory alarm for `length` (every publisher on the broker is blocked), then
/// restores the watermark found.
pub async fn memory_alarm(length: Duration) -> Result<(), String> {
    let current =
        blocking(|| rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]))
            .await?;
    let restore = if current.parse::<f64>().is_ok() {
        current
    } else {
        "0.4".to_owned()
    };
    blocking(|| rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).map(|_| ())).await?;
    tokio::time::sleep(length).await;
    let mut last = Ok(());
    for _ in 0..5 {
        let value = restore.clone();
        last = blocking(move || rabbitmqctl(&["set_vm_memory_high_watermark", &value]).map(|_| ()))
            .await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    last
}

/// Restarts the local PostgreSQL cluster with `pg_ctlcluster`.
pub async fn restart_postgres() -> Result<(), String> {
    blocking(|| {
        let version = std::fs::read_dir("/etc/postgresql")
            .map_err(|e| format!("no local PostgreSQL cluster (/etc/postgresql: {e})"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()
            .ok_or("no local PostgreSQL cluster")?;
        let status = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "restart"])
            .status()
            .map_err(|e| format!("pg_ctlcluster: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("pg_ctlcluster restart: {status}"))
        }
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// Starts `fault`. Returns the task that finishes it (a restart, an alarm lifted), or None when
/// it could not be injected (said on the console).
pub async fn inject(
    fault: Fault,
    progress: f64,
    tty: bool,
    plan: &Plan,
    setup: &Setup,
) -> Option<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let (fleet, proxies, pool) = (&setup.fleet, &setup.proxies[..], &setup.pool);
    let (app_name, connection_prefix) = (&setup.app_name, &plan.connection_prefix);
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
                restart_broker(Duration::from_secs(3))
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
                memory_alarm(length).await.map_err(anyhow::Error::msg)
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
                restart_postgres().await.map_err(anyhow::Error::msg)
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
