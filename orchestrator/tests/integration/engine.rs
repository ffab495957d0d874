//! The engine on the SQLite backend: pushes travel to `live`; bad messages, unknown tenants
//! and corrupt records are quarantined without stopping anything else; duplicates apply once;
//! stale step messages are dropped; two engines on one file converge; lost messages are
//! re-armed by the sweeper; shutdown releases what it could not finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::conformance::{key, tenant};
use activities::{Activities, Invocation, Outcome};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue, outgoing, sweep_once};
use orchestrator::ports::{
    Commit, Delivery, Journal, Queue, QueueKind, RecordWrite, Store, WorkflowFilter, WriteError,
};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::stack::{Batched, Sequential};
use tokio_util::sync::CancellationToken;
use workflows::testing::output_for;
use workflows::{
    Environment, Event, EventId, GitSha, Push, RepoKind, State, StepKind, Timestamp, Verdict,
    WorkflowKey,
};

/// Activities that finish at once with a plausible output, counting invocations.
#[derive(Default)]
struct Instant {
    calls: AtomicU64,
    delay: Option<Duration>,
    /// Image builds take this long, and are counted in `images`.
    image_delay: Option<Duration>,
    images: Arc<Running>,
    /// Image builds report progress once (recheck after this long) before they are done;
    /// builds in flight (from the first invocation to done) are counted in `builds`.
    image_progress: Option<Duration>,
    builds: Arc<Builds>,
    /// This tenant's step fails terminally; another kind than image only once the tenant's
    /// image build started (it reports progress until then).
    terminal: Option<(&'static str, StepKind)>,
    /// This tenant's step fails retryably, always.
    retryable: Option<(&'static str, StepKind)>,
    /// So many calls to `abandon` fail before they succeed.
    abandon_failures: AtomicU64,
    /// `invoke <tenant> <step>` and `abandon <tenant> <step> ok|failed`, in order.
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Image builds between their first invocation and done.
#[derive(Default)]
struct Builds {
    started: std::sync::Mutex<std::collections::HashSet<String>>,
    now: std::sync::Mutex<std::collections::HashSet<String>>,
    peak: AtomicU64,
}

/// Invocations running now, and the most at once.
#[derive(Default)]
struct Running {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Instant {
    fn note(&self, line: String) {
        self.log.lock().expect("lock").push(line);
    }
}

impl Activities for Instant {
    async fn abandon(&self, invocation: Invocation<'_>) -> Result<(), String> {
        let (tenant, step) = (&invocation.key.tenant, invocation.task.step);
        let fail = self
            .abandon_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let verdict = if fail { "failed" } else { "ok" };
        self.note(format!("abandon {tenant} {step} {verdict}"));
        if fail {
            Err("throttled".into())
        } else {
            Ok(())
        }
    }

    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tenant, step) = (&invocation.key.tenant, step_of(invocation));
        self.note(format!("invoke {tenant} {step}"));
        if self.retryable == Some((tenant.as_str(), step)) {
            return Outcome::Retryable("throttled".into());
        }
        if self.terminal == Some((tenant.as_str(), step)) {
            let building = format!("invoke {tenant} image");
            if step != StepKind::Image && !self.log.lock().expect("lock").contains(&building) {
                return Outcome::Progress {
                    recheck_after: Duration::from_millis(50),
                    note: "waiting for the build to start".into(),
                };
            }
            return Outcome::Terminal("rejected".into());
        }
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        if let (Some(d), StepKind::Image) = (self.image_delay, invocation.task.step) {
            let now = self.images.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.images.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(d).await;
            self.images.now.fetch_sub(1, Ordering::SeqCst);
        }
        if let (Some(recheck_after), StepKind::Image) = (self.image_progress, invocation.task.step)
        {
            let build = format!("{}/{}", invocation.key, invocation.task.run);
            let first = self
                .builds
                .started
                .lock()
                .expect("lock")
                .insert(build.clone());
            let mut now = self.builds.now.lock().expect("lock");
            if first {
                now.insert(build);
                self.builds
                    .peak
                    .fetch_max(now.len() as u64, Ordering::SeqCst);
                return Outcome::Progress {
                    recheck_after,
                    note: "building".into(),
                };
            }
            now.remove(&build);
        }
        Outcome::Done(output_for(invocation.task))
    }
}

fn step_of(invocation: Invocation<'_>) -> StepKind {
    invocation.task.step
}

type TestEngine = Engine<SqliteBackend, SqliteBackend, SqliteBackend, Instant>;

struct World {
    _dir: tempfile::TempDir,
    backend: SqliteBackend,
    clock: SharedClock,
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend =
            SqliteBackend::open(SqliteConfig::new(dir.path().join("o.sqlite"))).expect("open");
        for (id, infra, app) in [("acme", 1, 2), ("globex", 3, 4)] {
            backend
                .put_tenant(&tenant(id, infra, app), true)
                .await
                .expect("tenant");
        }
        Self {
            _dir: dir,
            backend,
            clock: Arc::new(SystemClock),
        }
    }

    fn engine(&self, activities: Instant, config: EngineConfig) -> Arc<TestEngine> {
        let b = Arc::new(self.backend.clone());
        Arc::new(Engine::new(
            b.clone(),
            b.clone(),
            b,
            Arc::new(activities),
            self.clock.clone(),
            config,
        ))
    }

    /// An engine with its own backend (own writer, as another process has) on the same file.
    fn engine_in_another_process(
        &self,
        activities: Instant,
        config: EngineConfig,
    ) -> Arc<TestEngine> {
        let b =
            Arc::new(SqliteBackend::open(SqliteConfig::new(self.backend.path())).expect("open"));
        Arc::new(Engine::new(
            b.clone(),
            b.clone(),
            b,
            Arc::new(activities),
            self.clock.clone(),
            config,
        ))
    }

    fn start(&self, engine: &Arc<TestEngine>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(engine.clone().run(stop.clone()));
        (stop, handle)
    }

    async fn push(&self, key: &WorkflowKey, repo: RepoKind, n: u32, id: &str) {
        self.push_from(key, repo, None, n, id).await;
    }

    /// Queues the push that moves the branch from commit `before` to commit `n`.
    async fn push_from(
        &self,
        key: &WorkflowKey,
        repo: RepoKind,
        before: Option<u32>,
        n: u32,
        id: &str,
    ) {
        let sha = |n: u32| GitSha::new(format!("{n:040x}")).expect("sha");
        let event = Event::Push(Push {
            event_id: EventId::new(id).expect("id"),
            repo,
            sha: sha(n),
            before: before.map(sha),
            git_ref: "refs/heads/main".into(),
            author: "jane".into(),
            message: format!("commit {n}"),
            received_at: self.clock.now(),
        });
        enqueue(&self.backend, key, event, self.clock.now())
            .await
            .expect("enqueue");
    }

    async fn state(&self, key: &WorkflowKey) -> Option<State> {
        self.backend
            .workflow(key)
            .await
            .expect("read")
            .map(|r| r.state())
    }

    /// Waits (polling the store, bounded) until `check` holds.
    async fn until(&self, what: &str, mut check: impl AsyncFnMut(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !check(self).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn all_live_at(
        &self,
        keys: &[WorkflowKey],
        infra: Option<u32>,
        app: Option<u32>,
    ) -> bool {
        for k in keys {
            if !self.live_at(k, infra, app).await {
                return false;
            }
        }
        true
    }

    async fn live_at(&self, key: &WorkflowKey, infra: Option<u32>, app: Option<u32>) -> bool {
        let Some(r) = self.backend.workflow(key).await.expect("read") else {
            return false;
        };
        let sha = |n: Option<u32>| n.map(|n| GitSha::new(format!("{n:040x}")).expect("sha"));
        r.state() == State::Live
            && r.workflow().deployed.as_ref().map(|d| d.release.clone())
                == Some(workflows::Release {
                    infra: sha(infra),
                    app: sha(app),
                })
    }
}

fn fast() -> EngineConfig {
    EngineConfig {
        wait: Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_travel_to_live_and_the_newest_wins() {
    let w = World::new().await;
    let engine = w.engine(Instant::default(), fast());
    let (stop, handle) = w.start(&engine);
    let acme = key("acme", Environment::Staging);
    let globex = key("globex", Environment::Production);
    w.push(&acme, RepoKind::Infra, 1, "p1").await;
    w.push(&acme, RepoKind::App, 1, "p2").await;
    w.push(&acme, RepoKind::Infra, 2, "p3").await;
    w.push(&globex, RepoKind::App, 7, "g1").await;
    w.until("both live at their newest pushes", async |w| {
        w.live_at(&acme, Some(2), Some(1)).await && w.live_at(&globex, None, Some(7)).await
    })
    .await;
    stop.cancel();
    handle.await.expect("engine stops");
    let history = w.backend.history(&acme, 0, 1000).await.expect("history");
    assert!(history.windows(2).all(|p| p[1].version == p[0].version + 1));
    for q in QueueKind::ALL {
        let stats = w.backend.stats(q).await.expect("stats");
        assert_eq!(
            (stats.visible, stats.in_flight, stats.delayed, stats.dead),
            (0, 0, 0, 0),
            "{q}"
        );
    }
    assert!(engine.stats().snapshot().transitions >= history.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_older_push_is_recorded_and_ignored_not_rolled_back_to() {
    let w = World::new().await;
    let engine = w.engine(Instant::default(), fast());
    let (stop, handle) = w.start(&engine);
    let acme = key("acme", Environment::Staging);
    w.push_from(&acme, RepoKind::App, Some(0), 1, "gitlab:a")
        .await;
    w.until("live at 1", async |w| w.live_at(&acme, None, Some(1)).await)
        .await;
    w.push_from(&acme, RepoKind::App, Some(1), 2, "gitlab:b")
        .await;
    w.until("live at 2", async |w| w.live_at(&acme, None, Some(2)).await)
        .await;
    // The first push again, under an id the record has not seen (a replay outside the
    // deduplication window, or a resend with a new delivery id).
    w.push_from(&acme, RepoKind::App, Some(0), 1, "gitlab:a-again")
        .await;
    w.until("the replay is applied", async |w| {
        let history = w.backend.history(&acme, 0, 1000).await.expect("history");
        history
            .iter()
            .any(|e| e.event.id().as_str() == "gitlab:a-again")
    })
    .await;
    stop.cancel();
    handle.await.expect("engine stops");
    let history = w.backend.history(&acme, 0, 1000).await.expect("history");
    let replay = history
        .iter()
        .find(|e| e.event.id().as_str() == "gitlab:a-again")
        .expect("recorded");
    match &replay.verdict {
        Verdict::Ignored(reason) => assert!(reason.contains("late or replayed"), "{reason}"),
        other => panic!("the replay was {other:?}"),
    }
    assert!(
        w.live_at(&acme, None, Some(2)).await,
        "still at the newest commit"
    );
    let record = w
        .backend
        .workflow(&acme)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.workflow().run.as_ref().map(|r| r.id.get()), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_unknown_tenants_and_corrupt_records_stop_only_themselves() {
    let w = World::new().await;
    // Garbage on the events queue.
    w.backend
        .send(vec![crate::conformance::event_message(
            "acme#dev",
            "junk",
            "{not json",
        )])
        .await
        .expect("send");
    // An event for a tenant nobody registered.
    let ghost = key("ghost", Environment::Dev);
    w.push(&ghost, RepoKind::App, 1, "ghost-1").await;
    // A workflow whose record is corrupt.
    let broken = key("globex", Environment::Dev);
    let (_, mut write) = crate::conformance::first_write("globex", Environment::Dev);
    write.record = b"{\"schema_version\": 99}".to_vec();
    w.backend.write(write).await.expect("write");
    w.push(&broken, RepoKind::App, 1, "broken-1").await;
    // And a healthy workflow beside them.
    let healthy = key("acme", Environment::Dev);
    w.push(&healthy, RepoKind::App, 1, "ok-1").await;

    let engine = w.engine(Instant::default(), fast());
    let (stop, handle) = w.start(&engine);
    w.until("the healthy workflow is live", async |w| {
        w.live_at(&healthy, None, Some(1)).await
    })
    .await;
    w.until("three dead letters", async |w| {
        w.backend
            .stats(QueueKind::Events)
            .await
            .expect("stats")
            .dead
            == 3
    })
    .await;
    stop.cancel();
    handle.await.expect("stops");
    let dead = w
        .backend
        .dead_letters(QueueKind::Events, 10)
        .await
        .expect("dead letters");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("undecodable message")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"unknown tenant ghost"), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("record of globex#dev does not decode") && r.contains("99")),
        "{reasons:?}"
    );
    let listed = w
        .backend
        .workflows(&WorkflowFilter::default(), None, 10)
        .await
        .expect("list");
    let broken_row = listed.iter().find(|s| s.key == broken).expect("listed");
    assert!(
        broken_row.corrupt.is_some(),
        "wfctl list shows it as corrupt"
    );
    assert_eq!(engine.stats().snapshot().quarantined, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_applies_once_and_its_commands_are_sent_again() {
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    // Apply a push by hand, as if a worker on a journal that is not atomic wrote the record
    // and died before sending its commands and acknowledging.
    let mut record = workflows::WorkflowRecord::new(k.clone(), w.clock.now());
    let push = Event::Push(Push {
        event_id: EventId::new("push-crash").expect("id"),
        repo: RepoKind::App,
        sha: GitSha::new("a".repeat(40)).expect("sha"),
        before: None,
        git_ref: "refs/heads/dev".into(),
        author: "jane".into(),
        message: "m".into(),
        received_at: w.clock.now(),
    });
    let applied = record.apply(
        &push,
        workflows::Input {
            now: w.clock.now(),
            settings: Default::default(),
        },
    );
    assert!(!outgoing(&k, &applied.commands, w.clock.now()).is_empty());
    let entry = record.history_entry(&push, &applied);
    w.backend
        .write(RecordWrite::new(&record, &entry))
        .await
        .expect("write");
    // The dead worker had received the push: it comes back as a redelivery.
    enqueue(&w.backend, &k, push.clone(), w.clock.now())
        .await
        .expect("enqueue");
    let held = w
        .backend
        .receive(
            QueueKind::Events,
            1,
            Duration::from_millis(1),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    assert_eq!(held.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;

    // The engine on a journal that is not atomic, as on SQS and DynamoDB.
    let b = Arc::new(w.backend.clone());
    let engine = Arc::new(Engine::new(
        b.clone(),
        b.clone(),
        Arc::new(Batched::new(b.clone(), b, 64)),
        Arc::new(Instant::default()),
        w.clock.clone(),
        fast(),
    ));
    let stop = CancellationToken::new();
    let handle = tokio::spawn(engine.clone().run(stop.clone()));
    w.until("live", async |w| w.state(&k).await == Some(State::Live))
        .await;
    assert_eq!(engine.stats().snapshot().duplicates, 1);

    stop.cancel();
    handle.await.expect("stops");

    // A copy delivered for the first time (GitLab sending the hook again) is a duplicate with
    // nothing to repair: handling it sends nothing.
    let mut copy = orchestrator::engine::message(
        &k,
        workflows::Body::Event(push),
        Duration::ZERO,
        w.clock.now(),
    );
    // Past the queue's deduplication window: only the record knows it.
    copy.dedup_id = Some("another-delivery".to_owned());
    w.backend.send(vec![copy]).await.expect("send");
    let delivery = w
        .backend
        .receive(
            QueueKind::Events,
            1,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect("receive")
        .remove(0);
    assert_eq!(delivery.receive_count, 1);
    engine.handle(delivery).await;
    assert_eq!(engine.stats().snapshot().duplicates, 2);
    let steps = w.backend.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!(
        steps.visible + steps.in_flight + steps.delayed,
        0,
        "nothing sent"
    );
    let history = w.backend.history(&k, 0, 100).await.expect("history");
    let pushes = history
        .iter()
        .filter(|e| e.event.id().as_str() == "push-crash")
        .count();
    assert_eq!(pushes, 1, "applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_step_messages_are_dropped_without_running_the_activity() {
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    let engine = w.engine(Instant::default(), fast());
    let (stop, handle) = w.start(&engine);
    w.push(&k, RepoKind::App, 1, "p1").await;
    w.until("live", async |w| w.state(&k).await == Some(State::Live))
        .await;
    let calls = engine.stats().snapshot().activities;
    // Replay the step messages of the run from its history: all stale now.
    let history = w.backend.history(&k, 0, 100).await.expect("history");
    let replay: Vec<_> = history
        .iter()
        .flat_map(|e| outgoing(&k, &e.commands, w.clock.now()))
        .collect();
    assert!(!replay.is_empty());
    let n = replay.len() as u64;
    w.backend.send(replay).await.expect("send");
    w.until("replayed messages consumed", async |w| {
        w.backend
            .stats(QueueKind::Steps)
            .await
            .expect("stats")
            .visible
            == 0
            && w.backend
                .stats(QueueKind::Steps)
                .await
                .expect("stats")
                .in_flight
                == 0
    })
    .await;
    stop.cancel();
    handle.await.expect("stops");
    assert_eq!(
        engine.stats().snapshot().activities,
        calls,
        "no activity ran"
    );
    assert!(engine.stats().snapshot().stale >= n);
    assert_eq!(w.state(&k).await, Some(State::Live));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_file_converge() {
    let w = World::new().await;
    let a = w.engine(Instant::default(), fast());
    let b = w.engine_in_another_process(Instant::default(), fast());
    let (stop_a, ha) = w.start(&a);
    let (stop_b, hb) = w.start(&b);
    let keys: Vec<WorkflowKey> = Environment::ALL
        .into_iter()
        .flat_map(|env| [key("acme", env), key("globex", env)])
        .collect();
    for (i, k) in keys.iter().enumerate() {
        for n in 1..=5u32 {
            let repo = if n % 2 == 0 {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            w.push(k, repo, n, &format!("k{i}-n{n}")).await;
        }
    }
    w.until("every workflow live at its newest pushes", async |w| {
        w.all_live_at(&keys, Some(4), Some(5)).await
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    ha.await.expect("a stops");
    hb.await.expect("b stops");
    let total = a.stats().snapshot().transitions + b.stats().snapshot().transitions;
    let mut written = 0;
    for k in &keys {
        let h = w.backend.history(k, 0, 1000).await.expect("history");
        assert!(h.windows(2).all(|p| p[1].version == p[0].version + 1));
        written += h.len() as u64;
    }
    assert_eq!(total, written, "every transition written once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_on_image_builds_holds_across_two_engines() {
    let w = World::new().await;
    let images = Arc::new(Running::default());
    let capped = || EngineConfig {
        limits: [(StepKind::Image, 2)].into(),
        // Longer than the test may take: waiters resume only by being woken.
        slot_poll: Duration::from_secs(30),
        ..fast()
    };
    let builds = || Instant {
        image_delay: Some(Duration::from_millis(60)),
        images: images.clone(),
        ..Instant::default()
    };
    let a = w.engine(builds(), capped());
    let b = w.engine_in_another_process(builds(), capped());
    let (stop_a, ha) = w.start(&a);
    let (stop_b, hb) = w.start(&b);
    let keys: Vec<WorkflowKey> = Environment::ALL
        .into_iter()
        .flat_map(|env| [key("acme", env), key("globex", env)])
        .collect();
    for (i, k) in keys.iter().enumerate() {
        w.push(k, RepoKind::Infra, 1, &format!("k{i}-infra")).await;
        w.push(k, RepoKind::App, 2, &format!("k{i}-app")).await;
    }
    w.until("every workflow live", async |w| {
        w.all_live_at(&keys, Some(1), Some(2)).await
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    ha.await.expect("a stops");
    hb.await.expect("b stops");
    // Six builds of 60 ms, two at a time, in two processes: never three at once, and the
    // cap was used (some waited).
    assert_eq!(images.peak.load(Ordering::SeqCst), 2);
    let waits = a.stats().snapshot().slot_waits + b.stats().snapshot().slot_waits;
    assert!(waits > 0, "no step waited for a slot");
    let view = w.backend.slots("image").await.expect("slots");
    assert!(
        view.held.is_empty() && view.waiting.is_empty(),
        "every slot given back: {view:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_of_a_running_step_keeps_its_slot() {
    let w = World::new().await;
    let builds = Arc::new(Builds::default());
    let engine = w.engine(
        Instant {
            image_progress: Some(Duration::from_millis(400)),
            builds: builds.clone(),
            ..Instant::default()
        },
        EngineConfig {
            limits: [(StepKind::Image, 1)].into(),
            slot_poll: Duration::from_secs(30),
            ..fast()
        },
    );
    let (stop, handle) = w.start(&engine);
    let acme = key("acme", Environment::Dev);
    let globex = key("globex", Environment::Dev);
    w.push(&acme, RepoKind::Infra, 1, "a-infra").await;
    w.until("acme's build started", async |_| {
        builds.peak.load(Ordering::SeqCst) == 1
    })
    .await;
    w.push(&globex, RepoKind::Infra, 2, "g-infra").await;
    // acme's first image message, now stale (its progress report moved the token on),
    // arrives again while its build runs.
    let history = w.backend.history(&acme, 0, 100).await.expect("history");
    let replay: Vec<_> = history
        .iter()
        .flat_map(|e| outgoing(&acme, &e.commands, w.clock.now()))
        .collect();
    w.backend.send(replay).await.expect("send");
    w.until("both live", async |w| {
        w.live_at(&acme, Some(1), None).await && w.live_at(&globex, Some(2), None).await
    })
    .await;
    stop.cancel();
    handle.await.expect("stops");
    assert!(engine.stats().snapshot().stale > 0, "the copy was stale");
    assert_eq!(
        builds.peak.load(Ordering::SeqCst),
        1,
        "globex's build started while acme's ran"
    );
}

impl World {
    /// Pushes to acme#dev until its run failed, then to globex#dev until it is live.
    async fn fail_acme_then_serve_globex(&self) {
        let acme = key("acme", Environment::Dev);
        let globex = key("globex", Environment::Dev);
        self.push(&acme, RepoKind::Infra, 1, "a-infra").await;
        self.until("acme failed", async |w| {
            w.state(&acme).await == Some(State::Failed)
        })
        .await;
        self.push(&globex, RepoKind::Infra, 2, "g-infra").await;
        self.until("globex live", async |w| {
            w.live_at(&globex, Some(2), None).await
        })
        .await;
    }
}

/// Where `line` is in `log`.
fn position(log: &[String], line: &str) -> usize {
    log.iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no {line:?} in {log:?}"))
}

/// acme's run fails at `failing` while acme holds the only image slot; globex, waiting for
/// it, must not build before acme's build was abandoned (its first abandonment fails).
async fn abandoned_before_given_back(failing: StepKind, image_progress: Option<Duration>) {
    let w = World::new().await;
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let engine = w.engine(
        Instant {
            image_progress,
            terminal: Some(("acme", failing)),
            abandon_failures: AtomicU64::new(1),
            log: log.clone(),
            ..Instant::default()
        },
        EngineConfig {
            limits: [(StepKind::Image, 1)].into(),
            slot_poll: Duration::from_millis(300),
            ..fast()
        },
    );
    let (stop, handle) = w.start(&engine);
    w.fail_acme_then_serve_globex().await;
    stop.cancel();
    handle.await.expect("stops");
    let log = log.lock().expect("lock").clone();
    let at = |line: &str| position(&log, line);
    assert!(at("invoke acme image") < at("abandon acme image failed"));
    assert!(at("abandon acme image failed") < at("abandon acme image ok"));
    assert!(
        at("abandon acme image ok") < at("invoke globex image"),
        "globex built before acme's build was given up: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("abandon globex")),
        "{log:?}"
    );
    let view = w.backend.slots("image").await.expect("slots");
    assert!(view.held.is_empty() && view.waiting.is_empty(), "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_fails_is_abandoned_before_its_slot_is_given_back() {
    abandoned_before_given_back(StepKind::Image, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_paused_by_another_failure_is_abandoned_before_its_slot_is_given_back() {
    // The database fails while acme's build reports progress; the build's next message is
    // stale, and gives it up.
    abandoned_before_given_back(StepKind::Database, Some(Duration::from_millis(200))).await;
}

/// A sequential journal (write, send, acknowledge, as on SQS and DynamoDB) that dies once after
/// the record write of the first commit leaving a workflow failed: nothing of it is sent or
/// acknowledged, so its message comes back when its visibility timeout ends (and finds its
/// event applied).
struct DiesAfterWrite {
    inner: Sequential<SqliteBackend, SqliteBackend>,
    store: Arc<SqliteBackend>,
    died: std::sync::atomic::AtomicBool,
}

impl Journal for DiesAfterWrite {
    async fn commit(&self, commits: Vec<Commit>) -> Vec<Result<Vec<Delivery>, WriteError>> {
        let mut results = Vec::new();
        for commit in commits {
            let failing = commit
                .write
                .as_ref()
                .is_some_and(|w| w.state == State::Failed);
            match commit.write {
                Some(write) if failing && !self.died.swap(true, Ordering::SeqCst) => {
                    results.push(self.store.write(write).await.map(|()| Vec::new()));
                }
                write => {
                    let commit = Commit { write, ..commit };
                    results.extend(self.inner.commit(vec![commit]).await);
                }
            }
        }
        results
    }
}

/// acme's build waits to retry (its message is a timer, not a step message) when its database
/// fails; the worker dies after writing the failure, so the copy that gives the build up is
/// lost with the commit. The redelivered report, a duplicate, sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_build_is_abandoned_even_if_the_worker_dies_after_writing_the_pause() {
    let w = World::new().await;
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = Arc::new(w.backend.clone());
    let journal = Arc::new(DiesAfterWrite {
        inner: Sequential::new(store.clone(), store.clone()),
        store: store.clone(),
        died: std::sync::atomic::AtomicBool::new(false),
    });
    let engine = Arc::new(Engine::new(
        store.clone(),
        store,
        journal.clone(),
        Arc::new(Instant {
            retryable: Some(("acme", StepKind::Image)),
            terminal: Some(("acme", StepKind::Database)),
            log: log.clone(),
            ..Instant::default()
        }),
        w.clock.clone(),
        EngineConfig {
            limits: [(StepKind::Image, 1)].into(),
            visibility: Duration::from_millis(500),
            ..fast()
        },
    ));
    let stop = CancellationToken::new();
    let handle = tokio::spawn(engine.clone().run(stop.clone()));
    w.fail_acme_then_serve_globex().await;
    stop.cancel();
    handle.await.expect("stops");
    assert!(
        journal.died.load(Ordering::SeqCst),
        "the commit of the failure died"
    );
    let log = log.lock().expect("lock").clone();
    let at = |line: &str| position(&log, line);
    assert!(
        at("abandon acme image ok") < at("invoke globex image"),
        "globex built before acme's build was given up: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_a_done_step_gives_back_a_slot_granted_to_it() {
    let w = World::new().await;
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let engine = w.engine(
        Instant {
            log: log.clone(),
            ..Instant::default()
        },
        EngineConfig {
            limits: [(StepKind::Image, 1)].into(),
            ..fast()
        },
    );
    let (stop, handle) = w.start(&engine);
    let acme = key("acme", Environment::Dev);
    w.push(&acme, RepoKind::Infra, 1, "a-infra").await;
    w.until("acme live", async |w| w.live_at(&acme, Some(1), None).await)
        .await;
    // A copy that waited in line is granted the slot after its step was done elsewhere.
    let holder = orchestrator::engine::holder_of(&acme, workflows::RunId::FIRST);
    let (grant, _) = w
        .backend
        .acquire_slot("image", &acme, &holder, 1, Duration::from_secs(600), b"")
        .await
        .expect("acquire");
    assert!(matches!(grant, orchestrator::ports::SlotGrant::Held { .. }));
    let history = w.backend.history(&acme, 0, 100).await.expect("history");
    let copies: Vec<_> = history
        .iter()
        .flat_map(|e| outgoing(&acme, &e.commands, w.clock.now()))
        .collect();
    w.backend.send(copies).await.expect("send");
    w.until("the slot given back", async |w| {
        w.backend
            .slots("image")
            .await
            .expect("slots")
            .held
            .is_empty()
    })
    .await;
    stop.cancel();
    handle.await.expect("stops");
    let abandons = log
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.starts_with("abandon"))
        .count();
    assert_eq!(abandons, 0, "a done step has nothing to abandon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_rearms_a_workflow_whose_step_message_was_lost() {
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    w.push(&k, RepoKind::App, 1, "p1").await;
    // Apply the push by handling its one message, then lose every step message it sent.
    let engine = w.engine(Instant::default(), fast());
    let mut push = w
        .backend
        .receive(
            QueueKind::Events,
            1,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    engine.handle(push.remove(0)).await;
    assert_eq!(w.state(&k).await, Some(State::Preparing));
    let lost = w
        .backend
        .receive(
            QueueKind::Steps,
            100,
            Duration::from_secs(3600),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    let _ = w
        .backend
        .ack(
            QueueKind::Steps,
            lost.iter().map(|d| d.receipt.clone()).collect(),
        )
        .await;
    let state = w.state(&k).await;
    assert!(
        matches!(state, Some(State::Preparing | State::RollingOut)),
        "{state:?}"
    );
    // Nothing is outstanding any more; a sweep with a zero deadline re-arms it.
    let rearmed = sweep_once(&w.backend, &w.backend, &w.clock, Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(rearmed, vec![k.clone()]);
    let (stop, handle) = w.start(&engine);
    w.until("live", async |w| w.state(&k).await == Some(State::Live))
        .await;
    stop.cancel();
    handle.await.expect("stops");
    assert!(
        sweep_once(&w.backend, &w.backend, &w.clock, Duration::ZERO)
            .await
            .expect("sweep")
            .is_empty(),
        "live workflows are not re-armed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_messages_it_could_not_finish() {
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    w.push(&k, RepoKind::App, 1, "p1").await;
    let slow = Instant {
        delay: Some(Duration::from_secs(3600)),
        ..Instant::default()
    };
    let engine = w.engine(
        slow,
        EngineConfig {
            shutdown_grace: Duration::from_millis(200),
            ..fast()
        },
    );
    let (stop, handle) = w.start(&engine);
    w.until("a step is running", async |w| {
        w.backend
            .stats(QueueKind::Steps)
            .await
            .expect("stats")
            .in_flight
            > 0
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("stops within the grace period")
        .expect("task");
    let stats = w.backend.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!(stats.in_flight, 0, "released, not left invisible");
    assert!(stats.visible > 0, "deliverable to the next worker at once");
    let _ = Timestamp::EPOCH;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_message_by_extending_visibility() {
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    w.push(&k, RepoKind::App, 1, "p1").await;
    // Each activity takes three visibility timeouts; without the heartbeat a second engine
    // would receive the same step messages and run them again.
    let config = EngineConfig {
        visibility: Duration::from_millis(400),
        heartbeat: Duration::from_millis(100),
        ..fast()
    };
    let slow = || Instant {
        delay: Some(Duration::from_millis(1200)),
        ..Instant::default()
    };
    let a = w.engine(slow(), config.clone());
    let b = w.engine_in_another_process(slow(), config);
    let (stop_a, ha) = w.start(&a);
    let (stop_b, hb) = w.start(&b);
    w.until("live", async |w| w.state(&k).await == Some(State::Live))
        .await;
    stop_a.cancel();
    stop_b.cancel();
    ha.await.expect("a");
    hb.await.expect("b");
    let runs = a.stats().snapshot().activities + b.stats().snapshot().activities;
    let record = w.backend.workflow(&k).await.expect("read").expect("exists");
    let steps = record
        .workflow()
        .run
        .as_ref()
        .map(|r| r.steps.iter().filter(|s| s.attempt > 0).count() as u64)
        .expect("run");
    assert_eq!(runs, steps, "every step ran once, on one engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_an_old_cached_record_applies_newer_step_reports() {
    // Regression: a worker whose cache held an older version ran a current step message and
    // then dropped its report as stale against that cache.
    let w = World::new().await;
    let k = key("acme", Environment::Dev);
    w.push(&k, RepoKind::Infra, 1, "p1").await;
    let a = w.engine(Instant::default(), fast());
    let b = w.engine_in_another_process(Instant::default(), fast());
    let push = w
        .backend
        .receive(
            QueueKind::Events,
            1,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await
        .expect("receive")
        .remove(0);
    // A applies the push and caches version 1; it claims network, source and routing.
    let claimed = a.handle(push).await;
    let network = claimed
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains("\"network\""))
        .expect("network claimed");
    // B runs the network step: version 2, which starts the database step.
    let next = b.handle(network).await;
    let database = next
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains("\"database\""))
        .expect("database claimed by B");
    // A, still caching version 1, gets the database step message.
    a.handle(database).await;
    let record = w.backend.workflow(&k).await.expect("read").expect("exists");
    let db = record
        .workflow()
        .run
        .as_ref()
        .and_then(|r| r.step(workflows::StepKind::Database).cloned())
        .expect("database step");
    assert_eq!(
        db.status,
        workflows::StepStatus::Done,
        "applied, not dropped"
    );
}
