//! Request accounting: how many requests the adapters sent to each service, per operation.
//! The AWS adapters count through an SDK interceptor ([`crate::aws`]); the engine carries a
//! counter so that its owner can report requests per transition.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Counts requests (attempts, retries included: each is billed) per service and operation.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

/// One line of [`RequestCounter::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    /// `SQS`, `DynamoDB`.
    pub service: String,
    /// `ReceiveMessage`, `TransactWriteItems`, ...
    pub operation: String,
    /// Requests sent.
    pub count: u64,
}

impl RequestCounter {
    /// A counter starting at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Vec<RequestCount> {
        self.counts
            .lock()
            .map(|c| {
                c.iter()
                    .map(|((service, operation), count)| RequestCount {
                        service: service.clone(),
                        operation: operation.clone(),
                        count: *count,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts one request of `operation` to `service`.
    pub fn count(&self, service: &str, operation: &str) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts
                .entry((service.to_owned(), operation.to_owned()))
                .or_default() += 1;
        }
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.snapshot().iter().map(|c| c.count).sum()
    }
}
