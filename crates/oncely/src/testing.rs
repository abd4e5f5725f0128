//! A test kit for users' handlers: run one message through the inbox and see the decision.
//!
//! The real-service tests of oncely prove the guarantees; this lets you check your own handler
//! against your own database without a broker.

use crate::consumer::InboxProcessor;
use crate::handler::Handler;
use oncely_core::{Classifier, Decision, DefaultClassifier, Envelope, RetryPolicy};
use oncely_inbox::Inbox;
use std::sync::Arc;

pub use oncely_inbox::testing::{
    TestSchema, TestSchemaError, block_on_thread, database_url, unique_name,
};

/// Runs a handler the way the consumer does, minus the broker.
pub struct TestWorker<H> {
    processor: InboxProcessor<H>,
}

impl<H> std::fmt::Debug for TestWorker<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestWorker").finish_non_exhaustive()
    }
}

impl<H: Handler> TestWorker<H> {
    /// A worker with the default retry policy and classifier.
    pub fn new(handler: H, inbox: Inbox) -> Self {
        Self::with_policy(handler, inbox, RetryPolicy::default(), DefaultClassifier)
    }

    /// A worker with a given policy and classifier.
    pub fn with_policy(
        handler: H,
        inbox: Inbox,
        policy: RetryPolicy,
        classifier: impl Classifier + 'static,
    ) -> Self {
        TestWorker {
            processor: InboxProcessor::new(
                handler,
                inbox,
                policy,
                Arc::new(classifier),
                "test-worker",
            ),
        }
    }

    /// Runs `envelope` and returns what the runtime would do with it.
    pub async fn run(&self, envelope: Envelope<H::Message>) -> Decision {
        self.processor.run(envelope).await
    }
}
