//! `wfctl dlq list|show|redrive|discard`: what is in the dead-letter queues, why, and putting
//! messages back once the cause is fixed.
//!
//! Every dead letter is assessed against the store before it is shown or moved:
//! - an external event (push, provision, signal, re-arm) is `applied` when the workflow's
//!   history holds an entry that applied its id, else `pending`;
//! - a step message or retry timer is `awaited` when the workflow's active run still waits for
//!   it (same run, step and token), else `stale` (the engine would drop it);
//! - a body that does not decode is `undecodable`; a message for a workflow that does not
//!   exist is `no_workflow`; one whose record does not decode is `unknown`.
//!
//! Redrive never duplicates an applied event: the record's deduplication window only covers
//! its last 64 events, so an applied event is looked up in the history and discarded instead
//! of being put back. Everything else is put back (a stale step is dropped by the engine, an
//! undecodable body is quarantined again unless the workers now understand it).

use serde::Serialize;
use workflows::{Body, Command, Envelope, Event, EventId, Timestamp, WorkflowKey};

use crate::output::{Cell, Printer, Style, Table, absolute, sanitize};
use crate::views::{describe_event, verdict_parts};
use crate::{Error, list_some};
use orchestrator::ports::queue::Disposal;
use orchestrator::ports::{self, DeadLetter, Queue, QueueKind, Store};

/// How much of an undecodable body `show` prints.
const RAW_PREVIEW: usize = 4096;

/// What a dead letter is, as far as the store can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// An external event the workflow has not applied: redrive applies it.
    Pending,
    /// An external event the workflow has applied: redrive discards it.
    Applied,
    /// A step message or timer the workflow still waits for: redrive resumes the step.
    Awaited,
    /// A step message or timer of a run or attempt that has moved on: the engine drops it.
    Stale,
    /// For a workflow that does not exist (yet).
    NoWorkflow,
    /// The body does not decode as a queue envelope.
    Undecodable,
    /// The workflow's record cannot be read.
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Applied => "applied",
            Status::Awaited => "awaited",
            Status::Stale => "stale",
            Status::NoWorkflow => "no_workflow",
            Status::Undecodable => "undecodable",
            Status::Unknown => "unknown",
        }
    }

    fn style(self) -> Style {
        match self {
            Status::Pending | Status::Awaited => Style::Yellow,
            Status::Applied | Status::Stale => Style::Dim,
            Status::NoWorkflow | Status::Undecodable | Status::Unknown => Style::Red,
        }
    }
}

/// A dead letter with what it carries and its status.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    /// The queue it was dead-lettered from: `events` or `steps`.
    pub queue: QueueKind,
    /// Its id in the dead-letter queue (what `show`, `redrive` and `discard` take).
    pub id: String,
    /// The workflow (`tenant#env`) it is for, or null when the body does not decode.
    pub workflow: Option<String>,
    /// What it carries: `push`, `provision`, `signal`, `timer`, `rearm`, `step`, or
    /// `undecodable`.
    pub message: &'static str,
    /// The event's id (for a step message, the id its report would carry), or null.
    pub event_id: Option<EventId>,
    /// The message in words.
    pub summary: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many times it had been received.
    pub receive_count: u32,
    /// When it was first sent.
    pub sent_at: Timestamp,
    /// When it was dead-lettered.
    pub dead_at: Timestamp,
    /// `pending`, `applied`, `awaited`, `stale`, `no_workflow`, `undecodable` or `unknown`.
    pub status: Status,
    /// The status in words (which version applied it, what the run waits for, the decoding
    /// error).
    pub status_detail: String,
    /// `show` only: the decoded envelope in full, or null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<serde_json::Value>,
    /// `show` only: the start of a body that does not decode (lossy UTF-8), or null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// Which dead letters `redrive` and `discard` take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every dead letter (of the chosen queues) present when the command starts.
    All,
    /// These dead-letter ids.
    Ids(Vec<String>),
}

/// The queues a command looks at: one, or both.
pub fn queues(queue: Option<QueueKind>) -> Vec<QueueKind> {
    queue.map_or_else(|| QueueKind::ALL.to_vec(), |q| vec![q])
}

/// Every dead letter of `queues`, oldest first within each queue.
async fn all_dead<Q: Queue>(queue: &Q, queues: &[QueueKind]) -> Result<Vec<DeadLetter>, Error> {
    let mut all = Vec::new();
    for &q in queues {
        all.extend(queue.dead_letters(q, usize::MAX).await?);
    }
    Ok(all)
}

/// Assesses `dead` against the store. `full` keeps the envelope (or raw body) for `show`.
async fn assess<S: Store>(
    store: &S,
    dead: &DeadLetter,
    full: bool,
) -> Result<DeadLetterView, Error> {
    let mut view = DeadLetterView {
        queue: dead.queue,
        id: dead.id.clone(),
        workflow: dead.group.clone(),
        message: "undecodable",
        event_id: None,
        summary: String::new(),
        reason: dead.reason.clone(),
        receive_count: dead.receive_count,
        sent_at: dead.sent_at,
        dead_at: dead.dead_at,
        status: Status::Undecodable,
        status_detail: String::new(),
        envelope: None,
        raw: None,
    };
    let envelope: Envelope = match workflows::decode(&dead.body) {
        Ok(e) => e,
        Err(e) => {
            view.status_detail = e.to_string();
            view.summary = format!("{} bytes that do not decode", dead.body.len());
            if full {
                let end = dead.body.len().min(RAW_PREVIEW);
                view.raw = Some(String::from_utf8_lossy(&dead.body[..end]).into_owned());
            }
            return Ok(view);
        }
    };
    let key = envelope.key.clone();
    view.workflow = Some(key.to_string());
    if full {
        view.envelope = serde_json::to_value(&envelope).ok();
    }
    let (status, detail) = match &envelope.body {
        Body::Event(event) => {
            view.message = event.kind();
            view.event_id = Some(event.id());
            view.summary = describe_event(event);
            match event {
                Event::Timer(timer) => {
                    let cmd = Command::ScheduleTimer {
                        timer: *timer,
                        delay: std::time::Duration::ZERO,
                    };
                    awaited(store, &key, &cmd).await?
                }
                _ => applied(store, &key, &event.id()).await?,
            }
        }
        Body::Step(task) => {
            view.message = "step";
            view.summary = format!("{} attempt {} of run {}", task.step, task.attempt, task.run);
            awaited(store, &key, &Command::RunStep(task.clone())).await?
        }
    };
    view.status = status;
    view.status_detail = detail;
    Ok(view)
}

/// Whether the external event `id` was applied to `key`.
async fn applied<S: Store>(
    store: &S,
    key: &WorkflowKey,
    id: &EventId,
) -> Result<(Status, String), Error> {
    match store.history_of_event(key, id).await? {
        // Only events that changed the record have history entries.
        Some(entry) => Ok((
            Status::Applied,
            format!(
                "applied at version {} ({}, {}): redrive discards it",
                entry.version,
                absolute(entry.at),
                verdict_parts(&entry.verdict).0
            ),
        )),
        None => match store.workflow(key).await {
            Ok(Some(record)) if record.has_applied(id) => Ok((
                Status::Applied,
                "applied (in the record's deduplication window): redrive discards it".to_owned(),
            )),
            Ok(_) => Ok((
                Status::Pending,
                "not applied: redrive applies it".to_owned(),
            )),
            Err(e @ ports::Error::Corrupt { .. }) => Ok((Status::Unknown, ports::chain(&e))),
            Err(e) => Err(e.into()),
        },
    }
}

/// Whether `key`'s active run still waits for the step message or timer `cmd`.
async fn awaited<S: Store>(
    store: &S,
    key: &WorkflowKey,
    cmd: &Command,
) -> Result<(Status, String), Error> {
    match store.workflow(key).await {
        Ok(Some(record)) if record.awaits(cmd) => Ok((
            Status::Awaited,
            "the run waits for it: redrive resumes the step".to_owned(),
        )),
        Ok(Some(record)) => Ok((
            Status::Stale,
            format!(
                "the workflow has moved on (now {} at version {}): the engine drops it",
                record.state().as_str(),
                record.version
            ),
        )),
        Ok(None) => Ok((Status::NoWorkflow, format!("no workflow {key}"))),
        Err(e @ ports::Error::Corrupt { .. }) => Ok((Status::Unknown, ports::chain(&e))),
        Err(e) => Err(e.into()),
    }
}

/// `wfctl dlq list`: the dead letters of `queues` (at most `limit` per queue), assessed.
pub async fn list<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    queues: &[QueueKind],
    limit: usize,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let mut views = Vec::new();
    for &q in queues {
        for dead in queue.dead_letters(q, limit).await? {
            views.push(assess(store, &dead, false).await?);
        }
    }
    if p.is_json() {
        p.json(&views)?;
        return Ok(());
    }
    if views.is_empty() {
        p.note(&format!(
            "no dead letters in {}",
            list_some(queues.iter().map(|q| format!("the {q} queue")), 2)
        ))?;
        return Ok(());
    }
    let mut table = Table::new([
        "QUEUE", "ID", "WORKFLOW", "MESSAGE", "RECEIVES", "DEAD", "STATUS", "REASON",
    ]);
    for v in &views {
        table.row([
            Cell::from(v.queue.as_str()),
            Cell::from(v.id.as_str()),
            Cell::from(v.workflow.as_deref().unwrap_or("-")),
            Cell::from(format!("{}: {}", v.message, v.summary)),
            Cell::from(v.receive_count.to_string()),
            Cell::from(p.ago(v.dead_at)),
            Cell::styled(v.status.as_str(), v.status.style()),
            Cell::from(v.reason.as_str()),
        ]);
    }
    p.table(&table)?;
    Ok(())
}

/// The dead letter `id` of `queues`, or a not-found error naming the ones there are.
async fn find<Q: Queue>(queue: &Q, queues: &[QueueKind], id: &str) -> Result<DeadLetter, Error> {
    let all = all_dead(queue, queues).await?;
    let ids: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
    all.into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| not_found(&[id.to_owned()], queues, &ids))
}

fn not_found(missing: &[String], queues: &[QueueKind], present: &[String]) -> Error {
    let within = list_some(
        queues.iter().map(|q| format!("the {q} dead-letter queue")),
        2,
    );
    let what = if missing.len() == 1 {
        format!("no dead letter {:?} in {within}", missing[0])
    } else {
        format!("no dead letters {} in {within}", list_some(missing, 5))
    };
    if present.is_empty() {
        Error::NotFound(format!("{what}: it is empty"))
    } else {
        Error::NotFound(format!(
            "{what}; dead letters there: {}",
            list_some(present, 10)
        ))
    }
}

/// `wfctl dlq show ID`: one dead letter in full.
pub async fn show<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    queues: &[QueueKind],
    id: &str,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let dead = find(queue, queues, id).await?;
    let v = assess(store, &dead, true).await?;
    if p.is_json() {
        p.json(&v)?;
        return Ok(());
    }
    let mut table = Table::headless();
    let mut field = |name: &str, value: Cell| table.row([Cell::from(name), value]);
    field("queue", Cell::from(v.queue.as_str()));
    field("id", Cell::from(v.id.as_str()));
    field("workflow", Cell::from(v.workflow.as_deref().unwrap_or("-")));
    field(
        "message",
        Cell::from(format!("{}: {}", v.message, v.summary)),
    );
    field(
        "event id",
        Cell::from(
            v.event_id
                .as_ref()
                .map_or("-".to_owned(), ToString::to_string),
        ),
    );
    field("reason", Cell::from(v.reason.as_str()));
    field("receives", Cell::from(v.receive_count.to_string()));
    field(
        "sent",
        Cell::from(format!("{} ({})", absolute(v.sent_at), p.ago(v.sent_at))),
    );
    field(
        "dead",
        Cell::from(format!("{} ({})", absolute(v.dead_at), p.ago(v.dead_at))),
    );
    field(
        "status",
        Cell::styled(
            format!("{}: {}", v.status.as_str(), v.status_detail),
            v.status.style(),
        ),
    );
    p.table(&table)?;
    if let Some(envelope) = &v.envelope {
        p.line("envelope:")?;
        let text = serde_json::to_string_pretty(envelope).unwrap_or_default();
        for line in text.lines() {
            p.line(&sanitize(line))?;
        }
    }
    if let Some(raw) = &v.raw {
        p.line(&format!(
            "body ({} bytes{}):",
            dead.body.len(),
            if dead.body.len() > RAW_PREVIEW {
                ", the start shown"
            } else {
                ""
            }
        ))?;
        for line in raw.lines() {
            p.line(&sanitize(line))?;
        }
    }
    Ok(())
}

/// What became of one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    /// Put back on its queue.
    Redriven,
    /// Deleted.
    Discarded,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Redriven => "redriven",
            Action::Discarded => "discarded",
        }
    }
}

/// What `redrive` or `discard` did to one dead letter.
#[derive(Debug, Clone, Serialize)]
struct OutcomeView {
    queue: QueueKind,
    id: String,
    workflow: Option<String>,
    action: Action,
    status: Status,
    /// Why (for a discarded applied event: the version that applied it).
    detail: String,
}

/// The dead letters `selection` names in `queues`, or a not-found error (nothing is moved
/// unless every id is found).
async fn select<Q: Queue>(
    queue: &Q,
    queues: &[QueueKind],
    selection: &Selection,
) -> Result<Vec<DeadLetter>, Error> {
    let all = all_dead(queue, queues).await?;
    match selection {
        Selection::All => Ok(all),
        Selection::Ids(ids) => {
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !all.iter().any(|d| &d.id == *id))
                .cloned()
                .collect();
            if !missing.is_empty() {
                let present: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
                return Err(not_found(&missing, queues, &present));
            }
            Ok(all.into_iter().filter(|d| ids.contains(&d.id)).collect())
        }
    }
}

/// `wfctl dlq redrive`: puts the selected dead letters back on their queues, except events
/// already applied, which are discarded.
pub async fn redrive<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    queues: &[QueueKind],
    selection: &Selection,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    move_dead_letters(store, queue, queues, selection, Disposal::Redrive, p).await
}

/// `wfctl dlq discard`: deletes the selected dead letters.
pub async fn discard<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    queues: &[QueueKind],
    selection: &Selection,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    move_dead_letters(store, queue, queues, selection, Disposal::Discard, p).await
}

/// Redrives or discards (`disposal`) the selected dead letters; a redrive discards the events
/// already applied instead.
async fn move_dead_letters<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    queues: &[QueueKind],
    selection: &Selection,
    disposal: Disposal,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let back = disposal == Disposal::Redrive;
    let selected = select(queue, queues, selection).await?;
    let mut outcomes: Vec<OutcomeView> = Vec::new();
    for &q in queues {
        let mut to_redrive = Vec::new();
        let mut to_discard = Vec::new();
        for dead in selected.iter().filter(|d| d.queue == q) {
            let v = assess(store, dead, false).await?;
            let goes_back = back && v.status != Status::Applied;
            let outcome = OutcomeView {
                queue: q,
                id: v.id.clone(),
                workflow: v.workflow,
                action: if goes_back {
                    Action::Redriven
                } else {
                    Action::Discarded
                },
                status: v.status,
                detail: v.status_detail,
            };
            if goes_back {
                to_redrive.push(outcome);
            } else {
                to_discard.push(outcome);
            }
        }
        if !to_discard.is_empty() {
            let ids = to_discard.iter().map(|o| o.id.clone()).collect();
            let done = queue.discard(q, ids).await?;
            outcomes.extend(to_discard.into_iter().filter(|o| done.contains(&o.id)));
        }
        if !to_redrive.is_empty() {
            let ids = to_redrive.iter().map(|o| o.id.clone()).collect();
            let done = queue.redrive(q, Some(ids)).await?;
            outcomes.extend(to_redrive.into_iter().filter(|o| done.contains(&o.id)));
        }
    }
    if p.is_json() {
        p.json(&outcomes)?;
    } else if outcomes.is_empty() {
        p.note("no dead letters to move")?;
    } else {
        let mut table = Table::new(["QUEUE", "ID", "WORKFLOW", "ACTION", "STATUS", "DETAIL"]);
        for o in &outcomes {
            table.row([
                Cell::from(o.queue.as_str()),
                Cell::from(o.id.as_str()),
                Cell::from(o.workflow.as_deref().unwrap_or("-")),
                Cell::from(o.action.as_str()),
                Cell::styled(o.status.as_str(), o.status.style()),
                Cell::from(o.detail.as_str()),
            ]);
        }
        p.table(&table)?;
        let redriven = outcomes
            .iter()
            .filter(|o| o.action == Action::Redriven)
            .count();
        let discarded = outcomes.len() - redriven;
        p.note(&format!(
            "{redriven} redriven, {discarded} discarded{}",
            if back && discarded > 0 {
                " (already applied: putting them back would apply them twice)"
            } else {
                ""
            }
        ))?;
    }
    // Gone between listing and moving (another operator, or SQS hid it): said, not hidden.
    let missed = selected.len() - outcomes.len();
    if missed > 0 {
        return Err(Error::NotFound(format!(
            "{missed} of the selected dead letters were no longer there to move (moved by someone else?); run `wfctl dlq list`"
        )));
    }
    Ok(())
}
