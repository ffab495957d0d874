//! The `Journal` port: what handling one message changes, committed as one unit.
//!
//! A commit is the record write (if the event changed the record), the messages its commands
//! send, and the acknowledgement of the message that was handled. The SQLite backend commits all
//! three in one transaction and groups the commits of different workflows into one fsync (an
//! atomic outbox). `crate::stack::Sequential` commits them one after the other on any `Store`
//! and `Queue`, which is what SQS and DynamoDB allow: a crash between the steps leaves the
//! message unacknowledged, and its redelivery finds the event applied and sends its commands
//! again.
//!
//! A commit may also **claim** the step messages it sends: the SQLite backend then stores them
//! as already received by the committing worker (invisible for the given visibility timeout)
//! and returns them as deliveries, so the worker runs the next step at once without a receive.
//! If the worker dies, the visibility timeout hands them to another worker like any message.

use std::future::Future;
use std::time::Duration;

use super::queue::{Delivery, Outgoing, QueueKind, Receipt};
use super::store::{RecordWrite, WriteError};

/// What handling one message changes.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// The record write, if the event changed the record.
    pub write: Option<RecordWrite>,
    /// Messages the event's commands send.
    pub send: Vec<Outgoing>,
    /// The handled message.
    pub ack: Option<(QueueKind, Receipt)>,
    /// Claim the undelayed step messages of `send` for this worker, invisible to others for
    /// this long. Journals that cannot claim send them normally.
    pub claim: Option<Duration>,
}

/// Commits handled messages.
pub trait Journal: Send + Sync + 'static {
    /// Commits each of `commits`; one result per commit, in order, with the messages it
    /// claimed. A commit whose write conflicts changes nothing (nothing sent, nothing
    /// acknowledged).
    fn commit(
        &self,
        commits: Vec<Commit>,
    ) -> impl Future<Output = Vec<Result<Vec<Delivery>, WriteError>>> + Send;

    /// Whether a commit's write, sends and acknowledgement happen together or not at all.
    /// When they do not, a redelivered message whose event was applied may be all that is left
    /// of that event's commands, and the engine sends them again from the history.
    fn is_atomic(&self) -> bool {
        false
    }
}
