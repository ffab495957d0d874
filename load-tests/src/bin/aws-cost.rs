//! The cost benchmark of the AWS backend: billable requests and DynamoDB write capacity per
//! workflow transition, under load, through a `moto_server` the benchmark starts itself
//! (`tools/moto_server.py`; `python3` needs moto: `pip install 'moto[server]'`).
//!
//! `--tenants` tenants get a dev, a staging and a production workflow each; every workflow
//! receives `--pushes` pushes (alternating infra and app) queued up front, and one in-process
//! engine (`--concurrency` handlers, the simulated cloud at zero latency) runs until every
//! workflow is live at its newest pushes. The run is made once per journal (`--journal
//! batched|sequential|both`, each on a fresh moto), so that their ratio is measured on one
//! machine in one run.
//!
//! Requests are counted by the SDK interceptor on the engine's clients (every attempt, idle
//! long polls included); the pushes' own `SendMessage` (the ingress's work) and the
//! benchmark's polling are counted apart. Write capacity comes from `ReturnConsumedCapacity`;
//! moto reports none for transactions, so there it is computed from item sizes as DynamoDB
//! bills a transactional write (2 WCU per started KB of each item).
//!
//! ```sh
//! cargo run --release -p load-tests --bin aws-cost                    # 30 tenants x 3 envs x 2 pushes
//! cargo run --release -p load-tests --bin aws-cost -- --tenants 10 --pushes 4 --journal batched
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use activities::simulated::{SimConfig, SimulatedCloud};
use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use load_tests::setup::{commit, commit_number, register_tenants};
use orchestrator::aws::dynamo::DynamoStore;
use orchestrator::aws::sqs::SqsQueue;
use orchestrator::aws::{Names, RequestCounter};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::{Journal, Store};
use orchestrator::requests::RequestCount;
use orchestrator::stack::{Batched, Sequential};
use testkit::moto::Moto;
use tokio_util::sync::CancellationToken;
use workflows::{Environment, Event, EventId, Push, RepoKind, State, TenantId, WorkflowKey};

/// Which journals to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Journals {
    /// Write, send, acknowledge, one commit after the other.
    Sequential,
    /// The same, grouped across concurrent handlers.
    Batched,
    /// Both, sequential first, and their ratio.
    Both,
}

/// AWS requests and DynamoDB write units per transition, on moto.
#[derive(Debug, Parser)]
#[command(name = "aws-cost")]
struct Options {
    /// Tenants (three workflows each: dev, staging, production).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    tenants: u32,
    /// Pushes per workflow.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pushes: u32,
    /// Messages the engine handles at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Which journals to measure.
    #[arg(long, value_enum, default_value_t = Journals::Both)]
    journal: Journals,
}

/// The requests of `after` that are not in `before`, per operation.
fn since(before: &[RequestCount], after: &[RequestCount]) -> BTreeMap<String, u64> {
    let mut d: BTreeMap<String, u64> = BTreeMap::new();
    for r in after {
        *d.entry(format!("{}:{}", r.service, r.operation))
            .or_default() += r.count;
    }
    for r in before {
        if let Some(c) = d.get_mut(&format!("{}:{}", r.service, r.operation)) {
            *c -= r.count;
        }
    }
    d.retain(|_, c| *c > 0);
    d
}

fn main() -> Result<()> {
    let o = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        println!(
            "AWS cost benchmark on moto: {} tenants x 3 environments x {} pushes, concurrency {}, simulated cloud at zero latency",
            o.tenants, o.pushes, o.concurrency
        );
        let journals: &[Journals] = match o.journal {
            Journals::Both => &[Journals::Sequential, Journals::Batched],
            one => std::slice::from_ref(match one {
                Journals::Sequential => &Journals::Sequential,
                _ => &Journals::Batched,
            }),
        };
        let mut per_transition = Vec::new();
        for journal in journals {
            let moto = Moto::start().await;
            let figure = match journal {
                Journals::Sequential => {
                    run(&o, &moto, "sequential", |s, q| Arc::new(Sequential::new(s, q))).await?
                }
                _ => {
                    let c = o.concurrency as usize;
                    run(&o, &moto, "batched", move |s, q| Arc::new(Batched::new(s, q, c))).await?
                }
            };
            per_transition.push(figure);
        }
        if let [x, y] = per_transition.as_slice() {
            println!("requests per transition, batched / sequential: {:.2}", y / x);
        }
        Ok(())
    })
}

/// One run on a fresh moto with the journal `make` builds; returns requests per transition.
async fn run<J: Journal>(
    o: &Options,
    moto: &Moto,
    name: &str,
    make: impl FnOnce(Arc<DynamoStore>, Arc<SqsQueue>) -> Arc<J>,
) -> Result<f64> {
    let sdk = moto.sdk_config();
    let names = Names::new("cost");
    orchestrator::aws::init::create_all(&sdk, &names, 10).await?;
    let clock: SharedClock = Arc::new(SystemClock);

    // The benchmark's own clients: registering tenants, pushing, polling.
    let own = RequestCounter::new();
    let own_store = DynamoStore::connect(&sdk, &names, &own).await?;
    let ingress = RequestCounter::new();
    let ingress_queue = SqsQueue::connect(&sdk, &names, &ingress).await?;

    let envs = [
        Environment::Dev,
        Environment::Staging,
        Environment::Production,
    ];
    let mut keys = Vec::new();
    let ids: Vec<TenantId> = (0..o.tenants)
        .map(|i| TenantId::new(format!("t{i:05}")))
        .collect::<Result<_, _>>()?;
    register_tenants(&own_store, ids.len(), |i| ids[i].clone(), "bench").await?;
    for id in &ids {
        keys.extend(envs.iter().map(|e| WorkflowKey::new(id.clone(), *e)));
    }
    let ingress_before = ingress.snapshot();
    let mut newest: HashMap<WorkflowKey, (u64, u64)> = HashMap::new();
    let mut n = 0;
    for p in 0..o.pushes {
        for k in &keys {
            n += 1;
            let repo = if p % 2 == 0 {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            let event = Event::Push(Push {
                event_id: EventId::new(format!("cost-{n}"))?,
                repo,
                sha: commit(n)?,
                before: None,
                git_ref: "refs/heads/main".into(),
                author: "bench".into(),
                message: "bench".into(),
                received_at: clock.now(),
            });
            enqueue(&ingress_queue, k, event, clock.now()).await?;
            let e = newest.entry(k.clone()).or_default();
            match repo {
                RepoKind::Infra => e.0 = n,
                RepoKind::App => e.1 = n,
            }
        }
    }
    let pushes = n;
    let ingress_requests: u64 = since(&ingress_before, &ingress.snapshot()).values().sum();

    // The engine's clients: what a worker pays.
    let counter = RequestCounter::new();
    let stack = orchestrator::aws::connect(&sdk, &names, &counter, o.concurrency as usize).await?;
    let (store, queue) = (stack.store, stack.queue);
    let journal = make(store.clone(), queue.clone());
    let cloud = SimulatedCloud::in_memory_with_clock(SimConfig::instant(), clock.clone())?;
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            queue,
            journal,
            Arc::new(cloud),
            clock.clone(),
            EngineConfig {
                concurrency: o.concurrency as usize,
                batch: 10,
                visibility: Duration::from_secs(60),
                heartbeat: Duration::from_secs(20),
                wait: Duration::from_secs(1),
                ..EngineConfig::default()
            },
        )
        .with_requests(counter.clone()),
    );
    let before = counter.snapshot();
    let wcu_before = store.consumed_wcu();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(engine.clone().run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut live = 0;
        for k in &keys {
            let Ok(Some(r)) = own_store.workflow(k).await else {
                continue;
            };
            let (infra, app) = newest.get(k).copied().unwrap_or_default();
            if r.state() == State::Live
                && r.workflow().deployed.as_ref().is_some_and(|d| {
                    d.release.infra.as_ref().map_or(0, commit_number) == infra
                        && d.release.app.as_ref().map_or(0, commit_number) == app
                })
            {
                live += 1;
            }
        }
        if live == keys.len() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}: only {live} of {} workflows live after 600 s",
                keys.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    let requests = since(&before, &counter.snapshot());
    let wcu = store.consumed_wcu() - wcu_before;
    stop.cancel();
    let _ = running.await;
    let stats = engine.stats().snapshot();
    let transitions = stats.transitions.max(1);
    let total: u64 = requests.values().sum();
    println!(
        "\n{name}: {} workflows live after {pushes} pushes in {:.1} s: {} transitions ({:.0}/s), {} activity invocations, {} duplicates, {} conflicts",
        keys.len(),
        elapsed.as_secs_f64(),
        stats.transitions,
        stats.transitions as f64 / elapsed.as_secs_f64(),
        stats.activities,
        stats.duplicates,
        stats.conflicts,
    );
    println!(
        "{name}: {total} requests = {:.2} per transition; {wcu:.0} WCU = {:.2} per transition; the ingress's SendMessage: {ingress_requests} for {pushes} pushes",
        total as f64 / transitions as f64,
        wcu / transitions as f64,
    );
    for (op, c) in &requests {
        println!(
            "  {op:<36} {c:>7}  {:>6.3} per transition",
            *c as f64 / transitions as f64
        );
    }
    Ok(total as f64 / transitions as f64)
}
