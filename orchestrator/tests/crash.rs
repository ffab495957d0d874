//! The crash test: the worker runs as a child process and is killed with SIGKILL at random
//! moments, over and over, while a stream of pushes (and some poison) arrives. At the end:
//! every event was applied exactly once, every workflow is live at its newest pushes, no
//! simulated resource was created twice, and nothing is left in the queues but the injected
//! poison, which is in the dead-letter queues.
//!
//! `CRASH_KILLS` sets the number of kills (default 200).

mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use activities::simulated::{SimConfig, SimulatedCloud};
use conformance::{event_message, key, tenant};
use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, QueueKind, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio::process::{Child, Command};
use workflows::{
    Environment, Event, EventId, GitSha, Push, Release, RepoKind, State, Timestamp, WorkflowKey,
};

const TENANTS: [&str; 4] = ["alpha", "bravo", "charlie", "delta"];

fn worker(db: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["--db"])
        .arg(db)
        .arg("worker")
        .env("RUST_LOG", "warn")
        // Short timeouts so that what a killed worker held comes back quickly.
        .env("ORCHESTRATOR__ENGINE__VISIBILITY", "1s")
        .env("ORCHESTRATOR__ENGINE__WAIT", "50ms")
        .env("ORCHESTRATOR__ENGINE__SHUTDOWN_GRACE", "2s")
        // AWS-like latencies divided by 20 000 (an image takes 24 ms), with throttling, so
        // that steps wait, recheck and retry while workers die around them.
        .env("ORCHESTRATOR__SIMULATED__TIME_SCALE", "20000.0")
        .env("ORCHESTRATOR__SIMULATED__THROTTLE_PROBABILITY", "0.05")
        .env("ORCHESTRATOR__SIMULATED__LOST_RESPONSE_PROBABILITY", "0.05")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts")
}

fn sha(n: u32) -> GitSha {
    GitSha::new(format!("{n:040x}")).expect("sha")
}

struct Stream {
    next: u32,
    newest: BTreeMap<WorkflowKey, Release>,
    pushed: Vec<(WorkflowKey, EventId)>,
}

impl Stream {
    async fn push(&mut self, backend: &SqliteBackend, k: &WorkflowKey, repo: RepoKind) {
        self.next += 1;
        let n = self.next;
        let id = EventId::new(format!("push-{n}")).expect("id");
        let event = Event::Push(Push {
            event_id: id.clone(),
            repo,
            sha: sha(n),
            git_ref: "refs/heads/main".into(),
            author: "crash-test".into(),
            message: format!("push {n}"),
            received_at: Timestamp::from_unix_millis(0),
        });
        enqueue(backend, k, event, Timestamp::from(jiff::Timestamp::now()))
            .await
            .expect("enqueue");
        let release = self.newest.entry(k.clone()).or_default();
        match repo {
            RepoKind::Infra => release.infra = Some(sha(n)),
            RepoKind::App => release.app = Some(sha(n)),
        }
        self.pushed.push((k.clone(), id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_worker_at_random_loses_and_repeats_nothing() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("crash.sqlite");
    let backend = SqliteBackend::open(SqliteConfig::new(&db)).expect("open");
    for (i, t) in TENANTS.iter().enumerate() {
        let i = i as u64;
        backend
            .put_tenant(&tenant(t, 100 + 2 * i, 101 + 2 * i), true)
            .await
            .expect("tenant");
    }
    let workflows: Vec<WorkflowKey> = TENANTS
        .iter()
        .flat_map(|t| [key(t, Environment::Dev), key(t, Environment::Production)])
        .collect();
    let mut stream = Stream {
        next: 0,
        newest: BTreeMap::new(),
        pushed: Vec::new(),
    };
    // Poison: bytes that are no envelope, and events for a tenant nobody registered.
    let mut poison = 0;
    for i in 0..3 {
        backend
            .send(vec![event_message(
                "x#dev",
                &format!("junk-{i}"),
                "\u{0}garbage",
            )])
            .await
            .expect("send");
        poison += 1;
    }
    for i in 0..2 {
        let ghost = key("ghost", Environment::Dev);
        let event = Event::Provision {
            event_id: EventId::new(format!("ghost-{i}")).expect("id"),
        };
        enqueue(
            &backend,
            &ghost,
            event,
            Timestamp::from(jiff::Timestamp::now()),
        )
        .await
        .expect("enqueue");
        poison += 1;
    }

    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..kills {
        // A few pushes arrive while the worker lives.
        for _ in 0..rng.usize(0..3) {
            let k = &workflows[rng.usize(..workflows.len())];
            let repo = if rng.bool() {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            stream.push(&backend, k, repo).await;
        }
        let mut child = worker(&db);
        tokio::time::sleep(Duration::from_millis(rng.u64(20..150))).await;
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("reaped");
        assert!(
            !status.success(),
            "round {round}: the worker was killed, not finished"
        );
    }
    // Every workflow gets at least one push of each repository.
    for k in &workflows {
        stream.push(&backend, k, RepoKind::Infra).await;
        stream.push(&backend, k, RepoKind::App).await;
    }

    // A worker that is left alone finishes the work.
    let mut last = worker(&db);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let mut done = true;
        for k in &workflows {
            let Some(r) = backend.workflow(k).await.expect("read") else {
                done = false;
                continue;
            };
            let deployed = r.workflow().deployed.as_ref().map(|d| d.release.clone());
            done &= r.state() == State::Live && deployed.as_ref() == stream.newest.get(k);
        }
        for q in QueueKind::ALL {
            let s = backend.stats(q).await.expect("stats");
            done &= s.visible + s.in_flight + s.delayed == 0;
        }
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workflows did not converge after {kills} kills"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last.start_kill().expect("stop");
    let _ = last.wait().await;

    // Exactly once: no event id twice in a workflow's history, every push there once.
    let mut applied: HashMap<(WorkflowKey, String), u32> = HashMap::new();
    for k in &workflows {
        let mut after = 0;
        loop {
            let page = backend.history(k, after, 500).await.expect("history");
            let Some(last) = page.last() else { break };
            after = last.version;
            for e in page {
                *applied
                    .entry((k.clone(), e.event.id().to_string()))
                    .or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    for (k, id) in &stream.pushed {
        assert_eq!(
            applied.get(&(k.clone(), id.to_string())),
            Some(&1),
            "push {id} of {k} applied once"
        );
    }

    // No simulated resource was created twice.
    let cloud = SimulatedCloud::open(&db, SimConfig::default()).expect("open the cloud");
    let creations = tokio::task::spawn_blocking(move || cloud.creations())
        .await
        .expect("join")
        .expect("creations");
    assert!(!creations.is_empty());
    let repeated: Vec<_> = creations.iter().filter(|c| c.count > 1).collect();
    assert!(repeated.is_empty(), "created twice: {repeated:?}");

    // Only the poison is left, in the dead-letter queues.
    let mut dead = backend
        .dead_letters(QueueKind::Events, 100)
        .await
        .expect("dead letters");
    dead.extend(
        backend
            .dead_letters(QueueKind::Steps, 100)
            .await
            .expect("dead letters"),
    );
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), poison, "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("undecodable message"))
            .count(),
        3,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "unknown tenant ghost")
            .count(),
        2,
        "{reasons:?}"
    );
    eprintln!(
        "crash test: {kills} kills, {} pushes, {} history entries, {} resources created once each",
        stream.pushed.len(),
        applied.len(),
        creations.len()
    );
}
