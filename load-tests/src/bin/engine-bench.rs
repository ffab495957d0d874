//! The engine benchmark on the embedded default: SQLite (WAL, `synchronous = FULL`, group
//! commit) and the simulated cloud at zero latency, both in one file (or the cloud in memory
//! with `--sim-in-memory`), in one process.
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
//! cargo run --release -p load-tests --bin engine-bench                # 1000 x 10, then 500/s for 20 s
//! cargo run --release -p load-tests --bin engine-bench -- --tenants 100 --pushes 5 --rate 200 --seconds 5
//! cargo run --release -p load-tests --bin engine-bench -- --telemetry   # traces and metrics exported
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use activities::Activities;
use activities::simulated::{SimConfig, SimulatedCloud};
use anyhow::{Context, Result, bail};
use clap::Parser;
use load_tests::analysis::percentile;
use load_tests::setup::{commit, commit_number, peak_rss_mib, register_tenants};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::{Queue, QueueKind, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio_util::sync::CancellationToken;
use workflows::{
    Environment, Event, EventId, Push, RepoKind, State, StepOutcome, StepOutput, TenantId,
    Timestamp, WorkflowKey,
};

/// The engine on SQLite and the simulated cloud at zero latency: throughput with every push
/// queued up front, then latency at a fixed rate.
#[derive(Debug, Parser)]
#[command(name = "engine-bench")]
struct Options {
    /// Workflows (one tenant each, env dev).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    tenants: u32,
    /// Pushes per workflow in the throughput run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pushes: u32,
    /// Pushes per second offered in the rate run.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Length of the rate run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Messages the engine handles at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Keep the simulated cloud in memory instead of in the SQLite file (its writes then do
    /// not share the file's lock and fsyncs with the engine's).
    #[arg(long)]
    sim_in_memory: bool,
    /// Export traces and metrics over OTLP/HTTP to a collector in this process.
    #[arg(long)]
    telemetry: bool,
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
    /// The newest infra and app commit pushed to each workflow.
    newest: HashMap<WorkflowKey, (u64, u64)>,
}

impl Bench {
    async fn push(&mut self, key: &WorkflowKey, repo: RepoKind) -> Result<()> {
        self.next += 1;
        let n = self.next;
        let now = self.clock.now();
        let event = Event::Push(Push {
            event_id: EventId::new(format!("bench-{n}"))?,
            repo,
            sha: commit(n)?,
            before: None,
            git_ref: "refs/heads/main".into(),
            author: "bench".into(),
            message: "bench".into(),
            received_at: now,
        });
        enqueue(&*self.backend, key, event, now).await?;
        self.sent.push(Sent {
            key: key.clone(),
            repo,
            n,
            at: now,
        });
        let newest = self.newest.entry(key.clone()).or_default();
        match repo {
            RepoKind::Infra => newest.0 = n,
            RepoKind::App => newest.1 = n,
        }
        Ok(())
    }

    /// Enqueue-to-live latency of every push in `sent[from..]`: until a rollout made live a
    /// release holding that push's commit or a newer one of the same repository.
    async fn latencies(&self, from: usize) -> Result<Vec<Duration>> {
        let mut lives: HashMap<WorkflowKey, Vec<(Timestamp, u64, u64)>> = HashMap::new();
        let keys: std::collections::BTreeSet<&WorkflowKey> =
            self.sent[from..].iter().map(|s| &s.key).collect();
        for key in keys {
            let mut after = 0;
            let list = lives.entry(key.clone()).or_default();
            loop {
                let page = self.backend.history(key, after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.version;
                for e in page {
                    if let Event::Step(r) = &e.event
                        && let StepOutcome::Done {
                            output: StepOutput::Rollout(d),
                        } = &r.outcome
                    {
                        let infra = d.release.infra.as_ref().map_or(0, commit_number);
                        let app = d.release.app.as_ref().map_or(0, commit_number);
                        list.push((e.at, infra, app));
                    }
                }
            }
        }
        Ok(self.sent[from..]
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
            .collect())
    }

    /// Whether every workflow of `keys` is live at the newest commits pushed to it.
    async fn all_live(&self, keys: &[WorkflowKey]) -> bool {
        for k in keys {
            let Ok(Some(r)) = self.backend.workflow(k).await else {
                return false;
            };
            let Some(d) = &r.workflow().deployed else {
                return false;
            };
            let (infra, app) = self.newest.get(k).copied().unwrap_or_default();
            if r.state() != State::Live
                || d.release.infra.as_ref().map_or(0, commit_number) != infra
                || d.release.app.as_ref().map_or(0, commit_number) != app
            {
                return false;
            }
        }
        true
    }
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

fn main() -> Result<()> {
    let o = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let telemetry = if o.telemetry {
        let _entered = runtime.enter();
        let collector = runtime.block_on(collector())?;
        let telemetry = orchestrator::telemetry::init_with(
            "engine-bench",
            orchestrator::telemetry::LogFormat::Text,
            "off",
            false,
            Some(&collector.url),
        )?;
        Some((telemetry, collector))
    } else {
        None
    };
    let result = runtime.block_on(run(&o));
    if let Some((t, collector)) = telemetry {
        let _entered = runtime.enter();
        t.shutdown();
        collector.report()?;
    }
    result
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
    fn report(&self) -> Result<()> {
        use prost::Message as _;
        let bodies = self
            .traces
            .lock()
            .map_err(|_| anyhow::anyhow!("the collector's lock is poisoned"))?;
        let mut spans = 0;
        let mut names: HashMap<String, usize> = HashMap::new();
        for body in bodies.iter() {
            let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body.as_ref())
                .context("an OTLP trace export")?;
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
        Ok(())
    }
}

/// An OTLP/HTTP collector in this process that keeps trace exports for counting after the run
/// and counts metric exports.
async fn collector() -> Result<Collector> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector = Collector {
        url: format!("http://{}", listener.local_addr()?),
        ..Collector::default()
    };
    let c = collector.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, body: axum::body::Bytes| async move {
            if uri.path().ends_with("/v1/traces") {
                if let Ok(mut traces) = c.traces.lock() {
                    traces.push(body);
                }
            } else {
                c.metrics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            axum::http::StatusCode::OK
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(collector)
}

async fn run(o: &Options) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.sqlite");
    let clock: SharedClock = Arc::new(SystemClock);
    let backend = Arc::new(SqliteBackend::open_with_clock(
        SqliteConfig::new(&path),
        clock.clone(),
    )?);
    let cloud = if o.sim_in_memory {
        SimulatedCloud::in_memory_with_clock(SimConfig::instant(), clock.clone())?
    } else {
        SimulatedCloud::open_with_clock(&path, SimConfig::instant(), clock.clone())?
    };
    let keys: Vec<WorkflowKey> = (0..o.tenants)
        .map(|i| TenantId::new(format!("t{i:05}")).map(|id| WorkflowKey::new(id, Environment::Dev)))
        .collect::<Result<_, _>>()?;
    register_tenants(&*backend, keys.len(), |i| keys[i].tenant.clone(), "bench").await?;
    let engine = Arc::new(Engine::new(
        backend.clone(),
        backend.clone(),
        backend.clone(),
        Arc::new(cloud),
        clock.clone(),
        EngineConfig {
            concurrency: o.concurrency as usize,
            batch: 64,
            wait: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    ));
    let mut bench = Bench {
        backend: backend.clone(),
        clock,
        next: 0,
        sent: Vec::new(),
        newest: HashMap::new(),
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
    let stop = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(stop.clone()));
    let result = async {
        throughput(o, &mut bench, &engine, &keys).await?;
        rate(o, &mut bench, &engine, &keys).await
    }
    .await;
    stop.cancel();
    let _ = running.await;
    result?;
    for q in QueueKind::ALL {
        let s = backend.stats(q).await?;
        if s.dead > 0 {
            bail!("{} messages were dead-lettered in {q}", s.dead);
        }
    }
    println!("peak RSS: {:.1} MiB", peak_rss_mib());
    Ok(())
}

/// The throughput run: every push queued up front, then the time until all are live.
async fn throughput<A: Activities>(
    o: &Options,
    bench: &mut Bench,
    engine: &Engine<SqliteBackend, SqliteBackend, SqliteBackend, A>,
    keys: &[WorkflowKey],
) -> Result<()> {
    for p in 0..o.pushes {
        for k in keys {
            let repo = if p % 2 == 0 {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            bench.push(k, repo).await?;
        }
    }
    let queued = bench.sent.len();
    let started = Instant::now();
    let before = engine.stats().snapshot();
    while !bench.all_live(keys).await {
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
    report("throughput run", bench.latencies(0).await?);
    println!(
        "peak RSS after the throughput run: {:.1} MiB",
        peak_rss_mib()
    );
    Ok(())
}

/// The rate run: pushes offered open-loop at `--rate` for `--seconds`, then the latencies.
async fn rate<A: Activities>(
    o: &Options,
    bench: &mut Bench,
    engine: &Engine<SqliteBackend, SqliteBackend, SqliteBackend, A>,
    keys: &[WorkflowKey],
) -> Result<()> {
    let from = bench.sent.len();
    let interval = Duration::from_secs_f64(1.0 / o.rate as f64);
    let total = o.rate * o.seconds;
    let start = tokio::time::Instant::now();
    let before = engine.stats().snapshot();
    let mut rng = fastrand::Rng::with_seed(1);
    for i in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let k = &keys[rng.usize(..keys.len())];
        let repo = if rng.bool() {
            RepoKind::Infra
        } else {
            RepoKind::App
        };
        bench.push(k, repo).await?;
    }
    let offered = start.elapsed();
    while !bench.all_live(keys).await {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = engine.stats().snapshot();
    println!(
        "rate run: {total} pushes offered at {} /s over {:.1} s; {} transitions",
        o.rate,
        offered.as_secs_f64(),
        after.transitions - before.transitions
    );
    report("rate run", bench.latencies(from).await?);
    Ok(())
}
