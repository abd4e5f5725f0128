//! The consumer runtime: take deliveries, hand them to a [`DeliveryProcessor`], settle each by
//! its [`Decision`], and keep going through connection loss until asked to stop.
//!
//! - `intake`: the connection loop, concurrency permits, batching, reconnects and the drain;
//! - `handle`: one delivery or a batch, from the contract check to the decision;
//! - `settle`: the decision as a pure plan (ack, copy then ack, requeue) and carrying it out.

mod handle;
mod intake;
mod settle;

use crate::connection::Backoff;
use crate::publisher::ConfirmPublisher;
use crate::stats::ConsumerStats;
use crate::telemetry::ConsumerMetrics;
use crate::topology::Topology;
use lapin::message::Delivery;
use lapin::{Channel, Connection};
use oncely_core::{ContractLimits, Decision, Metadata, RedactedUrl};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A boxed, `Send` future.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a delivery means; the `oncely` facade implements it over the inbox.
pub trait DeliveryProcessor: Send + Sync + 'static {
    /// Processes a delivery whose metadata passed the contract, and says what to do with it.
    fn process<'a>(&'a self, metadata: Metadata, body: &'a [u8]) -> BoxFuture<'a, Decision>;

    /// Processes a batch of deliveries whose metadata passed the contract (batched mode, see
    /// [`ConsumerOptions::batch`]); one result per item, in order. The default processes them
    /// one after the other; the `oncely` facade commits them in one transaction.
    fn process_batch<'a>(
        &'a self,
        items: Vec<(Metadata, &'a [u8])>,
    ) -> BoxFuture<'a, Vec<Decision>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (metadata, body) in items {
                out.push(self.process(metadata, body).await);
            }
            out
        })
    }
}

/// Batched mode: deliveries are handed to [`DeliveryProcessor::process_batch`] in groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// A batch is processed once it has this many deliveries ...
    pub max_messages: usize,
    /// ... or when its first delivery has waited this long.
    pub max_wait: Duration,
}

impl BatchOptions {
    /// The prefetch that lets `concurrency` batches fill at once (`max_messages × concurrency`,
    /// at most 65,535): batched mode's prefetch unless one is set.
    pub fn prefetch_for(&self, concurrency: usize) -> u16 {
        self.max_messages
            .saturating_mul(concurrency.max(1))
            .min(u16::MAX as usize) as u16
    }
}

/// The broker's default URL on this machine: what [`ConsumerOptions`] users opt into explicitly
/// (a consumer never falls back to it silently).
pub const LOCAL_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Default prefetch of a consumer (one delivery at a time).
pub const DEFAULT_PREFETCH: u16 = 32;

/// Default concurrency of a consumer.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// A setting a consumer cannot run with, named as the configuration file names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct InvalidOption {
    /// The setting (`prefetch`, `concurrency`, `batch_size`, `strict_order`, ...).
    pub setting: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> InvalidOption {
    InvalidOption {
        setting,
        problem: problem.into(),
    }
}

/// A test hook that simulates a crash between the commit and the ack (`failpoints` feature
/// only, as the other fault hooks).
#[cfg(feature = "failpoints")]
#[derive(Clone)]
pub struct FaultInjection {
    /// Called after a delivery was processed (committed) and before it is acked; `true` closes
    /// the connection instead of acking, as a crash there would.
    pub crash_after_commit: Arc<dyn Fn(&Metadata) -> bool + Send + Sync>,
}

#[cfg(feature = "failpoints")]
impl std::fmt::Debug for FaultInjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultInjection { .. }")
    }
}

/// Settings of a consumer runtime. `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct ConsumerOptions {
    /// Consumer name, for logs.
    pub consumer_name: String,
    /// Connection name shown by the broker. Default: the consumer name.
    pub connection_name: String,
    /// `amqp://` URL.
    pub amqp_url: String,
    /// The queue to consume and its retry, dead-letter and parking queues.
    pub topology: Topology,
    /// Declare the topology at every (re)connect. Default true.
    pub declare_topology: bool,
    /// Unacked deliveries the broker may send ahead. Default [`DEFAULT_PREFETCH`]; in batched
    /// mode [`BatchOptions::prefetch_for`] the concurrency.
    pub prefetch: u16,
    /// Deliveries (batches, in batched mode) processed at once. Default [`DEFAULT_CONCURRENCY`].
    pub concurrency: usize,
    /// Contract bounds.
    pub limits: ContractLimits,
    /// Longest wait for the confirm of a retry, dead-letter or parking copy. Default 5 s.
    pub confirm_timeout: Duration,
    /// Backoff between reconnection attempts (retried for ever while running).
    pub reconnect: Backoff,
    /// First wait before a held delivery is processed again after an infrastructure failure
    /// (the database down, a copy that cannot be confirmed); the waits double, jittered, up to
    /// 30 s. Default 1 s.
    pub requeue_delay: Duration,
    /// Longest a delivery is held through an infrastructure failure before it is given back
    /// (republished to the queue's tail, so no delivery count grows; nacked under strict order).
    /// Keep it below the broker's consumer acknowledgement timeout (30 min by default), which
    /// closes the channel. Default 15 min.
    pub max_hold: Duration,
    /// Longest wait for in-flight deliveries at shutdown. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Retry on the same delivery (wait, then run again) instead of through the delay queues,
    /// so that with concurrency 1 and prefetch 1 no later message overtakes a retrying one.
    /// Default false.
    pub retry_in_place: bool,
    /// Batched mode: up to `max_messages` deliveries (or what arrived within `max_wait`) are
    /// processed together, `concurrency` batches at once. `None` (the default): one delivery at
    /// a time. Refused with `retry_in_place` (see [`ConsumerOptions::validate`]).
    pub batch: Option<BatchOptions>,
    /// Test hook (`failpoints` feature only).
    #[cfg(feature = "failpoints")]
    pub fault_injection: Option<FaultInjection>,
}

impl std::fmt::Debug for ConsumerOptions {
    // By hand: options end up in logs and panics, and the URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ConsumerOptions {
            consumer_name,
            connection_name,
            amqp_url,
            topology,
            declare_topology,
            prefetch,
            concurrency,
            limits,
            confirm_timeout,
            reconnect,
            requeue_delay,
            max_hold,
            shutdown_timeout,
            retry_in_place,
            batch,
            #[cfg(feature = "failpoints")]
                fault_injection: _,
        } = self;
        f.debug_struct("ConsumerOptions")
            .field("consumer_name", consumer_name)
            .field("connection_name", connection_name)
            .field("amqp_url", &RedactedUrl(amqp_url))
            .field("topology", topology)
            .field("declare_topology", declare_topology)
            .field("prefetch", prefetch)
            .field("concurrency", concurrency)
            .field("limits", limits)
            .field("confirm_timeout", confirm_timeout)
            .field("reconnect", reconnect)
            .field("requeue_delay", requeue_delay)
            .field("max_hold", max_hold)
            .field("shutdown_timeout", shutdown_timeout)
            .field("retry_in_place", retry_in_place)
            .field("batch", batch)
            .finish_non_exhaustive()
    }
}

impl ConsumerOptions {
    /// Defaults for consuming `topology` as `consumer_name` from `amqp_url`.
    pub fn new(
        consumer_name: impl Into<String>,
        amqp_url: impl Into<String>,
        topology: Topology,
    ) -> Self {
        let consumer_name = consumer_name.into();
        ConsumerOptions {
            connection_name: consumer_name.clone(),
            consumer_name,
            amqp_url: amqp_url.into(),
            topology,
            declare_topology: true,
            prefetch: DEFAULT_PREFETCH,
            concurrency: DEFAULT_CONCURRENCY,
            limits: ContractLimits::default(),
            confirm_timeout: Duration::from_secs(5),
            reconnect: Backoff {
                max_attempts: None,
                ..Backoff::default()
            },
            requeue_delay: Duration::from_secs(1),
            max_hold: Duration::from_secs(15 * 60),
            shutdown_timeout: Duration::from_secs(30),
            retry_in_place: false,
            batch: None,
            #[cfg(feature = "failpoints")]
            fault_injection: None,
        }
    }

    /// Sets how deliveries flow, the one place the dependent defaults are decided (the builder
    /// and the configuration file both call it): `concurrency` and `prefetch` as given, and what
    /// is not given from the mode. Strict order (`retry_in_place`): 1 and 1. Batched: concurrency
    /// [`DEFAULT_CONCURRENCY`], prefetch [`BatchOptions::prefetch_for`] that concurrency, so
    /// batches can fill. Otherwise [`DEFAULT_CONCURRENCY`] and [`DEFAULT_PREFETCH`]. Nothing is
    /// clamped: [`validate`](Self::validate) refuses what does not fit together.
    pub fn set_flow(
        &mut self,
        concurrency: Option<usize>,
        prefetch: Option<u16>,
        batch: Option<BatchOptions>,
        strict_order: bool,
    ) -> &mut Self {
        self.retry_in_place = strict_order;
        self.batch = batch;
        self.concurrency =
            concurrency.unwrap_or(if strict_order { 1 } else { DEFAULT_CONCURRENCY });
        self.prefetch = prefetch.unwrap_or(match (strict_order, batch) {
            (true, _) => 1,
            (false, Some(batch)) => batch.prefetch_for(self.concurrency),
            (false, None) => DEFAULT_PREFETCH,
        });
        self
    }

    /// Checks the settings the runtime cannot run with, the same for the builder and the
    /// configuration file: nothing is clamped or dropped silently.
    ///
    /// ```
    /// use oncely_amqp::{ConsumerOptions, Topology};
    /// let mut options = ConsumerOptions::new("billing", "amqp://127.0.0.1", Topology::new("e", "q"));
    /// options.prefetch = 4;
    /// options.concurrency = 8;
    /// assert_eq!(options.validate().unwrap_err().setting, "prefetch");
    /// ```
    pub fn validate(&self) -> Result<(), InvalidOption> {
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        if self.batch.is_some_and(|b| b.max_messages == 0) {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.prefetch == 0 {
            return Err(invalid(
                "prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        if self.batch.is_some() && self.retry_in_place {
            return Err(invalid(
                "strict_order",
                "batched mode cannot keep strict order: choose one",
            ));
        }
        if self.retry_in_place && (self.concurrency != 1 || self.prefetch != 1) {
            return Err(invalid(
                "strict_order",
                format!(
                    "needs concurrency 1 and prefetch 1, not {} and {}",
                    self.concurrency, self.prefetch
                ),
            ));
        }
        if usize::from(self.prefetch) < self.concurrency {
            return Err(invalid(
                "prefetch",
                format!(
                    "{} is below the concurrency {}: the broker would never send enough \
                     deliveries to use it",
                    self.prefetch, self.concurrency
                ),
            ));
        }
        Ok(())
    }
}

/// Runs one consumer until its shutdown future completes.
pub struct ConsumerRuntime {
    shared: Arc<Shared>,
}

struct Shared {
    options: ConsumerOptions,
    processor: Arc<dyn DeliveryProcessor>,
    stats: Arc<ConsumerStats>,
    metrics: OnceLock<ConsumerMetrics>,
    in_flight: InFlightDeliveries,
    /// Cancelled once shutdown begins: held deliveries stop waiting and are given back.
    stopping: tokio_util::sync::CancellationToken,
}

/// The deliveries handed to a task and not yet settled, so that a shutdown that has to abandon
/// them can say which ones.
#[derive(Default)]
struct InFlightDeliveries {
    next: std::sync::atomic::AtomicU64,
    live: std::sync::Mutex<std::collections::BTreeMap<u64, (u64, Option<String>)>>,
}

/// Removes its delivery from [`InFlightDeliveries`] when the task ends, aborted or not.
struct Tracked {
    shared: Arc<Shared>,
    key: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut live = self
            .shared
            .in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.remove(&self.key);
    }
}

impl Shared {
    fn track(self: &Arc<Self>, delivery: &Delivery) -> Tracked {
        let key = self
            .in_flight
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().chars().take(200).collect());
        self.in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, (delivery.delivery_tag, message_id));
        Tracked {
            shared: self.clone(),
            key,
        }
    }

    /// Delivery tag and message id of every delivery still in flight.
    fn in_flight(&self) -> Vec<(u64, Option<String>)> {
        self.in_flight
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Shared {
    /// The wait before try `retry` (0-based) of a held delivery: from `requeue_delay`, doubling
    /// up to 30 s, with equal jitter so held deliveries do not probe in lockstep.
    fn hold_delay(&self, retry: u32) -> Duration {
        Backoff {
            initial: self.options.requeue_delay,
            max: Duration::from_secs(30).max(self.options.requeue_delay),
            max_attempts: None,
        }
        .jittered(retry, fastrand::f64())
    }

    /// Whether a delivery held since `since` may wait for another try.
    fn may_hold(&self, since: std::time::Instant) -> bool {
        !self.stopping.is_cancelled() && since.elapsed() < self.options.max_hold
    }

    /// Sleeps `delay`, or less when shutdown begins.
    async fn hold_for(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.stopping.cancelled() => {}
        }
    }

    /// The metric handles, taken at first use (after the application installed its recorder).
    fn metrics(&self) -> &ConsumerMetrics {
        self.metrics.get_or_init(|| {
            ConsumerMetrics::new(self.options.topology.queue(), &self.options.consumer_name)
        })
    }
}

impl std::fmt::Debug for ConsumerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRuntime")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// One connection's worth of state.
struct Session {
    connection: Arc<Connection>,
    channel: Channel,
    publisher: ConfirmPublisher,
}

impl Session {
    /// Whether its deliveries can still be settled. Once the channel is gone the broker has
    /// given them back already: holding one any longer only keeps a concurrency slot from the
    /// next session.
    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl ConsumerRuntime {
    /// A runtime for `processor` with `options`.
    pub fn new(options: ConsumerOptions, processor: Arc<dyn DeliveryProcessor>) -> Self {
        ConsumerRuntime {
            shared: Arc::new(Shared {
                options,
                processor,
                stats: Arc::new(ConsumerStats::default()),
                metrics: OnceLock::new(),
                in_flight: InFlightDeliveries::default(),
                stopping: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.shared.stats.clone()
    }

    /// Consumes until `shutdown` completes, then stops taking deliveries, lets the in-flight
    /// ones finish and ack, and closes the connection.
    ///
    /// A lost connection or channel is re-opened with backoff and consumption resumes; deliveries
    /// that were in flight are redelivered by the broker and the inbox recognises them.
    /// Returns an error only for what retrying cannot fix, a topology conflict, and for a stop
    /// that was not clean: [`AmqpError::DrainTimedOut`] when in-flight deliveries had to be
    /// abandoned after [`ConsumerOptions::shutdown_timeout`].
    ///
    /// [`AmqpError::DrainTimedOut`]: crate::AmqpError::DrainTimedOut
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> crate::Result<()> {
        self.consume(shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_fills_what_is_not_given_from_the_mode() {
        let batch = BatchOptions {
            max_messages: 50,
            max_wait: Duration::from_millis(20),
        };
        let flow = |c, p, b, s| {
            let mut o = options();
            o.set_flow(c, p, b, s);
            (
                o.concurrency,
                o.prefetch,
                o.batch.is_some(),
                o.retry_in_place,
            )
        };
        assert_eq!(
            flow(None, None, None, false),
            (DEFAULT_CONCURRENCY, DEFAULT_PREFETCH, false, false)
        );
        assert_eq!(flow(None, None, None, true), (1, 1, false, true));
        assert_eq!(
            flow(None, None, Some(batch), false),
            (
                DEFAULT_CONCURRENCY,
                batch.prefetch_for(DEFAULT_CONCURRENCY),
                true,
                false
            )
        );
        assert_eq!(
            flow(Some(2), None, Some(batch), false),
            (2, 100, true, false)
        );
        assert_eq!(flow(Some(4), Some(9), None, false), (4, 9, false, false));
        // Given values are kept, not clamped: validate refuses what does not fit.
        let mut o = options();
        o.set_flow(Some(4), None, None, true);
        assert_eq!(o.validate().map_err(|e| e.setting), Err("strict_order"));
        let mut o = options();
        o.set_flow(None, None, Some(batch), true);
        assert_eq!(o.validate().map_err(|e| e.setting), Err("strict_order"));
    }

    fn options() -> ConsumerOptions {
        ConsumerOptions::new("billing", LOCAL_AMQP_URL, Topology::new("e", "q"))
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(options().validate(), Ok(()));
    }

    #[test]
    fn settings_the_runtime_cannot_use_are_refused_by_name() {
        let refused = |change: &dyn Fn(&mut ConsumerOptions)| {
            let mut o = options();
            change(&mut o);
            o.validate().map_err(|e| e.setting)
        };
        assert_eq!(refused(&|o| o.concurrency = 0), Err("concurrency"));
        assert_eq!(refused(&|o| o.prefetch = 0), Err("prefetch"));
        assert_eq!(refused(&|o| o.prefetch = 4), Err("prefetch"));
        let batch = BatchOptions {
            max_messages: 0,
            max_wait: Duration::from_millis(20),
        };
        assert_eq!(refused(&|o| o.batch = Some(batch)), Err("batch_size"));
        let strict = |o: &mut ConsumerOptions| {
            o.retry_in_place = true;
            o.concurrency = 1;
            o.prefetch = 1;
        };
        assert_eq!(refused(&strict), Ok(()));
        assert_eq!(
            refused(&|o| {
                strict(o);
                o.batch = Some(BatchOptions {
                    max_messages: 10,
                    max_wait: Duration::from_millis(20),
                });
            }),
            Err("strict_order")
        );
        assert_eq!(
            refused(&|o| {
                strict(o);
                o.concurrency = 4;
                o.prefetch = 4;
            }),
            Err("strict_order")
        );
    }

    #[test]
    fn batch_prefetch_lets_every_batch_fill_and_stays_a_u16() {
        let batch = BatchOptions {
            max_messages: 100,
            max_wait: Duration::from_millis(20),
        };
        assert_eq!(batch.prefetch_for(4), 400);
        assert_eq!(batch.prefetch_for(0), 100);
        assert_eq!(batch.prefetch_for(usize::MAX), u16::MAX);
    }

    #[test]
    fn debug_of_consumer_options_shows_the_url_without_the_password() {
        let options = ConsumerOptions::new(
            "billing",
            "amqps://billing:amqp-pw-7f3a@rabbit.example:5671/prod",
            Topology::new("order.events", "billing.q"),
        );
        let shown = format!("{options:?}");
        assert!(!shown.contains("amqp-pw-7f3a"), "{shown}");
        assert!(
            shown.contains("amqps://***@rabbit.example:5671/prod"),
            "{shown}"
        );
        assert!(
            shown.contains("prefetch: 32"),
            "other settings stay visible: {shown}"
        );
    }
}
