//! The service runner: one value that runs a service's consumers, outbox relays and background
//! tasks together, with logging, metrics and health from the environment, and one graceful
//! shutdown that drains them all.

use crate::consumer::Consumer;
use oncely_inbox::Pool;
use std::future::Future;
use std::pin::Pin;
use tokio_util::sync::CancellationToken;

type Component =
    Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send>;
type Outcome = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Some components of a [`Service`] failed, or could not start; each is named.
#[derive(Debug, thiserror::Error)]
#[error("{} failed: {}", .failures.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "), .failures.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct ServiceError {
    /// The failed components, by name, with their errors.
    pub failures: Vec<(String, String)>,
}

/// A service's consumers, relays and tasks, run together, with logging, metrics and health
/// from the environment, and one graceful shutdown that drains them all.
///
/// ```no_run
/// # use oncely::prelude::*;
/// # #[oncely::handler(consumer = "billing")]
/// # async fn create_invoice(_c: &mut AsyncPgConnection, _m: Envelope<serde_json::Value>) -> Result<(), HandlerError> { Ok(()) }
/// # async fn start() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = oncely::connect_pool("postgres://postgres@127.0.0.1:5432/oncely", &oncely::PoolOptions::default());
/// let billing = Consumer::builder(create_invoice, Inbox::new(pool.clone()))
///     .amqp_url("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .topology(Topology::new("order.events", "billing.order-events.q").bind("order.created.v1"))
///     .build()?;
/// oncely::Service::new("billing")
///     .database(pool)
///     .consumer(billing)
///     .task("nightly-report", |stop| async move {
///         stop.cancelled().await; // a background task ends when the service stops
///         Ok::<(), std::io::Error>(())
///     })
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub struct Service {
    name: String,
    components: Vec<(String, Component)>,
    database: Option<Pool>,
    logging: bool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field(
                "components",
                &self.components.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name` (in its logs), with nothing to run yet.
    pub fn new(name: impl Into<String>) -> Self {
        Service {
            name: name.into(),
            components: Vec::new(),
            database: None,
            logging: true,
        }
    }

    /// Runs `consumer`; at shutdown it stops taking deliveries, finishes and acks what is in
    /// flight. A consumer that stops with an error (a topology conflict, an abandoned drain)
    /// stops the whole service and is reported by [`run`](Self::run).
    pub fn consumer(mut self, consumer: Consumer) -> Self {
        let name = format!("consumer {}", consumer.topology().queue());
        self.components.push((
            name,
            Box::new(move |stop: CancellationToken| {
                Box::pin(async move {
                    consumer
                        .run(stop.cancelled_owned())
                        .await
                        .map_err(|e| Box::new(e) as _)
                })
            }),
        ));
        self
    }

    /// Runs an outbox relay until the service stops.
    pub fn relay(mut self, relay: crate::outbox::Relay) -> Self {
        let name = "outbox relay".to_owned();
        self.components.push((
            name,
            Box::new(move |stop: CancellationToken| {
                Box::pin(async move {
                    relay
                        .run(stop.cancelled_owned())
                        .await
                        .map_err(|e| Box::new(e) as _)
                })
            }),
        ));
        self
    }

    /// Runs a background task (a reconciler, a cache warmer): `task` gets a token that is
    /// cancelled when the service stops, and should return soon after.
    pub fn task<F, Fut, E>(mut self, name: impl Into<String>, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.components.push((
            name.into(),
            Box::new(move |stop: CancellationToken| {
                Box::pin(async move { task(stop).await.map_err(|e| Box::new(e) as _) })
            }),
        ));
        self
    }

    /// The database pool readiness and `/metrics` report on: with it, and `METRICS_ADDR` set,
    /// the service serves `/metrics`, `/health/live` and `/health/ready` while it runs.
    pub fn database(mut self, pool: Pool) -> Self {
        self.database = Some(pool);
        self
    }

    /// Leaves logging to the application. By default [`run`](Self::run) installs a subscriber
    /// (stderr, `RUST_LOG` or `info`) unless one is installed already, so a first run is never
    /// silent.
    pub fn without_logging(mut self) -> Self {
        self.logging = false;
        self
    }

    /// Runs until Ctrl-C or SIGTERM ([`crate::shutdown_signal`]), or until a component fails.
    pub async fn run(self) -> Result<(), ServiceError> {
        self.run_until(crate::shutdown_signal()).await
    }

    /// Runs until `shutdown` completes or a component fails, then stops every component and
    /// waits for them all. `Err` names each component that failed.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServiceError> {
        if self.logging {
            install_logging();
        }
        let mut failures = Vec::new();
        #[cfg(feature = "observability")]
        let _observability = match &self.database {
            Some(pool) => match crate::observability::serve_from_env(pool).await {
                Ok(server) => server,
                Err(e) => {
                    return Err(ServiceError {
                        failures: vec![("observability".to_owned(), e.to_string())],
                    });
                }
            },
            None => None,
        };
        let stop = CancellationToken::new();
        let mut running = tokio::task::JoinSet::new();
        // A component that panics or is aborted leaves only its task id: its name is kept here.
        let mut names = std::collections::HashMap::new();
        for (name, component) in self.components {
            let future = component(stop.clone());
            let task = running.spawn({
                let name = name.clone();
                async move { (name, future.await) }
            });
            names.insert(task.id(), name);
        }
        tracing::info!(service = %self.name, components = running.len(), "service running");
        tokio::pin!(shutdown);
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = &mut shutdown, if !stopping => {
                    tracing::info!(service = %self.name, "shutting down");
                    stopping = true;
                    stop.cancel();
                }
                joined = running.join_next() => match joined {
                    None => break,
                    Some(joined) => {
                        let (name, outcome) = match joined {
                            Ok(ended) => ended,
                            Err(e) => (
                                names
                                    .get(&e.id())
                                    .cloned()
                                    .unwrap_or_else(|| "a component".to_owned()),
                                Err(Box::new(e) as _),
                            ),
                        };
                        if let Err(e) = outcome {
                            tracing::error!(service = %self.name, component = %name, error = %e, "component failed; stopping the service");
                            failures.push((name, e.to_string()));
                        } else if !stopping {
                            tracing::warn!(service = %self.name, component = %name, "component ended before the service stopped; stopping the service");
                        }
                        if !stopping {
                            stopping = true;
                            stop.cancel();
                        }
                    }
                },
            }
        }
        if failures.is_empty() {
            tracing::info!(service = %self.name, "service stopped");
            Ok(())
        } else {
            Err(ServiceError { failures })
        }
    }
}

/// The log filter of a service that sets no `RUST_LOG`: oncely and the application at `info`;
/// lapin off, because oncely logs every connection failure once, with its cause
/// (`ACCESS_REFUSED`, refused, reset), where lapin would log each one three or four times.
/// `RUST_LOG=info,lapin=warn` brings lapin's own lines back.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

/// Logs to stderr, filtered by `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]), unless the
/// application installed a subscriber already.
fn install_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
