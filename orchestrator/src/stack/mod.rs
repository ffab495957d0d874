//! Ports put together: [`Stack`], a store, a queue and a journal as one value that implements
//! all three ports (for code, and the conformance suite, that wants one backend where the AWS
//! one is three clients), and the journals composed of a separate store and queue:
//! [`Sequential`] (write, then send, then acknowledge) and [`Batched`] (the same, grouped
//! across concurrent handlers).

mod batched;
mod sequential;

pub use batched::Batched;
pub use sequential::Sequential;

use std::sync::Arc;
use std::time::Duration;

use workflows::{Domain, EventId, HistoryEntry, Tenant, TenantId, WorkflowKey, WorkflowRecord};

use crate::ports::{
    Commit, DeadLetter, Delivery, Error, Journal, Outgoing, Queue, QueueKind, QueueStats, Receipt,
    RecordWrite, SlotGrant, SlotsView, Store, Woken, WorkflowFilter, WorkflowSummary, WriteError,
};

/// The three ports of one backend.
#[derive(Debug)]
pub struct Stack<S, Q, J> {
    /// The store.
    pub store: Arc<S>,
    /// The queue.
    pub queue: Arc<Q>,
    /// The journal.
    pub journal: Arc<J>,
}

impl<S, Q, J> Clone for Stack<S, Q, J> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            queue: self.queue.clone(),
            journal: self.journal.clone(),
        }
    }
}

impl<S: Store, Q: Queue, J: Journal> Queue for Stack<S, Q, J> {
    async fn send(&self, batch: Vec<Outgoing>) -> Result<(), Error> {
        self.queue.send(batch).await
    }
    async fn receive(
        &self,
        queue: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        self.queue.receive(queue, max, visibility, wait).await
    }
    async fn ack(&self, queue: QueueKind, receipts: Vec<Receipt>) -> Result<Vec<Receipt>, Error> {
        self.queue.ack(queue, receipts).await
    }
    async fn extend(
        &self,
        queue: QueueKind,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), Error> {
        self.queue.extend(queue, receipt, visibility).await
    }
    async fn quarantine(&self, delivery: &Delivery, reason: &str) -> Result<(), Error> {
        self.queue.quarantine(delivery, reason).await
    }
    async fn dead_letters(&self, queue: QueueKind, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.queue.dead_letters(queue, limit).await
    }
    async fn redrive(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
    ) -> Result<Vec<String>, Error> {
        self.queue.redrive(queue, ids).await
    }
    async fn discard(&self, queue: QueueKind, ids: Vec<String>) -> Result<Vec<String>, Error> {
        self.queue.discard(queue, ids).await
    }
    async fn stats(&self, queue: QueueKind) -> Result<QueueStats, Error> {
        self.queue.stats(queue).await
    }
    fn system(&self) -> &'static str {
        self.queue.system()
    }
}

impl<S: Store, Q: Queue, J: Journal> Store for Stack<S, Q, J> {
    async fn workflow(&self, key: &WorkflowKey) -> Result<Option<WorkflowRecord>, Error> {
        self.store.workflow(key).await
    }
    async fn write(&self, write: RecordWrite) -> Result<(), WriteError> {
        self.store.write(write).await
    }
    async fn mark_corrupt(&self, key: &WorkflowKey, reason: &str) -> Result<(), Error> {
        self.store.mark_corrupt(key, reason).await
    }
    async fn workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&WorkflowKey>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        self.store.workflows(filter, after, limit).await
    }
    async fn history(
        &self,
        key: &WorkflowKey,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Error> {
        self.store.history(key, after_version, limit).await
    }
    async fn history_of_event(
        &self,
        key: &WorkflowKey,
        event_id: &EventId,
    ) -> Result<Option<HistoryEntry>, Error> {
        self.store.history_of_event(key, event_id).await
    }
    async fn put_tenant(&self, tenant: &Tenant, create_only: bool) -> Result<(), Error> {
        self.store.put_tenant(tenant, create_only).await
    }
    async fn update_tenant(&self, read: &Tenant, tenant: &Tenant) -> Result<(), Error> {
        self.store.update_tenant(read, tenant).await
    }
    async fn remove_tenant(&self, read: &Tenant) -> Result<(), Error> {
        self.store.remove_tenant(read).await
    }
    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        self.store.tenant(id).await
    }
    async fn tenant_by_project(&self, project: u64) -> Result<Option<Tenant>, Error> {
        self.store.tenant_by_project(project).await
    }
    async fn tenant_by_domain(&self, domain: &Domain) -> Result<Option<Tenant>, Error> {
        self.store.tenant_by_domain(domain).await
    }
    async fn tenants(&self) -> Result<Vec<Tenant>, Error> {
        self.store.tenants().await
    }
    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        self.store.allocate(pool, value, owner).await
    }
    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        self.store.release(pool, value, owner).await
    }
    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        self.store.allocation_of(pool, owner).await
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
        self.store
            .acquire_slot(kind, key, holder, cap, ttl, wake)
            .await
    }
    async fn release_slot(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<Woken, Error> {
        self.store.release_slot(kind, holder, cap, ttl).await
    }
    async fn slots(&self, kind: &str) -> Result<SlotsView, Error> {
        self.store.slots(kind).await
    }
}

impl<S: Store, Q: Queue, J: Journal> Journal for Stack<S, Q, J> {
    fn is_atomic(&self) -> bool {
        self.journal.is_atomic()
    }

    async fn commit(&self, commits: Vec<Commit>) -> Vec<Result<Vec<Delivery>, WriteError>> {
        self.journal.commit(commits).await
    }
}
