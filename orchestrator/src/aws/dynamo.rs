//! The `Store` port on DynamoDB, and the tables `orchestrator init` creates ([`create_tables`]).
//!
//! Four tables, named from the prefix by [`Names`], all on on-demand billing
//! (`PAY_PER_REQUEST`):
//!
//! | table | partition key | sort key | other attributes | indexes |
//! |---|---|---|---|---|
//! | `<prefix>-workflows` | `key` (S, `tenant#env`) | – | `version` (N), `state` (S), `tenant` (S), `env` (S), `updated_at` (N, unix ms), `corrupt` (S, only while marked), `record` (S, the record's JSON) | GSI `by_state`: partition `state`, sort `key`, projecting `version`, `updated_at`, `corrupt`, `tenant`, `env` |
//! | `<prefix>-history` | `key` (S) | `version` (N) | `event_id` (S), `entry` (S, the history entry's JSON) | – |
//! | `<prefix>-tenants` | `pk` (S) | – | `tenant#<id>`: `record` (S, JSON), `infra_project` (N), `app_project` (N); `project#<n>`: `tenant_id` (S) | – |
//! | `<prefix>-allocations` | `pool` (S) | `slot` (S) | `value#<n, 20 digits>`: `value` (N), `owner` (S); `owner#<owner>`: `value` (N), `owner` (S) | – |
//!
//! How each operation uses them:
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
//!   With a tenant filter it reads the
//!   tenant's at most three records by key with one strongly consistent `BatchGetItem`. Index
//!   reads are eventually consistent: a listing may lag a write by a moment.
//! - **`history`** is a strongly consistent `Query` of `key` with `version > :after`, oldest
//!   first. **`history_of_event`** queries the same partition newest first with a filter on
//!   `event_id`, in pages of 100, until it finds the entry: the engine only looks for recent
//!   events (those in the record's deduplication window), so a second index, which would cost a
//!   write per transition, is not worth it.
//! - **`mark_corrupt`** is an `UpdateItem` `SET corrupt`, conditional on the record existing.
//! - **`put_tenant`** reads the old tenant item, then writes in one `TransactWriteItems`: the
//!   tenant item (`attribute_not_exists(pk)` when creating, else conditional on the projects it
//!   had, so a concurrent change cannot leave a pointer behind), a pointer per project
//!   (`attribute_not_exists(pk) OR tenant_id = :id`: a project belongs to one tenant) and the
//!   deletion of pointers of projects the tenant no longer has. **`tenant_by_project`** reads the
//!   pointer, then the tenant. **`tenants`** scans for `tenant#` items (a few hundred tenants at
//!   most) and sorts them by id.
//! - **`allocate`** is one `TransactWriteItems` of two puts conditional on
//!   `attribute_not_exists`: the value's item (one owner per value) and the owner's item (one
//!   value per owner per pool). **`release`** deletes both, conditional on the owner.
//!   **`allocation_of`** reads the owner's item.
//! - **Slots** live in the allocations table too, one partition `slots#<kind>` per capped
//!   step kind: a counter item `count` (`held`, N), a lease per holder `lease#<holder>`
//!   (`holder`, `tenant`, `since`, `expires`: unix ms), and per waiter a place in line
//!   `line#<round, 4 digits>#<ticket, 20 digits>#<holder>` (with `wake`, B: the message that
//!   resumes it) and a pointer `wait#<holder>` to it (`line`). Holders start with their
//!   tenant, so `wait#<tenant>#` lists a tenant's waiters. **`acquire_slot`** queries the
//!   leases (dropping lapsed ones: delete conditional on the `expires` read plus `ADD held -1`,
//!   one transaction), renews ours if there is one, else finds or joins its place (the pointer
//!   put is conditional, so a duplicate request joins once). Then it grants the free slots to
//!   the head of the line (a `Query` of at most that many places), each in one transaction:
//!   `ADD held 1` on the counter conditional on `held < cap`, the lease put, the place and
//!   pointer deleted. So the cap holds whatever workers race. A waiter is told how many are
//!   ahead (a `COUNT` query of at most a thousand). **`release_slot`** deletes the lease with
//!   `ADD held -1` (one transaction) and the place in line, if any, then grants what is free
//!   the same way. About four to eight requests a call.
//!
//! Every listing follows `LastEvaluatedKey` until it has `limit` items or there are no more
//! (a page is DynamoDB's 1 MB unless [`DynamoStore::with_page_size`] bounds it).
//! The sort key of the allocations is a string so that one partition per pool holds both
//! kinds of items (a numeric sort key could not hold the owners); the value is zero-padded so
//! a query of a pool lists its values in order.
//!
//! moto (the local AWS the tests run on) returns no consumed capacity for
//! `TransactWriteItems`; when a response carries none, the sum counts what AWS would charge
//! (two write units per started KiB of each item, estimated from the item's size).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, ConsumedCapacity, Delete,
    GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType, KeysAndAttributes, Projection,
    ProjectionType, Put, ReturnConsumedCapacity, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, Select, TableStatus, TransactWriteItem, Update,
};
use aws_smithy_types::Blob;
use aws_smithy_types::error::operation::BuildError;
use workflows::{EventId, HistoryEntry, State, Tenant, TenantId, Timestamp, WorkflowKey};

use super::{Names, RequestCounter, sdk_error};
use crate::clock::{SharedClock, SystemClock};
use crate::ports::{
    Error, RecordWrite, SlotEntry, SlotGrant, SlotsView, Store, Woken, WorkflowFilter,
    WorkflowSummary, WriteError,
};

/// The backend name in errors.
const BACKEND: &str = "dynamodb";

/// The index of the workflows table by state.
pub const BY_STATE: &str = "by_state";

/// How many history entries a page of `history_of_event` reads.
const EVENT_PAGE: i32 = 100;

/// How long [`create_tables`] waits for the tables to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

type Item = HashMap<String, AttributeValue>;

/// A DynamoDB client for `sdk` that counts its requests in `counter`.
pub fn client(sdk: &aws_config::SdkConfig, counter: &RequestCounter) -> Client {
    let config = aws_sdk_dynamodb::config::Builder::from(sdk)
        .interceptor(counter.clone())
        .build();
    Client::from_conf(config)
}

/// The `Store` port on the four DynamoDB tables described in the [module docs](self).
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    workflows: String,
    history: String,
    tenants: String,
    allocations: String,
    page_size: Option<i32>,
    consumed_wcu: Arc<Mutex<f64>>,
    clock: SharedClock,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("workflows", &self.workflows)
            .field("allocations", &self.allocations)
            .finish_non_exhaustive()
    }
}

impl DynamoStore {
    /// Connects to the tables of `names`, counting requests in `counter`. Each table is
    /// described first: a missing table, a missing index or denied access is one error that
    /// names the table (and the permission, or `orchestrator init`).
    pub async fn connect(
        sdk: &aws_config::SdkConfig,
        names: &Names,
        counter: &RequestCounter,
    ) -> Result<Self, Error> {
        let store = Self::with_client(client(sdk, counter), names);
        for (table, index) in [
            (&store.workflows, Some(BY_STATE)),
            (&store.history, None),
            (&store.tenants, None),
            (&store.allocations, None),
        ] {
            let out = store
                .client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| sdk_error(BACKEND, "DescribeTable", &format!("table {table}"), e))?;
            if let Some(index) = index {
                let has_index = out.table().is_some_and(|t| {
                    t.global_secondary_indexes()
                        .iter()
                        .any(|i| i.index_name() == Some(index))
                });
                if !has_index {
                    return Err(Error::Invalid(format!(
                        "table {table} has no index {index}: it was not created by \
                         `orchestrator init`; delete it and run `orchestrator init`"
                    )));
                }
            }
        }
        tracing::debug!(workflows = %store.workflows, "dynamodb tables found");
        Ok(store)
    }

    /// A store on the tables of `names` through `client`, without checking that they exist.
    pub fn with_client(client: Client, names: &Names) -> Self {
        Self {
            client,
            workflows: names.workflows_table.clone(),
            history: names.history_table.clone(),
            tenants: names.tenants_table.clone(),
            allocations: names.allocations_table.clone(),
            page_size: None,
            consumed_wcu: Arc::new(Mutex::new(0.0)),
            clock: Arc::new(SystemClock),
        }
    }

    /// Reads at most `items` items per request of a listing (DynamoDB's own bound is 1 MB a
    /// page; `history_of_event` reads 100 a page). For tests of pagination, and for tuning.
    pub fn with_page_size(mut self, items: usize) -> Self {
        self.page_size = Some(clamp_i32(items));
        self
    }

    /// Times slot leases on `clock` instead of the system's (tests let leases lapse with it).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The `Limit` of a request that should return `wanted` more items.
    fn page_limit(&self, wanted: Option<usize>) -> Option<i32> {
        match (wanted.map(clamp_i32), self.page_size) {
            (Some(w), Some(p)) => Some(w.min(p)),
            (w, p) => w.or(p),
        }
    }

    /// Write capacity units consumed by this store's writes so far (as reported by DynamoDB,
    /// or estimated from the items' sizes where a response reports none, as moto's
    /// transactions do). Failed transactions are not counted.
    pub fn consumed_wcu(&self) -> f64 {
        self.consumed_wcu.lock().map(|c| *c).unwrap_or(0.0)
    }

    fn add_wcu(&self, units: f64) {
        if let Ok(mut c) = self.consumed_wcu.lock() {
            *c += units;
        }
    }

    /// Runs a transaction; `Ok(Err(reasons))` when it was cancelled (condition failures).
    async fn transact(
        &self,
        action_on: &str,
        items: Vec<TransactWriteItem>,
    ) -> Result<Result<(), Vec<CancellationReason>>, Error> {
        // What AWS would charge, for responses that report nothing (moto's).
        let estimate: f64 = items.iter().map(transactional_wcu).sum();
        let sent = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match sent {
            Ok(out) => {
                let reported = out.consumed_capacity();
                self.add_wcu(if reported.is_empty() {
                    estimate
                } else {
                    reported.iter().filter_map(capacity_units).sum()
                });
                Ok(Ok(()))
            }
            Err(e) => {
                let reasons = match e.as_service_error() {
                    Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                        c.cancellation_reasons().to_vec()
                    }
                    _ => return Err(sdk_error(BACKEND, "TransactWriteItems", action_on, e)),
                };
                let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
                // Anything but condition failures (a concurrent transaction, throttling,
                // validation) is an error of its own; condition failures are the caller's.
                if let Some(code) = codes
                    .iter()
                    .find(|c| !matches!(**c, "None" | "ConditionalCheckFailed"))
                {
                    let message = format!(
                        "TransactWriteItems on {action_on} was cancelled: {}",
                        codes.join(", ")
                    );
                    return Err(
                        if matches!(
                            *code,
                            "TransactionConflict"
                                | "ThrottlingError"
                                | "ProvisionedThroughputExceeded"
                                | "RequestLimitExceeded"
                        ) {
                            Error::Unavailable {
                                backend: BACKEND,
                                message,
                            }
                        } else {
                            Error::Invalid(message)
                        },
                    );
                }
                Ok(Err(reasons))
            }
        }
    }

    async fn get_item(&self, table: &str, key: Item, what: &str) -> Result<Option<Item>, Error> {
        let out = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "GetItem", &format!("{what} in table {table}"), e))?;
        Ok(out.item)
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
                    return Err(Error::Unavailable {
                        backend: BACKEND,
                        message: format!(
                            "BatchGetItem on table {} left keys unprocessed 8 times",
                            self.workflows
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
            }
        }
        Ok(out)
    }

    /// The stored tenant item of `id`.
    async fn tenant_item(&self, id: &str) -> Result<Option<Item>, Error> {
        self.get_item(
            &self.tenants,
            Item::from([("pk".to_owned(), s(format!("tenant#{id}")))]),
            &format!("tenant {id}"),
        )
        .await
    }
}

impl Store for DynamoStore {
    async fn workflow(
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
            Error::Invalid(format!(
                "the item of {key} in table {} has no record",
                self.workflows
            ))
        })?;
        workflows::decode(bytes)
            .map(Some)
            .map_err(|source| Error::Corrupt {
                what: format!("record of {key}"),
                source,
            })
    }

    async fn write(&self, write: RecordWrite) -> Result<(), WriteError> {
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
        Err(WriteError::Store(Error::Invalid(format!(
            "history entry {} of {key} exists although the record is at version {}: the \
             tables {} and {} disagree",
            write.version, write.expected_version, self.workflows, self.history
        ))))
    }

    async fn mark_corrupt(&self, key: &WorkflowKey, reason: &str) -> Result<(), Error> {
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

    async fn workflows(
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

    async fn history(
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

    async fn history_of_event(
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

    async fn put_tenant(&self, tenant: &Tenant, create_only: bool) -> Result<(), Error> {
        let id = tenant.id.as_str();
        let (infra, app) = (tenant.infra_project, tenant.app_project);
        if infra == app {
            return Err(Error::Invalid(format!(
                "tenant {id}: the infra and app repositories must be different GitLab projects (both are {infra})"
            )));
        }
        let old = self.tenant_item(id).await?;
        if create_only && old.is_some() {
            return Err(Error::AlreadyExists(format!("tenant {id}")));
        }
        let old_projects: Vec<u64> = old
            .as_ref()
            .map(|o| {
                ["infra_project", "app_project"]
                    .into_iter()
                    .filter_map(|a| num(o, a))
                    .collect()
            })
            .unwrap_or_default();
        let record = utf8(workflows::encode(tenant), &format!("tenant {id}"))?;
        let mut put = Put::builder()
            .table_name(&self.tenants)
            .item("pk", s(format!("tenant#{id}")))
            .item("record", s(record))
            .item("infra_project", n(infra))
            .item("app_project", n(app));
        put = match &old {
            None => put
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", "pk"),
            // Replace only what was read, so the pointers deleted below are still its own.
            Some(o) => put
                .condition_expression("#i = :i AND #a = :a")
                .expression_attribute_names("#i", "infra_project")
                .expression_attribute_names("#a", "app_project")
                .expression_attribute_values(":i", o.get("infra_project").cloned().unwrap_or(n(0)))
                .expression_attribute_values(":a", o.get("app_project").cloned().unwrap_or(n(0))),
        };
        let mut items = vec![
            TransactWriteItem::builder()
                .put(put.build().map_err(build_error)?)
                .build(),
        ];
        for project in [infra, app] {
            let pointer = Put::builder()
                .table_name(&self.tenants)
                .item("pk", s(format!("project#{project}")))
                .item("tenant_id", s(id))
                .condition_expression("attribute_not_exists(#pk) OR #t = :id")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#t", "tenant_id")
                .expression_attribute_values(":id", s(id))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(pointer).build());
        }
        for project in old_projects.iter().filter(|p| **p != infra && **p != app) {
            let delete = Delete::builder()
                .table_name(&self.tenants)
                .key("pk", s(format!("project#{project}")))
                .condition_expression("attribute_not_exists(#pk) OR #t = :id")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#t", "tenant_id")
                .expression_attribute_values(":id", s(id))
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        let reasons = match self
            .transact(&format!("tenant {id} (table {})", self.tenants), items)
            .await?
        {
            Ok(()) => return Ok(()),
            Err(reasons) => reasons,
        };
        if failed(&reasons, 0) {
            return Err(if create_only {
                Error::AlreadyExists(format!("tenant {id}"))
            } else {
                Error::Unavailable {
                    backend: BACKEND,
                    message: format!("tenant {id} changed while it was being written; try again"),
                }
            });
        }
        for (i, project) in [(1, infra), (2, app)] {
            if failed(&reasons, i) {
                let other = reasons
                    .get(i)
                    .and_then(CancellationReason::item)
                    .and_then(|o| text(o, "tenant_id"))
                    .unwrap_or("another tenant");
                return Err(Error::AlreadyExists(format!(
                    "GitLab project {project} (of tenant {other})"
                )));
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "a project pointer of tenant {id} changed while it was being written; try again"
            ),
        })
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        let item = self.tenant_item(id.as_str()).await?;
        item.map(|i| tenant_of(&i)).transpose()
    }

    async fn tenant_by_project(&self, project: u64) -> Result<Option<Tenant>, Error> {
        let pointer = self
            .get_item(
                &self.tenants,
                Item::from([("pk".to_owned(), s(format!("project#{project}")))]),
                &format!("GitLab project {project}"),
            )
            .await?;
        let Some(id) = pointer.as_ref().and_then(|p| text(p, "tenant_id")) else {
            return Ok(None);
        };
        let Some(item) = self.tenant_item(id).await? else {
            return Ok(None);
        };
        let tenant = tenant_of(&item)?;
        // A pointer is only ever written with its tenant; check all the same.
        Ok((tenant.infra_project == project || tenant.app_project == project).then_some(tenant))
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, Error> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.tenants)
                .set_limit(self.page_size)
                .filter_expression("begins_with(#pk, :prefix)")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":prefix", s("tenant#"))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error(BACKEND, "Scan", &format!("table {}", self.tenants), e))?;
            for item in page.items() {
                out.push(tenant_of(item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Ok(out)
    }

    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        let item = |slot: String| {
            Put::builder()
                .table_name(&self.allocations)
                .item("pool", s(pool))
                .item("slot", s(slot))
                .item("value", n(value))
                .item("owner", s(owner))
                .condition_expression("attribute_not_exists(#p)")
                .expression_attribute_names("#p", "pool")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .put(item(value_slot(value))?)
                .build(),
            TransactWriteItem::builder()
                .put(item(owner_slot(owner))?)
                .build(),
        ];
        let what = format!("value {value} of pool {pool} (table {})", self.allocations);
        let reasons = match self.transact(&what, items).await? {
            Ok(()) => return Ok(true),
            Err(reasons) => reasons,
        };
        if failed(&reasons, 0) {
            let holder = match reasons.first().and_then(CancellationReason::item) {
                Some(old) => text(old, "owner").map(str::to_owned),
                None => self
                    .get_item(
                        &self.allocations,
                        allocation_key(pool, value_slot(value)),
                        &what,
                    )
                    .await?
                    .as_ref()
                    .and_then(|i| text(i, "owner"))
                    .map(str::to_owned),
            };
            return Ok(holder.as_deref() == Some(owner));
        }
        // The value is free but the owner holds another value of the pool.
        Ok(false)
    }

    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        let delete = |slot: String, condition: &str, placeholder: &str, attribute: &str, v| {
            Delete::builder()
                .table_name(&self.allocations)
                .set_key(Some(allocation_key(pool, slot)))
                .condition_expression(condition)
                .expression_attribute_names(placeholder, attribute)
                .expression_attribute_values(":x", v)
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .delete(delete(
                    value_slot(value),
                    "#o = :x",
                    "#o",
                    "owner",
                    s(owner),
                )?)
                .build(),
            TransactWriteItem::builder()
                .delete(delete(
                    owner_slot(owner),
                    "#v = :x",
                    "#v",
                    "value",
                    n(value),
                )?)
                .build(),
        ];
        match self
            .transact(&format!("value {value} of pool {pool}"), items)
            .await?
        {
            Ok(()) => Ok(()),
            // Not held by `owner`: nothing to release.
            Err(_) => Ok(()),
        }
    }

    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        let item = self
            .get_item(
                &self.allocations,
                allocation_key(pool, owner_slot(owner)),
                &format!("allocation of {owner} in pool {pool}"),
            )
            .await?;
        Ok(item.as_ref().and_then(|i| num(i, "value")))
    }

    async fn acquire_slot(
        &self,
        kind: &str,
        key: &WorkflowKey,
        holder: &str,
        cap: u32,
        ttl: Duration,
        wake: &[u8],
    ) -> Result<(SlotGrant, Woken), Error> {
        let pool = slot_pool(kind);
        let span = SlotSpan::new(&pool, cap, self.clock.now(), ttl);
        let (now, expires) = (span.now, span.expires);
        let tenant = key.tenant.as_str();

        let mut leases = self.live_leases(&span).await?;
        if let Some(mine) = leases.iter().find(|l| l.holder == holder) {
            let since = mine.since;
            if self
                .renew_slot_item(&pool, format!("lease#{holder}"), expires, None)
                .await?
            {
                let woken = self.promote(&span, leases.len()).await?;
                return Ok((
                    SlotGrant::Held {
                        since: Timestamp::from_unix_millis(since),
                    },
                    woken.into_iter().map(|(_, w)| w).collect(),
                ));
            }
            // Dropped meanwhile by another worker (it lapsed): ask like a newcomer.
            leases.retain(|l| l.holder != holder);
        }

        // Our place in line: the tenant's waiters share a prefix, so one query finds ours and
        // counts the tenant's others (for the round).
        let mut tenant_waiting = 0;
        let mut place = None;
        for item in self
            .slot_items(&pool, &format!("wait#{tenant}#"), None)
            .await?
        {
            let waiter = SlotItem::of(&item)?;
            if waiter.expires <= now {
                self.drop_waiter(&pool, &waiter).await?;
            } else if waiter.holder == holder {
                place = Some(waiter);
            } else {
                tenant_waiting += 1;
            }
        }
        let line = match place.and_then(|w| w.line) {
            Some(line) => {
                self.renew_slot_item(&pool, format!("wait#{holder}"), expires, None)
                    .await?;
                self.renew_slot_item(&pool, line.clone(), expires, Some(wake))
                    .await?;
                line
            }
            None => {
                let round = leases.iter().filter(|l| l.tenant == tenant).count() + tenant_waiting;
                let line = format!("line#{round:04}#{now:020}#{holder}");
                self.join_line(&pool, holder, tenant, &line, &span, wake)
                    .await?;
                line
            }
        };

        let mut woken = Vec::new();
        let mut mine = false;
        for (h, w) in self.promote(&span, leases.len()).await? {
            if h == holder {
                mine = true;
            } else {
                woken.push(w);
            }
        }
        let grant = if mine {
            SlotGrant::Held {
                since: Timestamp::from_unix_millis(now),
            }
        } else {
            SlotGrant::Waiting {
                ahead: self.count_ahead(&pool, &line).await?,
            }
        };
        Ok((grant, woken))
    }

    async fn release_slot(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<Woken, Error> {
        let pool = slot_pool(kind);
        let span = SlotSpan::new(&pool, cap, self.clock.now(), ttl);
        let items = vec![
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(&pool, format!("lease#{holder}"))))
                        .condition_expression("attribute_exists(#s)")
                        .expression_attribute_names("#s", "slot")
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            count_change(&self.allocations, &pool, -1, None)?,
        ];
        // Cancelled: it held no lease (perhaps it only waited).
        let _ = self
            .transact(&format!("lease of {holder} in {pool}"), items)
            .await?;
        let pointer = self
            .get_item(
                &self.allocations,
                allocation_key(&pool, format!("wait#{holder}")),
                &format!("place of {holder} in {pool}"),
            )
            .await?;
        if let Some(item) = pointer {
            self.drop_waiter(&pool, &SlotItem::of(&item)?).await?;
        }
        let held = self.live_leases(&span).await?.len();
        Ok(self
            .promote(&span, held)
            .await?
            .into_iter()
            .map(|(_, w)| w)
            .collect())
    }

    async fn slots(&self, kind: &str) -> Result<SlotsView, Error> {
        let pool = slot_pool(kind);
        let now = self.clock.now().as_unix_millis();
        let entries = |items: Vec<Item>| -> Result<Vec<SlotEntry>, Error> {
            let mut out = Vec::new();
            for item in items {
                let e = SlotItem::of(&item)?;
                if e.expires > now {
                    out.push(SlotEntry {
                        holder: e.holder,
                        tenant: TenantId::new(e.tenant)
                            .map_err(|e| Error::Invalid(format!("slot tenant: {e}")))?,
                        since: Timestamp::from_unix_millis(e.since),
                        expires_at: Timestamp::from_unix_millis(e.expires),
                    });
                }
            }
            Ok(out)
        };
        let mut held = entries(self.slot_items(&pool, "lease#", None).await?)?;
        held.sort_by(|a, b| (a.since, &a.holder).cmp(&(b.since, &b.holder)));
        Ok(SlotsView {
            held,
            waiting: entries(self.slot_items(&pool, "line#", None).await?)?,
        })
    }
}

/// A lease, a place in line, or its pointer, as stored.
struct SlotItem {
    holder: String,
    tenant: String,
    since: i64,
    expires: i64,
    /// The sort key of the place in line (pointers and line items).
    line: Option<String>,
    /// The message that resumes a waiter (line items).
    wake: Option<Vec<u8>>,
}

impl SlotItem {
    fn of(item: &Item) -> Result<Self, Error> {
        let field = |name: &str| {
            Error::Invalid(format!(
                "a slot item has no {name}: {:?}",
                text(item, "slot")
            ))
        };
        Ok(Self {
            holder: text(item, "holder")
                .ok_or_else(|| field("holder"))?
                .to_owned(),
            tenant: text(item, "tenant")
                .ok_or_else(|| field("tenant"))?
                .to_owned(),
            since: num(item, "since").ok_or_else(|| field("since"))?,
            expires: num(item, "expires").ok_or_else(|| field("expires"))?,
            line: text(item, "line").map(str::to_owned),
            wake: item
                .get("wake")
                .and_then(|v| v.as_b().ok())
                .map(|b| b.as_ref().to_vec()),
        })
    }
}

/// The pool, cap and times of one slot request.
struct SlotSpan<'a> {
    pool: &'a str,
    cap: u32,
    now: i64,
    /// Of leases granted now.
    expires: i64,
}

impl<'a> SlotSpan<'a> {
    fn new(pool: &'a str, cap: u32, now: Timestamp, ttl: Duration) -> Self {
        let now = now.as_unix_millis();
        Self {
            pool,
            cap,
            now,
            expires: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4)),
        }
    }
}

fn slot_pool(kind: &str) -> String {
    format!("slots#{kind}")
}

/// `ADD held :delta` on the pool's counter item; with `cap`, only while it is under the cap.
fn count_change(
    table: &str,
    pool: &str,
    delta: i64,
    cap: Option<u32>,
) -> Result<TransactWriteItem, Error> {
    let mut update = Update::builder()
        .table_name(table)
        .set_key(Some(allocation_key(pool, "count".to_owned())))
        .update_expression("ADD #h :d")
        .expression_attribute_names("#h", "held")
        .expression_attribute_values(":d", n(delta));
    if let Some(cap) = cap {
        update = update
            .condition_expression("attribute_not_exists(#h) OR #h < :cap")
            .expression_attribute_values(":cap", n(cap));
    }
    Ok(TransactWriteItem::builder()
        .update(update.build().map_err(build_error)?)
        .build())
}

impl DynamoStore {
    /// The items of `pool` whose sort key starts with `prefix`, in order; with `first`, at
    /// most that many.
    async fn slot_items(
        &self,
        pool: &str,
        prefix: &str,
        first: Option<usize>,
    ) -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let query = self
                .client
                .query()
                .table_name(&self.allocations)
                .expression_attribute_names("#p", "pool")
                .expression_attribute_names("#s", "slot")
                .expression_attribute_values(":p", s(pool))
                .expression_attribute_values(":lo", s(prefix))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            let query = query.key_condition_expression("#p = :p AND begins_with(#s, :lo)");
            let query = match first {
                Some(limit) => query.limit(clamp_i32(limit - out.len())),
                None => query,
            };
            let page = query.send().await.map_err(|e| {
                sdk_error(
                    BACKEND,
                    "Query",
                    &format!("{prefix} items of {pool} in table {}", self.allocations),
                    e,
                )
            })?;
            out.extend(page.items().iter().cloned());
            if first.is_some_and(|limit| out.len() >= limit) {
                break;
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The leases of the pool that have not lapsed; lapsed ones are dropped.
    async fn live_leases(&self, span: &SlotSpan<'_>) -> Result<Vec<SlotItem>, Error> {
        let mut leases = Vec::new();
        for item in self.slot_items(span.pool, "lease#", None).await? {
            let lease = SlotItem::of(&item)?;
            if lease.expires <= span.now {
                self.drop_lease(span.pool, &lease).await?;
            } else {
                leases.push(lease);
            }
        }
        Ok(leases)
    }

    /// Grants the slots free beside `held` leases to the head of the line; returns the
    /// holders granted and their wake messages.
    async fn promote(
        &self,
        span: &SlotSpan<'_>,
        held: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let free = (span.cap as usize).saturating_sub(held);
        if free == 0 {
            return Ok(Vec::new());
        }
        let mut woken = Vec::new();
        for item in self.slot_items(span.pool, "line#", Some(free)).await? {
            let waiter = SlotItem::of(&item)?;
            if waiter.expires <= span.now {
                self.drop_waiter(span.pool, &waiter).await?;
                continue;
            }
            let line = waiter.line.clone().unwrap_or_default();
            if !self
                .grant(span, &waiter.holder, &waiter.tenant, &line)
                .await?
            {
                // The cap was reached meanwhile (another worker granted it).
                break;
            }
            woken.push((waiter.holder, waiter.wake.unwrap_or_default()));
        }
        Ok(woken)
    }

    /// Waiters before the place `line` (at most a thousand are counted).
    async fn count_ahead(&self, pool: &str, line: &str) -> Result<u64, Error> {
        let out = self
            .client
            .query()
            .table_name(&self.allocations)
            .key_condition_expression("#p = :p AND #s BETWEEN :lo AND :hi")
            .expression_attribute_names("#p", "pool")
            .expression_attribute_names("#s", "slot")
            .expression_attribute_values(":p", s(pool))
            .expression_attribute_values(":lo", s("line#"))
            .expression_attribute_values(":hi", s(line))
            .select(Select::Count)
            .limit(1001)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "Query", &format!("line of {pool}"), e))?;
        // The range includes our own place.
        Ok(u64::try_from(out.count).unwrap_or(0).saturating_sub(1))
    }

    /// Sets `expires` of an existing item; false when it is gone.
    async fn renew_slot_item(
        &self,
        pool: &str,
        slot: String,
        expires: i64,
        wake: Option<&[u8]>,
    ) -> Result<bool, Error> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.allocations)
            .set_key(Some(allocation_key(pool, slot.clone())))
            .condition_expression("attribute_exists(#s)")
            .expression_attribute_names("#e", "expires")
            .expression_attribute_names("#s", "slot")
            .expression_attribute_values(":e", n(expires));
        let sent = match wake {
            Some(w) => sent
                .update_expression("SET #e = :e, #w = :w")
                .expression_attribute_names("#w", "wake")
                .expression_attribute_values(":w", AttributeValue::B(Blob::new(w.to_vec()))),
            None => sent.update_expression("SET #e = :e"),
        }
        .send()
        .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(
                BACKEND,
                "UpdateItem",
                &format!("{slot} of {pool}"),
                e,
            )),
        }
    }

    async fn join_line(
        &self,
        pool: &str,
        holder: &str,
        tenant: &str,
        line: &str,
        span: &SlotSpan<'_>,
        wake: &[u8],
    ) -> Result<(), Error> {
        let (now, expires) = (span.now, span.expires);
        let put = |slot: String| {
            let put = Put::builder();
            let put = if slot == line {
                put.item("wake", AttributeValue::B(Blob::new(wake.to_vec())))
            } else {
                put
            };
            put.table_name(&self.allocations)
                .item("pool", s(pool))
                .item("slot", s(slot))
                .item("holder", s(holder))
                .item("tenant", s(tenant))
                .item("line", s(line))
                .item("since", n(now))
                .item("expires", n(expires))
                // One place per holder: a second worker asking for it at the same moment
                // (a duplicate message) leaves it to the first.
                .condition_expression("attribute_not_exists(#s)")
                .expression_attribute_names("#s", "slot")
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .put(put(format!("wait#{holder}"))?)
                .build(),
            TransactWriteItem::builder()
                .put(put(line.to_owned())?)
                .build(),
        ];
        let _ = self.transact(&format!("line of {pool}"), items).await?;
        Ok(())
    }

    /// Takes a slot for `holder`: counter under the cap, lease created, place in line left,
    /// in one transaction. False when the cap was reached meanwhile.
    async fn grant(
        &self,
        span: &SlotSpan<'_>,
        holder: &str,
        tenant: &str,
        line: &str,
    ) -> Result<bool, Error> {
        let (pool, cap, now, expires) = (span.pool, span.cap, span.now, span.expires);
        let delete = |slot: String| -> Result<TransactWriteItem, Error> {
            Ok(TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(pool, slot)))
                        .build()
                        .map_err(build_error)?,
                )
                .build())
        };
        let items = vec![
            count_change(&self.allocations, pool, 1, Some(cap))?,
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.allocations)
                        .item("pool", s(pool))
                        .item("slot", s(format!("lease#{holder}")))
                        .item("holder", s(holder))
                        .item("tenant", s(tenant))
                        .item("since", n(now))
                        .item("expires", n(expires))
                        .condition_expression("attribute_not_exists(#s)")
                        .expression_attribute_names("#s", "slot")
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            delete(line.to_owned())?,
            delete(format!("wait#{holder}"))?,
        ];
        Ok(self
            .transact(&format!("slot of {holder} in {pool}"), items)
            .await?
            .is_ok())
    }

    /// Deletes a lapsed lease and gives its slot back, unless it was renewed meanwhile.
    async fn drop_lease(&self, pool: &str, lease: &SlotItem) -> Result<(), Error> {
        let items = vec![
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(
                            pool,
                            format!("lease#{}", lease.holder),
                        )))
                        .condition_expression("#e = :e")
                        .expression_attribute_names("#e", "expires")
                        .expression_attribute_values(":e", n(lease.expires))
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            count_change(&self.allocations, pool, -1, None)?,
        ];
        let _ = self
            .transact(
                &format!("lapsed lease of {} in {pool}", lease.holder),
                items,
            )
            .await?;
        Ok(())
    }

    /// Deletes a place in line and its pointer (only if the pointer still points there).
    async fn drop_waiter(&self, pool: &str, waiter: &SlotItem) -> Result<(), Error> {
        let Some(line) = &waiter.line else {
            return Ok(());
        };
        for slot in [format!("wait#{}", waiter.holder), line.clone()] {
            let sent = self
                .client
                .delete_item()
                .table_name(&self.allocations)
                .set_key(Some(allocation_key(pool, slot.clone())))
                .condition_expression("attribute_not_exists(#l) OR #l = :l")
                .expression_attribute_names("#l", "line")
                .expression_attribute_values(":l", s(line))
                .send()
                .await;
            match sent {
                Ok(_) => {}
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
                Err(e) => {
                    return Err(sdk_error(
                        BACKEND,
                        "DeleteItem",
                        &format!("{slot} of {pool}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Creates the four tables of `names` (see the [module docs](self)) unless they exist, and
/// waits until they and their indexes are active. Running it again changes nothing.
pub async fn create_tables(client: &Client, names: &Names) -> Result<(), Error> {
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build_error)
    };
    let attr = |name: &str, kind: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(kind)
            .build()
            .map_err(build_error)
    };
    let by_state = GlobalSecondaryIndex::builder()
        .index_name(BY_STATE)
        .key_schema(key("state", KeyType::Hash)?)
        .key_schema(key("key", KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::Include)
                .set_non_key_attributes(Some(
                    ["version", "updated_at", "corrupt", "tenant", "env"]
                        .map(str::to_owned)
                        .to_vec(),
                ))
                .build(),
        )
        .build()
        .map_err(build_error)?;
    let tables = [
        (
            &names.workflows_table,
            vec![
                attr("key", ScalarAttributeType::S)?,
                attr("state", ScalarAttributeType::S)?,
            ],
            vec![key("key", KeyType::Hash)?],
            Some(by_state),
        ),
        (
            &names.history_table,
            vec![
                attr("key", ScalarAttributeType::S)?,
                attr("version", ScalarAttributeType::N)?,
            ],
            vec![key("key", KeyType::Hash)?, key("version", KeyType::Range)?],
            None,
        ),
        (
            &names.tenants_table,
            vec![attr("pk", ScalarAttributeType::S)?],
            vec![key("pk", KeyType::Hash)?],
            None,
        ),
        (
            &names.allocations_table,
            vec![
                attr("pool", ScalarAttributeType::S)?,
                attr("slot", ScalarAttributeType::S)?,
            ],
            vec![key("pool", KeyType::Hash)?, key("slot", KeyType::Range)?],
            None,
        ),
    ];
    for (table, attributes, key_schema, index) in tables {
        let sent = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(attributes))
            .set_key_schema(Some(key_schema))
            .set_global_secondary_indexes(index.map(|i| vec![i]))
            .send()
            .await;
        match sent {
            Ok(_) => tracing::info!(%table, "created table"),
            Err(SdkError::ServiceError(e)) if e.err().is_resource_in_use_exception() => {
                tracing::info!(%table, "table exists already");
            }
            Err(e) => {
                return Err(sdk_error(
                    BACKEND,
                    "CreateTable",
                    &format!("table {table}"),
                    e,
                ));
            }
        }
    }
    for table in [
        &names.workflows_table,
        &names.history_table,
        &names.tenants_table,
        &names.allocations_table,
    ] {
        wait_until_active(client, table).await?;
    }
    Ok(())
}

/// Waits until `table` and its indexes are active.
async fn wait_until_active(client: &Client, table: &str) -> Result<(), Error> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "DescribeTable", &format!("table {table}"), e))?;
        let active = out.table().is_some_and(|t| {
            t.table_status() == Some(&TableStatus::Active)
                && t.global_secondary_indexes()
                    .iter()
                    .all(|i| i.index_status() == Some(&IndexStatus::Active))
        });
        if active {
            return Ok(());
        }
        if started.elapsed() > ACTIVE_TIMEOUT {
            return Err(Error::Unavailable {
                backend: BACKEND,
                message: format!(
                    "table {table} is not active after {}s",
                    ACTIVE_TIMEOUT.as_secs()
                ),
            });
        }
        tracing::debug!(%table, "waiting for the table to become active");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)?.as_s().ok().map(String::as_str)
}

fn num<T: FromStr>(item: &Item, name: &str) -> Option<T> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

/// The JSON bytes of a string attribute (or a binary one, should an item carry that).
fn bytes_of<'a>(item: &'a Item, name: &str) -> Option<&'a [u8]> {
    match item.get(name)? {
        AttributeValue::S(v) => Some(v.as_bytes()),
        AttributeValue::B(v) => Some(v.as_ref()),
        _ => None,
    }
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, Error> {
    String::from_utf8(bytes).map_err(|e| Error::Invalid(format!("{what} is not UTF-8 JSON: {e}")))
}

fn build_error(e: BuildError) -> Error {
    Error::Invalid(format!("a DynamoDB request could not be built: {e}"))
}

fn clamp_i32(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX).max(1)
}

/// Whether the `i`-th operation of a cancelled transaction failed its condition.
fn failed(reasons: &[CancellationReason], i: usize) -> bool {
    reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
}

fn value_slot(value: u64) -> String {
    format!("value#{value:020}")
}

fn owner_slot(owner: &str) -> String {
    format!("owner#{owner}")
}

fn allocation_key(pool: &str, slot: String) -> Item {
    Item::from([("pool".to_owned(), s(pool)), ("slot".to_owned(), s(slot))])
}

fn parse_state(v: &str) -> Option<State> {
    State::ALL.into_iter().find(|st| st.as_str() == v)
}

/// A listing's summary of a workflows item (or its index projection).
fn summary(item: &Item) -> Result<WorkflowSummary, Error> {
    let bad = |what: &str| {
        Error::Invalid(format!(
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

fn entry_of(key: &str, item: &Item) -> Result<HistoryEntry, Error> {
    let bytes = bytes_of(item, "entry")
        .ok_or_else(|| Error::Invalid(format!("a history item of {key} has no entry attribute")))?;
    workflows::decode(bytes).map_err(|source| Error::Corrupt {
        what: format!("history entry of {key}"),
        source,
    })
}

fn tenant_of(item: &Item) -> Result<Tenant, Error> {
    let pk = text(item, "pk").unwrap_or("a tenant item");
    let bytes = bytes_of(item, "record")
        .ok_or_else(|| Error::Invalid(format!("{pk} has no record attribute")))?;
    workflows::decode(bytes).map_err(|source| Error::Corrupt {
        what: format!("tenant record {pk}"),
        source,
    })
}

fn capacity_units(c: &ConsumedCapacity) -> Option<f64> {
    c.capacity_units().or(c.write_capacity_units())
}

/// What AWS charges for one item of a transactional write: two units per started KiB.
fn transactional_wcu(item: &TransactWriteItem) -> f64 {
    let size = if let Some(put) = item.put() {
        item_size(put.item())
    } else if let Some(delete) = item.delete() {
        item_size(delete.key())
    } else if let Some(update) = item.update() {
        item_size(update.key())
    } else {
        0
    };
    // Sizes are far below 2^52: the conversion is exact.
    2.0 * size.div_ceil(1024).max(1) as f64
}

/// An item's size as DynamoDB counts it: names plus values (numbers about a byte per two
/// digits).
fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => n.len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(v) => 3 + v.iter().map(|x| 1 + value_size(x)).sum::<usize>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, x)| 1 + k.len() + value_size(x))
                .sum::<usize>()
        }
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_sizes_count_names_and_values() {
        let item = Item::from([
            ("key".to_owned(), s("acme#dev")),
            ("version".to_owned(), n(12)),
        ]);
        assert_eq!(item_size(&item), 3 + 8 + 7 + 2);
    }

    #[test]
    fn a_transactional_put_costs_two_units_per_started_kib() {
        let put = |bytes: usize| {
            let p = Put::builder()
                .table_name("t")
                .item("record", s("x".repeat(bytes)))
                .build()
                .expect("put");
            transactional_wcu(&TransactWriteItem::builder().put(p).build())
        };
        assert_eq!(put(10), 2.0);
        assert_eq!(put(1024 - 6), 2.0);
        assert_eq!(put(1024), 4.0);
    }

    #[test]
    fn value_slots_sort_numerically() {
        assert!(value_slot(9) < value_slot(10));
        assert_eq!(owner_slot("acme#dev"), "owner#acme#dev");
    }
}
