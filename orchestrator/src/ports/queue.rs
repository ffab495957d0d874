//! The `Queue` port: the two logical queues (events, FIFO per workflow; steps) and
//! their dead-letter queues.
//!
//! Semantics every adapter gives (the conformance suite checks them):
//! - **events** is FIFO per group (the workflow key): a group's next message is delivered only
//!   after the one before it is acknowledged or dead-lettered, while different groups are
//!   delivered in parallel; a deduplication id seen within the deduplication window is
//!   accepted and dropped.
//! - **steps** is a standard queue with a per-message delay.
//! - A received message is invisible for the visibility timeout, then delivered again unless
//!   acknowledged; its visibility can be extended or released.
//! - A message received more than `max_receives` times is moved to the dead-letter queue on
//!   its next receive, with that reason; a handler can quarantine a message with its own reason.
//! - Dead letters can be listed, moved back to their queue (redriven: an event keeps its group,
//!   and the deduplication window of its original id does not drop it) or discarded.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use workflows::Timestamp;

use super::Error;

/// One of the two logical queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueKind {
    /// Pushes, signals, provisioning, re-arms: FIFO per workflow, deduplicated by event id.
    Events,
    /// Step messages and timers: standard, with per-message delays.
    Steps,
}

impl QueueKind {
    /// Both queues.
    pub const ALL: [QueueKind; 2] = [QueueKind::Events, QueueKind::Steps];

    /// The queue's name in tables, metrics and `wfctl`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Events => "events",
            QueueKind::Steps => "steps",
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "events" => Ok(QueueKind::Events),
            "steps" => Ok(QueueKind::Steps),
            other => Err(format!("unknown queue {other:?}: one of events, steps")),
        }
    }
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Which queue.
    pub queue: QueueKind,
    /// FIFO group (events: the workflow key).
    pub group: Option<String>,
    /// Deduplication id (events: the event id).
    pub dedup_id: Option<String>,
    /// Deliver no earlier than this from now (steps only).
    pub delay: Duration,
    /// The encoded envelope.
    pub body: Vec<u8>,
    /// Message attributes (W3C trace context).
    pub attributes: BTreeMap<String, String>,
}

/// The handle that acknowledges, extends or releases one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Which queue it came from.
    pub queue: QueueKind,
    /// The message's id, stable across deliveries.
    pub id: String,
    /// This delivery's handle.
    pub receipt: Receipt,
    /// The encoded envelope.
    pub body: Vec<u8>,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
    /// When it was first sent.
    pub sent_at: Timestamp,
    /// Its FIFO group.
    pub group: Option<String>,
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The queue it was dead-lettered from.
    pub queue: QueueKind,
    /// Its id in the dead-letter queue.
    pub id: String,
    /// The encoded envelope.
    #[serde(skip)]
    pub body: Vec<u8>,
    /// Its FIFO group.
    pub group: Option<String>,
    /// Its deduplication id.
    pub dedup_id: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many times it had been received.
    pub receive_count: u32,
    /// When it was first sent.
    pub sent_at: Timestamp,
    /// When it was dead-lettered.
    pub dead_at: Timestamp,
}

/// Counts of one queue, for metrics and `wfctl`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Deliverable now.
    pub visible: u64,
    /// Received and not yet acknowledged.
    pub in_flight: u64,
    /// Waiting for their delay.
    pub delayed: u64,
    /// In the dead-letter queue.
    pub dead: u64,
    /// Age of the oldest message that is not dead.
    pub oldest_age: Option<Duration>,
}

/// The queues.
pub trait Queue: Send + Sync + 'static {
    /// Sends messages. A message whose deduplication id was sent within the window is dropped
    /// (and that is a success). A message larger than the adapter's limit is refused whole.
    fn send(&self, batch: Vec<Outgoing>) -> impl Future<Output = Result<(), Error>> + Send;

    /// Receives up to `max` messages of `queue`, waiting up to `wait` for the first one; each
    /// stays invisible to other receivers for `visibility`.
    fn receive(
        &self,
        queue: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>, Error>> + Send;

    /// Acknowledges (deletes) deliveries. Returns the receipts that could not be acknowledged
    /// because they are no longer current (the message was delivered again since).
    fn ack(
        &self,
        queue: QueueKind,
        receipts: Vec<Receipt>,
    ) -> impl Future<Output = Result<Vec<Receipt>, Error>> + Send;

    /// Sets a delivery's remaining invisibility to `visibility` (zero releases it at once).
    fn extend(
        &self,
        queue: QueueKind,
        receipt: &Receipt,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Moves a delivery to the dead-letter queue at once, with `reason`.
    fn quarantine(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Up to `limit` dead letters of `queue`, oldest first.
    fn dead_letters(
        &self,
        queue: QueueKind,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, Error>> + Send;

    /// Moves dead letters of `queue` back to it: all of them (`None`), or the ones whose
    /// dead-letter ids are in `ids`. Returns the ids moved (ids not found are left out). At
    /// least once: an adapter that cannot move atomically may leave a copy in both queues.
    fn redrive(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;

    /// Deletes the dead letters of `queue` whose ids are in `ids`. Returns the ids deleted.
    fn discard(
        &self,
        queue: QueueKind,
        ids: Vec<String>,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;

    /// The messaging system, as OpenTelemetry's `messaging.system` names it (`aws_sqs`).
    fn system(&self) -> &'static str {
        "sqlite"
    }

    /// Counts of `queue`.
    fn stats(&self, queue: QueueKind) -> impl Future<Output = Result<QueueStats, Error>> + Send;
}

/// What becomes of dead letters an operator selected: put back, or deleted ([`Queue::redrive`],
/// [`Queue::discard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    /// Back to their queue.
    Redrive,
    /// Deleted for good.
    Discard,
}
