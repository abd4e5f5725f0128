//! Process-wide health of the connections oncely depends on, for readiness probes.
//!
//! Each part that holds a connection (a consumer's broker connection, a relay's database, a
//! database probe) registers a [`Component`] and reports it up or down; the registry answers
//! whether every registered component is up, or down for less than a grace period. Dropping the
//! [`Component`] removes it (a stopped consumer no longer counts). No I/O here: the reporters do
//! the I/O, the HTTP endpoint in the `oncely` facade reads [`Registry::report`].
//!
//! ```
//! use oncely_core::health::{Registry, Kind};
//! use std::time::Duration;
//!
//! let registry = Registry::default();
//! let broker = registry.register("billing", Kind::Broker, false);
//! // Starting: down, but within the grace period.
//! assert!(registry.report(Duration::from_secs(10)).ready);
//! assert!(!registry.report(Duration::ZERO).ready);
//! broker.up();
//! assert!(registry.report(Duration::ZERO).ready);
//! drop(broker);
//! assert!(registry.report(Duration::ZERO).components.is_empty());
//! ```

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What a component connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// RabbitMQ.
    Broker,
    /// PostgreSQL.
    Database,
}

impl Kind {
    /// `broker` or `database`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Broker => "broker",
            Kind::Database => "database",
        }
    }
}

#[derive(Debug)]
struct State {
    name: String,
    kind: Kind,
    down_since: Mutex<Option<Instant>>,
}

/// A registered component; report its state with [`Component::up`] and [`Component::down`].
/// Dropping it unregisters it.
#[derive(Debug)]
pub struct Component {
    state: Arc<State>,
}

impl Component {
    /// The connection works.
    pub fn up(&self) {
        if let Ok(mut since) = self.state.down_since.lock() {
            *since = None;
        }
    }

    /// The connection is lost; the time of loss is kept if it was already down.
    pub fn down(&self) {
        if let Ok(mut since) = self.state.down_since.lock() {
            since.get_or_insert_with(Instant::now);
        }
    }

    /// True while reported up.
    pub fn is_up(&self) -> bool {
        self.state
            .down_since
            .lock()
            .map(|s| s.is_none())
            .unwrap_or(false)
    }
}

/// One component as the readiness report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentReport {
    /// Name given at registration (a consumer name, a relay name).
    pub name: String,
    /// What it connects to.
    pub kind: Kind,
    /// How long it has been down; `None` when up.
    pub down_for: Option<Duration>,
    /// False when down for longer than the grace period.
    pub healthy: bool,
}

/// Every registered component at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// True when every component is healthy.
    pub ready: bool,
    /// The components, in registration order.
    pub components: Vec<ComponentReport>,
}

/// A set of components; [`Registry::global`] is the one oncely's runtimes report to.
#[derive(Debug, Default)]
pub struct Registry {
    components: Mutex<Vec<Weak<State>>>,
}

impl Registry {
    /// The process-wide registry.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(Registry::default)
    }

    /// Registers a component, up or down (down since now) to begin with.
    pub fn register(&self, name: impl Into<String>, kind: Kind, up: bool) -> Component {
        let state = Arc::new(State {
            name: name.into(),
            kind,
            down_since: Mutex::new((!up).then(Instant::now)),
        });
        if let Ok(mut components) = self.components.lock() {
            components.retain(|c| c.strong_count() > 0);
            components.push(Arc::downgrade(&state));
        }
        Component { state }
    }

    /// The state of every live component; a component down for longer than `grace` is
    /// unhealthy and makes the report not ready.
    pub fn report(&self, grace: Duration) -> HealthReport {
        let now = Instant::now();
        let components: Vec<ComponentReport> = self
            .components
            .lock()
            .map(|c| c.iter().filter_map(Weak::upgrade).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|state| {
                let down_for = state
                    .down_since
                    .lock()
                    .ok()
                    .and_then(|s| *s)
                    .map(|since| now.saturating_duration_since(since));
                ComponentReport {
                    name: state.name.clone(),
                    kind: state.kind,
                    healthy: down_for.is_none_or(|d| d <= grace),
                    down_for,
                }
            })
            .collect();
        HealthReport {
            ready: components.iter().all(|c| c.healthy),
            components,
        }
    }
}
