//! The history table: one item per applied event, by workflow key and version.
//!
//! - **`history`** is a strongly consistent `Query` of `key` with `version > :after`, oldest
//!   first.
//! - **`history_of_event`** queries the same partition newest first with a filter on
//!   `event_id`, in pages of [`EVENT_PAGE`], until it finds the entry: the engine only looks
//!   for recent events (those in the record's deduplication window), so a second index, which
//!   would cost a write per transition, is not worth it.

use workflows::{EventId, HistoryEntry, WorkflowKey};

use super::{BACKEND, DynamoStore, Item, bytes_of, n, s};
use crate::aws::sdk_error;
use crate::ports::Error;

/// How many history entries a page of `history_of_event` reads.
const EVENT_PAGE: i32 = 100;

impl DynamoStore {
    pub(super) async fn read_history(
        &self,
        key: &WorkflowKey,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Error> {
        let k = key.to_string();
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.history)
                .key_condition_expression("#k = :k AND #v > :after")
                .expression_attribute_names("#k", "key")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":k", s(&k))
                .expression_attribute_values(":after", n(after_version))
                .consistent_read(true)
                .scan_index_forward(true)
                .set_limit(self.page_limit(Some(limit - out.len())))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        BACKEND,
                        "Query",
                        &format!("history of {k} in table {}", self.history),
                        e,
                    )
                })?;
            for item in page.items() {
                out.push(entry_of(&k, item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    pub(super) async fn find_event(
        &self,
        key: &WorkflowKey,
        event_id: &EventId,
    ) -> Result<Option<HistoryEntry>, Error> {
        let k = key.to_string();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.history)
                .key_condition_expression("#k = :k")
                .filter_expression("#e = :e")
                .expression_attribute_names("#k", "key")
                .expression_attribute_names("#e", "event_id")
                .expression_attribute_values(":k", s(&k))
                .expression_attribute_values(":e", s(event_id.as_str()))
                .consistent_read(true)
                .scan_index_forward(false)
                .limit(self.page_size.unwrap_or(EVENT_PAGE))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        BACKEND,
                        "Query",
                        &format!("history of {k} in table {}", self.history),
                        e,
                    )
                })?;
            if let Some(item) = page.items().first() {
                return entry_of(&k, item).map(Some);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(None),
            }
        }
    }
}

fn entry_of(key: &str, item: &Item) -> Result<HistoryEntry, Error> {
    let bytes = bytes_of(item, "entry")
        .ok_or_else(|| Error::invalid(format!("a history item of {key} has no entry attribute")))?;
    workflows::decode(bytes)
        .map_err(|source| Error::corrupt(format!("history entry of {key}"), source))
}
