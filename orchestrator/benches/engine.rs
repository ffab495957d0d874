//! The engine benchmark on the embedded default: SQLite (WAL, `synchronous = FULL`, group
//! commit) and the simulated cloud at zero latency, both in one file, in one process.
//!
//! 1. Throughput: `--tenants` workflows receive `--pushes` pushes each (alternating infra and
//!    app), all queued up front; the engine runs until every workflow is live at its newest
//!    pushes. Prints transitions/s, pushes/s and enqueue-to-live latencies.
//! 2. Latency at a rate: pushes arrive open-loop at `--rate` per second for `--seconds`
//!    (spread over the same tenants); prints enqueue-to-live p50/p90/p99/max.
//!
//! Peak RSS is the process's (engine, SQLite cache and the benchmark's own bookkeeping).
//!
//! ```sh
//! cargo bench -p orchestrator --bench engine                      # 1000 x 10, then 500/s for 20 s
//! cargo bench -p orchestrator --bench engine -- --tenants 100 --pushes 5 --rate 200 --seconds 5
//! cargo bench -p orchestrator --bench engine -- --telemetry   # traces and metrics exported
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use activities::simulated::{SimConfig, SimulatedCloud};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::{Queue, QueueKind, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio_util::sync::CancellationToken;
use workflows::{
    Domain, Environment, Event, EventId, GitSha, Push, RepoKind, State, StepOutcome, StepOutput,
    Tenant, TenantId, Timestamp, WorkflowKey,
};

struct Options {
    tenants: usize,
    pushes: usize,
    rate: u64,
    seconds: u64,
    concurrency: usize,
    /// Keep the simulated cloud in memory instead of in the SQLite file (for comparison).
    sim_in_memory: bool,
    /// Export traces and metrics over OTLP/HTTP to a collector in this process.
    telemetry: bool,
}

fn options() -> Options {
    let mut o = Options {
        tenants: 1000,
        pushes: 10,
        rate: 500,
        seconds: 20,
        concurrency: 128,
        sim_in_memory: false,
        telemetry: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        if args[i] == "--sim-in-memory" {
            o.sim_in_memory = true;
            i += 1;
            continue;
        }
        if args[i] == "--telemetry" {
            o.telemetry = true;
            i += 1;
            continue;
        }
        match (args[i].as_str(), value) {
            ("--tenants", Some(v)) => o.tenants = v as usize,
            ("--pushes", Some(v)) => o.pushes = v as usize,
            ("--rate", Some(v)) => o.rate = v,
            ("--seconds", Some(v)) => o.seconds = v,
            ("--concurrency", Some(v)) => o.concurrency = v as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn sha(n: u64) -> GitSha {
    GitSha::new(format!("{n:040x}")).expect("sha")
}

fn sha_number(s: &GitSha) -> u64 {
    u64::from_str_radix(&s.as_str()[24..], 16).unwrap_or(0)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A push the benchmark sent: to which workflow and repository, which commit, when.
struct Sent {
    key: WorkflowKey,
    repo: RepoKind,
    n: u64,
    at: Timestamp,
}

struct Bench {
    backend: Arc<SqliteBackend>,
    clock: SharedClock,
    next: u64,
    sent: Vec<Sent>,
}

impl Bench {
    async fn push(&mut self, key: &WorkflowKey, repo: RepoKind) {
        self.next += 1;
        let n = self.next;
        let now = self.clock.now();
        let event = Event::Push(Push {
            event_id: EventId::new(format!("bench-{n}")).expect("id"),
            repo,
            sha: sha(n),
            git_ref: "refs/heads/main".into(),
            author: "bench".into(),
            message: "bench".into(),
            received_at: now,
        });
        enqueue(&*self.backend, key, event, now)
            .await
            .expect("enqueue");
        self.sent.push(Sent {
            key: key.clone(),
            repo,
            n,
            at: now,
        });
    }

    /// Enqueue-to-live latency of every push in `sent[from..]`: until a rollout made live a
    /// release holding that push's commit or a newer one of the same repository.
    async fn latencies(&self, from: usize) -> Vec<Duration> {
        let mut lives: HashMap<WorkflowKey, Vec<(Timestamp, u64, u64)>> = HashMap::new();
        let keys: std::collections::BTreeSet<&WorkflowKey> =
            self.sent[from..].iter().map(|s| &s.key).collect();
        for key in keys {
            let mut after = 0;
            let list = lives.entry(key.clone()).or_default();
            loop {
                let page = self
                    .backend
                    .history(key, after, 1000)
                    .await
                    .expect("history");
                let Some(last) = page.last() else { break };
                after = last.version;
                for e in page {
                    if let Event::Step(r) = &e.event
                        && let StepOutcome::Done {
                            output: StepOutput::Rollout(d),
                        } = &r.outcome
                    {
                        let infra = d.release.infra.as_ref().map_or(0, sha_number);
                        let app = d.release.app.as_ref().map_or(0, sha_number);
                        list.push((e.at, infra, app));
                    }
                }
            }
        }
        self.sent[from..]
            .iter()
            .filter_map(|s| {
                lives.get(&s.key)?.iter().find_map(|(at, infra, app)| {
                    let live = match s.repo {
                        RepoKind::Infra => *infra,
                        RepoKind::App => *app,
                    };
                    (live >= s.n).then(|| at.since(s.at))
                })
            })
            .collect()
    }

    async fn all_live(
        &self,
        keys: &[WorkflowKey],
        newest: &HashMap<WorkflowKey, (u64, u64)>,
    ) -> bool {
        for k in keys {
            let Ok(Some(r)) = self.backend.workflow(k).await else {
                return false;
            };
            let Some(d) = &r.workflow().deployed else {
                return false;
            };
            let (infra, app) = newest.get(k).copied().unwrap_or_default();
            if r.state() != State::Live
                || d.release.infra.as_ref().map_or(0, sha_number) != infra
                || d.release.app.as_ref().map_or(0, sha_number) != app
            {
                return false;
            }
        }
        true
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut l: Vec<Duration>) {
    l.sort();
    println!(
        "{what}: {} pushes, enqueue-to-live p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        l.len(),
        percentile(&l, 0.5).as_secs_f64() * 1e3,
        percentile(&l, 0.9).as_secs_f64() * 1e3,
        percentile(&l, 0.99).as_secs_f64() * 1e3,
        l.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let telemetry = o.telemetry.then(|| {
        let _entered = runtime.enter();
        let collector = runtime.block_on(collector());
        let telemetry = orchestrator::telemetry::init_with(
            "engine-bench",
            orchestrator::telemetry::LogFormat::Text,
            "off",
            false,
            Some(&collector.url),
        )
        .expect("telemetry");
        (telemetry, collector)
    });
    runtime.block_on(run(o));
    if let Some((t, collector)) = telemetry {
        let _entered = runtime.enter();
        t.shutdown();
        collector.report();
    }
}

/// What the in-process collector received.
#[derive(Clone, Default)]
struct Collector {
    url: String,
    traces: Arc<std::sync::Mutex<Vec<axum::body::Bytes>>>,
    metrics: Arc<std::sync::atomic::AtomicUsize>,
}

impl Collector {
    /// Decodes the trace exports (after the run, so decoding costs the run nothing) and prints
    /// how many spans arrived: the figure shows nothing was dropped on the way.
    fn report(&self) {
        use prost::Message as _;
        let bodies = self.traces.lock().expect("bodies");
        let mut spans = 0;
        let mut names: HashMap<String, usize> = HashMap::new();
        for body in bodies.iter() {
            let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body.as_ref())
                .expect("an OTLP trace export");
            for rs in request.resource_spans {
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans += 1;
                        *names.entry(span.name).or_default() += 1;
                    }
                }
            }
        }
        let mut names: Vec<_> = names.into_iter().collect();
        names.sort();
        println!(
            "collector: {spans} spans in {} trace exports ({:.1} MiB; {names:?}), {} metric exports",
            bodies.len(),
            bodies.iter().map(|b| b.len()).sum::<usize>() as f64 / (1024.0 * 1024.0),
            self.metrics.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
}

/// An OTLP/HTTP collector in this process that keeps trace exports for counting after the run
/// and counts metric exports.
async fn collector() -> Collector {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = Collector {
        url: format!("http://{}", listener.local_addr().expect("addr")),
        ..Collector::default()
    };
    let c = collector.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, body: axum::body::Bytes| async move {
            if uri.path().ends_with("/v1/traces") {
                c.traces.lock().expect("bodies").push(body);
            } else {
                c.metrics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            axum::http::StatusCode::OK
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    collector
}

async fn run(o: Options) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.sqlite");
    let clock: SharedClock = Arc::new(SystemClock);
    let backend = Arc::new(
        SqliteBackend::open_with_clock(SqliteConfig::new(&path), clock.clone()).expect("open"),
    );
    let cloud =
        SimulatedCloud::open_with_clock(&path, SimConfig::instant(), clock.clone()).expect("cloud");
    let keys: Vec<WorkflowKey> = (0..o.tenants)
        .map(|i| {
            WorkflowKey::new(
                TenantId::new(format!("t{i:05}")).expect("id"),
                Environment::Dev,
            )
        })
        .collect();
    for (i, k) in keys.iter().enumerate() {
        let now = clock.now();
        let tenant = Tenant::new(
            k.tenant.clone(),
            Domain::new(format!("{}.example", k.tenant)).expect("domain"),
            2 * i as u64 + 1,
            2 * i as u64 + 2,
            "00".repeat(32),
            now,
        );
        backend.put_tenant(&tenant, true).await.expect("tenant");
    }
    let engine = Arc::new(Engine::new(
        backend.clone(),
        backend.clone(),
        backend.clone(),
        Arc::new(cloud),
        clock.clone(),
        EngineConfig {
            concurrency: o.concurrency,
            batch: 64,
            wait: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    ));
    let mut bench = Bench {
        backend: backend.clone(),
        clock: clock.clone(),
        next: 0,
        sent: Vec::new(),
    };
    println!(
        "engine benchmark: {} tenants x {} pushes, SQLite synchronous=FULL (WAL, group commit), simulated cloud at zero latency ({}), concurrency {}, telemetry {}",
        o.tenants,
        o.pushes,
        if o.sim_in_memory {
            "in memory"
        } else {
            "in the same file"
        },
        o.concurrency,
        if o.telemetry {
            "exported over OTLP/HTTP to a collector in this process"
        } else {
            "off"
        }
    );

    // 1. Throughput.
    let mut newest: HashMap<WorkflowKey, (u64, u64)> = HashMap::new();
    for p in 0..o.pushes {
        for k in &keys {
            let repo = if p % 2 == 0 {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            bench.push(k, repo).await;
            let n = bench.next;
            let e = newest.entry(k.clone()).or_default();
            match repo {
                RepoKind::Infra => e.0 = n,
                RepoKind::App => e.1 = n,
            }
        }
    }
    let queued = bench.sent.len();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let before = engine.stats().snapshot();
    let running = tokio::spawn(engine.clone().run(stop.clone()));
    while !bench.all_live(&keys, &newest).await {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    let after = engine.stats().snapshot();
    let transitions = after.transitions - before.transitions;
    println!(
        "throughput: {transitions} transitions in {:.2} s = {:.0} transitions/s ({queued} pushes queued up front = {:.0} pushes/s; {} activity invocations, {} conflicts, {} stale)",
        elapsed.as_secs_f64(),
        transitions as f64 / elapsed.as_secs_f64(),
        queued as f64 / elapsed.as_secs_f64(),
        after.activities - before.activities,
        after.conflicts - before.conflicts,
        after.stale - before.stale,
    );
    report("throughput run", bench.latencies(0).await);
    println!(
        "peak RSS after the throughput run: {:.1} MiB",
        peak_rss_mib()
    );

    // 2. Latency at a fixed rate, open loop.
    let from = bench.sent.len();
    let interval = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let total = (o.rate * o.seconds) as usize;
    let start = tokio::time::Instant::now();
    let before = engine.stats().snapshot();
    let mut rng = fastrand::Rng::with_seed(1);
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let k = keys[rng.usize(..keys.len())].clone();
        let repo = if rng.bool() {
            RepoKind::Infra
        } else {
            RepoKind::App
        };
        bench.push(&k, repo).await;
        let n = bench.next;
        let e = newest.entry(k).or_default();
        match repo {
            RepoKind::Infra => e.0 = n,
            RepoKind::App => e.1 = n,
        }
    }
    let offered = start.elapsed();
    while !bench.all_live(&keys, &newest).await {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = engine.stats().snapshot();
    println!(
        "rate run: {total} pushes offered at {} /s over {:.1} s; {} transitions",
        o.rate,
        offered.as_secs_f64(),
        after.transitions - before.transitions
    );
    report("rate run", bench.latencies(from).await);
    for q in QueueKind::ALL {
        let s = backend.stats(q).await.expect("stats");
        assert_eq!(s.dead, 0, "nothing dead-lettered in {q}");
    }
    println!("peak RSS: {:.1} MiB", peak_rss_mib());
    stop.cancel();
    let _ = running.await;
}
