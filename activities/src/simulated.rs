//! The simulated cloud: the resources of the AWS reconcilers as rows of an SQLite file, with AWS-like
//! latencies (scaled by [`SimConfig::time_scale`]) and injected faults. It backs the embedded
//! default (`orchestrator dev`), the crash test and the load tests.
//!
//! # Resources and reconcilers
//!
//! Every resource has a name derived from tenant, environment and release, unique within its
//! kind; a reconciler looks it up by that name (describe), uses it if it is there (adopt) and
//! creates it only if it is not (create). One invocation runs in one SQLite `BEGIN IMMEDIATE`
//! transaction, so two concurrent invocations, in one process or several sharing the file,
//! cannot both create a resource.
//!
//! | step | resources (names for tenant `acme`, env `staging`) | done when |
//! |---|---|---|
//! | network | security groups `acme-staging-instances`, `acme-staging-database` (`sg-…`), created together | both ready (network latency) |
//! | source_infra, source_app | artifact `src/<sha>.tar.gz`, shared by all tenants (content-addressed) | uploaded (source latency) |
//! | image | builder `acme-staging-builder-<sha>` (`i-…`), then image `acme-staging-<sha>` (`ami-…`) | image available (image latency: builder half, image half); the builder is then terminated |
//! | database | database `acme-staging`: endpoint `…:3306`, secret ARN, never a password | available (database latency) |
//! | routing | target group and listener rule `acme-staging` for host `staging.<domain>`, holding the lowest free priority from [`SimConfig::first_listener_priority`] | both active (routing latency) |
//! | rollout | Auto Scaling group `acme-staging-r3` per run, running `task.resources.image` or [`SimConfig::base_image_id`] | healthy (rollout latency); then the groups of older runs are deleted |
//! | decommission | deletes every resource of the environment and frees its rule priority | at once |
//!
//! An invocation takes at most one action that has to be waited for and stops there with
//! [`Outcome::Progress`] (`recheck_after` is the time left, at most
//! [`SimConfig::max_recheck_ms`] scaled, at least 1 ms). With zero latency nothing has to be
//! waited for: the step is done on its first invocation, and the steps that take several
//! actions (image, rollout) take them all in that invocation.
//!
//! Two guards keep late step messages (redelivered, or of a cancelled run) from undoing
//! newer work: nothing is created for an environment by a step whose attempts began before it
//! was last decommissioned ([`Error::Decommissioned`], terminal; a run that provisions it
//! again began later), and a rollout that finds a group of a newer run
//! neither creates its own nor deletes the newer one ([`Error::Superseded`], terminal).
//!
//! # Faults
//!
//! A builder or an Auto Scaling group is created with its scripts' fate drawn once
//! ([`SimConfig::script_failure_probability`], [`SimConfig::install_failure_probability`]): a
//! failing build is noticed when the builder powers off (half the image latency), a failing
//! install at a quarter of the rollout latency (the new group is then deleted); both fail the
//! step terminally with a script report's failure, as the AWS reconcilers do.
//!
//! Before anything else, each invocation draws one number (with `fastrand`, seeded by
//! [`SimConfig::seed`]): below [`SimConfig::throttle_probability`] it fails with
//! `Throttling: Rate exceeded`, then [`SimConfig::server_error_probability`] gives
//! `InternalError (500)` (both retryable), then [`SimConfig::terminal_probability`] gives
//! `InvalidParameterValue` (terminal). A failed call changes nothing. Separately,
//! [`SimConfig::lost_response_probability`] lets the action happen and then reports
//! `RequestTimeout` (retryable), so the next invocation must adopt what this one created.
//!
//! # Tables (all in the file given to [`SimulatedCloud::open`])
//!
//! | table | columns | what |
//! |---|---|---|
//! | `sim_meta` | `key` PK, `value` | `schema_version` (1) and `next_id`, the counter ids are made from |
//! | `sim_resources` | (`kind`, `name`) PK, `id`, `workflow` (`tenant#env`, null for artifacts), `created_at_ms`, `ready_at_ms`, `attrs` (JSON) | the resources that exist |
//! | `sim_priorities` | `priority` PK, `rule_name` UNIQUE | listener rule priorities held |
//! | `sim_creations` | (`kind`, `name`) PK, `count` | how often each name was created; never lowered |
//! | `sim_decommissioned` | `workflow` PK, `at_ms` | environments decommissioned |
//!
//! The file may hold other tables (the orchestrator's); this module touches only `sim_` ones.
//! It is opened in WAL mode with `synchronous = NORMAL` and a busy timeout
//! ([`SimConfig::busy_timeout_ms`]); SQLite failures become retryable outcomes, never panics.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;
use tracing::instrument;
use workflows::{Domain, RetryPolicy, StepKind, StepTask, Timestamp, WorkflowKey};

use crate::{Activities, Invocation, Outcome};

mod config;
mod error;
mod reconcile;
mod store;
#[cfg(test)]
mod tests;

pub use crate::clock::{Clock, ManualClock, SystemClock};
pub use config::{MAX_LISTENER_PRIORITY, SimConfig};
pub use error::Error;
pub use store::{Creation, PriorityAllocation, ResourceKind, SimResource};

/// The simulated cloud. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct SimulatedCloud {
    inner: Arc<Inner>,
}

/// An invocation waiting for the connection, and where its result goes.
type PendingJob = (Job, std::sync::mpsc::Sender<Result<Outcome, Error>>);

struct Inner {
    conn: Mutex<Connection>,
    /// Invocations waiting to be run in the next transaction.
    pending: Mutex<Vec<PendingJob>>,
    /// Taken around every write transaction (see [`crate::gate`]); `None` in memory.
    gate: Option<Arc<Mutex<()>>>,
    config: SimConfig,
    clock: Arc<dyn Clock>,
    rng: Mutex<fastrand::Rng>,
    location: String,
}

impl fmt::Debug for SimulatedCloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedCloud")
            .field("location", &self.inner.location)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What a blocking invocation needs, owned.
struct Job {
    key: WorkflowKey,
    domain: Domain,
    task: StepTask,
    env_config: workflows::EnvConfig,
    env_settings: workflows::EnvSettings,
}

/// A fault drawn for one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Throttling,
    Internal,
    Terminal,
}

impl SimulatedCloud {
    /// Opens (or creates) the `sim_` tables in the SQLite file at `path`, on the system clock.
    pub fn open(path: &Path, config: SimConfig) -> Result<Self, Error> {
        Self::open_with_clock(path, config, Arc::new(SystemClock))
    }

    /// Like [`SimulatedCloud::open`], with time from `clock`.
    pub fn open_with_clock(
        path: &Path,
        config: SimConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let conn = store::open_file(path, Duration::from_millis(config.busy_timeout_ms))?;
        let gate = Some(crate::gate::write_gate(path));
        Self::with_connection(conn, gate, config, clock, path.display().to_string())
    }

    /// A simulated cloud in memory (gone when dropped), on the system clock.
    pub fn in_memory(config: SimConfig) -> Result<Self, Error> {
        Self::in_memory_with_clock(config, Arc::new(SystemClock))
    }

    /// Like [`SimulatedCloud::in_memory`], with time from `clock`.
    pub fn in_memory_with_clock(config: SimConfig, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        config.validate()?;
        let conn = Connection::open_in_memory()?;
        Self::with_connection(conn, None, config, clock, ":memory:".to_owned())
    }

    fn with_connection(
        mut conn: Connection,
        gate: Option<Arc<Mutex<()>>>,
        config: SimConfig,
        clock: Arc<dyn Clock>,
        location: String,
    ) -> Result<Self, Error> {
        store::migrate(&mut conn)?;
        let rng = config
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        tracing::debug!(location = %location, time_scale = config.time_scale, "simulated cloud opened");
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                gate,
                config,
                clock,
                rng: Mutex::new(rng),
                pending: Mutex::new(Vec::new()),
                location,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The simulated cloud's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Every resource that exists, by kind and name. Blocking (one short SQLite read).
    pub fn resources(&self) -> Result<Vec<SimResource>, Error> {
        let rows = self.inner.with_conn(store::list_all)?;
        rows.into_iter().map(store::Row::into_public).collect()
    }

    /// The resources of one workflow, by kind and name (artifacts belong to none). Blocking.
    pub fn resources_of(&self, key: &WorkflowKey) -> Result<Vec<SimResource>, Error> {
        let workflow = key.to_string();
        let rows = self
            .inner
            .with_conn(|conn| store::list_workflow(conn, &workflow, None))?;
        rows.into_iter().map(store::Row::into_public).collect()
    }

    /// How often each resource name was created, by kind and name. Blocking.
    pub fn creations(&self) -> Result<Vec<Creation>, Error> {
        self.inner.with_conn(store::creations)
    }

    /// The highest creation count of any resource name (0 when nothing was created), a
    /// creation after an abandonment not counted: 1 means nothing was created twice. Blocking.
    pub fn max_creations(&self) -> Result<u64, Error> {
        Ok(self
            .creations()?
            .iter()
            .map(|c| c.count.saturating_sub(c.abandoned))
            .max()
            .unwrap_or(0))
    }

    /// The most resources of each kind that existed at the same moment (image builders: the
    /// most builds at once), for kinds ever created. Blocking.
    pub fn peaks(&self) -> Result<Vec<(ResourceKind, u64)>, Error> {
        self.inner.with_conn(store::peaks)
    }

    /// The listener rule priorities held, lowest first. Blocking.
    pub fn priorities(&self) -> Result<Vec<PriorityAllocation>, Error> {
        self.inner.with_conn(store::priorities)
    }

    /// Whether `key`'s environment was decommissioned. Blocking.
    pub fn is_decommissioned(&self, key: &WorkflowKey) -> Result<bool, Error> {
        let workflow = key.to_string();
        self.inner
            .with_conn(|conn| store::is_decommissioned(conn, &workflow))
    }

    async fn run(&self, invocation: Invocation<'_>) -> Outcome {
        if let Some(fault) = self.inner.draw_fault() {
            let error = match fault {
                Fault::Throttling => Error::Throttling,
                Fault::Internal => Error::Internal,
                Fault::Terminal => Error::InvalidParameter(format!(
                    "injected terminal failure of step {}",
                    invocation.task.step
                )),
            };
            tracing::info!(error = %error, "fault injected");
            return outcome_of(Err(error));
        }
        let job = Job {
            key: invocation.key.clone(),
            domain: invocation.domain.clone(),
            task: invocation.task.clone(),
            env_config: invocation.config.clone(),
            env_settings: invocation.settings.clone(),
        };
        let inner = Arc::clone(&self.inner);
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            inner.reconcile(job)
        })
        .await
        .unwrap_or_else(|e| Err(Error::Blocking(e.to_string())));
        let result = match result {
            Ok(Outcome::Done(_) | Outcome::Progress { .. }) if self.inner.draw_lost_response() => {
                tracing::info!("response lost after the action took effect");
                Err(Error::LostResponse)
            }
            other => other,
        };
        outcome_of(result)
    }
}

fn outcome_of(result: Result<Outcome, Error>) -> Outcome {
    match result {
        Ok(outcome) => {
            if let Outcome::Done(_) = &outcome {
                tracing::debug!("step done");
            }
            outcome
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "step failed retryably");
            Outcome::Retryable(e.to_string())
        }
        Err(e) => {
            tracing::warn!(error = %e, "step failed terminally");
            Outcome::Terminal(e.to_string())
        }
    }
}

impl Inner {
    /// Runs `f` on the connection. A poisoned lock is taken over: a panic inside a
    /// transaction rolled it back when the transaction was dropped.
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&conn)
    }

    /// One invocation's read-check-write, in a `BEGIN IMMEDIATE` transaction; the clock is
    /// read once the write lock is held.
    ///
    /// Invocations that arrive while a transaction is running are committed together by the
    /// next caller to get the connection (each inside its own savepoint, so one failing
    /// invocation undoes only itself): one lock and one commit for many invocations, as the
    /// orchestrator's writer does, instead of one each.
    fn reconcile(&self, job: Job) -> Result<Outcome, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((job, tx));
        loop {
            if let Ok(result) = rx.try_recv() {
                return result;
            }
            let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            // Whoever held the connection may have run this job meanwhile.
            if let Ok(result) = rx.try_recv() {
                return result;
            }
            let batch =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if !batch.is_empty() {
                self.run_batch(&conn, batch);
            }
        }
    }

    fn run_batch(&self, conn: &Connection, batch: Vec<PendingJob>) {
        let _turn = self
            .gate
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(PoisonError::into_inner));
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = Error::from(e).to_string();
            for (_, reply) in batch {
                let _ = reply.send(Err(Error::Storage(e.clone())));
            }
            return;
        }
        let mut results = Vec::with_capacity(batch.len());
        for (job, reply) in batch {
            let cx = reconcile::Cx {
                key: &job.key,
                domain: &job.domain,
                task: &job.task,
                now_ms: self.clock.now().as_unix_millis(),
                config: &self.config,
                env_config: &job.env_config,
                env_settings: &job.env_settings,
                sample: self.draw_script_sample(),
            };
            let result = conn
                .execute_batch("SAVEPOINT invocation")
                .map_err(Error::from)
                .and_then(|()| reconcile::reconcile(conn, &cx));
            let end = if result.is_ok() {
                "RELEASE invocation"
            } else {
                "ROLLBACK TO invocation; RELEASE invocation"
            };
            let result = match conn.execute_batch(end) {
                Ok(()) => result,
                Err(e) => Err(Error::from(e)),
            };
            results.push((reply, result));
        }
        match conn.execute_batch("COMMIT") {
            Ok(()) => {
                for (reply, result) in results {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let e = Error::from(e).to_string();
                for (reply, _) in results {
                    let _ = reply.send(Err(Error::Storage(e.clone())));
                }
            }
        }
    }

    fn draw_fault(&self) -> Option<Fault> {
        let c = &self.config;
        if c.throttle_probability + c.server_error_probability + c.terminal_probability <= 0.0 {
            return None;
        }
        let x = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64();
        let mut bound = c.throttle_probability;
        if x < bound {
            return Some(Fault::Throttling);
        }
        bound += c.server_error_probability;
        if x < bound {
            return Some(Fault::Internal);
        }
        bound += c.terminal_probability;
        (x < bound).then_some(Fault::Terminal)
    }

    /// A sample for the script failures a new builder or group is given; 1 (never below a
    /// probability) when neither can fail, so seeded fault sequences stay as they were.
    fn draw_script_sample(&self) -> f64 {
        let c = &self.config;
        if c.script_failure_probability <= 0.0 && c.install_failure_probability <= 0.0 {
            return 1.0;
        }
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64()
    }

    fn draw_lost_response(&self) -> bool {
        let p = self.config.lost_response_probability;
        p > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .f64()
                < p
    }
}

impl Activities for SimulatedCloud {
    // At debug: the engine's `step` span is the exported span of an invocation.
    #[instrument(level = "debug", skip_all, fields(
        tenant.id = %invocation.key.tenant,
        workflow.env = %invocation.key.env,
        step = %invocation.task.step,
        run = %invocation.task.run,
        attempt = invocation.task.attempt,
    ))]
    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        self.run(invocation).await
    }

    /// Terminates an abandoned image build's builder. A drawn fault fails it retryably (a
    /// throttled `TerminateInstances`).
    #[instrument(level = "debug", skip_all, fields(
        tenant.id = %invocation.key.tenant,
        workflow.env = %invocation.key.env,
        step = %invocation.task.step,
        run = %invocation.task.run,
    ))]
    async fn abandon(&self, invocation: Invocation<'_>) -> Result<(), String> {
        if invocation.task.step != StepKind::Image {
            return Ok(());
        }
        if let Some(fault) = self.inner.draw_fault() {
            tracing::info!(?fault, "fault injected");
            return Err(format!("injected {fault:?} fault terminating the builder"));
        }
        let (key, task) = (invocation.key.clone(), invocation.task.clone());
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            inner.with_conn(|conn| {
                // Immediate, as reconcilers' transactions: other processes share the file.
                conn.execute_batch("BEGIN IMMEDIATE")?;
                let result = reconcile::abandon(conn, &key, &task)
                    .and_then(|()| Ok(conn.execute_batch("COMMIT")?));
                if result.is_err() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                result
            })
        })
        .await
        .unwrap_or_else(|e| Err(Error::Blocking(e.to_string())))
        .map_err(|e| e.to_string())
    }

    /// Per-kind policies in simulated time; see [`SimConfig::retry_policy`].
    fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        self.inner.config.retry_policy(step)
    }
}
