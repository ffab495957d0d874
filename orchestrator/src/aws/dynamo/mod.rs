//! The `Store` port on DynamoDB, and the tables `orchestrator init` creates
//! ([`create_tables`]).
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
//! Each table has its module, with the operations on it: [`records`] (the workflows table:
//! records, their writes and listings), [`history`], [`tenants`], [`allocations`] and [`slots`] (both in the
//! allocations table), [`tables`] (creation and the start-up check) and [`capacity`] (the
//! write units a transaction costs). Each describes how it uses its table.
//!
//! Every listing follows `LastEvaluatedKey` until it has `limit` items or there are no more
//! (a page is DynamoDB's 1 MB unless [`DynamoStore::with_page_size`] bounds it).
//!
//! moto (the local AWS the tests run on) returns no consumed capacity for
//! `TransactWriteItems`; when a response carries none, the sum counts what AWS would charge
//! (two write units per started KiB of each item, estimated from the item's size).
mod allocations;
mod capacity;
mod history;
mod records;
mod slots;
mod tables;
mod tenants;

pub use tables::create_tables;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, ReturnConsumedCapacity, TransactWriteItem,
};
use aws_smithy_types::error::operation::BuildError;
use workflows::{Domain, EventId, HistoryEntry, Tenant, TenantId, WorkflowKey, WorkflowRecord};

use super::{Names, RequestCounter, sdk_error};
use crate::clock::{SharedClock, SystemClock};
use crate::ports::{
    Error, RecordWrite, SlotGrant, SlotsView, Store, Woken, WorkflowFilter, WorkflowSummary,
    WriteError,
};
use capacity::{capacity_units, transactional_wcu};

/// The backend name in errors.
const BACKEND: &str = "dynamodb";

/// The index of the workflows table by state.
pub const BY_STATE: &str = "by_state";

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
        tables::check_tables(&store).await?;
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
                            Error::unavailable(BACKEND, message)
                        } else {
                            Error::invalid(message)
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
}

impl Store for DynamoStore {
    async fn workflow(&self, key: &WorkflowKey) -> Result<Option<WorkflowRecord>, Error> {
        self.read_record(key).await
    }
    async fn write(&self, write: RecordWrite) -> Result<(), WriteError> {
        self.write_record(write).await
    }
    async fn mark_corrupt(&self, key: &WorkflowKey, reason: &str) -> Result<(), Error> {
        self.mark_record_corrupt(key, reason).await
    }
    async fn workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&WorkflowKey>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        self.list_workflows(filter, after, limit).await
    }
    async fn history(
        &self,
        key: &WorkflowKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Error> {
        self.read_history(key, after, limit).await
    }
    async fn history_of_event(
        &self,
        key: &WorkflowKey,
        id: &EventId,
    ) -> Result<Option<HistoryEntry>, Error> {
        self.find_event(key, id).await
    }
    async fn put_tenant(&self, tenant: &Tenant, create_only: bool) -> Result<(), Error> {
        self.write_tenant(tenant, create_only, None).await
    }
    async fn update_tenant(&self, read: &Tenant, tenant: &Tenant) -> Result<(), Error> {
        if read.id != tenant.id {
            return Err(Error::invalid(format!(
                "tenant {} cannot replace tenant {}",
                tenant.id, read.id
            )));
        }
        self.write_tenant(tenant, false, Some(read)).await
    }
    async fn remove_tenant(&self, read: &Tenant) -> Result<(), Error> {
        self.delete_tenant(read).await
    }
    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        self.read_tenant(id).await
    }
    async fn tenant_by_project(&self, project: u64) -> Result<Option<Tenant>, Error> {
        self.read_tenant_by_project(project).await
    }
    async fn tenant_by_domain(&self, domain: &Domain) -> Result<Option<Tenant>, Error> {
        self.read_tenant_by_domain(domain).await
    }
    async fn tenants(&self) -> Result<Vec<Tenant>, Error> {
        self.read_tenants().await
    }
    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        self.allocate_value(pool, value, owner).await
    }
    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        self.release_value(pool, value, owner).await
    }
    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        self.read_allocation(pool, owner).await
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
        self.acquire_lease(kind, key, holder, cap, ttl, wake).await
    }
    async fn release_slot(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<Woken, Error> {
        self.release_lease(kind, holder, cap, ttl).await
    }
    async fn slots(&self, kind: &str) -> Result<SlotsView, Error> {
        self.read_slots(kind).await
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
    String::from_utf8(bytes).map_err(|e| Error::invalid(format!("{what} is not UTF-8 JSON: {e}")))
}

fn build_error(e: BuildError) -> Error {
    Error::invalid(format!("a DynamoDB request could not be built: {e}"))
}

fn clamp_i32(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX).max(1)
}

/// Whether the `i`-th operation of a cancelled transaction failed its condition.
fn failed(reasons: &[CancellationReason], i: usize) -> bool {
    reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
}
