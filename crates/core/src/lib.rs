//! The I/O-free heart of oncely: the message contract, handler errors and the retry decision.
//!
//! `oncely-core` knows neither lapin nor Diesel. The AMQP side turns a delivery into a
//! [`RawMetadata`]; this crate validates it against the contract ([`Metadata::from_raw`]),
//! decodes the body ([`Envelope::decode`]) and, once the handler has run, turns its result into a
//! [`Decision`] through a [`Classifier`].
//!
//! ```
//! use oncely_core::{Classifier, Decision, DefaultClassifier, HandlerError, RetryPolicy};
//! use std::time::Duration;
//!
//! let policy = RetryPolicy::new(3, vec![Duration::from_secs(1), Duration::from_secs(10)]);
//! let error = HandlerError::retryable("inventory_down", "inventory API answered 503");
//! match DefaultClassifier.classify(&error, 1, &policy) {
//!     Decision::Retry { next_attempt, delay, .. } => {
//!         assert_eq!(next_attempt, 2);
//!         assert_eq!(delay, Duration::from_secs(1));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

mod contract;
mod decision;
mod error;
pub mod health;
pub mod metric_names;
mod redact;
mod retry;

pub use contract::{
    ContractLimits, ContractViolation, Envelope, HeaderValue, Metadata, RawMetadata, headers,
    is_traceparent,
};
pub use decision::{Classifier, Decision, DefaultClassifier, Reason};
pub use error::{DEPLOYMENT_ERROR_CODES, ErrorKind, HandlerError};
pub use redact::{RedactedUrl, redact_url};
pub use retry::{RetryPolicy, RetryPolicyError, tier_label};
