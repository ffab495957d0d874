//! `wfctl approve|retry|cancel|redeploy|decommission`: an operator's signal travels as an event
//! through the events queue, so the engine stays the only writer of records.
//!
//! Before sending, the signal is applied to a copy of the stored record (the machine is a pure
//! function): a signal the workflow would refuse now is not sent, and the command says why and
//! exits with `1`. With `--wait` the command then watches the history until the engine has
//! applied the signal and reports its verdict (the workflow may have moved on meanwhile, so
//! the engine's verdict is the one that counts), and then the record until the work the signal
//! started is done: the workflow is at rest (live, failed, decommissioned, awaiting approval).
//! A signal whose work ends in `failed` exits with `1`, naming the failed step.

use std::time::Duration;

use serde::Serialize;
use workflows::{Event, EventId, Input, Signal, State, TenantId, Timestamp, Verdict, WorkflowKey};

use crate::Error;
use crate::output::Printer;
use crate::tenant::unknown_tenant;
use crate::workflow::missing_workflow;
use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, Store};

/// What an operator asks of a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A signal.
    Signal(Signal),
    /// Provision the environment (again, after a decommission; restoring the database from
    /// its final snapshot with `from_snapshot`).
    Provision {
        /// Restore the database from the final snapshot.
        from_snapshot: bool,
    },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Signal(s) => s.fmt(f),
            Action::Provision { .. } => f.write_str("provision"),
        }
    }
}

/// What to signal, and whether to wait for the engine's verdict.
#[derive(Debug, Clone)]
pub struct SignalRequest {
    /// The tenant.
    pub tenant: TenantId,
    /// The workflow's environment.
    pub env: workflows::Environment,
    /// The signal, or a provision.
    pub signal: Action,
    /// Who sends it (recorded in the history).
    pub actor: String,
    /// Wait up to this long for the engine to apply it.
    pub wait: Option<Duration>,
}

/// The JSON answer of a signal command.
#[derive(Debug, Clone, Serialize)]
struct SignalView {
    workflow: String,
    signal: String,
    event_id: String,
    /// `sent` (not waited for), `accepted`, `ignored`.
    status: &'static str,
    /// The state before and after, once applied.
    from: Option<State>,
    to: Option<State>,
    /// Why it changed nothing (`ignored`).
    reason: Option<String>,
    /// With `--wait`: the state the workflow came to rest in once the signal's work was done
    /// (live, failed, decommissioned, awaiting approval, unprovisioned).
    settled: Option<State>,
}

/// Whether the workflow in `state` has no work in flight: it waits for a push, a person, or
/// nothing at all.
fn at_rest(state: State) -> bool {
    matches!(
        state,
        State::Live
            | State::Failed
            | State::Decommissioned
            | State::Unprovisioned
            | State::AwaitingApproval
    )
}

/// Watches `key`'s record from `version` on until it is at rest, or `deadline` passes (then
/// `None`). With the state, the error of a failed step, if it came to rest failed.
async fn settle<S: Store>(
    store: &S,
    key: &WorkflowKey,
    version: u64,
    deadline: tokio::time::Instant,
) -> Result<(Option<State>, Option<String>), Error> {
    loop {
        if let Some(record) = store.workflow(key).await?
            && record.version >= version
            && at_rest(record.state())
        {
            let failure = record.workflow().run.as_ref().and_then(|run| {
                run.steps
                    .iter()
                    .find(|s| s.status == workflows::StepStatus::Failed)
                    .map(|s| {
                        format!(
                            "{} failed: {}",
                            s.kind,
                            s.last_error.as_deref().unwrap_or("no error recorded")
                        )
                    })
            });
            return Ok((Some(record.state()), failure));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((None, None));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How often `--wait` looks at the history.
const POLL: Duration = Duration::from_millis(200);

/// Checks `req` against the stored record, sends it, and with `--wait` reports the verdict.
pub async fn send<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    req: &SignalRequest,
    now: Timestamp,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let key = WorkflowKey::new(req.tenant.clone(), req.env);
    let Some(tenant) = store.tenant(&req.tenant).await? else {
        return Err(unknown_tenant(store, &req.tenant).await);
    };
    let signal = req.signal;
    let record = match store.workflow(&key).await? {
        Some(record) => record,
        // An environment never pushed to can be provisioned.
        None if matches!(signal, Action::Provision { .. }) => {
            workflows::WorkflowRecord::new(key.clone(), now)
        }
        None => return Err(missing_workflow(store, &req.tenant, req.env).await),
    };
    let event_id = new_event_id(&format!("signal:{signal}"), &key, now)?;
    let event = match signal {
        Action::Signal(signal) => Event::Signal {
            event_id: event_id.clone(),
            signal,
            actor: req.actor.clone(),
        },
        Action::Provision { from_snapshot } => Event::Provision {
            event_id: event_id.clone(),
            from_snapshot,
        },
    };
    let mut probe = record.clone();
    let input = Input {
        now,
        settings: tenant.settings(req.env),
    };
    let mut view = SignalView {
        workflow: key.to_string(),
        signal: signal.to_string(),
        event_id: event_id.to_string(),
        status: "sent",
        from: None,
        to: None,
        reason: None,
        settled: None,
    };
    match probe.apply(&event, input).verdict {
        Verdict::Refused(reason) => {
            return Err(Error::Refused(format!(
                "{signal} refused for {key} ({}): {reason}; nothing was sent",
                record.state()
            )));
        }
        Verdict::Ignored(reason) => {
            view.status = "ignored";
            view.reason = Some(reason.clone());
            return finish(
                p,
                &view,
                &format!("{signal} would change nothing for {key}: {reason}; nothing was sent"),
            );
        }
        _ => {}
    }
    // The ingress answers pushes to a decommissioned environment as ignored until it is
    // provisioned again; the mark is set before the decommission is sent and cleared before
    // the provision is, so no push slips between.
    let decommissioned = match signal {
        Action::Signal(Signal::Decommission) => Some(true),
        Action::Provision { .. } => Some(false),
        Action::Signal(_) => None,
    };
    if let Some(mark) = decommissioned {
        mark_decommissioned(store, &tenant, req.env, mark, now).await?;
    }
    enqueue(queue, &key, event, now).await?;
    let Some(wait) = req.wait else {
        return finish(
            p,
            &view,
            &format!(
                "{signal} sent to {key} (event {event_id}); `wfctl show {} --env {}` shows its effect",
                req.tenant, req.env
            ),
        );
    };
    let deadline = tokio::time::Instant::now() + wait;
    let entry = loop {
        if let Some(entry) = store.history_of_event(&key, &event_id).await? {
            break entry;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::TimedOut(format!(
                "{signal} was sent to {key} (event {event_id}) but no worker applied it within {}: are workers running?",
                humantime::format_duration(wait)
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    view.from = Some(entry.from);
    view.to = Some(entry.to);
    match entry.verdict {
        Verdict::Accepted => {
            view.status = "accepted";
            let mut text = format!("{signal}: {key} {} -> {}", entry.from, entry.to);
            // The work the signal started (a rollout, a decommission) is waited for too.
            let (state, failure) = settle(store, &key, entry.version, deadline).await?;
            let state = state.ok_or_else(|| {
                Error::TimedOut(format!(
                    "{signal} was applied to {key}, but its work did not finish within {}; `wfctl show {} --env {}` shows where it is",
                    humantime::format_duration(wait),
                    req.tenant,
                    req.env
                ))
            })?;
            view.settled = Some(state);
            if state != entry.to {
                text.push_str(&format!(", then {state}"));
            }
            if state == State::Failed && signal != Action::Signal(Signal::Cancel) {
                finish(p, &view, &text)?;
                return Err(Error::Failed(format!(
                    "{signal}: {key} failed{}",
                    failure.map_or_else(String::new, |f| format!(": {f}"))
                )));
            }
            finish(p, &view, &text)
        }
        Verdict::Ignored(reason) => {
            view.status = "ignored";
            view.reason = Some(reason.clone());
            finish(
                p,
                &view,
                &format!("{signal} changed nothing for {key}: {reason}"),
            )
        }
        // The workflow moved on between the check and the engine's turn.
        Verdict::Refused(reason) => Err(Error::Refused(format!(
            "{signal} refused for {key} ({}): {reason}",
            entry.from
        ))),
        Verdict::Stale(reason) => Err(Error::Refused(format!(
            "{signal} dropped for {key}: {reason}"
        ))),
        Verdict::Duplicate => Err(Error::Refused(format!(
            "{signal} for {key} was applied before"
        ))),
    }
}

/// Sets or clears `env`'s decommissioned mark in `tenant`'s record (nothing when it is so).
async fn mark_decommissioned<S: Store>(
    store: &S,
    tenant: &workflows::Tenant,
    env: workflows::Environment,
    mark: bool,
    now: Timestamp,
) -> Result<(), Error> {
    let mut settings = tenant.env_settings(env);
    if settings.decommissioned == mark {
        return Ok(());
    }
    settings.decommissioned = mark;
    let mut changed = tenant.clone();
    changed.set_env_settings(env, settings);
    changed.updated_at = now;
    store.update_tenant(tenant, &changed).await?;
    Ok(())
}

fn finish(p: &mut Printer<'_>, view: &SignalView, text: &str) -> Result<(), Error> {
    if p.is_json() {
        p.json(view)?;
    } else {
        p.line(text)?;
    }
    Ok(())
}

/// A fresh id of an operator's event for `key`: `<kind>:<key>:<time>:<random>`, so that two
/// operators sending the same thing at the same millisecond are still two events.
pub(crate) fn new_event_id(
    kind: &str,
    key: &WorkflowKey,
    now: Timestamp,
) -> Result<EventId, Error> {
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce).map_err(Error::Random)?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    EventId::new(format!("{kind}:{key}:{}:{nonce}", now.as_unix_millis()))
        .map_err(|e| Error::Invalid(e.to_string()))
}
