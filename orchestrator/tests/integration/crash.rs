//! The crash test: the worker runs as a child process and is killed with SIGKILL at random
//! moments, over and over, while a stream of pushes (and some poison) arrives. At the end:
//! every event was applied exactly once, every workflow is live at its newest pushes, no
//! simulated resource was created twice, and nothing is left in the queues but the injected
//! poison, which is in the dead-letter queues.
//!
//! On the embedded backend one worker is killed 200 times (`CRASH_KILLS`); on SQS and
//! DynamoDB (a moto_server of the test's own) `CRASH_WORKERS_AWS` workers (default 2) run side
//! by side and one of them is killed `CRASH_KILLS_AWS` times (default 30: moto is slower, and
//! each kill costs a visibility timeout). Workers have `CRASH_PATIENCE_SECS` (300 s) to
//! converge after the last kill.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use crate::conformance::{event_message, key, tenant};
use activities::simulated::{SimConfig, SimulatedCloud};
use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, QueueKind, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio::process::{Child, Command};
use workflows::{
    Environment, Event, EventId, GitSha, Push, Release, RepoKind, State, Timestamp, WorkflowKey,
};

const TENANTS: [&str; 4] = ["alpha", "bravo", "charlie", "delta"];

/// How to start a worker on the backend under test.
struct WorkerEnv {
    db: std::path::PathBuf,
    env: Vec<(String, String)>,
}

fn worker(w: &WorkerEnv) -> Child {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["--db"])
        .arg(&w.db)
        .arg("worker")
        .env(
            "RUST_LOG",
            std::env::var("CRASH_WORKER_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        // Short timeouts so that what a killed worker held comes back quickly.
        .env("ORCHESTRATOR__ENGINE__VISIBILITY", "1s")
        .env("ORCHESTRATOR__ENGINE__WAIT", "50ms")
        .env("ORCHESTRATOR__ENGINE__SHUTDOWN_GRACE", "2s")
        // AWS-like latencies divided by 20 000 (an image takes 24 ms), with throttling, so
        // that steps wait, recheck and retry while workers die around them.
        .env("ORCHESTRATOR__SIMULATED__TIME_SCALE", "20000.0")
        .env("ORCHESTRATOR__SIMULATED__THROTTLE_PROBABILITY", "0.05")
        .env("ORCHESTRATOR__SIMULATED__LOST_RESPONSE_PROBABILITY", "0.05")
        // The backend's own settings come last and win.
        .envs(w.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("CRASH_WORKER_LOG") {
            // For debugging: every worker's stderr, appended to one file.
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_or_else(|_| Stdio::null(), Stdio::from),
            None => Stdio::null(),
        })
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
    async fn push<B: Queue>(&mut self, backend: &B, k: &WorkflowKey, repo: RepoKind) {
        self.next += 1;
        let n = self.next;
        let id = EventId::new(format!("push-{n}")).expect("id");
        let event = Event::Push(Push {
            event_id: id.clone(),
            repo,
            sha: sha(n),
            before: None,
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
    let env = WorkerEnv {
        db,
        env: Vec::new(),
    };
    crash(&backend, &env, kills, 1).await;
}

#[cfg(feature = "aws")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_on_sqs_and_dynamodb_loses_and_repeats_nothing() {
    use orchestrator::aws::{Names, RequestCounter};

    let kills: usize = std::env::var("CRASH_KILLS_AWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let moto = testkit::moto::Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("crash");
    orchestrator::aws::init::create_all(&sdk, &names, 10)
        .await
        .expect("init");
    let stack = orchestrator::aws::connect(&sdk, &names, &RequestCounter::new(), 64)
        .await
        .expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let env = WorkerEnv {
        // The simulated cloud keeps its resources in this file.
        db: dir.path().join("cloud.sqlite"),
        env: [
            ("ORCHESTRATOR__BACKEND", "aws"),
            ("ORCHESTRATOR__AWS__PREFIX", "crash"),
            ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            // moto answers a busy moment slowly: a visibility timeout of a second would
            // redeliver messages whose handlers are alive but whose heartbeat is late.
            ("ORCHESTRATOR__ENGINE__VISIBILITY", "3s"),
            ("ORCHESTRATOR__ENGINE__WAIT", "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    let workers = std::env::var("CRASH_WORKERS_AWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    crash(&stack, &env, kills, workers).await;
}

/// Runs `workers` workers on `backend` while pushes arrive, killing one at random `kills`
/// times, then checks what the module docs promise.
async fn crash<B: Queue + Store>(backend: &B, env: &WorkerEnv, kills: usize, workers: usize) {
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
                "{not an envelope",
            )])
            .await
            .expect("send");
        poison += 1;
    }
    for i in 0..2 {
        let ghost = key("ghost", Environment::Dev);
        let event = Event::Provision {
            event_id: EventId::new(format!("ghost-{i}")).expect("id"),
            from_snapshot: false,
        };
        enqueue(
            backend,
            &ghost,
            event,
            Timestamp::from(jiff::Timestamp::now()),
        )
        .await
        .expect("enqueue");
        poison += 1;
    }

    let mut rng = fastrand::Rng::with_seed(7);
    let mut running: Vec<Child> = (0..workers).map(|_| worker(env)).collect();
    for round in 0..kills {
        // A few pushes arrive while the workers live.
        for _ in 0..rng.usize(0..3) {
            let k = &workflows[rng.usize(..workflows.len())];
            let repo = if rng.bool() {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            stream.push(backend, k, repo).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(20..150))).await;
        let victim = rng.usize(..running.len());
        let mut child = std::mem::replace(&mut running[victim], worker(env));
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("reaped");
        assert!(
            !status.success(),
            "round {round}: the worker was killed, not finished"
        );
    }
    // Every workflow gets at least one push of each repository.
    for k in &workflows {
        stream.push(backend, k, RepoKind::Infra).await;
        stream.push(backend, k, RepoKind::App).await;
    }

    // Workers that are left alone finish the work.
    let patience = std::env::var("CRASH_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(patience);
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
        if tokio::time::Instant::now() >= deadline {
            let mut report = Vec::new();
            for k in &workflows {
                let r = backend.workflow(k).await.expect("read");
                report.push(format!(
                    "{k}: {:?} deployed {:?} want {:?}",
                    r.as_ref().map(|r| r.state()),
                    r.as_ref().and_then(|r| r
                        .workflow()
                        .deployed
                        .as_ref()
                        .map(|d| d.release.clone())),
                    stream.newest.get(k)
                ));
            }
            for q in QueueKind::ALL {
                report.push(format!("{q}: {:?}", backend.stats(q).await));
            }
            // The history of every workflow that is not where it should be (else the first).
            let mut behind = Vec::new();
            for k in &workflows {
                let r = backend.workflow(k).await.expect("read");
                let deployed = r
                    .as_ref()
                    .and_then(|r| r.workflow().deployed.as_ref().map(|d| d.release.clone()));
                if deployed.as_ref() != stream.newest.get(k) {
                    behind.push(k.clone());
                }
            }
            if behind.is_empty() {
                behind.extend(workflows.first().cloned());
            }
            for k in &behind {
                let h = backend.history(k, 0, 1000).await.expect("history");
                for e in h.iter().rev().take(12).rev() {
                    report.push(format!(
                        "  {k} v{} {:?} {:?} -> {} commands {:?}",
                        e.version,
                        e.event,
                        e.verdict,
                        e.to,
                        e.commands.len()
                    ));
                }
                if let Ok(Some(r)) = backend.workflow(k).await
                    && let Some(run) = &r.workflow().run
                {
                    for st in &run.steps {
                        report.push(format!(
                            "  step {:?} {:?} token {} attempt {}",
                            st.kind, st.status, st.token, st.attempt
                        ));
                    }
                }
            }
            panic!(
                "the workflows did not converge after {kills} kills:\n{}",
                report.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for mut w in running {
        w.start_kill().expect("stop");
        let _ = w.wait().await;
    }

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
    let cloud = SimulatedCloud::open(&env.db, SimConfig::default()).expect("open the cloud");
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
    // The engine quarantines poison after one attempt; a message that a dying worker received
    // `max_receives` times is moved by the queue's redrive first (SQS's own poison guard).
    let redriven = |r: &str| r.contains("without being acknowledged");
    let garbage = dead
        .iter()
        .filter(|d| d.body == b"{not an envelope")
        .inspect(|d| {
            assert!(
                d.reason.starts_with("undecodable message") || redriven(&d.reason),
                "{}",
                d.reason
            );
        })
        .count();
    assert_eq!(garbage, 3, "{reasons:?}");
    let ghosts = dead
        .iter()
        .filter(|d| {
            d.reason == "unknown tenant ghost"
                || (d.body != b"{not an envelope" && redriven(&d.reason))
        })
        .count();
    assert_eq!(ghosts, 2, "{reasons:?}");
    eprintln!(
        "crash test: {kills} kills, {} pushes, {} history entries, {} resources created once each",
        stream.pushed.len(),
        applied.len(),
        creations.len()
    );
}
