//! How often and after which delays a retryable failure is tried again.

use std::time::Duration;

/// Bounded retries through fixed delay tiers.
///
/// Attempt `n` (1-based) that fails with a retryable error is retried after `tiers[n - 1]`
/// (the last tier repeats) while `n < max_attempts`; after that the message is dead-lettered.
/// Each tier is one delay queue `Q.retry.<label>` with a fixed `x-message-ttl`, so the set of
/// tiers is part of the topology.
///
/// ```
/// use oncely_core::RetryPolicy;
/// use std::time::Duration;
///
/// let p = RetryPolicy::default();
/// assert_eq!(p.max_attempts(), 5);
/// assert_eq!(p.delay_for(1), Some((0, Duration::from_secs(1))));
/// assert_eq!(p.delay_for(5), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    tiers: Vec<Duration>,
}

/// A retry policy that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryPolicyError {
    /// `max_attempts` is 0.
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    /// Retries are allowed but no delay tier is given.
    #[error("max_attempts {0} allows retries but no delay tier is given")]
    NoTiers(u32),
    /// A tier is zero or longer than a broker TTL can express.
    #[error("delay tier {0:?} must be between 1 ms and 2^31 - 1 ms")]
    BadTier(Duration),
    /// Two tiers have the same delay (they would share a queue name).
    #[error("delay tier {0:?} is given twice")]
    DuplicateTier(Duration),
}

impl RetryPolicy {
    /// A policy; panics never, see [`RetryPolicy::try_new`] for a checked one.
    ///
    /// Invalid input is corrected: `max_attempts` of 0 becomes 1, an empty tier list with
    /// retries becomes one 1 s tier. Prefer `try_new` for configuration read from outside.
    pub fn new(max_attempts: u32, tiers: Vec<Duration>) -> Self {
        match Self::try_new(max_attempts, tiers) {
            Ok(p) => p,
            Err(_) => RetryPolicy {
                max_attempts: max_attempts.max(1),
                tiers: vec![Duration::from_secs(1)],
            },
        }
    }

    /// A policy, or why it cannot work.
    pub fn try_new(max_attempts: u32, tiers: Vec<Duration>) -> Result<Self, RetryPolicyError> {
        if max_attempts == 0 {
            return Err(RetryPolicyError::NoAttempts);
        }
        if max_attempts > 1 && tiers.is_empty() {
            return Err(RetryPolicyError::NoTiers(max_attempts));
        }
        for (i, tier) in tiers.iter().enumerate() {
            if tier.is_zero() || tier.as_millis() > i32::MAX as u128 {
                return Err(RetryPolicyError::BadTier(*tier));
            }
            if tiers[..i].contains(tier) {
                return Err(RetryPolicyError::DuplicateTier(*tier));
            }
        }
        Ok(RetryPolicy {
            max_attempts,
            tiers,
        })
    }

    /// No retries: a retryable failure is dead-lettered at once.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            tiers: Vec::new(),
        }
    }

    /// Total number of attempts, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay tiers, shortest first as given.
    pub fn tiers(&self) -> &[Duration] {
        &self.tiers
    }

    /// Tier index and delay after failed attempt `attempt`, or `None` when retries are used up.
    pub fn delay_for(&self, attempt: u32) -> Option<(usize, Duration)> {
        if attempt >= self.max_attempts || self.tiers.is_empty() {
            return None;
        }
        let index = (attempt.max(1) as usize - 1).min(self.tiers.len() - 1);
        Some((index, self.tiers[index]))
    }
}

impl Default for RetryPolicy {
    /// 5 attempts, retried after 1 s, 10 s, 1 min, then 1 min.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            tiers: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
        }
    }
}

/// Name of a delay tier in queue names: `250ms`, `5s`, `2m`, `1h`.
pub fn tier_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn tiers_are_used_in_order_then_the_last_repeats() {
        let p = RetryPolicy::new(6, vec![s(1), s(5)]);
        assert_eq!(p.delay_for(1), Some((0, s(1))));
        assert_eq!(p.delay_for(2), Some((1, s(5))));
        assert_eq!(p.delay_for(4), Some((1, s(5))));
        assert_eq!(p.delay_for(5), Some((1, s(5))));
        assert_eq!(p.delay_for(6), None);
    }

    #[test]
    fn no_retries_never_delays() {
        assert_eq!(RetryPolicy::no_retries().delay_for(1), None);
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert_eq!(
            RetryPolicy::try_new(0, vec![s(1)]),
            Err(RetryPolicyError::NoAttempts)
        );
        assert_eq!(
            RetryPolicy::try_new(3, vec![]),
            Err(RetryPolicyError::NoTiers(3))
        );
        assert_eq!(
            RetryPolicy::try_new(3, vec![Duration::ZERO]),
            Err(RetryPolicyError::BadTier(Duration::ZERO))
        );
        assert_eq!(
            RetryPolicy::try_new(3, vec![s(1), s(1)]),
            Err(RetryPolicyError::DuplicateTier(s(1)))
        );
        assert!(RetryPolicy::try_new(1, vec![]).is_ok());
    }

    #[test]
    fn new_corrects_invalid_input() {
        let p = RetryPolicy::new(0, vec![]);
        assert_eq!(p.max_attempts(), 1);
        assert_eq!(RetryPolicy::new(3, vec![]).tiers(), &[s(1)]);
    }

    #[test]
    fn labels_use_the_largest_whole_unit() {
        assert_eq!(tier_label(Duration::from_millis(250)), "250ms");
        assert_eq!(tier_label(s(5)), "5s");
        assert_eq!(tier_label(s(120)), "2m");
        assert_eq!(tier_label(s(7200)), "2h");
        assert_eq!(tier_label(s(90)), "90s");
    }
}
