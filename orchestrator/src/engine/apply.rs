//! Applying an event: load the record, apply the event (pure), and commit the new record, its
//! history entry, the messages of its commands and the acknowledgement as one unit; reload and
//! apply again on a version conflict. An event applied before has its awaited commands sent
//! again when a journal that is not atomic may have lost them.

use activities::Activities;
use tracing::{debug, info};
use workflows::{
    Command, Event, EventId, Input, StepStatus, StepTask, Verdict, WorkflowKey, WorkflowRecord,
};

use super::step::{SlotHold, capped_copies, give_up, slot_hold};
use super::{Engine, Handled, bump, metrics, outgoing, verdict_name};
use crate::ports::{
    Commit, Delivery, Error, Journal, Outgoing, Queue, QueueKind, Receipt, RecordWrite, Store,
    WriteError,
};

impl<S: Store, Q: Queue, J: Journal, A: Activities> Engine<S, Q, J, A> {
    /// Applies `event` to the workflow `key` and commits the result with the acknowledgement.
    pub(super) async fn apply(
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
            settings: tenant.settings(key.env),
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
                            .filter(|task| slot_hold(&record, task) == SlotHold::Stopped)
                            .map(|task| give_up(key, task, now)),
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
        Err(Error::unavailable(
            "engine",
            format!(
                "{key}: {} version conflicts in a row; left for redelivery",
                self.config.max_conflicts
            ),
        ))
    }

    /// What to send again for `delivery`, whose event `id` was applied before: the messages
    /// of that event's commands that `record` (the current record) still waits for.
    ///
    /// Only a journal that is not atomic can have written the record and died before sending;
    /// the message that worker held is then delivered again, so a first delivery has nothing to
    /// repair (it is a duplicate or a late copy, and re-sending for it would make every copy
    /// breed another). A command the workflow has moved past was delivered: not sent again.
    pub(super) async fn resend(
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
            .map(|task| give_up(key, &task, now)),
        );
        Ok(send)
    }

    pub(super) async fn commit(&self, commit: Commit) -> Result<Vec<Delivery>, WriteError> {
        match self.journal.commit(vec![commit]).await.pop() {
            Some(r) => r,
            None => Err(WriteError::Store(Error::unavailable(
                "journal",
                "no result for a commit",
            ))),
        }
    }
}
