//! The `Queue` port on SQS: `<prefix>-events.fifo` and `<prefix>-steps`, each with its
//! dead-letter queue (`<prefix>-events-dlq.fifo`, `<prefix>-steps-dlq`), and the queue half of
//! `orchestrator init` ([`create_queues`]).
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry,
    DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_smithy_types::error::operation::BuildError;
use tracing::{debug, info, warn};
use workflows::Timestamp;

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

    /// Moves dead letters of `queue` back to it or deletes them (`disposal`): all, or the ones
    /// whose dead-letter ids are in `ids`. Pages through the dead-letter queue receiving them;
    /// a moved one is sent to the queue (events in their group, under a new deduplication id
    /// derived from the dead letter's id, so the original id's window does not drop them), then
    /// deleted from the dead-letter queue; the others are released. Returns the ids handled. At
    /// least once: a failure between the send and the delete leaves a copy in both queues (a
    /// FIFO queue drops the second send within five minutes).
    async fn dispose_dead_letters(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
        disposal: Disposal,
    ) -> Result<Vec<String>, Error> {
        let back = disposal == Disposal::Redrive;
        let pair = self.pair(queue);
        let mut wanted: Option<HashSet<String>> = ids.map(|ids| ids.into_iter().collect());
        if wanted.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(Vec::new());
        }
        let mut done: Vec<String> = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut first = true;
        let result = loop {
            let messages = match self
                .receive_raw(
                    &pair.dlq,
                    BATCH,
                    PEEK_VISIBILITY_SECS,
                    if first { 1 } else { 0 },
                )
                .await
            {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            first = false;
            if messages.is_empty() {
                break Ok(());
            }
            let mut entries = Vec::new();
            let mut receipts = Vec::new();
            let mut handled = Vec::new();
            for m in messages {
                let (Some(id), Some(receipt)) = (m.message_id(), m.receipt_handle()) else {
                    warn!(queue = %pair.dlq.name, "dead letter without an id or receipt; skipped");
                    continue;
                };
                let selected =
                    seen.insert(id.to_owned()) && wanted.as_ref().is_none_or(|w| w.contains(id));
                if !selected {
                    skipped.push(receipt.to_owned());
                    continue;
                }
                let prepared = Prepared {
                    body: m.body().unwrap_or_default().to_owned(),
                    group: pair.fifo().then(|| {
                        system_attribute(&m, MessageSystemAttributeName::MessageGroupId)
                            .unwrap_or(id)
                            .to_owned()
                    }),
                    dedup_id: pair.fifo().then(|| dedup_id(REDRIVE_DEDUP, id)),
                    delay_seconds: 0,
                    attributes: message_attributes(&m)
                        .into_iter()
                        .filter(|(k, _)| !INTERNAL.contains(&k.as_str()) || k == FIRST_SENT_AT)
                        .collect(),
                };
                entries.push(prepared);
                receipts.push(receipt.to_owned());
                handled.push(id.to_owned());
                if let Some(w) = wanted.as_mut() {
                    w.remove(id);
                }
            }
            if !receipts.is_empty() {
                if back && let Err(e) = self.send_prepared(&pair.main, entries).await {
                    break Err(e);
                }
                let failed = match self.delete_batch(&pair.dlq, receipts.clone()).await {
                    Ok(failed) => failed,
                    Err(e) => break Err(e),
                };
                if !failed.is_empty() {
                    warn!(
                        queue = %pair.dlq.name,
                        count = failed.len(),
                        "dead letters could not be deleted; they stay in the dead-letter queue"
                    );
                }
                // A redriven message whose delete failed was moved all the same (a copy
                // stays); a discarded one was not discarded.
                done.extend(
                    handled
                        .into_iter()
                        .zip(receipts)
                        .filter(|(_, r)| back || !failed.contains(r))
                        .map(|(id, _)| id),
                );
            }
            if wanted.as_ref().is_some_and(HashSet::is_empty) {
                break Ok(());
            }
        };
        if let Err(e) = self.release(&pair.dlq, skipped).await {
            warn!(queue = %pair.dlq.name, error = %crate::ports::chain(&e), "cannot release dead letters left in place");
        }
        result?;
        if back {
            info!(queue = %pair.main.name, count = done.len(), "dead letters redriven");
        } else {
            info!(queue = %pair.dlq.name, count = done.len(), "dead letters discarded");
        }
        Ok(done)
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
        let pair = self.pair(delivery.queue);
        let body = String::from_utf8(delivery.body.clone())
            .map_err(|_| Error::invalid(format!("message {} is not UTF-8", delivery.id)))?;
        let mut attributes: BTreeMap<String, String> = delivery
            .attributes
            .iter()
            .filter(|(k, v)| !INTERNAL.contains(&k.as_str()) && !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        attributes.insert(DEAD_REASON.to_owned(), truncate(reason, MAX_REASON_BYTES));
        attributes.insert(DEAD_SOURCE.to_owned(), pair.main.name.clone());
        attributes.insert(DEAD_AT.to_owned(), now_ms().to_string());
        attributes.insert(DEAD_RECEIVES.to_owned(), delivery.receive_count.to_string());
        attributes.insert(
            FIRST_SENT_AT.to_owned(),
            delivery.sent_at.as_unix_millis().to_string(),
        );
        let message = Prepared {
            body,
            group: pair.fifo().then(|| {
                delivery
                    .group
                    .clone()
                    .unwrap_or_else(|| delivery.id.clone())
            }),
            dedup_id: pair
                .fifo()
                .then(|| dedup_id(QUARANTINE_DEDUP, &delivery.id)),
            delay_seconds: 0,
            attributes,
        };
        self.send_prepared(&pair.dlq, vec![message]).await?;
        self.client
            .delete_message()
            .queue_url(&pair.main.url)
            .receipt_handle(&delivery.receipt.0)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "DeleteMessage", &queue_resource(&pair.main), e))?;
        info!(queue = %pair.main.name, message.id = %delivery.id, reason, "message quarantined");
        Ok(())
    }

    async fn dead_letters(&self, queue: QueueKind, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let pair = self.pair(queue);
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut receipts: Vec<String> = Vec::new();
        let mut first = true;
        let result = loop {
            if dead.len() >= limit {
                break Ok(());
            }
            let messages = match self
                .receive_raw(
                    &pair.dlq,
                    limit - dead.len(),
                    PEEK_VISIBILITY_SECS,
                    if first { 1 } else { 0 },
                )
                .await
            {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            first = false;
            if messages.is_empty() {
                break Ok(());
            }
            for m in &messages {
                if let Some(receipt) = m.receipt_handle() {
                    receipts.push(receipt.to_owned());
                }
                if let Some(d) = dead_letter(pair, m)
                    && !dead.iter().any(|x| x.id == d.id)
                {
                    dead.push(d);
                }
            }
        };
        // A peek: what was received is released at once.
        if let Err(e) = self.release(&pair.dlq, receipts).await {
            warn!(queue = %pair.dlq.name, error = %crate::ports::chain(&e), "cannot release peeked dead letters; they are hidden for a minute");
        }
        result?;
        dead.sort_by_key(|d| (d.dead_at, d.sent_at));
        dead.truncate(limit);
        Ok(dead)
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

/// Creates the four queues of `names` (idempotently: run it again to converge settings):
/// the dead-letter queues first, then the main queues, all with a retention of 14 days; the
/// events queues FIFO with content-based deduplication off; the main queues with a visibility
/// timeout of 60 s and the redrive policy `{"deadLetterTargetArn": <dlq>, "maxReceiveCount":
/// max_receives}`. `CreateQueue` gets only the attributes a queue cannot change (`FifoQueue`),
/// so an existing queue is found again; the rest is set with `SetQueueAttributes`.
pub async fn create_queues(client: &Client, names: &Names, max_receives: u32) -> Result<(), Error> {
    if !(1..=1000).contains(&max_receives) {
        return Err(Error::invalid(format!(
            "max_receives must be between 1 and 1000 (SQS maxReceiveCount), not {max_receives}"
        )));
    }
    let retention = RETENTION.as_secs().to_string();
    let visibility = DEFAULT_VISIBILITY.as_secs().to_string();
    for (main, dlq, fifo) in [
        (&names.events_queue, &names.events_dlq, true),
        (&names.steps_queue, &names.steps_dlq, false),
    ] {
        let dlq_url = create_queue(client, dlq, fifo).await?;
        let mut dlq_attributes = vec![(
            QueueAttributeName::MessageRetentionPeriod,
            retention.clone(),
        )];
        if fifo {
            dlq_attributes.push((
                QueueAttributeName::ContentBasedDeduplication,
                "false".to_owned(),
            ));
        }
        set_attributes(client, dlq, &dlq_url, dlq_attributes).await?;
        let dlq_arn = queue_arn(client, dlq, &dlq_url).await?;

        let main_url = create_queue(client, main, fifo).await?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receives,
        })
        .to_string();
        let mut attributes = vec![
            (
                QueueAttributeName::MessageRetentionPeriod,
                retention.clone(),
            ),
            (QueueAttributeName::VisibilityTimeout, visibility.clone()),
            (QueueAttributeName::RedrivePolicy, policy),
        ];
        if fifo {
            attributes.push((
                QueueAttributeName::ContentBasedDeduplication,
                "false".to_owned(),
            ));
        }
        set_attributes(client, main, &main_url, attributes).await?;
        info!(queue = %main, dead_letter_queue = %dlq, max_receives, "queue ready");
    }
    Ok(())
}

async fn create_queue(client: &Client, name: &str, fifo: bool) -> Result<String, Error> {
    let mut request = client.create_queue().queue_name(name);
    if fifo {
        request = request.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let out = request
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "CreateQueue", &format!("queue {name}"), e))?;
    out.queue_url
        .ok_or_else(|| unavailable(format!("CreateQueue of {name} returned no URL")))
}

async fn set_attributes(
    client: &Client,
    name: &str,
    url: &str,
    attributes: Vec<(QueueAttributeName, String)>,
) -> Result<(), Error> {
    client
        .set_queue_attributes()
        .queue_url(url)
        .set_attributes(Some(attributes.into_iter().collect()))
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "SetQueueAttributes", &format!("queue {name}"), e))?;
    Ok(())
}

async fn queue_arn(client: &Client, name: &str, url: &str) -> Result<String, Error> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueAttributes", &format!("queue {name}"), e))?;
    out.attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| unavailable(format!("GetQueueAttributes of {name} returned no QueueArn")))
}

async fn queue_url(client: &Client, name: &str) -> Result<Target, Error> {
    let out = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueUrl", &format!("queue {name}"), e))?;
    let url = out
        .queue_url
        .ok_or_else(|| unavailable(format!("GetQueueUrl of {name} returned no URL")))?;
    Ok(Target {
        name: name.to_owned(),
        url,
    })
}

/// Reads `main`'s redrive policy: it must send dead letters to `dlq`. Returns its
/// `maxReceiveCount`.
async fn redrive_policy(client: &Client, main: &Target, dlq: &Target) -> Result<u32, Error> {
    let out = client
        .get_queue_attributes()
        .queue_url(&main.url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueAttributes", &queue_resource(main), e))?;
    let missing = || {
        Error::invalid(format!(
            "queue {} has no redrive policy to {}: run `orchestrator init`",
            main.name, dlq.name
        ))
    };
    let policy = out
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::RedrivePolicy))
        .ok_or_else(missing)?;
    let policy: serde_json::Value = serde_json::from_str(&policy).map_err(|e| {
        Error::invalid(format!(
            "queue {} has a redrive policy that is not JSON ({e}): run `orchestrator init`",
            main.name
        ))
    })?;
    let target = policy
        .get("deadLetterTargetArn")
        .and_then(|v| v.as_str())
        .ok_or_else(missing)?;
    if target.rsplit(':').next() != Some(dlq.name.as_str()) {
        return Err(Error::invalid(format!(
            "queue {} sends its dead letters to {target}, not to {}: run `orchestrator init`",
            main.name, dlq.name
        )));
    }
    // SQS writes the count as a number; older tools wrote a string.
    let max = policy.get("maxReceiveCount").and_then(|v| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    });
    max.and_then(|m| u32::try_from(m).ok()).ok_or_else(missing)
}

/// A message ready for `SendMessageBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prepared {
    body: String,
    group: Option<String>,
    dedup_id: Option<String>,
    delay_seconds: i32,
    attributes: BTreeMap<String, String>,
}

impl Prepared {
    fn size(&self) -> usize {
        message_size(&self.body, &self.attributes)
    }

    fn entry(&self, id: usize) -> Result<SendMessageBatchRequestEntry, Error> {
        let attributes = self
            .attributes
            .iter()
            .map(|(k, v)| {
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map(|value| (k.clone(), value))
                    .map_err(build_error)
            })
            .collect::<Result<HashMap<_, _>, _>>()?;
        SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(&self.body)
            .set_delay_seconds((self.delay_seconds > 0).then_some(self.delay_seconds))
            .set_message_group_id(self.group.clone())
            .set_message_deduplication_id(self.dedup_id.clone())
            .set_message_attributes((!attributes.is_empty()).then_some(attributes))
            .build()
            .map_err(build_error)
    }
}

/// Checks `m` and turns it into a message for SQS, `now_ms` being the time of the send.
fn prepare(m: Outgoing, now_ms: i64) -> Result<Prepared, Error> {
    let mut attributes: BTreeMap<String, String> = m
        .attributes
        .into_iter()
        // SQS refuses empty attribute values.
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let (group, dedup_id, delay_seconds) = match m.queue {
        QueueKind::Events => {
            if !m.delay.is_zero() {
                return Err(Error::invalid(
                    "events messages cannot be delayed (a FIFO queue has no per-message delay): send timers to the steps queue",
                ));
            }
            let group = m.group.ok_or_else(|| {
                Error::invalid("an events message needs a group (the workflow key)")
            })?;
            let dedup = m.dedup_id.ok_or_else(|| {
                Error::invalid("an events message needs a deduplication id (the event id)")
            })?;
            (Some(group), Some(dedup), 0)
        }
        QueueKind::Steps => {
            if m.delay > MAX_DELAY {
                let until =
                    now_ms.saturating_add(i64::try_from(m.delay.as_millis()).unwrap_or(i64::MAX));
                attributes.insert(NOT_BEFORE.to_owned(), until.to_string());
            }
            (None, None, seconds(m.delay, MAX_DELAY.as_secs()))
        }
    };
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid(format!(
            "a message has {} attributes; SQS allows {MAX_ATTRIBUTES}",
            attributes.len()
        )));
    }
    let size = m.body.len() + attributes_size(&attributes);
    if size > MAX_MESSAGE_BYTES {
        return Err(Error::TooLarge {
            size,
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let body = String::from_utf8(m.body)
        .map_err(|_| Error::invalid("a message body is not UTF-8 (SQS bodies are text)"))?;
    Ok(Prepared {
        body,
        group,
        dedup_id,
        delay_seconds,
        attributes,
    })
}

/// Splits `messages` into batches of at most [`BATCH`] messages and [`MAX_MESSAGE_BYTES`].
fn chunks(messages: Vec<Prepared>) -> Vec<Vec<Prepared>> {
    let mut out: Vec<Vec<Prepared>> = Vec::new();
    let mut current: Vec<Prepared> = Vec::new();
    let mut bytes = 0;
    for m in messages {
        let size = m.size();
        if !current.is_empty() && (current.len() == BATCH || bytes + size > MAX_MESSAGE_BYTES) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(m);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The size SQS counts: body, and per attribute its name, type and value.
fn message_size(body: &str, attributes: &BTreeMap<String, String>) -> usize {
    body.len() + attributes_size(attributes)
}

fn attributes_size(attributes: &BTreeMap<String, String>) -> usize {
    attributes
        .iter()
        .map(|(k, v)| k.len() + "String".len() + v.len())
        .sum()
}

/// `d` in whole seconds, rounded up, at most `max`.
fn seconds(d: Duration, max: u64) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A deduplication id for a copy of message `id`: stable, so a retried copy is dropped.
fn dedup_id(prefix: &str, id: &str) -> String {
    truncate(&format!("{prefix}{id}"), MAX_DEDUP_ID)
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn system_attribute(m: &Message, name: MessageSystemAttributeName) -> Option<&str> {
    m.attributes()
        .and_then(|a| a.get(&name))
        .map(String::as_str)
}

/// The string message attributes of `m` (binary ones are not ours and are left out).
fn message_attributes(m: &Message) -> BTreeMap<String, String> {
    m.message_attributes()
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn attribute_ms(m: &Message, name: &str) -> Option<i64> {
    m.message_attributes()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value())
        .and_then(|s| s.parse().ok())
}

fn sent_at(m: &Message) -> Timestamp {
    let ms = attribute_ms(m, FIRST_SENT_AT)
        .or_else(|| {
            system_attribute(m, MessageSystemAttributeName::SentTimestamp)
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or_else(now_ms);
    Timestamp::from_unix_millis(ms)
}

/// `m` as a delivery of `queue`; `None` without an id, receipt or body.
fn delivery(queue: QueueKind, m: &Message) -> Option<Delivery> {
    Some(Delivery {
        queue,
        id: m.message_id()?.to_owned(),
        receipt: Receipt(m.receipt_handle()?.to_owned()),
        body: m.body()?.as_bytes().to_vec(),
        attributes: message_attributes(m)
            .into_iter()
            .filter(|(k, _)| !INTERNAL.contains(&k.as_str()))
            .collect(),
        receive_count: system_attribute(m, MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
        sent_at: sent_at(m),
        group: system_attribute(m, MessageSystemAttributeName::MessageGroupId).map(str::to_owned),
    })
}

/// `m`, received from `pair`'s dead-letter queue, as a dead letter. A message quarantined by
/// this adapter carries its reason, time and receive count; one moved by SQS's redrive policy
/// does not, and SQS does not say when it moved it: its `dead_at` is then its send time.
fn dead_letter(pair: &Pair, m: &Message) -> Option<DeadLetter> {
    let id = m.message_id()?.to_owned();
    let body = m.body()?.as_bytes().to_vec();
    let attributes = message_attributes(m);
    let sent_at = sent_at(m);
    let (reason, receive_count, dead_at) = match attributes.get(DEAD_REASON) {
        Some(reason) => (
            reason.clone(),
            attributes
                .get(DEAD_RECEIVES)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            attribute_ms(m, DEAD_AT).map_or(sent_at, Timestamp::from_unix_millis),
        ),
        None => (
            format!(
                "received {n} times without being acknowledged (maxReceiveCount = {n}); moved by the redrive policy of {queue}",
                n = pair.max_receives,
                queue = pair.main.name
            ),
            pair.max_receives,
            sent_at,
        ),
    };
    let dedup_id = system_attribute(m, MessageSystemAttributeName::MessageDeduplicationId)
        .filter(|d| !d.starts_with(QUARANTINE_DEDUP) && !d.starts_with(REDRIVE_DEDUP))
        .map(str::to_owned);
    Some(DeadLetter {
        queue: pair.kind,
        id,
        body,
        group: system_attribute(m, MessageSystemAttributeName::MessageGroupId).map(str::to_owned),
        dedup_id,
        reason,
        receive_count,
        sent_at,
        dead_at,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn step(delay: Duration) -> Outgoing {
        Outgoing {
            queue: QueueKind::Steps,
            group: None,
            dedup_id: None,
            delay,
            body: b"{}".to_vec(),
            attributes: BTreeMap::from([("traceparent".to_owned(), "00-a-b-01".to_owned())]),
        }
    }

    #[test]
    fn delays_up_to_900_seconds_are_sent_as_they_are() {
        let p = prepare(step(Duration::from_millis(1500)), 1_000).expect("prepare");
        assert_eq!(p.delay_seconds, 2, "rounded up: never earlier");
        assert!(!p.attributes.contains_key(NOT_BEFORE));
        let p = prepare(step(MAX_DELAY), 1_000).expect("prepare");
        assert_eq!(p.delay_seconds, 900);
        assert!(!p.attributes.contains_key(NOT_BEFORE));
    }

    #[test]
    fn a_longer_delay_is_sent_with_900_seconds_and_not_before() {
        let p = prepare(step(Duration::from_secs(1000)), 5_000).expect("prepare");
        assert_eq!(p.delay_seconds, 900);
        assert_eq!(
            p.attributes.get(NOT_BEFORE).map(String::as_str),
            Some("1005000")
        );
        assert_eq!(
            p.attributes.get("traceparent").map(String::as_str),
            Some("00-a-b-01")
        );
        let entry = p.entry(3).expect("entry");
        assert_eq!(entry.delay_seconds(), Some(900));
        assert_eq!(entry.id(), "3");
        let attrs = entry.message_attributes().expect("attributes");
        assert_eq!(
            attrs.get(NOT_BEFORE).and_then(|v| v.string_value()),
            Some("1005000")
        );
        assert_eq!(attrs.get(NOT_BEFORE).map(|v| v.data_type()), Some("String"));
    }

    #[test]
    fn events_need_a_group_and_a_dedup_id_and_no_delay() {
        let mut m = step(Duration::ZERO);
        m.queue = QueueKind::Events;
        assert!(matches!(prepare(m.clone(), 0), Err(Error::Invalid { .. })));
        m.group = Some("acme#dev".into());
        assert!(matches!(prepare(m.clone(), 0), Err(Error::Invalid { .. })));
        m.dedup_id = Some("e-1".into());
        let p = prepare(m.clone(), 0).expect("prepare");
        assert_eq!(p.group.as_deref(), Some("acme#dev"));
        assert_eq!(p.dedup_id.as_deref(), Some("e-1"));
        m.delay = Duration::from_secs(1);
        assert!(matches!(prepare(m, 0), Err(Error::Invalid { .. })));
    }

    #[test]
    fn the_size_counts_body_and_attributes() {
        let mut m = step(Duration::ZERO);
        m.attributes.clear();
        m.body = vec![b'x'; MAX_MESSAGE_BYTES];
        assert!(prepare(m.clone(), 0).is_ok(), "exactly the limit");
        m.attributes.insert("a".into(), "b".into());
        match prepare(m, 0) {
            Err(Error::TooLarge { size, limit }) => {
                assert_eq!(size, MAX_MESSAGE_BYTES + 1 + 6 + 1);
                assert_eq!(limit, MAX_MESSAGE_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn non_utf8_bodies_and_empty_attributes() {
        let mut m = step(Duration::ZERO);
        m.body = vec![0xff, 0xfe];
        assert!(matches!(prepare(m, 0), Err(Error::Invalid { .. })));
        let mut m = step(Duration::ZERO);
        m.attributes.insert("tracestate".into(), String::new());
        let p = prepare(m, 0).expect("prepare");
        assert!(
            !p.attributes.contains_key("tracestate"),
            "SQS refuses empty values"
        );
    }

    #[test]
    fn batches_hold_ten_messages_and_256_kib() {
        let small = |n: usize| {
            (0..n)
                .map(|_| prepare(step(Duration::ZERO), 0).expect("prepare"))
                .collect::<Vec<_>>()
        };
        let sizes: Vec<usize> = chunks(small(25)).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
        let mut big = step(Duration::ZERO);
        big.attributes.clear();
        big.body = vec![b'x'; 100 * 1024];
        let bigs = (0..5)
            .map(|_| prepare(big.clone(), 0).expect("prepare"))
            .collect::<Vec<_>>();
        let sizes: Vec<usize> = chunks(bigs).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn seconds_round_up_and_clamp() {
        assert_eq!(seconds(Duration::ZERO, 20), 0);
        assert_eq!(seconds(Duration::from_millis(1), 20), 1);
        assert_eq!(seconds(Duration::from_secs(2), 20), 2);
        assert_eq!(seconds(Duration::from_secs(60), 20), 20);
    }

    #[test]
    fn dedup_ids_and_reasons_are_cut_to_size() {
        assert_eq!(dedup_id(QUARANTINE_DEDUP, "abc"), "quarantine-abc");
        assert_eq!(
            dedup_id(REDRIVE_DEDUP, &"x".repeat(300)).len(),
            MAX_DEDUP_ID
        );
        assert_eq!(truncate("ééé", 3), "é");
    }
}
