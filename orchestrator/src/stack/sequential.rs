//! [`Sequential`]: the `Journal` over a separate `Store` and `Queue`, one step after the other.

use std::sync::Arc;

use crate::ports::{Commit, Delivery, Journal, Queue, Store, WriteError};

/// A journal over a separate store and queue: write, then send, then acknowledge.
#[derive(Debug)]
pub struct Sequential<S, Q> {
    store: Arc<S>,
    queue: Arc<Q>,
}

impl<S, Q> Sequential<S, Q> {
    /// A journal writing to `store` and sending to `queue`.
    pub fn new(store: Arc<S>, queue: Arc<Q>) -> Self {
        Self { store, queue }
    }
}

impl<S: Store, Q: Queue> Journal for Sequential<S, Q> {
    async fn commit(&self, commits: Vec<Commit>) -> Vec<Result<Vec<Delivery>, WriteError>> {
        let mut results = Vec::with_capacity(commits.len());
        for commit in commits {
            // Sent messages are not claimed: other workers receive them.
            results.push(self.commit_one(commit).await.map(|()| Vec::new()));
        }
        results
    }
}

impl<S: Store, Q: Queue> Sequential<S, Q> {
    async fn commit_one(&self, commit: Commit) -> Result<(), WriteError> {
        if let Some(write) = commit.write {
            self.store.write(write).await?;
        }
        if !commit.send.is_empty() {
            self.queue.send(commit.send).await?;
        }
        if let Some((queue, receipt)) = commit.ack {
            // A receipt that is no longer current means the message was delivered again;
            // that delivery will find the event applied. Nothing is lost.
            self.queue.ack(queue, vec![receipt]).await?;
        }
        Ok(())
    }
}
