//! Opt-in observability: Prometheus metrics on `/metrics`, liveness on `/health/live` and
//! readiness on `/health/ready`, served over HTTP on one address.
//!
//! oncely's runtimes record their metrics through the [`metrics`] facade (names in
//! [`oncely_core::metric_names`]); this module installs a Prometheus recorder for them and serves
//! it. Readiness turns unhealthy (503) when a broker or database connection reported by a
//! consumer, a relay or a database probe has been down for longer than a grace period.
//!
//! ```no_run
//! # async fn demo(pool: oncely::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! // METRICS_ADDR=127.0.0.1:9464 my-service
//! let _observability = oncely::observability::serve_from_env(&pool).await?;
//! // ... build and run consumers or relays: their metrics are served from now on.
//! # Ok(()) }
//! ```
//!
//! Install the recorder (through [`serve_from_env`], [`Observability::serve`] or
//! [`install_recorder`]) before starting consumers: a runtime takes its metric handles when it
//! starts, and handles taken before a recorder exists record nothing.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use diesel_async::RunQueryDsl;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use oncely_core::health::{Component, Kind, Registry};
use oncely_inbox::Pool;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The environment variable [`serve_from_env`] reads: the address to serve on.
pub const METRICS_ADDR_ENV: &str = "METRICS_ADDR";

/// Histogram buckets, in seconds, of every oncely histogram (durations and latencies).
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Setting up observability failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObservabilityError {
    /// `METRICS_ADDR` is not a socket address.
    #[error("{METRICS_ADDR_ENV}={value:?} is not an address such as 127.0.0.1:9464")]
    InvalidAddress {
        /// The value found.
        value: String,
    },
    /// Another metrics recorder was installed before oncely's.
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder as the process's metrics recorder, once; later calls return
/// the same handle. [`PrometheusHandle::render`] gives the text `/metrics` serves.
pub fn install_recorder() -> Result<PrometheusHandle, ObservabilityError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(ObservabilityError::Recorder)
}

/// What to serve, and how readiness is judged.
#[derive(Debug, Clone)]
pub struct Observability {
    addr: SocketAddr,
    grace: Duration,
    probe_interval: Duration,
    databases: Vec<(String, Pool)>,
}

impl Observability {
    /// Serve on `addr` (port 0 picks a free port; see [`ObservabilityServer::local_addr`]).
    pub fn new(addr: SocketAddr) -> Self {
        Observability {
            addr,
            grace: Duration::from_secs(15),
            probe_interval: Duration::from_secs(5),
            databases: Vec::new(),
        }
    }

    /// How long a connection may be down before readiness fails. Default 15 s: a broker
    /// restart or a database failover that heals in time does not take the service out.
    pub fn readiness_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Checks `pool` with `SELECT 1` every probe interval; a failed or hung probe marks the
    /// database down. Consumers report their database only when messages flow; the probe covers
    /// idle times.
    pub fn probe_database(mut self, name: impl Into<String>, pool: Pool) -> Self {
        self.databases.push((name.into(), pool));
        self
    }

    /// Interval (and timeout) of the database probes. Default 5 s.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Installs the recorder (see [`install_recorder`]), binds the address and serves in the
    /// background until [`ObservabilityServer::shutdown`] or drop.
    pub async fn serve(self) -> Result<ObservabilityServer, ObservabilityError> {
        let handle = install_recorder()?;
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|source| ObservabilityError::Bind {
                addr: self.addr,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ObservabilityError::Bind {
                addr: self.addr,
                source,
            })?;
        let mut tasks = Vec::new();
        for (name, pool) in self.databases {
            let component = Registry::global().register(name, Kind::Database, true);
            tasks.push(tokio::spawn(probe_database(
                pool,
                component,
                self.probe_interval,
            )));
        }
        let upkeep = handle.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        }));
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(AppState {
                handle: handle.clone(),
                grace: self.grace,
            });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "observability endpoint stopped");
            }
        });
        tracing::info!(%addr, "serving /metrics, /health/live and /health/ready");
        Ok(ObservabilityServer {
            addr,
            handle,
            stop: Some(stop),
            server: Some(server),
            tasks,
        })
    }
}

/// Serves metrics and health on `METRICS_ADDR` when it is set (e.g.
/// `METRICS_ADDR=127.0.0.1:9464`), probing `pool` for readiness; `Ok(None)` when it is not set.
/// Keep the returned server alive as long as the service runs.
pub async fn serve_from_env(
    pool: &Pool,
) -> Result<Option<ObservabilityServer>, ObservabilityError> {
    let Ok(value) = std::env::var(METRICS_ADDR_ENV) else {
        return Ok(None);
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| ObservabilityError::InvalidAddress { value })?;
    Observability::new(addr)
        .probe_database("database", pool.clone())
        .serve()
        .await
        .map(Some)
}

/// The running endpoint; dropping it stops it.
#[derive(Debug)]
pub struct ObservabilityServer {
    addr: SocketAddr,
    handle: PrometheusHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ObservabilityServer {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The recorder's handle: `render()` gives what `/metrics` serves.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for ObservabilityServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    grace: Duration,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.handle.render(),
    )
}

async fn live() -> impl IntoResponse {
    "live\n"
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let report = Registry::global().report(state.grace);
    let components: Vec<serde_json::Value> = report
        .components
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "kind": c.kind.as_str(),
                "up": c.down_for.is_none(),
                "down_for_secs": c.down_for.map(|d| d.as_secs_f64()),
                "healthy": c.healthy,
            })
        })
        .collect();
    let body = serde_json::json!({ "ready": report.ready, "components": components });
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// Probes `pool` every `interval`. The query runs on a task of its own and is never cancelled
/// (cancelling diesel-async work can leave a connection mid-transaction); a probe still running
/// after `interval` marks the database down and is awaited again instead of starting another.
async fn probe_database(pool: Pool, component: Component, interval: Duration) {
    let mut running: Option<JoinHandle<bool>> = None;
    loop {
        let mut probe = running.take().unwrap_or_else(|| {
            let pool = pool.clone();
            tokio::spawn(async move {
                match pool.get().await {
                    Ok(mut conn) => diesel::sql_query("SELECT 1")
                        .execute(&mut *conn)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            })
        });
        match tokio::time::timeout(interval, &mut probe).await {
            Ok(Ok(true)) => component.up(),
            Ok(_) => component.down(),
            Err(_) => {
                component.down();
                running = Some(probe);
                continue;
            }
        }
        tokio::time::sleep(interval).await;
    }
}
