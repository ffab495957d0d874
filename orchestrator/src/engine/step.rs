//! A step message: confirm that its step is current (else give up what a stopped step holds),
//! take a slot when its kind is capped, invoke the activity, and apply its report.

use std::collections::BTreeMap;
use std::time::Duration;

use activities::{Activities, Invocation, Outcome};
use tracing::{Instrument, debug, warn};
use workflows::{
    Body, Event, Run, StepKind, StepOutcome, StepProgress, StepReport, StepStatus, StepTask,
    Tenant, Timestamp, WorkflowKey, WorkflowRecord,
};

use super::{Engine, Handled, bump, event_span, holder_of, message, metrics};
use crate::ports::{
    Commit, Delivery, Error, Journal, Outgoing, Queue, QueueKind, Receipt, SlotGrant, Store,
    WriteError, chain,
};

/// Whether a step message is the one its step waits for.
enum Currency {
    /// Its step is running with its token: invoke.
    Current,
    /// Not (older run or token, or the step has moved on); the stored record, when it could
    /// be read, says what became of the step.
    Stale(Option<Box<WorkflowRecord>>),
}

/// Whether a step may run now, for the account-wide cap of its kind.
enum SlotTurn {
    /// Its kind has no cap.
    Uncapped,
    /// It holds a slot: it may run, and gives the slot back once done.
    Held,
    /// It waits in line; its message was put back (delayed by `slot_poll`).
    Waiting,
}

/// How an invocation ended, as spans and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutcomeKind {
    Done,
    Progress,
    Retryable,
    Terminal,
}

impl OutcomeKind {
    fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Done(_) => OutcomeKind::Done,
            Outcome::Progress { .. } => OutcomeKind::Progress,
            Outcome::Retryable(_) => OutcomeKind::Retryable,
            Outcome::Terminal(_) => OutcomeKind::Terminal,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Done => "done",
            OutcomeKind::Progress => "progress",
            OutcomeKind::Retryable => "retryable",
            OutcomeKind::Terminal => "terminal",
        }
    }
}

/// Where a step stands for the slot its run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotHold {
    /// Running or waiting to retry: the run still drives it, and keeps the slot.
    Driven,
    /// Done: nothing to abandon; a slot still held (granted to a late copy) goes back.
    Done,
    /// Failed, paused, superseded or cancelled: to abandon, then give the slot back.
    Stopped,
}

/// Where `task`'s step stands in `record`, for its slot.
pub(super) fn slot_hold(record: &WorkflowRecord, task: &StepTask) -> SlotHold {
    let step = record
        .workflow()
        .run
        .as_ref()
        .filter(|run| run.id == task.run)
        .and_then(|run| Some((run.is_active(), run.step(task.step)?.status)));
    match step {
        Some((_, StepStatus::Done)) => SlotHold::Done,
        Some((true, StepStatus::Running | StepStatus::RetryWait)) => SlotHold::Driven,
        _ => SlotHold::Stopped,
    }
}

impl<S: Store, Q: Queue, J: Journal, A: Activities> Engine<S, Q, J, A> {
    /// Handles a step message: invokes its activity if it is current and may run, and applies
    /// the report.
    pub(super) async fn run_step(
        &self,
        key: &WorkflowKey,
        task: &StepTask,
        ack: (QueueKind, Receipt),
        delivery: &Delivery,
    ) -> Result<Handled, Error> {
        // Routing and rollout make what the tenant's settings say at that moment (the host, the
        // launch template's config vars and sizing): they read the tenant afresh, so that a
        // change that started their run is never met by a cached copy from before it.
        let ttl = match task.step {
            StepKind::Routing | StepKind::Rollout => Duration::ZERO,
            _ => self.config.tenant_ttl,
        };
        let Some(tenant) = self.tenant_within(&key.tenant, ttl).await? else {
            return self
                .quarantine(delivery, &format!("unknown tenant {}", key.tenant))
                .await;
        };
        if let Currency::Stale(stored) = self.currency(key, task).await? {
            self.drop_stale(key, &tenant, task, stored, ack, delivery)
                .await?;
            return Ok(Handled::Done(Vec::new()));
        }
        let turn = self.take_slot(key, task, ack.clone()).await?;
        if let SlotTurn::Waiting = turn {
            return Ok(Handled::Done(Vec::new()));
        }
        let (kind, outcome) = self.invoke(key, &tenant, task).await;
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
        // A step done gives its slot back once its report is committed: were the report lost,
        // the next invocation finds its lease (and whatever the activity made) again. One its
        // run stops driving (failed terminally, out of retries) is given up through the copy
        // its report's commit sends (`apply`).
        if let (SlotTurn::Held, OutcomeKind::Done, Ok(_)) = (turn, kind, &result) {
            self.release_slot(task.step, &holder_of(key, task.run))
                .await;
        }
        result
    }

    /// Whether `task` is current. A cached record may be older than the message, so a stale
    /// verdict is confirmed with a fresh read (and a newer record kept for applying the
    /// report).
    async fn currency(&self, key: &WorkflowKey, task: &StepTask) -> Result<Currency, Error> {
        let current = |r: &WorkflowRecord| {
            r.workflow()
                .active_run()
                .filter(|run| run.id == task.run)
                .and_then(|run| run.step(task.step))
                .is_some_and(|s| s.status == StepStatus::Running && s.token == task.token)
        };
        match self.load(key, false).await {
            Ok(r) if current(&r) => Ok(Currency::Current),
            Ok(_) => match self.load(key, true).await {
                Ok(r) if current(&r) => {
                    self.remember(r);
                    Ok(Currency::Current)
                }
                Ok(r) => Ok(Currency::Stale(Some(Box::new(r)))),
                Err(_) => Ok(Currency::Stale(None)),
            },
            Err(Error::Corrupt { .. }) => Ok(Currency::Stale(None)),
            Err(e) => Err(e),
        }
    }

    /// Drops a stale step message without running the activity. A capped step its run no
    /// longer drives (paused, superseded, cancelled, failed) is given up now rather than at its
    /// lease's expiry. A stale copy of a step still driven (running under a newer token because
    /// another copy was woken first) must not take the slot from under it. A copy of a step
    /// done may have been granted a slot from the line meanwhile: that one goes back.
    async fn drop_stale(
        &self,
        key: &WorkflowKey,
        tenant: &Tenant,
        task: &StepTask,
        stored: Option<Box<WorkflowRecord>>,
        ack: (QueueKind, Receipt),
        delivery: &Delivery,
    ) -> Result<(), Error> {
        bump(&self.stats.stale);
        debug!("stale step message dropped");
        let mut send = Vec::new();
        if let (true, Some(r)) = (self.config.limits.contains_key(&task.step), &stored) {
            let holder = holder_of(key, task.run);
            match slot_hold(r, task) {
                SlotHold::Driven => {}
                SlotHold::Done => self.release_slot(task.step, &holder).await,
                SlotHold::Stopped => {
                    send = self.abandon(key, tenant, task, &holder).await;
                }
            }
        }
        if let Some(record) = &stored {
            let id = workflows::event::step_event_id(task.run, task.step, task.token);
            send.extend(self.resend(key, &id, record, delivery).await?);
        }
        self.send_and_ack(send, ack).await
    }

    /// Takes a slot for `task` when its kind is capped. If every slot is taken, the store puts
    /// the step in line with its own message to resume it; the message is acknowledged and a
    /// copy delayed by `slot_poll` keeps its place, in one commit.
    async fn take_slot(
        &self,
        key: &WorkflowKey,
        task: &StepTask,
        ack: (QueueKind, Receipt),
    ) -> Result<SlotTurn, Error> {
        let Some(&cap) = self.config.limits.get(&task.step) else {
            return Ok(SlotTurn::Uncapped);
        };
        let resume = message(
            key,
            Body::Step(Box::new(task.clone())),
            Duration::ZERO,
            self.clock.now(),
        );
        let (grant, woken) = self
            .store
            .acquire_slot(
                task.step.as_str(),
                key,
                &holder_of(key, task.run),
                cap,
                self.config.slot_ttl,
                &resume.body,
            )
            .await?;
        let mut send = wake(woken);
        match grant {
            SlotGrant::Held { .. } => {
                self.send_woken(send).await;
                Ok(SlotTurn::Held)
            }
            SlotGrant::Waiting { ahead } => {
                bump(&self.stats.slot_waits);
                tracing::Span::current().record("step.outcome", "waiting_for_slot");
                self.metrics
                    .slot_waits
                    .add(1, &[metrics::Metrics::kv("step", task.step.as_str())]);
                debug!(ahead, "waiting for a slot");
                // A slot coming free wakes the step (its resume message is in line); until
                // then it asks again now and then, keeping its place.
                send.push(Outgoing {
                    delay: self.config.slot_poll,
                    ..resume
                });
                self.send_and_ack(send, ack).await?;
                Ok(SlotTurn::Waiting)
            }
        }
    }

    /// Invokes the activity once and turns its outcome into the step's report outcome (a
    /// retryable failure gets its delay from the step's retry policy here: the engine owns the
    /// randomness).
    async fn invoke(
        &self,
        key: &WorkflowKey,
        tenant: &Tenant,
        task: &StepTask,
    ) -> (OutcomeKind, StepOutcome) {
        bump(&self.stats.activities);
        let started = std::time::Instant::now();
        let config = tenant.config_of(key.env);
        let settings = tenant.env_settings(key.env);
        let outcome = self
            .activities
            .invoke(Invocation {
                key,
                domain: &tenant.domain,
                task,
                config: &config,
                settings: &settings,
            })
            .await;
        let kind = OutcomeKind::of(&outcome);
        tracing::Span::current().record("step.outcome", kind.as_str());
        let step_kv = metrics::Metrics::kv("step", task.step.as_str());
        self.metrics.step_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                step_kv.clone(),
                metrics::Metrics::kv("outcome", kind.as_str()),
            ],
        );
        if kind == OutcomeKind::Retryable {
            self.metrics.retries.add(1, &[step_kv]);
        }
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
                    self.clock.now().since(task.first_attempt_at),
                    fastrand::f64(),
                );
                StepOutcome::Retryable { error, retry_in }
            }
            Outcome::Terminal(error) => StepOutcome::Terminal { error },
        };
        (kind, outcome)
    }

    /// Gives up a capped step its run no longer drives: what it holds while it runs (a
    /// builder) goes first, then its slot, so the count of what runs never exceeds the cap.
    /// If the activities cannot give it up now, this returns a copy of the step message to
    /// send after `slot_poll`: stale, it comes back here to try again, the slot still held.
    async fn abandon(
        &self,
        key: &WorkflowKey,
        tenant: &Tenant,
        task: &StepTask,
        holder: &str,
    ) -> Vec<Outgoing> {
        let config = tenant.config_of(key.env);
        let settings = tenant.env_settings(key.env);
        let invocation = Invocation {
            key,
            domain: &tenant.domain,
            task,
            config: &config,
            settings: &settings,
        };
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
                warn!(%step, holder, error = %chain(&e), "slot not released; it comes free when its lease lapses");
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
            warn!(error = %chain(&e), "steps granted a slot not woken; they resume when they next ask");
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
            conflict => Error::unavailable("journal", conflict.to_string()),
        })
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
pub(super) fn capped_copies<'a>(
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
fn copy_of(run: &Run, s: &StepProgress, record: &WorkflowRecord) -> StepTask {
    StepTask {
        run: run.id,
        step: s.kind,
        token: s.token,
        attempt: s.attempt,
        first_attempt_at: s.first_attempt_at.unwrap_or(run.started_at),
        delay: Duration::ZERO,
        release: run.release.clone(),
        resources: record.workflow().resources.clone(),
        // A copy only abandons what the step holds: nothing is deleted or restored by it.
        keep: Vec::new(),
        restore_database: false,
    }
}

/// The message that gives up `task`'s step: sent with the commit of an event that stopped it,
/// it arrives stale and abandons the step before its slot is given back.
pub(super) fn give_up(key: &WorkflowKey, task: &StepTask, now: Timestamp) -> Outgoing {
    message(key, Body::Step(Box::new(task.clone())), Duration::ZERO, now)
}
