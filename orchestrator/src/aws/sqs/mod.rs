//! The `Queue` port on SQS: `<prefix>-events.fifo` and `<prefix>-steps`, each with its
//! dead-letter queue (`<prefix>-events-dlq.fifo`, `<prefix>-steps-dlq`), and the queue half of
//! `orchestrator init` ([`create_queues`]).
//!
//! Modules: `message` (what a message is on SQS: sizes, delays, attributes, deliveries),
//! `dead_letters` (quarantine, peeking, redrive and discard) and `setup` (creating the queues
//! and checking them at start-up).
//!
//! How the port's semantics map onto SQS:
//! - **Sends** are `SendMessageBatch` calls of at most 10 messages and 256 KiB. Events carry
//!   `MessageGroupId` = the workflow key and `MessageDeduplicationId` = the event id (the queue
//!   has content-based deduplication off). Step messages carry `DelaySeconds`; SQS allows at most
//!   900 s, so a longer delay is sent as 900 s with the message attribute `not-before` (absolute
//!   unix milliseconds), and a receive that finds it still in the future sends the message again
//!   with the remaining delay and deletes the old one (a chain of delayed messages). A message
//!   whose body and attributes exceed 256 KiB is refused before anything is sent.
//! - **FIFO per group.** SQS hands out several messages of one group in one batch (and then none
//!   of that group while any is in flight), but the port delivers a group's next message only
//!   after the one before it is done. Taking the first of each group and releasing the others
//!   (visibility zero) would count each release as a receive in SQS's
//!   `ApproximateReceiveCount`: a message behind `k` others of its group would be counted `k`
//!   times extra, and a backlog longer than `maxReceiveCount` would be dead-lettered unhandled.
//!   So the events queue is received one message per `ReceiveMessage` (SQS then skips the group
//!   while that message is in flight), repeated while messages keep coming: one request per
//!   event plus one that comes back empty. Events are only the external ones (pushes, signals),
//!   a small share of the transitions; the steps queue is received in batches of 10. (Should a
//!   batch still hold two messages of a group, the later one is released.)
//! - **Dead letters.** A message received more than `maxReceiveCount` times is moved by SQS's
//!   redrive policy (set by [`create_queues`]) on its next receive. [`Queue::quarantine`] sends a
//!   copy to the dead-letter queue with the attributes `dead-letter-reason`,
//!   `dead-letter-source`, `dead-letter-at` and `dead-letter-receive-count`, then deletes the
//!   original. [`Queue::dead_letters`] peeks: it receives, then releases what it received.
//!   [`SqsQueue::redrive`] sends dead letters back to their queue.
//! - **Receipts.** `DeleteMessage` with an earlier receipt handle of a message that was
//!   received again "succeeds, but the message might not be deleted" (SQS's documentation), and
//!   moto accepts earlier handles for `ChangeMessageVisibility` too (and applies them). So an
//!   acknowledgement or extension with a receipt that is no longer current is not reported;
//!   only receipts SQS rejects (`ReceiptHandleIsInvalid`, an expired FIFO receipt, ...) are.
//! - **Stats** come from `GetQueueAttributes`. SQS publishes the age of the oldest message only
//!   as the CloudWatch metric `ApproximateAgeOfOldestMessage`, so `oldest_age` is `None`.
//!
//! Sizes: 256 KiB counts the body plus, per message attribute, its name, its type (`String`)
//! and its value, as SQS does. Bodies are text: a body that is not UTF-8 is refused. SQS allows
//! ten message attributes per message; the adapter uses up to five of its own (a dead letter:
//! the four `dead-letter-*` and `first-sent-at`), so a message should carry at most five.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry,
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_smithy_types::error::operation::BuildError;
use tracing::{debug, info, warn};

mod dead_letters;
mod message;
mod setup;

use message::{
    Prepared, attribute_ms, chunks, delivery, message_attributes, now_ms, prepare, seconds,
};
pub use setup::create_queues;
use setup::{queue_url, redrive_policy};

use super::{Names, RequestCounter, sdk_error};
use crate::ports::queue::Disposal;
use crate::ports::{DeadLetter, Delivery, Error, Outgoing, Queue, QueueKind, QueueStats, Receipt};

const BACKEND: &str = "sqs";

/// The largest message SQS accepts by default: body plus message attributes.
pub const MAX_MESSAGE_BYTES: usize = 262_144;

/// The longest per-message delay SQS accepts; longer delays are chained.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

/// How long `orchestrator init` has SQS keep a message: 14 days, the maximum.
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// The queues' default visibility timeout (receives pass their own).
pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(60);

/// Entries per batch request (an SQS limit).
const BATCH: usize = 10;
/// The longest visibility timeout SQS accepts.
const MAX_VISIBILITY_SECS: u64 = 43_200;
/// The longest long poll SQS accepts.
const MAX_WAIT_SECS: u64 = 20;
/// How long a dead letter stays hidden while `dead_letters` or `redrive` pages through them.
const PEEK_VISIBILITY_SECS: i32 = 60;
/// The longest reason kept in `dead-letter-reason`.
const MAX_REASON_BYTES: usize = 4096;
/// The longest `MessageDeduplicationId`.
const MAX_DEDUP_ID: usize = 128;
/// Message attributes SQS allows per message.
const MAX_ATTRIBUTES: usize = 10;
/// Deduplication ids of quarantined copies: this and the message id.
const QUARANTINE_DEDUP: &str = "quarantine-";
/// Deduplication ids of redriven dead letters: this and the dead letter's id.
const REDRIVE_DEDUP: &str = "redrive-";

/// Absolute unix milliseconds before which a step message is not delivered (long delays).
const NOT_BEFORE: &str = "not-before";
/// Unix milliseconds of the first send, kept when a message is sent again (chained, dead-lettered).
const FIRST_SENT_AT: &str = "first-sent-at";
/// Why a message was quarantined.
const DEAD_REASON: &str = "dead-letter-reason";
/// The queue a quarantined message came from.
const DEAD_SOURCE: &str = "dead-letter-source";
/// Unix milliseconds of the quarantine.
const DEAD_AT: &str = "dead-letter-at";
/// How many times a quarantined message had been received.
const DEAD_RECEIVES: &str = "dead-letter-receive-count";
/// Attributes of this adapter's own, never shown as a delivery's attributes.
const INTERNAL: [&str; 6] = [
    NOT_BEFORE,
    FIRST_SENT_AT,
    DEAD_REASON,
    DEAD_SOURCE,
    DEAD_AT,
    DEAD_RECEIVES,
];

/// An SQS client for `sdk`, counting its requests in `counter`.
pub fn client(sdk: &aws_config::SdkConfig, counter: &RequestCounter) -> Client {
    let config = aws_sdk_sqs::config::Builder::from(sdk)
        .interceptor(counter.clone())
        .build();
    Client::from_conf(config)
}

/// One SQS queue: its name and URL.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    url: String,
}

/// A logical queue: the main queue, its dead-letter queue and its `maxReceiveCount`.
#[derive(Debug, Clone)]
struct Pair {
    kind: QueueKind,
    main: Target,
    dlq: Target,
    max_receives: u32,
}

impl Pair {
    fn fifo(&self) -> bool {
        self.kind == QueueKind::Events
    }
}

/// The `Queue` port on SQS. Cheap to clone (the SDK client is shared).
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    events: Pair,
    steps: Pair,
}

impl SqsQueue {
    /// Connects to the four queues of `names`: resolves their URLs (`GetQueueUrl`) and reads the
    /// main queues' redrive policies (`GetQueueAttributes`). This is the start-up check: a
    /// missing queue, a denied permission or a queue without its redrive policy is one error
    /// naming the queue (and the permission), e.g.
    ///
    /// ```text
    /// queue orchestrator-events.fifo does not exist (sqs GetQueueUrl): create it with `orchestrator init`
    /// ```
    pub async fn connect(
        sdk: &aws_config::SdkConfig,
        names: &Names,
        counter: &RequestCounter,
    ) -> Result<Self, Error> {
        Self::connect_with(client(sdk, counter), names).await
    }

    /// [`SqsQueue::connect`] with a client of the caller's.
    pub async fn connect_with(client: Client, names: &Names) -> Result<Self, Error> {
        // All four at once; the first error in this order is the one reported, so the
        // message does not depend on which answer came first.
        let (events, events_dlq, steps, steps_dlq) = tokio::join!(
            queue_url(&client, &names.events_queue),
            queue_url(&client, &names.events_dlq),
            queue_url(&client, &names.steps_queue),
            queue_url(&client, &names.steps_dlq),
        );
        let (events, events_dlq, steps, steps_dlq) = (events?, events_dlq?, steps?, steps_dlq?);
        let (events_max, steps_max) = tokio::join!(
            redrive_policy(&client, &events, &events_dlq),
            redrive_policy(&client, &steps, &steps_dlq),
        );
        let (events_max, steps_max) = (events_max?, steps_max?);
        info!(
            events = %events.name,
            steps = %steps.name,
            events.max_receives = events_max,
            steps.max_receives = steps_max,
            "connected to sqs"
        );
        Ok(Self {
            client,
            events: Pair {
                kind: QueueKind::Events,
                main: events,
                dlq: events_dlq,
                max_receives: events_max,
            },
            steps: Pair {
                kind: QueueKind::Steps,
                main: steps,
                dlq: steps_dlq,
                max_receives: steps_max,
            },
        })
    }

    /// The SDK client (with the request counter).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The `maxReceiveCount` of `queue`'s redrive policy, as read at connect.
    pub fn max_receives(&self, queue: QueueKind) -> u32 {
        self.pair(queue).max_receives
    }

    fn pair(&self, queue: QueueKind) -> &Pair {
        match queue {
            QueueKind::Events => &self.events,
            QueueKind::Steps => &self.steps,
        }
    }

    /// Sends prepared messages to `target` in batches of at most 10 messages and 256 KiB, in
    /// order; entries that fail are sent once more, then the send is an error.
    async fn send_prepared(&self, target: &Target, messages: Vec<Prepared>) -> Result<(), Error> {
        for chunk in chunks(messages) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| m.entry(i))
                .collect::<Result<Vec<_>, _>>()?;
            let failed = self.send_batch(target, entries.clone()).await?;
            if failed.is_empty() {
                continue;
            }
            debug!(queue = %target.name, count = failed.len(), "retrying failed entries");
            let retry: Vec<SendMessageBatchRequestEntry> = entries
                .into_iter()
                .filter(|e| failed.iter().any(|f| f.id() == e.id()))
                .collect();
            let failed = self.send_batch(target, retry).await?;
            if !failed.is_empty() {
                return Err(entry_error("SendMessageBatch", &target.name, &failed));
            }
        }
        Ok(())
    }

    async fn send_batch(
        &self,
        target: &Target,
        entries: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<Vec<BatchResultErrorEntry>, Error> {
        let out = self
            .client
            .send_message_batch()
            .queue_url(&target.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "SendMessageBatch", &queue_resource(target), e))?;
        Ok(out.failed().to_vec())
    }

    async fn receive_raw(
        &self,
        target: &Target,
        max: usize,
        visibility_secs: i32,
        wait_secs: i32,
    ) -> Result<Vec<Message>, Error> {
        let out = self
            .client
            .receive_message()
            .queue_url(&target.url)
            .max_number_of_messages(i32::try_from(max.clamp(1, BATCH)).unwrap_or(1))
            .visibility_timeout(visibility_secs)
            .wait_time_seconds(wait_secs)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_system_attribute_names(MessageSystemAttributeName::MessageDeduplicationId)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "ReceiveMessage", &queue_resource(target), e))?;
        Ok(out.messages.unwrap_or_default())
    }

    /// Deletes by receipt; returns the receipts whose entries failed (after one more try of
    /// those SQS did not blame on the request).
    async fn delete_batch(
        &self,
        target: &Target,
        receipts: Vec<String>,
    ) -> Result<Vec<String>, Error> {
        let mut failed_receipts = Vec::new();
        for chunk in receipts.chunks(BATCH) {
            let mut pending: Vec<(usize, &String)> = chunk.iter().enumerate().collect();
            for attempt in 0..2 {
                let entries = pending
                    .iter()
                    .map(|(i, r)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r.as_str())
                            .build()
                            .map_err(build_error)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let out = self
                    .client
                    .delete_message_batch()
                    .queue_url(&target.url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| {
                        sdk_error(BACKEND, "DeleteMessageBatch", &queue_resource(target), e)
                    })?;
                let mut retry = Vec::new();
                for f in out.failed() {
                    let Some(&(i, receipt)) = pending.iter().find(|(i, _)| i.to_string() == f.id())
                    else {
                        continue;
                    };
                    if f.sender_fault() || attempt == 1 {
                        debug!(
                            queue = %target.name,
                            code = f.code(),
                            message = f.message().unwrap_or_default(),
                            "receipt not acknowledged"
                        );
                        failed_receipts.push(receipt.clone());
                    } else {
                        retry.push((i, receipt));
                    }
                }
                if retry.is_empty() {
                    break;
                }
                pending = retry;
            }
        }
        Ok(failed_receipts)
    }

    /// Makes received messages visible again at once; entries that fail are logged.
    async fn release(&self, target: &Target, receipts: Vec<String>) -> Result<(), Error> {
        for chunk in receipts.chunks(BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r.as_str())
                        .visibility_timeout(0)
                        .build()
                        .map_err(build_error)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .change_message_visibility_batch()
                .queue_url(&target.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        BACKEND,
                        "ChangeMessageVisibilityBatch",
                        &queue_resource(target),
                        e,
                    )
                })?;
            for f in out.failed() {
                warn!(queue = %target.name, code = f.code(), "cannot release a message");
            }
        }
        Ok(())
    }

    /// Sends the chained messages again with their remaining delay, then deletes them.
    async fn chain(&self, target: &Target, chained: Vec<(Prepared, String)>) {
        if chained.is_empty() {
            return;
        }
        let (messages, receipts): (Vec<Prepared>, Vec<String>) = chained.into_iter().unzip();
        let count = messages.len();
        if let Err(e) = self.send_prepared(target, messages).await {
            warn!(queue = %target.name, error = %crate::ports::chain(&e), "cannot send delayed messages on; they come back after their visibility timeout");
            return;
        }
        match self.delete_batch(target, receipts).await {
            Ok(failed) if failed.is_empty() => {
                debug!(queue = %target.name, count, "long delays chained");
            }
            Ok(failed) => warn!(
                queue = %target.name,
                count = failed.len(),
                "chained messages could not be deleted; they will be chained again"
            ),
            Err(e) => {
                warn!(queue = %target.name, error = %crate::ports::chain(&e), "cannot delete chained messages")
            }
        }
    }

    async fn queue_counts(&self, target: &Target) -> Result<(u64, u64, u64), Error> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&target.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "GetQueueAttributes", &queue_resource(target), e))?;
        let attributes = out.attributes.unwrap_or_default();
        let count = |name: QueueAttributeName| {
            attributes
                .get(&name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ))
    }
}

impl Queue for SqsQueue {
    async fn send(&self, batch: Vec<Outgoing>) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut by_queue: BTreeMap<QueueKind, Vec<Prepared>> = BTreeMap::new();
        for m in batch {
            let queue = m.queue;
            by_queue.entry(queue).or_default().push(prepare(m, now)?);
        }
        for (queue, messages) in by_queue {
            let target = &self.pair(queue).main;
            let count = messages.len();
            self.send_prepared(target, messages).await?;
            debug!(queue = %target.name, count, "sent");
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        let pair = self.pair(queue);
        let visibility_secs = seconds(visibility, MAX_VISIBILITY_SECS);
        let mut wait_secs = seconds(wait, MAX_WAIT_SECS);
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut groups: HashSet<String> = HashSet::new();
        while deliveries.len() < max {
            // Events one at a time: see the module documentation (FIFO per group).
            let want = if pair.fifo() {
                1
            } else {
                max - deliveries.len()
            };
            let messages = self
                .receive_raw(&pair.main, want, visibility_secs, wait_secs)
                .await?;
            // Only the first call waits; the others fill the batch while messages keep coming.
            wait_secs = 0;
            if messages.is_empty() {
                break;
            }
            let now = now_ms();
            let mut chained = Vec::new();
            let mut released = Vec::new();
            for m in messages {
                let Some(delivery) = delivery(queue, &m) else {
                    warn!(queue = %pair.main.name, "message without an id, receipt or body; skipped");
                    continue;
                };
                if !pair.fifo()
                    && let Some(not_before) = attribute_ms(&m, NOT_BEFORE)
                    && not_before > now
                {
                    let mut attributes = message_attributes(&m);
                    attributes
                        .entry(FIRST_SENT_AT.to_owned())
                        .or_insert_with(|| delivery.sent_at.as_unix_millis().to_string());
                    let remaining = u64::try_from(not_before - now).unwrap_or(0);
                    let prepared = Prepared {
                        body: m.body().unwrap_or_default().to_owned(),
                        group: None,
                        dedup_id: None,
                        delay_seconds: seconds(
                            Duration::from_millis(remaining),
                            MAX_DELAY.as_secs(),
                        ),
                        attributes,
                    };
                    chained.push((prepared, delivery.receipt.0));
                    continue;
                }
                if pair.fifo()
                    && let Some(group) = &delivery.group
                    && !groups.insert(group.clone())
                {
                    // A later message of a group already handed out: it waits its turn.
                    released.push(delivery.receipt.0);
                    continue;
                }
                deliveries.push(delivery);
            }
            self.chain(&pair.main, chained).await;
            if !released.is_empty() {
                debug!(queue = %pair.main.name, count = released.len(), "later messages of a group released");
                if let Err(e) = self.release(&pair.main, released).await {
                    warn!(queue = %pair.main.name, error = %crate::ports::chain(&e), "cannot release later messages of a group; they come back after the visibility timeout");
                }
            }
        }
        Ok(deliveries)
    }

    async fn ack(&self, queue: QueueKind, receipts: Vec<Receipt>) -> Result<Vec<Receipt>, Error> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let target = &self.pair(queue).main;
        let failed = self
            .delete_batch(target, receipts.into_iter().map(|r| r.0).collect())
            .await?;
        Ok(failed.into_iter().map(Receipt).collect())
    }

    async fn extend(
        &self,
        queue: QueueKind,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), Error> {
        let target = &self.pair(queue).main;
        self.client
            .change_message_visibility()
            .queue_url(&target.url)
            .receipt_handle(&receipt.0)
            .visibility_timeout(seconds(visibility, MAX_VISIBILITY_SECS))
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    BACKEND,
                    "ChangeMessageVisibility",
                    &queue_resource(target),
                    e,
                )
            })?;
        Ok(())
    }

    async fn quarantine(&self, delivery: &Delivery, reason: &str) -> Result<(), Error> {
        self.quarantine_message(delivery, reason).await
    }

    async fn dead_letters(&self, queue: QueueKind, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.peek_dead_letters(queue, limit).await
    }

    async fn redrive(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
    ) -> Result<Vec<String>, Error> {
        self.dispose_dead_letters(queue, ids, Disposal::Redrive)
            .await
    }

    async fn discard(&self, queue: QueueKind, ids: Vec<String>) -> Result<Vec<String>, Error> {
        self.dispose_dead_letters(queue, Some(ids), Disposal::Discard)
            .await
    }

    fn system(&self) -> &'static str {
        "aws_sqs"
    }

    async fn stats(&self, queue: QueueKind) -> Result<QueueStats, Error> {
        let pair = self.pair(queue);
        let ((visible, in_flight, delayed), (dead_visible, dead_hidden, dead_delayed)) =
            tokio::try_join!(self.queue_counts(&pair.main), self.queue_counts(&pair.dlq))?;
        Ok(QueueStats {
            visible,
            in_flight,
            delayed,
            dead: dead_visible + dead_hidden + dead_delayed,
            oldest_age: None,
        })
    }
}

fn queue_resource(target: &Target) -> String {
    format!("queue {}", target.name)
}

fn build_error(e: BuildError) -> Error {
    Error::invalid(format!("cannot build an SQS request: {e}"))
}

fn unavailable(message: String) -> Error {
    Error::unavailable(BACKEND, message)
}

/// The error of batch entries that failed twice.
fn entry_error(action: &str, queue: &str, failed: &[BatchResultErrorEntry]) -> Error {
    let detail = failed
        .iter()
        .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("; ");
    let message = format!(
        "{action} on queue {queue}: {} entries failed: {detail}",
        failed.len()
    );
    if failed.iter().any(BatchResultErrorEntry::sender_fault) {
        Error::invalid(message)
    } else {
        Error::unavailable(BACKEND, message)
    }
}
