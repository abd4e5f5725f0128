//! What happens to a delivery once it has been handled: the [`Decision`] and its [`Classifier`].

use crate::{ContractViolation, ErrorKind, HandlerError, RetryPolicy};
use std::time::Duration;

/// Why a message was dead-lettered or parked; written to its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// Machine-readable code (`x-oncely-error-code`).
    pub code: String,
    /// Human-readable text (`x-oncely-reason`).
    pub message: String,
}

impl Reason {
    /// A reason from code and text.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Reason {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<&ContractViolation> for Reason {
    fn from(v: &ContractViolation) -> Self {
        Reason::new(v.code(), v.to_string())
    }
}

/// What the AMQP runtime does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Handled and committed: ack.
    Ack,
    /// Already processed before: ack without running the handler.
    AckDuplicate,
    /// Publish a copy to the delay queue of tier `tier`, then ack.
    Retry {
        /// Index into [`RetryPolicy::tiers`].
        tier: usize,
        /// The tier's delay.
        delay: Duration,
        /// Attempt number the copy will carry.
        next_attempt: u32,
        /// The failure being retried.
        reason: Reason,
    },
    /// Publish a copy to `Q.dlq` with the reason, then ack.
    DeadLetter {
        /// Why.
        reason: Reason,
    },
    /// Publish a copy to `Q.parking` with the reason, then ack.
    Park {
        /// Why.
        reason: Reason,
    },
    /// The message is not at fault (the database is unreachable, say): give it back to the
    /// queue without spending one of its retries.
    Requeue {
        /// What failed.
        reason: Reason,
    },
}

impl Decision {
    /// Short name for logs and metrics: `ack`, `ack_duplicate`, `retry`, `dead_letter`, `park`,
    /// `requeue`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Ack => "ack",
            Decision::AckDuplicate => "ack_duplicate",
            Decision::Retry { .. } => "retry",
            Decision::DeadLetter { .. } => "dead_letter",
            Decision::Park { .. } => "park",
            Decision::Requeue { .. } => "requeue",
        }
    }

    /// Give the message back because of `what` failed outside it.
    pub fn requeue(code: impl Into<String>, message: impl Into<String>) -> Decision {
        Decision::Requeue {
            reason: Reason::new(code, message),
        }
    }
}

/// Turns a handler failure into a [`Decision`]. Usable as `dyn Classifier`.
///
/// Write your own to, say, park rather than dead-letter once retries run out:
///
/// ```
/// use oncely_core::{Classifier, Decision, DefaultClassifier, ErrorKind, HandlerError, Reason, RetryPolicy};
///
/// struct ParkWhenExhausted;
///
/// impl Classifier for ParkWhenExhausted {
///     fn classify(&self, error: &HandlerError, attempt: u32, policy: &RetryPolicy) -> Decision {
///         match DefaultClassifier.classify(error, attempt, policy) {
///             Decision::DeadLetter { reason } if error.kind() == ErrorKind::Retryable => {
///                 Decision::Park { reason }
///             }
///             other => other,
///         }
///     }
/// }
///
/// let classifier: &dyn Classifier = &ParkWhenExhausted;
/// let e = HandlerError::retryable("timeout", "gateway timed out");
/// let d = classifier.classify(&e, 5, &RetryPolicy::default());
/// assert!(matches!(d, Decision::Park { .. }));
/// ```
pub trait Classifier: Send + Sync {
    /// The decision for `error`, raised on delivery attempt `attempt` (1-based).
    fn classify(&self, error: &HandlerError, attempt: u32, policy: &RetryPolicy) -> Decision;
}

/// Retryable -> retry while the policy allows, then dead-letter (`retries_exhausted`);
/// permanent -> dead-letter; park -> parking lot.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl Classifier for DefaultClassifier {
    fn classify(&self, error: &HandlerError, attempt: u32, policy: &RetryPolicy) -> Decision {
        let reason = Reason::new(error.code(), error.message());
        match error.kind() {
            ErrorKind::Retryable => match policy.delay_for(attempt) {
                Some((tier, delay)) => Decision::Retry {
                    tier,
                    delay,
                    next_attempt: attempt.saturating_add(1),
                    reason,
                },
                None => Decision::DeadLetter {
                    reason: Reason::new(
                        "retries_exhausted",
                        format!(
                            "gave up after {attempt} of {} attempts; last error {}: {}",
                            policy.max_attempts(),
                            error.code(),
                            error.message()
                        ),
                    ),
                },
            },
            ErrorKind::Permanent => Decision::DeadLetter { reason },
            ErrorKind::Park => Decision::Park { reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(3, vec![Duration::from_secs(1), Duration::from_secs(10)])
    }

    #[test]
    fn retryable_is_retried_with_the_next_attempt_and_tier() {
        let e = HandlerError::retryable("down", "503");
        let d = DefaultClassifier.classify(&e, 2, &policy());
        assert_eq!(
            d,
            Decision::Retry {
                tier: 1,
                delay: Duration::from_secs(10),
                next_attempt: 3,
                reason: Reason::new("down", "503"),
            }
        );
        assert_eq!(d.as_str(), "retry");
    }

    #[test]
    fn retryable_is_dead_lettered_when_attempts_are_used_up() {
        let e = HandlerError::retryable("down", "503");
        match DefaultClassifier.classify(&e, 3, &policy()) {
            Decision::DeadLetter { reason } => {
                assert_eq!(reason.code, "retries_exhausted");
                assert!(
                    reason.message.contains("3 of 3 attempts"),
                    "{}",
                    reason.message
                );
                assert!(reason.message.contains("down: 503"), "{}", reason.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn permanent_is_dead_lettered_at_once() {
        let e = HandlerError::permanent("bad", "no such currency");
        assert_eq!(
            DefaultClassifier.classify(&e, 1, &policy()),
            Decision::DeadLetter {
                reason: Reason::new("bad", "no such currency")
            }
        );
    }

    #[test]
    fn park_goes_to_the_parking_lot() {
        let e = HandlerError::park("review", "amount too high");
        assert_eq!(
            DefaultClassifier.classify(&e, 1, &policy()),
            Decision::Park {
                reason: Reason::new("review", "amount too high")
            }
        );
    }

    #[test]
    fn contract_violation_becomes_a_reason_with_its_code() {
        let r = Reason::from(&ContractViolation::MissingMessageId);
        assert_eq!(r.code, "contract.missing_message_id");
        assert_eq!(r.message, "message has no message_id property");
    }

    #[test]
    fn decision_names() {
        assert_eq!(Decision::Ack.as_str(), "ack");
        assert_eq!(Decision::AckDuplicate.as_str(), "ack_duplicate");
        let r = Reason::new("c", "m");
        assert_eq!(
            Decision::DeadLetter { reason: r.clone() }.as_str(),
            "dead_letter"
        );
        assert_eq!(Decision::Park { reason: r.clone() }.as_str(), "park");
        assert_eq!(Decision::Requeue { reason: r }.as_str(), "requeue");
    }
}
