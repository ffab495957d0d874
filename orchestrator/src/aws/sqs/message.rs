//! A message as SQS carries it: prepared for a send (group, deduplication id, delay, attributes
//! within SQS's limits), cut into batches, and read back as a delivery.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, SendMessageBatchRequestEntry,
};
use workflows::Timestamp;

use super::{
    BATCH, FIRST_SENT_AT, INTERNAL, MAX_ATTRIBUTES, MAX_DEDUP_ID, MAX_DELAY, MAX_MESSAGE_BYTES,
    NOT_BEFORE, build_error,
};
use crate::ports::{Delivery, Error, Outgoing, QueueKind, Receipt};

/// A message ready for `SendMessageBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Prepared {
    pub(super) body: String,
    pub(super) group: Option<String>,
    pub(super) dedup_id: Option<String>,
    pub(super) delay_seconds: i32,
    pub(super) attributes: BTreeMap<String, String>,
}

impl Prepared {
    pub(super) fn size(&self) -> usize {
        message_size(&self.body, &self.attributes)
    }

    pub(super) fn entry(&self, id: usize) -> Result<SendMessageBatchRequestEntry, Error> {
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
pub(super) fn prepare(m: Outgoing, now_ms: i64) -> Result<Prepared, Error> {
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
pub(super) fn chunks(messages: Vec<Prepared>) -> Vec<Vec<Prepared>> {
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
pub(super) fn seconds(d: Duration, max: u64) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A deduplication id for a copy of message `id`: stable, so a retried copy is dropped.
pub(super) fn dedup_id(prefix: &str, id: &str) -> String {
    truncate(&format!("{prefix}{id}"), MAX_DEDUP_ID)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

pub(super) fn system_attribute(m: &Message, name: MessageSystemAttributeName) -> Option<&str> {
    m.attributes()
        .and_then(|a| a.get(&name))
        .map(String::as_str)
}

/// The string message attributes of `m` (binary ones are not ours and are left out).
pub(super) fn message_attributes(m: &Message) -> BTreeMap<String, String> {
    m.message_attributes()
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn attribute_ms(m: &Message, name: &str) -> Option<i64> {
    m.message_attributes()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value())
        .and_then(|s| s.parse().ok())
}

pub(super) fn sent_at(m: &Message) -> Timestamp {
    let ms = attribute_ms(m, FIRST_SENT_AT)
        .or_else(|| {
            system_attribute(m, MessageSystemAttributeName::SentTimestamp)
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or_else(now_ms);
    Timestamp::from_unix_millis(ms)
}

/// `m` as a delivery of `queue`; `None` without an id, receipt or body.
pub(super) fn delivery(queue: QueueKind, m: &Message) -> Option<Delivery> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::sqs::{QUARANTINE_DEDUP, REDRIVE_DEDUP};

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
