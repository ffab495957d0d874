//! Dead letters on SQS: quarantine sends a copy with the reason to the dead-letter queue and
//! deletes the original; listing peeks (receive, then release at once); redrive and discard
//! page through the dead-letter queue.

use std::collections::{BTreeMap, HashSet};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use tracing::{info, warn};
use workflows::Timestamp;

use super::message::{
    Prepared, attribute_ms, dedup_id, message_attributes, now_ms, sent_at, system_attribute,
    truncate,
};
use super::{
    BACKEND, BATCH, DEAD_AT, DEAD_REASON, DEAD_RECEIVES, DEAD_SOURCE, FIRST_SENT_AT, INTERNAL,
    MAX_REASON_BYTES, PEEK_VISIBILITY_SECS, Pair, QUARANTINE_DEDUP, REDRIVE_DEDUP, SqsQueue,
    queue_resource,
};
use crate::aws::sdk_error;
use crate::ports::queue::Disposal;
use crate::ports::{DeadLetter, Delivery, Error, QueueKind};

impl SqsQueue {
    /// Moves dead letters of `queue` back to it or deletes them (`disposal`): all, or the ones
    /// whose dead-letter ids are in `ids`. Pages through the dead-letter queue receiving them;
    /// a moved one is sent to the queue (events in their group, under a new deduplication id
    /// derived from the dead letter's id, so the original id's window does not drop them), then
    /// deleted from the dead-letter queue; the others are released. Returns the ids handled. At
    /// least once: a failure between the send and the delete leaves a copy in both queues (a
    /// FIFO queue drops the second send within five minutes).
    pub(super) async fn dispose_dead_letters(
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

    pub(super) async fn quarantine_message(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), Error> {
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

    pub(super) async fn peek_dead_letters(
        &self,
        queue: QueueKind,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
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
