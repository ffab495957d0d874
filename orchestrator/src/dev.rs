//! The demo of `orchestrator dev`: a demo tenant and its pushes, and a watcher that prints a
//! line per history entry of the demo workflows as the workers write them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use workflows::{
    Command, Domain, Environment, Event, EventId, GitSha, HistoryEntry, Push, RepoKind, State,
    StepKind, StepOutcome, Tenant, TenantId, Timestamp, WorkflowKey,
};

use crate::describe::describe_event;
use crate::engine::enqueue;
use crate::ports::{Error, Queue, Store};
use crate::tenants;

/// The demo tenant's id.
pub const DEMO_TENANT: &str = "demo";

/// The demo tenant's domain.
const DEMO_DOMAIN: &str = "demo.example.com";

/// The demo tenant's GitLab projects (infra, app).
const DEMO_PROJECTS: (u64, u64) = (1001, 1002);

/// Registers the demo tenant (once) and pushes new commits to both of its repositories on
/// `dev`, so every `orchestrator dev` shows a deployment. Returns the demo workflows.
pub async fn start_demo<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    now: Timestamp,
) -> Result<Vec<WorkflowKey>, Error> {
    let id = TenantId::new(DEMO_TENANT).map_err(|e| Error::invalid_by("the demo tenant", e))?;
    if store.tenant(&id).await?.is_none() {
        register(store, &id, now).await?;
    }
    let key = WorkflowKey::new(id, Environment::Dev);
    let seed = u64::try_from(now.as_unix_millis()).unwrap_or(0);
    for (repo, salt) in [(RepoKind::Infra, 1u64), (RepoKind::App, 2u64)] {
        let sha = GitSha::new(format!("{seed:016x}{salt:024x}"))
            .map_err(|e| Error::invalid_by("a demo commit", e))?;
        let event = Event::Push(Push {
            event_id: EventId::new(format!("demo:{key}:{repo}:{sha}"))
                .map_err(|e| Error::invalid_by("a demo event id", e))?,
            repo,
            sha: sha.clone(),
            before: None,
            git_ref: "refs/heads/dev".into(),
            author: "demo".into(),
            message: format!("demo {repo} push"),
            received_at: now,
        });
        enqueue(queue, &key, event, now).await?;
        info!(workflow = %key, %repo, sha = %sha.short(), "demo push queued");
    }
    Ok(vec![key])
}

async fn register<S: Store>(store: &S, id: &TenantId, now: Timestamp) -> Result<(), Error> {
    let token = tenants::try_generate_token()
        .map_err(|e| Error::unavailable_by("random source", "a demo webhook secret", e))?;
    let domain = Domain::new(DEMO_DOMAIN).map_err(|e| Error::invalid_by("the demo domain", e))?;
    let (infra, app) = DEMO_PROJECTS;
    let tenant = Tenant::new(
        id.clone(),
        domain,
        infra,
        app,
        tenants::token_sha256(&token),
        now,
    );
    match store.put_tenant(&tenant, true).await {
        Ok(()) => {
            info!(
                tenant = DEMO_TENANT,
                "demo tenant registered (GitLab projects {infra} and {app})"
            );
            Ok(())
        }
        Err(Error::AlreadyExists(what)) => {
            warn!(%what, "demo tenant not registered: its projects are taken");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Prints every new history entry of `key` to stderr as it is written, until `stop`: a plain
/// line, or with `json` a log event (so every line of `--log-format json` is JSON).
pub async fn watch<S: Store>(store: Arc<S>, key: WorkflowKey, stop: CancellationToken, json: bool) {
    let mut after = match store.workflow(&key).await {
        Ok(Some(r)) => r.version,
        _ => 0,
    };
    // A step waiting for something reports the same progress many times; say it once.
    let mut said: HashMap<StepKind, String> = HashMap::new();
    // After the stop, one more pass prints what was written up to it (the last step's entry).
    let mut last_pass = false;
    loop {
        last_pass |= stop.is_cancelled();
        match store.history(&key, after, 100).await {
            Ok(entries) => {
                for e in entries {
                    after = e.version;
                    if repeats_progress(&e, &mut said) {
                        continue;
                    }
                    if json {
                        info!(workflow = %key, version = e.version, "{}", describe_entry(&e));
                    } else {
                        eprintln!("{}", describe_entry(&e));
                    }
                }
            }
            Err(e) => warn!(error = %crate::ports::chain(&e), "watch: history not readable"),
        }
        if last_pass {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Whether `e` reports the same progress of a step as the last entry that step reported.
fn repeats_progress(e: &HistoryEntry, said: &mut HashMap<StepKind, String>) -> bool {
    let Event::Step(r) = &e.event else {
        return false;
    };
    if let StepOutcome::Progress { note, .. } = &r.outcome {
        if said.get(&r.step) == Some(note) {
            return true;
        }
        said.insert(r.step, note.clone());
    } else {
        said.remove(&r.step);
    }
    false
}

/// Cancels `stop` once every workflow of `keys` is live (`orchestrator dev --exit-when-live`).
pub async fn stop_when_live<S: Store>(
    store: Arc<S>,
    keys: Vec<WorkflowKey>,
    stop: CancellationToken,
) {
    loop {
        let mut live = !keys.is_empty();
        for k in &keys {
            live &= matches!(store.workflow(k).await, Ok(Some(r)) if r.state() == State::Live);
        }
        if live {
            info!("every demo workflow is live");
            stop.cancel();
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// One line for a history entry, for people watching `orchestrator dev`: the workflow, the
/// version, the state after it, what happened, and which steps it started.
pub fn describe_entry(e: &HistoryEntry) -> String {
    let started: Vec<String> = e
        .commands
        .iter()
        .filter_map(|c| match c {
            Command::RunStep(t) if t.delay.is_zero() => Some(t.step.to_string()),
            _ => None,
        })
        .collect();
    let mut line = format!(
        "{}  v{:<3} {:<18} {}",
        e.key,
        e.version,
        e.to,
        describe_event(&e.event)
    );
    if let Event::Step(r) = &e.event
        && r.step == StepKind::Rollout
        && matches!(r.outcome, StepOutcome::Done { .. })
    {
        line.push_str("; the release is live");
        if let (true, Some(run)) = (e.to != State::Live, e.run) {
            line.push_str(&format!("; run {run} starts for the pushes that waited"));
        }
    }
    if !started.is_empty() {
        line.push_str(&format!("; starting {}", started.join(", ")));
    }
    line
}
