//! The engine (DESIGN.md §4): the only writer of workflow records.
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

mod metrics;
mod sweeper;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activities::{Activities, Invocation, Outcome};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use workflows::{
    Body, Command, Envelope, Event, EventId, Input, StepKind, StepOutcome, StepReport, StepStatus,
    StepTask, Tenant, TenantId, Timestamp, Verdict, WorkflowKey, WorkflowRecord,
};

use crate::clock::SharedClock;
use crate::ports::{
    Commit, Delivery, Error, Journal, Outgoing, Queue, QueueKind, Receipt, RecordWrite, SlotGrant,
    Store, WriteError,
};
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

/// Where an intake loop takes messages from.
enum Source {
    /// Received from a queue.
    Queue(QueueKind),
    /// Claimed by this worker's own commits.
    Local(mpsc::UnboundedReceiver<Delivery>),
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
pub fn message(key: &WorkflowKey, body: Body, delay: Duration, now: Timestamp) -> Outgoing {
    let (queue, group, dedup_id) = match &body {
        Body::Event(e) if e.is_external() => (
            QueueKind::Events,
            Some(key.to_string()),
            Some(e.id().to_string()),
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

    /// Receives and handles messages from both queues until `shutdown` is cancelled, then
    /// stops receiving, gives in-flight handlers `shutdown_grace` to finish and releases the
    /// messages of those that did not.
    ///
    /// Step messages that a commit claimed for this worker are handled at once, beside the
    /// received ones and under the same concurrency bound.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let mut loops = JoinSet::new();
        for queue in QueueKind::ALL {
            let engine = self.clone();
            let source = Source::Queue(queue);
            loops.spawn(engine.intake(source, permits.clone(), local_tx.clone(), shutdown.clone()));
        }
        let engine = self.clone();
        let source = Source::Local(local_rx);
        loops.spawn(engine.intake(source, permits, local_tx, shutdown));
        while loops.join_next().await.is_some() {}
    }

    /// Takes messages from one source and handles each in its own task.
    async fn intake(
        self: Arc<Self>,
        mut source: Source,
        permits: Arc<Semaphore>,
        local: mpsc::UnboundedSender<Delivery>,
        shutdown: CancellationToken,
    ) {
        let mut handlers: JoinSet<()> = JoinSet::new();
        let in_flight: Arc<Mutex<HashMap<String, (QueueKind, Receipt)>>> = Arc::default();
        let mut backoff = Duration::from_millis(50);
        while !shutdown.is_cancelled() {
            while handlers.try_join_next().is_some() {}
            let deliveries = match &mut source {
                Source::Local(rx) => {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => break,
                        next = rx.recv() => next,
                    };
                    match next {
                        Some(d) => vec![d],
                        None => break,
                    }
                }
                Source::Queue(queue) => {
                    // Ask only for as many messages as can be handled now, without holding
                    // capacity while the receive waits: claimed messages use it meanwhile.
                    if permits.available_permits() == 0 {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            p = permits.acquire() => drop(p),
                        }
                    }
                    let n = permits.available_permits().clamp(1, self.config.batch);
                    let receive =
                        self.queue
                            .receive(*queue, n, self.config.visibility, self.config.wait);
                    tokio::pin!(receive);
                    let received = tokio::select! {
                        () = shutdown.cancelled() => {
                            // The backend may have handed out messages already (a long poll
                            // answers a client that went away): dropping the receive would hide
                            // them for the visibility timeout. It ends within `wait`; what it
                            // got goes back at once.
                            if let Ok(got) = receive.await {
                                for d in &got {
                                    let _ = self.queue.extend(d.queue, &d.receipt, Duration::ZERO).await;
                                }
                                if !got.is_empty() {
                                    info!(queue = %queue, released = got.len(), "shutdown; released messages received meanwhile");
                                }
                            }
                            break;
                        }
                        r = &mut receive => r,
                    };
                    match received {
                        Ok(d) => {
                            backoff = Duration::from_millis(50);
                            d
                        }
                        Err(e) => {
                            warn!(queue = %queue, error = %e, "receive failed; backing off");
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                () = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            for delivery in deliveries {
                // Received messages are invisible to others already: wait for capacity
                // rather than give them back.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let engine = self.clone();
                let in_flight = in_flight.clone();
                let local = local.clone();
                if let Ok(mut m) = in_flight.lock() {
                    m.insert(
                        delivery.id.clone(),
                        (delivery.queue, delivery.receipt.clone()),
                    );
                }
                handlers.spawn(async move {
                    let id = delivery.id.clone();
                    let claimed = engine.handle(delivery).await;
                    if let Ok(mut m) = in_flight.lock() {
                        m.remove(&id);
                    }
                    drop(permit);
                    for next in claimed {
                        if let Err(mpsc::error::SendError(next)) = local.send(next) {
                            // Shutting down: release it for the next worker.
                            let _ = engine
                                .queue
                                .extend(next.queue, &next.receipt, Duration::ZERO)
                                .await;
                        }
                    }
                });
            }
        }
        // Shutdown: nothing new is taken. Claimed messages not started yet are released.
        if let Source::Local(rx) = &mut source {
            rx.close();
            while let Ok(d) = rx.try_recv() {
                let _ = self.queue.extend(d.queue, &d.receipt, Duration::ZERO).await;
            }
        }
        // Let handlers finish within the grace period; release what they still hold.
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = handlers.join_next() => if next.is_none() { break },
                () = &mut grace => {
                    handlers.abort_all();
                    let left: Vec<(QueueKind, Receipt)> = in_flight
                        .lock()
                        .map(|m| m.values().cloned().collect())
                        .unwrap_or_default();
                    for (queue, receipt) in &left {
                        // Released, so another worker takes it at once instead of after the
                        // visibility timeout. Failure only delays it.
                        let _ = self.queue.extend(*queue, receipt, Duration::ZERO).await;
                    }
                    info!(released = left.len(), "shutdown grace over; released in-flight messages");
                    break;
                }
            }
        }
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
                warn!(queue = %delivery.queue, message.id = %delivery.id, error = %e, retryable = e.is_retryable(), "message left for redelivery");
                Vec::new()
            }
        }
    }

    fn heartbeat(&self, delivery: &Delivery) -> tokio::task::AbortHandle {
        let queue = self.queue.clone();
        let receipt = delivery.receipt.clone();
        let kind = delivery.queue;
        let id = delivery.id.clone();
        // A heartbeat after the visibility timeout would let the message be redelivered while
        // it is handled; configurations are checked, but an engine built in code may not be.
        let every = self.config.heartbeat.min(self.config.visibility / 2);
        let visibility = self.config.visibility;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = queue.extend(kind, &receipt, visibility).await {
                    debug!(message.id = %id, error = %e, "visibility not extended");
                    return;
                }
                tracing::trace!(queue = %kind, message.id = %id, "visibility extended");
            }
        })
        .abort_handle()
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
        let now = self.clock.now();
        if let Ok(cache) = self.tenants.lock()
            && let Some((t, at)) = cache.get(id)
            && now.since(*at) < self.config.tenant_ttl
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

    async fn run_step(
        &self,
        key: &WorkflowKey,
        task: &StepTask,
        ack: (QueueKind, Receipt),
        delivery: &Delivery,
    ) -> Result<Handled, Error> {
        let Some(tenant) = self.tenant(&key.tenant).await? else {
            return self
                .quarantine(delivery, &format!("unknown tenant {}", key.tenant))
                .await;
        };
        // Skip the activity when the step message is stale. A cached record may be older
        // than the message, so confirm with a fresh read before dropping it.
        let current = |r: &WorkflowRecord| {
            r.workflow()
                .active_run()
                .filter(|run| run.id == task.run)
                .and_then(|run| run.step(task.step))
                .is_some_and(|s| s.status == StepStatus::Running && s.token == task.token)
        };
        let (is_current, stored) = match self.load(key, false).await {
            Ok(r) if current(&r) => (true, None),
            Ok(_) => match self.load(key, true).await {
                Ok(r) if current(&r) => {
                    // Newer than the cache: keep it for applying the report.
                    self.remember(r);
                    (true, None)
                }
                Ok(r) => (false, Some(r)),
                Err(_) => (false, None),
            },
            Err(Error::Corrupt { .. }) => (false, None),
            Err(e) => return Err(e),
        };
        let cap = self.config.limits.get(&task.step).copied();
        // Only capped kinds have holders (no allocation on the common path).
        let holder = cap.map(|_| slot_holder(key, task)).unwrap_or_default();
        if !is_current {
            bump(&self.stats.stale);
            debug!("stale step message dropped");
            // A step its run no longer drives (paused, superseded, cancelled, failed) is
            // given up now rather than at its lease's expiry. A stale copy of a step still
            // driven (running under a newer token because another copy was woken first) must
            // not take the slot from under it. A copy of a step done may have been granted a
            // slot from the line meanwhile: that one goes back.
            let mut send = Vec::new();
            if let (Some(_), Some(r)) = (cap, &stored) {
                match settled(r, task) {
                    Settled::Driven => {}
                    Settled::Done => self.release_slot(task.step, &holder).await,
                    Settled::Stopped => {
                        send = self.abandon(key, &tenant.domain, task, &holder).await;
                    }
                }
            }
            let id = workflows::event::step_event_id(task.run, task.step, task.token);
            if let Some(record) = &stored {
                send.extend(self.resend(key, &id, record, delivery).await?);
            }
            self.send_and_ack(send, ack).await?;
            return Ok(Handled::Done(Vec::new()));
        }
        let slot = match cap {
            None => None,
            Some(cap) => {
                let now = self.clock.now();
                let resume = message(key, Body::Step(Box::new(task.clone())), Duration::ZERO, now);
                let (grant, woken) = self
                    .store
                    .acquire_slot(
                        task.step.as_str(),
                        key,
                        &holder,
                        cap,
                        self.config.slot_ttl,
                        &resume.body,
                    )
                    .await?;
                let mut send = wake(woken);
                match grant {
                    SlotGrant::Held { since } => {
                        self.send_woken(send).await;
                        Some(since)
                    }
                    SlotGrant::Waiting { ahead } => {
                        bump(&self.stats.slot_waits);
                        tracing::Span::current().record("step.outcome", "waiting_for_slot");
                        self.metrics
                            .slot_waits
                            .add(1, &[metrics::Metrics::kv("step", task.step.as_str())]);
                        debug!(ahead, "waiting for a slot");
                        // A slot coming free wakes the step (its resume message is in line);
                        // until then it asks again now and then, keeping its place.
                        send.push(Outgoing {
                            delay: self.config.slot_poll,
                            ..resume
                        });
                        self.send_and_ack(send, ack).await?;
                        return Ok(Handled::Done(Vec::new()));
                    }
                }
            }
        };
        bump(&self.stats.activities);
        let started = std::time::Instant::now();
        let outcome = self
            .activities
            .invoke(Invocation {
                key,
                domain: &tenant.domain,
                task,
            })
            .await;
        let kind = match &outcome {
            Outcome::Done(_) => "done",
            Outcome::Progress { .. } => "progress",
            Outcome::Retryable(_) => "retryable",
            Outcome::Terminal(_) => "terminal",
        };
        // A step done gives its slot back. One its run stops driving (failed terminally, out
        // of retries) is given up through the reminder its report's commit sends (`apply`).
        let finished = matches!(outcome, Outcome::Done(_));
        tracing::Span::current().record("step.outcome", kind);
        let step_kv = metrics::Metrics::kv("step", task.step.as_str());
        self.metrics.step_duration.record(
            started.elapsed().as_secs_f64(),
            &[step_kv.clone(), metrics::Metrics::kv("outcome", kind)],
        );
        if kind == "retryable" {
            self.metrics.retries.add(1, &[step_kv]);
        }
        let now = self.clock.now();
        let outcome = match outcome {
            Outcome::Done(output) => StepOutcome::Done { output },
            Outcome::Progress {
                recheck_after,
                note,
            } => StepOutcome::Progress {
                recheck_after,
                note,
            },
            Outcome::Retryable(error) => {
                let policy = self.activities.retry_policy(task.step);
                let retry_in = policy.next_delay(
                    task.attempt,
                    now.since(task.first_attempt_at),
                    fastrand::f64(),
                );
                StepOutcome::Retryable { error, retry_in }
            }
            Outcome::Terminal(error) => StepOutcome::Terminal { error },
        };
        let event = Event::Step(StepReport {
            run: task.run,
            step: task.step,
            token: task.token,
            outcome,
        });
        let result = self
            .apply(key, &event, ack, delivery)
            .instrument(event_span(key, &event))
            .await;
        // Held until the report is committed: were it lost, the next invocation finds its
        // lease (and whatever the activity made) again.
        if let (Some(_), true, Ok(_)) = (slot, finished, &result) {
            self.release_slot(task.step, &holder).await;
        }
        result
    }

    /// Gives up a capped step its run no longer drives: what it holds while it runs (a
    /// builder) goes first, then its slot, so the count of what runs never exceeds the cap.
    /// If the activities cannot give it up now, this returns a copy of the step message to
    /// send after `slot_poll`: stale, it comes back here to try again, the slot still held.
    async fn abandon(
        &self,
        key: &WorkflowKey,
        domain: &workflows::Domain,
        task: &StepTask,
        holder: &str,
    ) -> Vec<Outgoing> {
        let invocation = Invocation { key, domain, task };
        match self.activities.abandon(invocation).await {
            Ok(()) => {
                debug!("step abandoned");
                self.release_slot(task.step, holder).await;
                Vec::new()
            }
            Err(error) => {
                warn!(%error, "step not abandoned yet; its slot stays held until it is");
                let body = Body::Step(Box::new(task.clone()));
                vec![message(key, body, self.config.slot_poll, self.clock.now())]
            }
        }
    }

    /// Sends `send` and acknowledges the message, one commit.
    async fn send_and_ack(
        &self,
        send: Vec<Outgoing>,
        ack: (QueueKind, Receipt),
    ) -> Result<(), Error> {
        self.commit(Commit {
            send,
            ack: Some(ack),
            ..Commit::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| match e {
            WriteError::Store(e) => e,
            conflict => Error::Unavailable {
                backend: "journal",
                message: conflict.to_string(),
            },
        })
    }

    /// Gives a slot back and wakes whom it was granted to; a failure only delays it to the
    /// lease's expiry.
    async fn release_slot(&self, step: StepKind, holder: &str) {
        let cap = self.config.limits.get(&step).copied().unwrap_or(1);
        match self
            .store
            .release_slot(step.as_str(), holder, cap, self.config.slot_ttl)
            .await
        {
            Ok(woken) => self.send_woken(wake(woken)).await,
            Err(e) => {
                warn!(%step, holder, error = %e, "slot not released; it comes free when its lease lapses");
            }
        }
    }

    /// Sends the resume messages of steps just granted a slot. Should it fail, they resume
    /// when they next ask (`slot_poll`).
    async fn send_woken(&self, woken: Vec<Outgoing>) {
        if woken.is_empty() {
            return;
        }
        if let Err(e) = self.queue.send(woken).await {
            warn!(error = %e, "steps granted a slot not woken; they resume when they next ask");
        }
    }

    /// What to send again for `delivery`, whose event `id` was applied before: the messages
    /// of that event's commands that `record` (the current record) still waits for.
    ///
    /// Only a journal that is not atomic can have written the record and died before sending;
    /// the message that worker held is then delivered again, so a first delivery has nothing to
    /// repair (it is a duplicate or a late copy, and re-sending for it would make every copy
    /// breed another). A command the workflow has moved past was delivered: not sent again.
    async fn resend(
        &self,
        key: &WorkflowKey,
        id: &EventId,
        record: &WorkflowRecord,
        delivery: &Delivery,
    ) -> Result<Vec<Outgoing>, Error> {
        if self.journal.is_atomic() || delivery.receive_count <= 1 {
            return Ok(Vec::new());
        }
        let Some(entry) = self.store.history_of_event(key, id).await? else {
            return Ok(Vec::new());
        };
        let awaited: Vec<Command> = entry
            .commands
            .into_iter()
            .filter(|c| record.awaits(c))
            .collect();
        if !awaited.is_empty() {
            debug!(event.id = %id, commands = awaited.len(), "sending an applied event's commands again");
        }
        let now = self.clock.now();
        let mut send = outgoing(key, &awaited, now);
        // The copies that give up capped steps the event stopped (`stopped`) were lost with
        // the commands; a copy for every capped step the run does not drive stands in for
        // them (giving up a step that holds nothing changes nothing).
        send.extend(
            capped_copies(
                record,
                &self.config.limits,
                &[StepStatus::Failed, StepStatus::Pending],
            )
            .map(|task| message(key, Body::Step(Box::new(task)), Duration::ZERO, now)),
        );
        Ok(send)
    }

    async fn commit(&self, commit: Commit) -> Result<Vec<Delivery>, WriteError> {
        match self.journal.commit(vec![commit]).await.pop() {
            Some(r) => r,
            None => Err(WriteError::Store(Error::Unavailable {
                backend: "journal",
                message: "no result for a commit".into(),
            })),
        }
    }

    /// Applies `event` to the workflow `key` and commits the result with the acknowledgement.
    async fn apply(
        &self,
        key: &WorkflowKey,
        event: &Event,
        ack: (QueueKind, Receipt),
        delivery: &Delivery,
    ) -> Result<Handled, Error> {
        let Some(tenant) = self.tenant(&key.tenant).await? else {
            return self
                .quarantine(delivery, &format!("unknown tenant {}", key.tenant))
                .await;
        };
        let input = |now| Input {
            now,
            settings: tenant.settings(),
        };
        let mut fresh = false;
        for _ in 0..self.config.max_conflicts {
            let mut record = match self.load(key, fresh).await {
                Ok(r) => r,
                Err(Error::Corrupt { what, source }) => {
                    let reason = format!("{what} does not decode: {source}");
                    self.store.mark_corrupt(key, &reason).await?;
                    return self
                        .quarantine(delivery, &format!("workflow stopped: {reason}"))
                        .await;
                }
                Err(e) => return Err(e),
            };
            let now = self.clock.now();
            let from_version = record.version;
            // The capped steps the run drives now; those the event stops are given up.
            let driven: Vec<StepTask> = capped_copies(
                &record,
                &self.config.limits,
                &[StepStatus::Running, StepStatus::RetryWait],
            )
            .collect();
            let applied = record.apply(event, input(now));
            let commit = match &applied.verdict {
                Verdict::Duplicate => {
                    bump(&self.stats.duplicates);
                    // Its commands may not have been sent (a crash after the write): send
                    // them again. Repeating them is safe.
                    Commit {
                        write: None,
                        send: self.resend(key, &event.id(), &record, delivery).await?,
                        ack: Some(ack.clone()),
                        claim: None,
                    }
                }
                Verdict::Stale(_) if !fresh => {
                    // The cached record may be older than the message (another worker
                    // moved the workflow on): only the stored record can say it is stale.
                    fresh = true;
                    continue;
                }
                Verdict::Stale(reason) => {
                    bump(&self.stats.stale);
                    debug!(reason, "stale event dropped");
                    // A report or timer is stale once applied; if it was applied by a
                    // worker that died before sending its commands, send them now.
                    let send = self.resend(key, &event.id(), &record, delivery).await?;
                    Commit {
                        send,
                        ack: Some(ack.clone()),
                        ..Commit::default()
                    }
                }
                verdict => {
                    let entry = record.history_entry(event, &applied);
                    if !matches!(verdict, Verdict::Accepted) {
                        info!(?verdict, "event not applied");
                    }
                    let mut send = outgoing(key, &applied.commands, now);
                    // Sent with the commit, each copy arrives stale and gives its step
                    // up (`abandon`), even if this worker dies after the commit.
                    send.extend(
                        driven
                            .iter()
                            .filter(|task| settled(&record, task) == Settled::Stopped)
                            .map(|task| {
                                let body = Body::Step(Box::new(task.clone()));
                                message(key, body, Duration::ZERO, now)
                            }),
                    );
                    Commit {
                        write: Some(RecordWrite::new(&record, &entry)),
                        send,
                        ack: Some(ack.clone()),
                        claim: Some(self.config.visibility),
                    }
                }
            };
            let writes = commit.write.is_some();
            match self.commit(commit).await {
                Ok(claimed) => {
                    let verdict = verdict_name(&applied.verdict);
                    let span = tracing::Span::current();
                    span.record("event.verdict", verdict);
                    span.record("workflow.from_state", applied.from.as_str());
                    span.record("workflow.to_state", applied.to.as_str());
                    if let Some(run) = &record.workflow().run {
                        span.record("run", tracing::field::display(run.id));
                    }
                    self.metrics.events.add(
                        1,
                        &[
                            metrics::Metrics::kv("verdict", verdict),
                            metrics::Metrics::kv("event.kind", event.kind()),
                        ],
                    );
                    if writes {
                        bump(&self.stats.transitions);
                        if applied.from != applied.to {
                            self.metrics.transitions.add(
                                1,
                                &[
                                    metrics::Metrics::kv("from_state", applied.from.as_str()),
                                    metrics::Metrics::kv("to_state", applied.to.as_str()),
                                ],
                            );
                            info!(from = %applied.from, to = %applied.to, version = record.version, "transition");
                        }
                        self.remember(record);
                    }
                    return Ok(Handled::Done(claimed));
                }
                Err(WriteError::Conflict { found, .. }) => {
                    bump(&self.stats.conflicts);
                    debug!(
                        expected = from_version,
                        found, "version conflict; reloading"
                    );
                    self.forget(key);
                    fresh = true;
                }
                Err(WriteError::Store(e)) => {
                    self.forget(key);
                    return Err(e);
                }
            }
        }
        Err(Error::Unavailable {
            backend: "engine",
            message: format!(
                "{key}: {} version conflicts in a row; left for redelivery",
                self.config.max_conflicts
            ),
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

/// The resume messages of steps granted a slot, to send now.
fn wake(bodies: Vec<Vec<u8>>) -> Vec<Outgoing> {
    bodies
        .into_iter()
        .map(|body| Outgoing {
            queue: QueueKind::Steps,
            group: None,
            dedup_id: None,
            delay: Duration::ZERO,
            body,
            attributes: crate::telemetry::current_context(),
        })
        .collect()
}

/// Copies of the step messages of the capped steps of `record`'s last run whose status is one
/// of `statuses`: before an event, the running ones it may stop; on a redelivery after a
/// crash, the failed and paused ones to give up again.
fn capped_copies<'a>(
    record: &'a WorkflowRecord,
    limits: &'a BTreeMap<StepKind, u32>,
    statuses: &'a [StepStatus],
) -> impl Iterator<Item = StepTask> + 'a {
    record.workflow().run.iter().flat_map(move |run| {
        run.steps
            .iter()
            .filter(|s| limits.contains_key(&s.kind) && statuses.contains(&s.status))
            .map(move |s| copy_of(run, s, record))
    })
}

/// A copy of the message of `run`'s step `s`, with `record`'s resources.
fn copy_of(run: &workflows::Run, s: &workflows::StepProgress, record: &WorkflowRecord) -> StepTask {
    StepTask {
        run: run.id,
        step: s.kind,
        token: s.token,
        attempt: s.attempt,
        first_attempt_at: s.first_attempt_at.unwrap_or(run.started_at),
        delay: Duration::ZERO,
        release: run.release.clone(),
        resources: record.workflow().resources.clone(),
    }
}

/// Where `task`'s step stands for the slot its run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Running or waiting to retry: the run still drives it, and keeps the slot.
    Driven,
    /// Done: nothing to abandon; a slot still held (granted to a late copy) goes back.
    Done,
    /// Failed, paused, superseded or cancelled: to abandon, then give the slot back.
    Stopped,
}

fn settled(record: &WorkflowRecord, task: &StepTask) -> Settled {
    let step = record
        .workflow()
        .run
        .as_ref()
        .filter(|run| run.id == task.run)
        .and_then(|run| Some((run.is_active(), run.step(task.step)?.status)));
    match step {
        Some((_, StepStatus::Done)) => Settled::Done,
        Some((true, StepStatus::Running | StepStatus::RetryWait)) => Settled::Driven,
        _ => Settled::Stopped,
    }
}

/// Who holds a slot for a step: the workflow's run, so a superseded run's lease is never taken
/// for the next run's.
fn slot_holder(key: &WorkflowKey, task: &StepTask) -> String {
    holder_of(key, task.run)
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
