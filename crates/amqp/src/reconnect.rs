//! When to reconnect: jittered exponential backoff that only starts over once a connection has
//! proved itself.

use crate::connection::Backoff;
use std::time::{Duration, Instant};

/// The reconnect schedule of a long-running client (the consumer runtime, the outbox relay's
/// LISTEN connection).
///
/// Every failure (an open that failed, or a connection lost) waits
/// [`Backoff::jittered`] for the failures so far. Opening a connection does not reset the count:
/// only a connection that stayed up for `stable_after` does. A broker that accepts the
/// connection and then drops it (a failing topology declaration, a node going down, a
/// connection limit) would otherwise be hit every `initial` with a full redeclare.
///
/// Pure: the caller passes the instants, so the rule is tested without sleeping.
///
/// ```
/// # use oncely_amqp::{Backoff, ReconnectBackoff};
/// # use std::time::{Duration, Instant};
/// let mut schedule = ReconnectBackoff::new(Backoff::default(), Duration::from_secs(30));
/// let t0 = Instant::now();
/// schedule.on_connected(t0);
/// // Dropped right after opening: the next wait grows instead of starting over.
/// let first = schedule.on_failure(t0 + Duration::from_millis(10));
/// schedule.on_connected(t0 + Duration::from_secs(1));
/// let second = schedule.on_failure(t0 + Duration::from_secs(2));
/// assert!(first <= Duration::from_millis(100));
/// assert!(second >= Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct ReconnectBackoff {
    backoff: Backoff,
    stable_after: Duration,
    failures: u32,
    connected_at: Option<Instant>,
    rng: fastrand::Rng,
}

impl ReconnectBackoff {
    /// How long a connection must stay up before the backoff starts over, by default.
    pub const STABLE_AFTER: Duration = Duration::from_secs(30);

    /// A schedule over `backoff` that resets after a connection stayed up `stable_after`.
    pub fn new(backoff: Backoff, stable_after: Duration) -> Self {
        ReconnectBackoff {
            backoff,
            stable_after,
            failures: 0,
            connected_at: None,
            rng: fastrand::Rng::new(),
        }
    }

    /// The same schedule with a seeded random source, for reproducible tests.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// A connection was opened at `at`.
    pub fn on_connected(&mut self, at: Instant) {
        self.connected_at = Some(at);
    }

    /// An open failed, or the connection was lost, at `at`: the wait before the next attempt.
    pub fn on_failure(&mut self, at: Instant) -> Duration {
        if let Some(since) = self.connected_at.take()
            && at.saturating_duration_since(since) >= self.stable_after
        {
            self.failures = 0;
        }
        let delay = self.backoff.jittered(self.failures, self.rng.f64());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Failures since the last connection that stayed up.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn schedule(seed: u64) -> ReconnectBackoff {
        ReconnectBackoff::new(Backoff::default(), Duration::from_secs(30)).with_seed(seed)
    }

    #[test]
    fn jitter_stays_between_half_the_delay_and_the_delay() {
        let b = Backoff::default();
        for retry in 0..12 {
            let full = b.delay(retry);
            assert_eq!(b.jittered(retry, 0.0), full / 2);
            assert_eq!(b.jittered(retry, 1.0), full);
            assert_eq!(
                b.jittered(retry, f64::NAN),
                full,
                "a bad draw never shortens"
            );
            assert_eq!(b.jittered(retry, 7.0), full);
            assert_eq!(b.jittered(retry, -1.0), full / 2);
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let retry = rng.u32(0..12);
            let d = b.jittered(retry, rng.f64());
            assert!(d >= b.delay(retry) / 2 && d <= b.delay(retry), "{d:?}");
        }
    }

    #[test]
    fn clients_that_failed_together_do_not_retry_in_lockstep() {
        let t = Instant::now();
        let waits = |seed| {
            let mut s = schedule(seed);
            (0..6).map(|_| s.on_failure(t)).collect::<Vec<_>>()
        };
        assert_ne!(waits(1), waits(2));
    }

    #[test]
    fn a_connection_that_drops_right_after_opening_keeps_backing_off() {
        let mut s = schedule(3);
        let mut t = Instant::now();
        let mut floors = Vec::new();
        for _ in 0..8 {
            s.on_connected(t);
            t += ms(20);
            let wait = s.on_failure(t);
            floors.push(wait);
            t += wait;
        }
        // Equal jitter: wait n is at least half of 100 ms * 2^n, capped at 5 s.
        for (n, wait) in floors.iter().enumerate() {
            let full = Backoff::default().delay(n as u32);
            assert!(*wait >= full / 2 && *wait <= full, "wait {n}: {wait:?}");
        }
        assert!(
            floors[7] >= ms(2500),
            "reached the cap, not 100 ms: {floors:?}"
        );
        assert_eq!(s.failures(), 8);
    }

    #[test]
    fn a_connection_that_stayed_up_long_enough_starts_the_backoff_over() {
        let mut s = schedule(4);
        let t = Instant::now();
        for _ in 0..6 {
            s.on_failure(t);
        }
        s.on_connected(t);
        let just_short = s.on_failure(t + Duration::from_secs(29));
        assert!(
            just_short >= ms(1600),
            "29 s up is not enough: {just_short:?}"
        );
        s.on_connected(t + Duration::from_secs(40));
        let after_stable = s.on_failure(t + Duration::from_secs(70));
        assert!(
            after_stable >= ms(50) && after_stable <= ms(100),
            "{after_stable:?}"
        );
        assert_eq!(s.failures(), 1);
    }

    #[test]
    fn failed_opens_without_a_connection_keep_growing_to_the_cap() {
        let mut s = schedule(5);
        let t = Instant::now();
        let waits: Vec<_> = (0..20).map(|_| s.on_failure(t)).collect();
        assert!(waits[0] <= ms(100));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(5)));
        assert!(waits[19] >= Duration::from_millis(2500));
    }
}
