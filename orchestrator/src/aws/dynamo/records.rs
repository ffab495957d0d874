//! The workflows table (`<prefix>-workflows`): records, their conditional writes (with the history entry, one
//! transaction) and listings by state.
//!
//! - **`write`** is one `TransactWriteItems` of two conditional puts: the record (condition
//!   `attribute_not_exists(key)` for version 0, else `version = :expected`; a put has no
//!   `corrupt`, so a write clears the mark) and its history entry (`attribute_not_exists`).
//!   The record put asks for `ReturnValuesOnConditionCheckFailure = ALL_OLD`, so a conflict
//!   reports the version found without another read (only when the item is missing from the
//!   cancellation reason although a record must exist, a consistent `GetItem` reads it).
//!   Every write asks for `ReturnConsumedCapacity = TOTAL`; [`DynamoStore::consumed_wcu`] is the
//!   running sum. There is no `ClientRequestToken`: a retry of a write that did succeed reports
//!   a conflict, and the engine's reload then finds the event applied.
//! - **`workflow`** is a strongly consistent `GetItem` of the record attribute.
//! - **`workflows`** (listing) uses the `by_state` index, never a scan. With a state filter it is
//!   one `Query` of that state (`key > :after`, environment and `updated_before` as a filter
//!   expression). Without one it queries every state for up to `limit` keys after `after` and
//!   merges them by key (at most eight queries a page, each reading no more than the page
//!   unless a filter drops items, where a scan would read the whole table for every page).
//!   With a tenant filter it reads the tenant's at most three records by key with one strongly
//!   consistent `BatchGetItem`. Index reads are eventually consistent: a listing may lag a
//!   write by a moment.
//! - **`mark_corrupt`** is an `UpdateItem` `SET corrupt`, conditional on the record existing.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    KeysAndAttributes, Put, ReturnConsumedCapacity, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem,
};
use workflows::{State, TenantId, Timestamp, WorkflowKey};

use super::capacity::capacity_units;
use super::{
    BACKEND, BY_STATE, DynamoStore, Item, build_error, bytes_of, failed, n, num, s, text, utf8,
};
use crate::aws::sdk_error;
use crate::ports::{Error, RecordWrite, WorkflowFilter, WorkflowSummary, WriteError};

impl DynamoStore {
    pub(super) async fn read_record(
        &self,
        key: &WorkflowKey,
    ) -> Result<Option<workflows::WorkflowRecord>, Error> {
        let out = self
            .client
            .get_item()
            .table_name(&self.workflows)
            .key("key", s(key.to_string()))
            .consistent_read(true)
            .projection_expression("#r")
            .expression_attribute_names("#r", "record")
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    BACKEND,
                    "GetItem",
                    &format!("record of {key} in table {}", self.workflows),
                    e,
                )
            })?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let bytes = bytes_of(&item, "record").ok_or_else(|| {
            Error::invalid(format!(
                "the item of {key} in table {} has no record",
                self.workflows
            ))
        })?;
        workflows::decode(bytes)
            .map(Some)
            .map_err(|source| Error::corrupt(format!("record of {key}"), source))
    }

    pub(super) async fn write_record(&self, write: RecordWrite) -> Result<(), WriteError> {
        let key = write.key.to_string();
        let record = utf8(write.record, &format!("record of {key}"))?;
        let entry = utf8(write.history, &format!("history entry of {key}"))?;
        let record_item = Item::from([
            ("key".to_owned(), s(&key)),
            ("version".to_owned(), n(write.version)),
            ("state".to_owned(), s(write.state.as_str())),
            ("tenant".to_owned(), s(write.key.tenant.as_str())),
            ("env".to_owned(), s(write.key.env.as_str())),
            (
                "updated_at".to_owned(),
                n(write.updated_at.as_unix_millis()),
            ),
            ("record".to_owned(), s(record)),
        ]);
        let put_record = Put::builder()
            .table_name(&self.workflows)
            .set_item(Some(record_item))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let put_record = if write.expected_version == 0 {
            put_record
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", "key")
        } else {
            put_record
                .condition_expression("#v = :expected")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":expected", n(write.expected_version))
        };
        let put_entry = Put::builder()
            .table_name(&self.history)
            .set_item(Some(Item::from([
                ("key".to_owned(), s(&key)),
                ("version".to_owned(), n(write.version)),
                ("event_id".to_owned(), s(write.event_id.as_str())),
                ("entry".to_owned(), s(entry)),
            ])))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", "key")
            .build()
            .map_err(build_error)?;
        let items = vec![
            TransactWriteItem::builder()
                .put(put_record.build().map_err(build_error)?)
                .build(),
            TransactWriteItem::builder().put(put_entry).build(),
        ];
        let reasons = match self
            .transact(
                &format!(
                    "record of {key} (tables {} and {})",
                    self.workflows, self.history
                ),
                items,
            )
            .await?
        {
            Ok(()) => return Ok(()),
            Err(reasons) => reasons,
        };
        if failed(&reasons, 0) {
            let found = match reasons.first().and_then(|r| r.item()) {
                Some(old) => num(old, "version").unwrap_or(0),
                // No item: none is stored, unless the condition was its absence.
                None if write.expected_version == 0 => self.stored_version(&write.key).await?,
                None => 0,
            };
            tracing::debug!(%key, expected = write.expected_version, found, "version conflict");
            return Err(WriteError::Conflict {
                key: write.key,
                expected: write.expected_version,
                found,
            });
        }
        Err(WriteError::Store(Error::invalid(format!(
            "history entry {} of {key} exists although the record is at version {}: the \
             tables {} and {} disagree",
            write.version, write.expected_version, self.workflows, self.history
        ))))
    }

    pub(super) async fn mark_record_corrupt(
        &self,
        key: &WorkflowKey,
        reason: &str,
    ) -> Result<(), Error> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.workflows)
            .key("key", s(key.to_string()))
            .update_expression("SET #c = :reason")
            .condition_expression("attribute_exists(#k)")
            .expression_attribute_names("#c", "corrupt")
            .expression_attribute_names("#k", "key")
            .expression_attribute_values(":reason", s(reason))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match sent {
            Ok(out) => {
                self.add_wcu(
                    out.consumed_capacity()
                        .and_then(capacity_units)
                        .unwrap_or(1.0),
                );
                Ok(())
            }
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                tracing::debug!(%key, "no record to mark corrupt");
                Ok(())
            }
            Err(e) => Err(sdk_error(
                BACKEND,
                "UpdateItem",
                &format!("record of {key} in table {}", self.workflows),
                e,
            )),
        }
    }

    pub(super) async fn list_workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&WorkflowKey>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(ToString::to_string);
        let mut found = if let Some(tenant) = &filter.tenant {
            self.tenant_workflows(tenant, filter).await?
        } else {
            let states = match filter.state {
                Some(state) => vec![state],
                None => State::ALL.to_vec(),
            };
            let mut found = Vec::new();
            for state in states {
                found.extend(
                    self.query_state(state, filter, after.as_deref(), limit)
                        .await?,
                );
            }
            found
        };
        found.retain(|w| {
            filter.state.is_none_or(|st| w.state == st)
                && filter.env.is_none_or(|e| w.key.env == e)
                && filter.updated_before.is_none_or(|t| w.updated_at < t)
                && after
                    .as_deref()
                    .is_none_or(|a| w.key.to_string().as_str() > a)
        });
        // Ordered by the key as stored (a string), as DynamoDB orders sort keys.
        found.sort_by_cached_key(|w| w.key.to_string());
        found.truncate(limit);
        Ok(found)
    }

    /// The version of `key`'s record (0: none), read consistently.
    async fn stored_version(&self, key: &WorkflowKey) -> Result<u64, Error> {
        let item = self
            .get_item(
                &self.workflows,
                Item::from([("key".to_owned(), s(key.to_string()))]),
                &format!("record of {key}"),
            )
            .await?;
        Ok(item.as_ref().and_then(|i| num(i, "version")).unwrap_or(0))
    }

    /// Up to `limit` summaries of `state` with keys after `after`, matching `filter`'s
    /// environment and age.
    async fn query_state(
        &self,
        state: State,
        filter: &WorkflowFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        let mut names = HashMap::from([
            ("#s".to_owned(), "state".to_owned()),
            ("#k".to_owned(), "key".to_owned()),
        ]);
        let mut values = HashMap::from([(":s".to_owned(), s(state.as_str()))]);
        let mut key_condition = "#s = :s".to_owned();
        if let Some(after) = after {
            key_condition.push_str(" AND #k > :after");
            values.insert(":after".into(), s(after));
        } else {
            names.remove("#k");
        }
        let mut filters = Vec::new();
        if let Some(env) = filter.env {
            filters.push("#env = :env");
            names.insert("#env".into(), "env".into());
            values.insert(":env".into(), s(env.as_str()));
        }
        if let Some(before) = filter.updated_before {
            filters.push("#u < :before");
            names.insert("#u".into(), "updated_at".into());
            values.insert(":before".into(), n(before.as_unix_millis()));
        }
        let filter_expression = (!filters.is_empty()).then(|| filters.join(" AND "));
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            // Without a filter every item read is returned: read no more than the page.
            let page_limit =
                self.page_limit(filter_expression.is_none().then(|| limit - out.len()));
            let page = self
                .client
                .query()
                .table_name(&self.workflows)
                .index_name(BY_STATE)
                .key_condition_expression(&key_condition)
                .set_filter_expression(filter_expression.clone())
                .set_expression_attribute_names(Some(names.clone()))
                .set_expression_attribute_values(Some(values.clone()))
                .set_limit(page_limit)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        BACKEND,
                        "Query",
                        &format!("index {BY_STATE} of table {}", self.workflows),
                        e,
                    )
                })?;
            for item in page.items() {
                out.push(summary(item)?);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// The summaries of `tenant`'s workflows (at most one per environment), read by key.
    async fn tenant_workflows(
        &self,
        tenant: &TenantId,
        filter: &WorkflowFilter,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        let keys: Vec<Item> = workflows::Environment::ALL
            .into_iter()
            .filter(|e| filter.env.is_none_or(|f| f == *e))
            .map(|e| {
                Item::from([(
                    "key".to_owned(),
                    s(WorkflowKey::new(tenant.clone(), e).to_string()),
                )])
            })
            .collect();
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .projection_expression("#k, #s, #v, #u, #c")
                .set_expression_attribute_names(Some(HashMap::from([
                    ("#k".to_owned(), "key".to_owned()),
                    ("#s".to_owned(), "state".to_owned()),
                    ("#v".to_owned(), "version".to_owned()),
                    ("#u".to_owned(), "updated_at".to_owned()),
                    ("#c".to_owned(), "corrupt".to_owned()),
                ])))
                .build()
                .map_err(build_error)?,
        );
        let mut out = Vec::new();
        let mut attempt = 0u32;
        while let Some(request) = pending.take() {
            let page = self
                .client
                .batch_get_item()
                .request_items(&self.workflows, request)
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        BACKEND,
                        "BatchGetItem",
                        &format!("table {}", self.workflows),
                        e,
                    )
                })?;
            if let Some(items) = page.responses().and_then(|r| r.get(&self.workflows)) {
                for item in items {
                    out.push(summary(item)?);
                }
            }
            pending = page
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.workflows))
                .filter(|k| !k.keys().is_empty());
            if pending.is_some() {
                attempt += 1;
                if attempt > 8 {
                    return Err(Error::unavailable(
                        BACKEND,
                        format!(
                            "BatchGetItem on table {} left keys unprocessed 8 times",
                            self.workflows
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
            }
        }
        Ok(out)
    }
}

fn parse_state(v: &str) -> Option<State> {
    State::ALL.into_iter().find(|st| st.as_str() == v)
}

/// A listing's summary of a workflows item (or its index projection).
fn summary(item: &Item) -> Result<WorkflowSummary, Error> {
    let bad = |what: &str| {
        Error::invalid(format!(
            "an item of the workflows table has {what}: {:?}",
            item.get("key")
        ))
    };
    let key = text(item, "key")
        .and_then(|k| k.parse::<WorkflowKey>().ok())
        .ok_or_else(|| bad("no valid key"))?;
    Ok(WorkflowSummary {
        key,
        state: text(item, "state")
            .and_then(parse_state)
            .ok_or_else(|| bad("no valid state"))?,
        version: num(item, "version").ok_or_else(|| bad("no valid version"))?,
        updated_at: Timestamp::from_unix_millis(
            num(item, "updated_at").ok_or_else(|| bad("no valid updated_at"))?,
        ),
        corrupt: text(item, "corrupt").map(str::to_owned),
    })
}
