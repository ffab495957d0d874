//! An engine in the test's process, on any backend, with activities that finish at once:
//! [`pushes_reach_live`] takes a push of each repository to live on two workflows (the engine
//! tests, on SQLite, on moto and on moto behind injected faults), and [`start`] runs one for
//! tests that drive it from outside (the dead-letter tests of `wfctl`).

use std::sync::Arc;
use std::time::Duration;

use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::{Journal, Queue, QueueKind, Store};
use workflows::{
    Domain, Environment, Event, EventId, GitSha, Push, RepoKind, State, Tenant, TenantId,
    Timestamp, WorkflowKey,
};

/// Activities that finish at once with a plausible output.
#[derive(Debug)]
pub struct Instant;

impl activities::Activities for Instant {
    async fn invoke(&self, invocation: activities::Invocation<'_>) -> activities::Outcome {
        activities::Outcome::Done(workflows::testing::output_for(invocation.task))
    }
}

/// Calls `f` until it succeeds, as a client facing a throttling backend would; a failure
/// that is not retryable, or ten in a row, fails the test.
pub async fn retried<T, E: std::fmt::Display + Retryable, F: AsyncFn() -> Result<T, E>>(f: F) -> T {
    let mut tries = 0;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tries += 1;
                assert!(e.retryable() && tries < 10, "{e}");
            }
        }
    }
}

/// Errors that know whether trying again may pass.
pub trait Retryable {
    /// Whether trying again may pass.
    fn retryable(&self) -> bool;
}

impl Retryable for orchestrator::ports::Error {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

/// Registers tenant `acme`, pushes infra and app to its dev and production workflows, runs an
/// engine until both are live with both, and checks that nothing was dead-lettered. Returns
/// the transitions the engine made.
pub async fn pushes_reach_live<B: Queue + Store + Journal>(stack: Arc<B>) -> u64 {
    let tenant = Tenant::new(
        TenantId::new("acme").expect("id"),
        Domain::new("acme.example").expect("domain"),
        1,
        2,
        "00".repeat(32),
        Timestamp::from_unix_millis(1_000),
    );
    retried(async || stack.put_tenant(&tenant, true).await).await;
    let clock: SharedClock = Arc::new(SystemClock);
    let engine = engine(&stack, &clock);
    let keys: Vec<WorkflowKey> = [Environment::Dev, Environment::Production]
        .into_iter()
        .map(|env| WorkflowKey::new(tenant.id.clone(), env))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        for (n, repo) in [(1u32, RepoKind::Infra), (2, RepoKind::App)] {
            let event = Event::Push(Push {
                event_id: EventId::new(format!("p{i}-{n}")).expect("id"),
                repo,
                sha: GitSha::new(format!("{n:040x}")).expect("sha"),
                before: None,
                git_ref: "refs/heads/main".into(),
                author: "jane".into(),
                message: "m".into(),
                received_at: clock.now(),
            });
            retried(async || enqueue(&*stack, key, event.clone(), clock.now()).await).await;
        }
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut live = true;
        for key in &keys {
            live &= matches!(stack.workflow(key).await, Ok(Some(r)) if r.state() == State::Live
                && r.workflow().deployed.as_ref().is_some_and(|d| d.release.app.is_some() && d.release.infra.is_some()));
        }
        if live {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not live in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    running.await.expect("engine stops");
    for q in QueueKind::ALL {
        let s = retried(async || stack.stats(q).await).await;
        assert_eq!(s.dead, 0, "{q}");
    }
    engine.stats().snapshot().transitions
}

/// An engine running in a task of this process.
#[derive(Debug)]
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Shuts the engine down and waits until it has stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.expect("engine stops");
    }
}

/// An engine on `stack` with instant activities, polling every 200 ms, messages coming back
/// five seconds after a failed commit.
fn engine<B: Queue + Store + Journal>(
    stack: &Arc<B>,
    clock: &SharedClock,
) -> Arc<Engine<B, B, B, Instant>> {
    Arc::new(Engine::new(
        stack.clone(),
        stack.clone(),
        stack.clone(),
        Arc::new(Instant),
        clock.clone(),
        EngineConfig {
            wait: Duration::from_millis(200),
            // A message whose commit failed (a test may fail a fifth of all requests) comes
            // back after this rather than after the default minute; the heartbeat keeps longer
            // handlers' messages.
            visibility: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    ))
}

/// Starts an engine on `stack` with instant activities.
pub fn start<B: Queue + Store + Journal>(stack: &Arc<B>, clock: &SharedClock) -> Running {
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(engine(stack, clock).run(stop.clone()));
    Running { stop, handle }
}
