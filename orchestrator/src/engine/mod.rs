//! The engine (ARCHITECTURE.md, "The engine"): the only writer of workflow records.
//!
//! For each message: decode it (quarantine it if it does not decode) -> for a step message,
//! run the activity and turn its result into a step report -> load the record (from the cache
//! when current) -> if the event was applied before, send its commands again and acknowledge ->
//! apply the event (pure) -> one commit of the new record, its history entry, the messages its
//! commands send and the acknowledgement -> on a version conflict, reload and apply again.
//!
//! Messages are received in batches from both queues and handled concurrently up to a bound;
//! handlers of one workflow take turns in this process (other processes are kept honest by the
//! conditional write). A handler that runs long extends its message's visibility.
//!
//! Modules: `intake` (the receive loops, the concurrency bound, shutdown), `step` (a step
//! message: is it current, its slot, the invocation), `apply` (an event: apply and commit,
//! conflicts, re-sending an applied event's commands), `metrics`, and the sweeper.

mod apply;
mod intake;
mod metrics;
mod step;
mod sweeper;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activities::Activities;
use serde::Serialize;
use tracing::{Instrument, debug, info, info_span, warn};
use workflows::{
    Body, Command, Envelope, Event, StepKind, StepTask, Tenant, TenantId, Timestamp, Verdict,
    WorkflowKey, WorkflowRecord,
};

use crate::clock::SharedClock;
use crate::ports::{Delivery, Error, Journal, Outgoing, Queue, QueueKind, Store};
use crate::requests::{RequestCount, RequestCounter};

pub use sweeper::{ARMED_STATES, SweepConfig, run_sweeper, sweep_once};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Messages handled at once, both queues together.
    pub concurrency: usize,
    /// Messages asked for per receive.
    pub batch: usize,
    /// How long a received message stays invisible to other workers.
    pub visibility: Duration,
    /// How long a receive waits for messages.
    pub wait: Duration,
    /// How often a long handler extends its message's visibility.
    pub heartbeat: Duration,
    /// Reloads after a version conflict before the message is left for redelivery.
    pub max_conflicts: u32,
    /// On shutdown, how long in-flight handlers may take before their messages are released.
    pub shutdown_grace: Duration,
    /// Decoded records kept in memory.
    pub cache_records: usize,
    /// How long a tenant record is trusted before it is read again.
    pub tenant_ttl: Duration,
    /// Account-wide caps on concurrent activities per step kind (EC2 quotas are per account):
    /// an invocation of a capped kind first takes a leased slot in the store, held until the
    /// step is done, whichever worker invokes it. A step its run stops driving (failed,
    /// paused by another step's failure, superseded, cancelled) is abandoned
    /// ([`Activities::abandon`]: an image build's builder is terminated) before its slot is
    /// given back, so what runs in the cloud never outnumbers the cap.
    pub limits: BTreeMap<StepKind, u32>,
    /// How long a slot lease lasts unless renewed; every invocation renews it, so it must
    /// outlast the longest pause between a step's invocations (rechecks and retries). A dead
    /// worker's slots come free after it.
    pub slot_ttl: Duration,
    /// How often a step waiting for a slot asks again, keeping its place in line (a slot
    /// coming free wakes it at once); shorter than `slot_ttl`.
    pub slot_poll: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            batch: 32,
            visibility: Duration::from_secs(60),
            wait: Duration::from_secs(1),
            heartbeat: Duration::from_secs(20),
            max_conflicts: 8,
            shutdown_grace: Duration::from_secs(10),
            cache_records: 4096,
            tenant_ttl: Duration::from_secs(5),
            limits: BTreeMap::new(),
            slot_ttl: Duration::from_secs(600),
            slot_poll: Duration::from_secs(60),
        }
    }
}

/// Counters of what the engine did, for benchmarks, tests and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Records written (one per transition).
    pub transitions: AtomicU64,
    /// Events found applied before (their commands were sent again).
    pub duplicates: AtomicU64,
    /// Step reports and timers of older runs or tokens, dropped.
    pub stale: AtomicU64,
    /// Version conflicts resolved by reloading.
    pub conflicts: AtomicU64,
    /// Activity invocations.
    pub activities: AtomicU64,
    /// Messages moved to a dead-letter queue by the engine.
    pub quarantined: AtomicU64,
    /// Messages left for redelivery after an error.
    pub errors: AtomicU64,
    /// Step messages put back because every slot of their kind was taken.
    pub slot_waits: AtomicU64,
}

/// A snapshot of [`EngineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Records written.
    pub transitions: u64,
    /// Duplicate events.
    pub duplicates: u64,
    /// Stale reports and timers.
    pub stale: u64,
    /// Version conflicts.
    pub conflicts: u64,
    /// Activity invocations.
    pub activities: u64,
    /// Quarantined messages.
    pub quarantined: u64,
    /// Messages left for redelivery.
    pub errors: u64,
    /// Step messages put back to wait for a slot.
    pub slot_waits: u64,
}

impl EngineStats {
    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            transitions: get(&self.transitions),
            duplicates: get(&self.duplicates),
            stale: get(&self.stale),
            conflicts: get(&self.conflicts),
            activities: get(&self.activities),
            quarantined: get(&self.quarantined),
            errors: get(&self.errors),
            slot_waits: get(&self.slot_waits),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What became of one message.
#[derive(Debug)]
enum Handled {
    /// Committed (and so acknowledged), with the step messages the commit claimed for this
    /// worker to run next.
    Done(Vec<Delivery>),
    /// Moved to the dead-letter queue.
    Quarantined,
}

/// The engine: generic over its ports and activities.
pub struct Engine<S, Q, J, A> {
    store: Arc<S>,
    queue: Arc<Q>,
    journal: Arc<J>,
    activities: Arc<A>,
    clock: SharedClock,
    config: EngineConfig,
    cache: Mutex<HashMap<WorkflowKey, WorkflowRecord>>,
    tenants: Mutex<HashMap<TenantId, (Tenant, Timestamp)>>,
    turns: Mutex<HashMap<WorkflowKey, Arc<tokio::sync::Mutex<()>>>>,
    stats: EngineStats,
    requests: RequestCounter,
    metrics: metrics::Metrics,
}

impl<S, Q, J, A> std::fmt::Debug for Engine<S, Q, J, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The name of a verdict in metrics and spans.
fn verdict_name(v: &Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "accepted",
        Verdict::Ignored(_) => "ignored",
        Verdict::Refused(_) => "refused",
        Verdict::Stale(_) => "stale",
        Verdict::Duplicate => "duplicate",
    }
}

/// The envelope of `body` for `key`, as a message for `queue`.
///
/// An external event's deduplication id holds the workflow key and the event id
/// ([`dedup_id`]): the queue's deduplication spans every workflow, and an event id may be
/// chosen by a caller (an `Idempotency-Key`), so the key keeps one workflow's ids from ever
/// suppressing another's.
pub fn message(key: &WorkflowKey, body: Body, delay: Duration, now: Timestamp) -> Outgoing {
    let (queue, group, dedup_id) = match &body {
        Body::Event(e) if e.is_external() => (
            QueueKind::Events,
            Some(key.to_string()),
            Some(dedup_id(key, &e.id())),
        ),
        // Timers and step messages need per-message delays: the standard queue.
        Body::Event(_) | Body::Step(_) => (QueueKind::Steps, None, None),
    };
    let envelope = Envelope::new(key.clone(), now, body);
    Outgoing {
        queue,
        group,
        dedup_id,
        delay,
        body: workflows::encode(&envelope),
        // The sender's span: the receiver continues its trace.
        attributes: crate::telemetry::current_context(),
    }
}

/// The queue's deduplication id of event `id` of workflow `key`: `<id>/<key>`, or, when that
/// is longer than a deduplication id may be (128 characters), `sha256:<digest of id>/<key>`.
/// Workflow keys hold no `/`, so no two (key, id) pairs share one (the key is what follows the
/// last `/`). The id comes first so that ids a sender makes in order (sequence numbers,
/// time-ordered ids) sort next to each other in the embedded backend's deduplication index,
/// whatever workflow they are for: an insert then touches the index's last page rather than
/// one page per workflow.
pub fn dedup_id(key: &WorkflowKey, id: &workflows::EventId) -> String {
    let plain = format!("{id}/{key}");
    if plain.len() <= 128 {
        return plain;
    }
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(id.as_str().as_bytes()));
    format!("sha256:{digest}/{key}")
}

/// The messages `commands` send.
pub fn outgoing(key: &WorkflowKey, commands: &[Command], now: Timestamp) -> Vec<Outgoing> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::RunStep(task) => Some(message(key, Body::Step(task.clone()), task.delay, now)),
            Command::ScheduleTimer { timer, delay } => {
                Some(message(key, Body::Event(Event::Timer(*timer)), *delay, now))
            }
            Command::RecordSuperseded { push, by, reason } => {
                info!(workflow.key = %key, push.sha = %push.sha, push.event_id = %push.event_id, by = %by, reason, "push superseded");
                None
            }
        })
        .collect()
}

/// Sends an external event (push, signal, provision) to the events queue, the way the
/// ingress and `wfctl` do.
pub async fn enqueue<Q: Queue>(
    queue: &Q,
    key: &WorkflowKey,
    event: Event,
    now: Timestamp,
) -> Result<(), Error> {
    queue
        .send(vec![message(key, Body::Event(event), Duration::ZERO, now)])
        .await
}

impl<S: Store, Q: Queue, J: Journal, A: Activities> Engine<S, Q, J, A> {
    /// An engine over these ports.
    pub fn new(
        store: Arc<S>,
        queue: Arc<Q>,
        journal: Arc<J>,
        activities: Arc<A>,
        clock: SharedClock,
        config: EngineConfig,
    ) -> Self {
        Self {
            store,
            queue,
            journal,
            activities,
            clock,
            config,
            cache: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            stats: EngineStats::default(),
            metrics: metrics::Metrics::new(),
            requests: RequestCounter::new(),
        }
    }

    /// The engine with `counter`, the counter its adapters count their requests on, so that
    /// [`Engine::requests`] reports them.
    pub fn with_requests(mut self, counter: RequestCounter) -> Self {
        self.requests = counter;
        self
    }

    /// Requests its adapters sent, per service and operation (none for adapters that do not
    /// count, such as SQLite).
    pub fn requests(&self) -> Vec<RequestCount> {
        self.requests.snapshot()
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Samples the gauges: the age of each queue's oldest message, and (with `workflows`)
    /// how many workflows are in each state (one listing per state: call it rarely).
    pub async fn observe(&self, workflows: bool) {
        for q in QueueKind::ALL {
            if let Ok(stats) = self.queue.stats(q).await {
                self.metrics.oldest_age.record(
                    stats.oldest_age.map_or(0.0, |d| d.as_secs_f64()),
                    &[metrics::Metrics::kv(
                        "messaging.destination.name",
                        q.as_str(),
                    )],
                );
            }
        }
        if !workflows {
            return;
        }
        for state in workflows::State::ALL {
            let filter = crate::ports::WorkflowFilter {
                state: Some(state),
                ..crate::ports::WorkflowFilter::default()
            };
            let mut count = 0_u64;
            let mut after: Option<WorkflowKey> = None;
            loop {
                let Ok(page) = self.store.workflows(&filter, after.as_ref(), 1000).await else {
                    return;
                };
                count += page.len() as u64;
                match page.last() {
                    Some(last) if page.len() == 1000 => after = Some(last.key.clone()),
                    _ => break,
                }
            }
            self.metrics
                .workflows
                .record(count, &[metrics::Metrics::kv("state", state.as_str())]);
        }
    }

    /// Handles one delivery; every outcome is final for this delivery (committed,
    /// quarantined, or left for redelivery after an error that may pass). Returns the step
    /// messages its commit claimed for this worker: the caller handles them next (or releases
    /// them).
    pub async fn handle(&self, delivery: Delivery) -> Vec<Delivery> {
        debug!(queue = %delivery.queue, message.id = %delivery.id, receive_count = delivery.receive_count, "handling message");
        let heartbeat = self.heartbeat(&delivery);
        let result = self.handle_inner(&delivery).await;
        heartbeat.abort();
        debug!(queue = %delivery.queue, message.id = %delivery.id, ok = result.is_ok(), "message handled");
        match result {
            Ok(Handled::Done(claimed)) => claimed,
            Ok(Handled::Quarantined) => Vec::new(),
            Err(e) => {
                bump(&self.stats.errors);
                warn!(queue = %delivery.queue, message.id = %delivery.id, error = %crate::ports::chain(&e), retryable = e.is_retryable(), "message left for redelivery");
                Vec::new()
            }
        }
    }

    async fn handle_inner(&self, delivery: &Delivery) -> Result<Handled, Error> {
        let envelope: Envelope = match workflows::decode(&delivery.body) {
            Ok(e) => e,
            Err(e) => {
                return self
                    .quarantine(delivery, &format!("undecodable message: {e}"))
                    .await;
            }
        };
        let key = envelope.key;
        let ack = (delivery.queue, delivery.receipt.clone());
        let turn = self.turn(&key);
        let _turn = turn.lock().await;
        // The span of a received message is its consumer span (OpenTelemetry's `process`),
        // continuing the sender's trace; a step report's `event` span nests under the `step`.
        let span = match &envelope.body {
            Body::Event(event) => event_span(&key, event),
            Body::Step(task) => step_span(&key, task),
        };
        self.consumer(&span, delivery);
        let result = async {
            match envelope.body {
                Body::Event(event) => self.apply(&key, &event, ack, delivery).await,
                Body::Step(task) => self.run_step(&key, &task, ack, delivery).await,
            }
        }
        .instrument(span)
        .await;
        drop(_turn);
        self.forget_turn(&key, turn);
        result
    }

    /// The in-process lock that makes handlers of one workflow take turns.
    fn turn(&self, key: &WorkflowKey) -> Arc<tokio::sync::Mutex<()>> {
        match self.turns.lock() {
            Ok(mut turns) => turns.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn forget_turn(&self, key: &WorkflowKey, turn: Arc<tokio::sync::Mutex<()>>) {
        if let Ok(mut turns) = self.turns.lock() {
            // Two references: the map's and ours. Nobody else waits for it.
            if Arc::strong_count(&turn) == 2 {
                turns.remove(key);
            }
        }
    }

    async fn quarantine(&self, delivery: &Delivery, reason: &str) -> Result<Handled, Error> {
        warn!(queue = %delivery.queue, message.id = %delivery.id, reason, "message quarantined");
        self.queue.quarantine(delivery, reason).await?;
        bump(&self.stats.quarantined);
        self.metrics.dead_lettered.add(
            1,
            &[metrics::Metrics::kv(
                "messaging.destination.name",
                delivery.queue.as_str(),
            )],
        );
        Ok(Handled::Quarantined)
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        self.tenant_within(id, self.config.tenant_ttl).await
    }

    /// The tenant `id`, from the cache if it was read less than `ttl` ago (zero: read now).
    async fn tenant_within(&self, id: &TenantId, ttl: Duration) -> Result<Option<Tenant>, Error> {
        let now = self.clock.now();
        if let Ok(cache) = self.tenants.lock()
            && let Some((t, at)) = cache.get(id)
            && now.since(*at) < ttl
        {
            return Ok(Some(t.clone()));
        }
        let tenant = self.store.tenant(id).await?;
        if let (Some(t), Ok(mut cache)) = (&tenant, self.tenants.lock()) {
            cache.insert(id.clone(), (t.clone(), now));
        }
        Ok(tenant)
    }

    fn cached(&self, key: &WorkflowKey) -> Option<WorkflowRecord> {
        self.cache.lock().ok().and_then(|c| c.get(key).cloned())
    }

    fn remember(&self, record: WorkflowRecord) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.config.cache_records && !cache.contains_key(&record.key) {
                // Crude but bounded: a miss costs one read.
                cache.clear();
            }
            cache.insert(record.key.clone(), record);
        }
    }

    fn forget(&self, key: &WorkflowKey) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(key);
        }
    }

    /// The record of `key`: cached, stored, or new.
    async fn load(&self, key: &WorkflowKey, fresh: bool) -> Result<WorkflowRecord, Error> {
        if !fresh && let Some(r) = self.cached(key) {
            return Ok(r);
        }
        Ok(match self.store.workflow(key).await? {
            Some(r) => r,
            None => WorkflowRecord::new(key.clone(), self.clock.now()),
        })
    }

    /// Marks `span` as the consumer span of `delivery`, with the messaging attributes of
    /// OpenTelemetry's semantic conventions, and makes it continue the sender's trace.
    fn consumer(&self, span: &tracing::Span, delivery: &Delivery) {
        span.record("otel.kind", "consumer");
        span.record("messaging.system", self.queue.system());
        span.record("messaging.operation.type", "process");
        span.record("messaging.destination.name", delivery.queue.as_str());
        span.record("messaging.message.id", delivery.id.as_str());
        span.record("messaging.message.delivery_count", delivery.receive_count);
        crate::telemetry::continue_trace(span, &delivery.attributes);
    }
}

/// The slot holder of `key`'s run `run` (`<tenant>#<env>/<run>`), as the store lists it.
pub fn holder_of(key: &WorkflowKey, run: workflows::RunId) -> String {
    format!("{key}/{run}")
}

/// The span of applying `event`; its verdict, states and run are recorded once known.
fn event_span(key: &WorkflowKey, event: &Event) -> tracing::Span {
    info_span!(
        "event",
        tenant.id = %key.tenant,
        workflow.env = %key.env,
        workflow.key = %key,
        event.kind = event.kind(),
        event.id = %event.id(),
        event.verdict = tracing::field::Empty,
        workflow.from_state = tracing::field::Empty,
        workflow.to_state = tracing::field::Empty,
        run = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        messaging.system = tracing::field::Empty,
        messaging.operation.type = tracing::field::Empty,
        messaging.destination.name = tracing::field::Empty,
        messaging.message.id = tracing::field::Empty,
        messaging.message.delivery_count = tracing::field::Empty,
    )
}

/// The span of one activity invocation and the report it produces.
fn step_span(key: &WorkflowKey, task: &StepTask) -> tracing::Span {
    info_span!(
        "step",
        tenant.id = %key.tenant,
        workflow.env = %key.env,
        workflow.key = %key,
        run = %task.run,
        step = %task.step,
        attempt = task.attempt,
        step.outcome = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        messaging.system = tracing::field::Empty,
        messaging.operation.type = tracing::field::Empty,
        messaging.destination.name = tracing::field::Empty,
        messaging.message.id = tracing::field::Empty,
        messaging.message.delivery_count = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflows::{Environment, EventId, TenantId};

    fn key(tenant: &str, env: Environment) -> WorkflowKey {
        WorkflowKey::new(TenantId::new(tenant).expect("tenant"), env)
    }

    #[test]
    fn dedup_ids_put_the_event_first_and_name_the_workflow_last() {
        let id = EventId::new("gitlab:load-17").expect("id");
        let acme = key("acme", Environment::Dev);
        assert_eq!(dedup_id(&acme, &id), "gitlab:load-17/acme#dev");
        // A slash in a caller's id cannot make two pairs meet: the key follows the last one.
        let tricky = EventId::new("a/b#dev").expect("id");
        assert_ne!(
            dedup_id(&key("bbb", Environment::Dev), &tricky),
            dedup_id(
                &key("abc", Environment::Dev),
                &EventId::new("a").expect("id")
            )
        );
        let long = EventId::new("x".repeat(128)).expect("id");
        let widest = key("a-twenty-char-tenant", Environment::Production);
        let d = dedup_id(&widest, &long);
        assert!(d.starts_with("sha256:") && d.ends_with("/a-twenty-char-tenant#production"));
        assert!(d.len() <= 128, "{}", d.len());
    }
}
