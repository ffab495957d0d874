//! The `Store` port: workflow records with their history, tenants, allocations, and the leased
//! slots that cap concurrent activities of a kind across every worker.
//!
//! Records are written only by the engine, with one conditional write per transition: the
//! record at version `v + 1` together with its history entry, accepted only over version `v`.
//! Everything else here is read by `wfctl` and the ingress.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use workflows::{
    Domain, Environment, EventId, HistoryEntry, State, Tenant, TenantId, Timestamp, WorkflowKey,
    WorkflowRecord,
};

use super::Error;

/// A record write: the new record and its history entry, conditional on the previous version.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// The workflow.
    pub key: WorkflowKey,
    /// The version the stored record must have (0: it must not exist yet).
    pub expected_version: u64,
    /// The new version (`expected_version + 1`).
    pub version: u64,
    /// The new state, kept beside the record for listing by status.
    pub state: State,
    /// When the record changed.
    pub updated_at: Timestamp,
    /// The encoded record.
    pub record: Vec<u8>,
    /// The history entry's event id, for finding an applied event's commands again.
    pub event_id: EventId,
    /// The encoded history entry.
    pub history: Vec<u8>,
}

impl RecordWrite {
    /// The write of `record` (already applied, so at its new version) with `entry`.
    pub fn new(record: &WorkflowRecord, entry: &HistoryEntry) -> Self {
        Self {
            key: record.key.clone(),
            expected_version: record.version.saturating_sub(1),
            version: record.version,
            state: record.state(),
            updated_at: record.updated_at,
            record: workflows::encode(record),
            event_id: entry.event.id(),
            history: workflows::encode(entry),
        }
    }
}

/// Why a conditional write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The stored version is not the expected one: another writer was first.
    #[error("version conflict on {key}: expected {expected}, found {found}")]
    Conflict {
        /// The workflow.
        key: WorkflowKey,
        /// The version the write expected.
        expected: u64,
        /// The version stored (0: none).
        found: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

impl WriteError {
    /// Conflicts are resolved by reloading and re-applying; store failures by the error's rule.
    pub fn is_retryable(&self) -> bool {
        match self {
            WriteError::Conflict { .. } => true,
            WriteError::Store(e) => e.is_retryable(),
        }
    }
}

/// A workflow as listed: enough for a table, without decoding the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowSummary {
    /// The workflow.
    pub key: WorkflowKey,
    /// Its state as of its last write.
    pub state: State,
    /// Its record version.
    pub version: u64,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Why the engine stopped it, when its record does not decode.
    pub corrupt: Option<String>,
}

/// Which workflows to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkflowFilter {
    /// Only in this state.
    pub state: Option<State>,
    /// Only of this environment.
    pub env: Option<Environment>,
    /// Only of this tenant.
    pub tenant: Option<TenantId>,
    /// Only those not changed since this instant (for `--stuck`).
    pub updated_before: Option<Timestamp>,
}

/// The answer to a slot request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotGrant {
    /// The holder has a slot, leased until it is released or not renewed in time.
    Held {
        /// When the slot was granted (earlier than now when the lease was renewed).
        since: Timestamp,
    },
    /// Every slot is taken, or others wait before this holder; it is in line now.
    Waiting {
        /// Waiters served before this one (a lower bound on the AWS backend, which counts at
        /// most a thousand).
        ahead: u64,
    },
}

/// The `wake` messages of waiters just granted a slot, for the caller to send.
pub type Woken = Vec<Vec<u8>>;

/// A holder of, or a waiter for, a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotEntry {
    /// Who holds or waits (`<workflow key>/<run>`).
    pub holder: String,
    /// Its tenant.
    pub tenant: TenantId,
    /// When it was granted the slot, or started waiting.
    pub since: Timestamp,
    /// When the lease (or the place in line) lapses unless renewed.
    pub expires_at: Timestamp,
}

/// The slots of one kind: holders, and waiters in the order they will be served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SlotsView {
    /// Current leases.
    pub held: Vec<SlotEntry>,
    /// Waiters, next served first.
    pub waiting: Vec<SlotEntry>,
}

/// The store.
pub trait Store: Send + Sync + 'static {
    /// The record of `key`, if any. A record that does not decode is `Error::Corrupt`.
    fn workflow(
        &self,
        key: &WorkflowKey,
    ) -> impl Future<Output = Result<Option<WorkflowRecord>, Error>> + Send;

    /// Writes a record and its history entry as one atomic, conditional step.
    fn write(&self, write: RecordWrite) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Marks the workflow as stopped because its record does not decode (`reason`), so that
    /// listings show it; the record itself is left as it is for an operator to inspect.
    fn mark_corrupt(
        &self,
        key: &WorkflowKey,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Up to `limit` workflows matching `filter`, ordered by key, after `after`.
    fn workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&WorkflowKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<WorkflowSummary>, Error>> + Send;

    /// History entries of `key` with versions after `after_version`, oldest first, at most
    /// `limit`.
    fn history(
        &self,
        key: &WorkflowKey,
        after_version: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, Error>> + Send;

    /// The history entry that applied `event_id` to `key`, if any.
    fn history_of_event(
        &self,
        key: &WorkflowKey,
        event_id: &EventId,
    ) -> impl Future<Output = Result<Option<HistoryEntry>, Error>> + Send;

    /// Creates or replaces a tenant. A GitLab project and a domain belong to one tenant: one
    /// held by another tenant is `Error::AlreadyExists` naming that tenant, and nothing is
    /// written. With `create_only`, an existing tenant with that id is `Error::AlreadyExists`
    /// too. A tenant that changes its domain frees the old one.
    fn put_tenant(
        &self,
        tenant: &Tenant,
        create_only: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Replaces `read`, the tenant as the caller read it, with `tenant` (the same id), under
    /// the rules of [`Store::put_tenant`]. If the stored tenant is no longer `read` (another
    /// change came first), nothing is written and the error is a retryable
    /// `Error::Unavailable` saying so: read it again and redo the change. So two concurrent
    /// read-modify-writes never lose one of them.
    fn update_tenant(
        &self,
        read: &Tenant,
        tenant: &Tenant,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Removes `read`, the tenant as the caller read it, with its GitLab projects and domain
    /// (free for another tenant after). If the stored tenant is no longer `read`, nothing is
    /// removed and the error is the retryable `Error::Unavailable` of
    /// [`Store::update_tenant`]; a tenant already gone is no error. Its workflow records and
    /// history stay.
    fn remove_tenant(&self, read: &Tenant) -> impl Future<Output = Result<(), Error>> + Send;

    /// The tenant `id`.
    fn tenant(&self, id: &TenantId) -> impl Future<Output = Result<Option<Tenant>, Error>> + Send;

    /// The tenant owning GitLab project `project`.
    fn tenant_by_project(
        &self,
        project: u64,
    ) -> impl Future<Output = Result<Option<Tenant>, Error>> + Send;

    /// The tenant whose domain is `domain`.
    fn tenant_by_domain(
        &self,
        domain: &Domain,
    ) -> impl Future<Output = Result<Option<Tenant>, Error>> + Send;

    /// Every tenant, ordered by id.
    fn tenants(&self) -> impl Future<Output = Result<Vec<Tenant>, Error>> + Send;

    /// Takes `value` of `pool` for `owner` if it is free (or already `owner`'s). Returns
    /// whether `owner` holds it now. Two owners can never hold the same value.
    fn allocate(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Frees `value` of `pool` if `owner` holds it.
    fn release(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The value of `pool` that `owner` holds, if any.
    fn allocation_of(
        &self,
        pool: &str,
        owner: &str,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send;

    /// Asks for one of `cap` slots of `kind` for `holder` (a run of workflow `key`), or renews
    /// the lease it has, for `ttl` from now. Leases and places in line that were not renewed in
    /// time are dropped first, so a dead worker's slots come free.
    ///
    /// A holder that must wait joins the line (or keeps its place, renewed) with `wake`, the
    /// message that resumes it: whenever a slot comes free (a release, a lapsed lease), the
    /// call that finds it free grants it to the head of the line and returns the heads'
    /// `wake` messages, which the caller sends. So a waiter is woken when its turn comes and
    /// only asks again now and then, to keep its place.
    ///
    /// Waiters are served in rounds across tenants, then first come first served: a waiter
    /// whose tenant already held or awaited `n` slots of the kind when it joined the line is in
    /// round `n`, and every waiter of round `n` is served before any of round `n + 1`. So no
    /// tenant waits behind another tenant's whole backlog. At most `cap` holders exist at any
    /// moment, whichever workers ask.
    fn acquire_slot(
        &self,
        kind: &str,
        key: &WorkflowKey,
        holder: &str,
        cap: u32,
        ttl: Duration,
        wake: &[u8],
    ) -> impl Future<Output = Result<(SlotGrant, Woken), Error>> + Send;

    /// Gives up `holder`'s slot of `kind`, or its place in line, and grants what is free to
    /// the head of the line (leases of `ttl`), returning their `wake` messages. Releasing
    /// what is not held does nothing.
    fn release_slot(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> impl Future<Output = Result<Woken, Error>> + Send;

    /// The holders and waiters of `kind`'s slots whose leases have not lapsed.
    fn slots(&self, kind: &str) -> impl Future<Output = Result<SlotsView, Error>> + Send;
}
