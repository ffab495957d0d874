//! The cost benchmark of the AWS backend: billable requests and DynamoDB write capacity per
//! workflow transition, under load, through a `moto_server` the benchmark starts itself.
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
//! cargo bench -p orchestrator --bench aws_cost                        # 30 tenants x 3 envs x 2 pushes
//! cargo bench -p orchestrator --bench aws_cost -- --tenants 10 --pushes 4 --journal batched
//! ```

#[path = "../tests/moto/mod.rs"]
mod moto;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use activities::simulated::{SimConfig, SimulatedCloud};
use orchestrator::aws::dynamo::DynamoStore;
use orchestrator::aws::sqs::SqsQueue;
use orchestrator::aws::{Names, RequestCounter};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::{Batched, Journal, Sequential, Store};
use orchestrator::requests::RequestCount;
use tokio_util::sync::CancellationToken;
use workflows::{
    Domain, Environment, Event, EventId, GitSha, Push, RepoKind, State, Tenant, TenantId,
    WorkflowKey,
};

struct Options {
    tenants: usize,
    pushes: usize,
    concurrency: usize,
    journals: Vec<&'static str>,
}

fn options() -> Options {
    let mut o = Options {
        tenants: 30,
        pushes: 2,
        concurrency: 64,
        journals: vec!["sequential", "batched"],
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let number = value.parse::<usize>().ok();
        match (args[i].as_str(), number) {
            ("--tenants", Some(v)) => o.tenants = v,
            ("--pushes", Some(v)) => o.pushes = v,
            ("--concurrency", Some(v)) => o.concurrency = v,
            ("--journal", _) => {
                o.journals = match value.as_str() {
                    "batched" => vec!["batched"],
                    "sequential" => vec!["sequential"],
                    _ => vec!["sequential", "batched"],
                }
            }
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

fn main() {
    let o = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "AWS cost benchmark on moto: {} tenants x 3 environments x {} pushes, concurrency {}, simulated cloud at zero latency",
            o.tenants, o.pushes, o.concurrency
        );
        let mut per_transition = Vec::new();
        for journal in &o.journals {
            let figure = match *journal {
                "sequential" => {
                    run(&o, journal, |s, q| Arc::new(Sequential::new(s, q))).await
                }
                _ => {
                    let c = o.concurrency;
                    run(&o, journal, move |s, q| Arc::new(Batched::new(s, q, c))).await
                }
            };
            per_transition.push((*journal, figure));
        }
        if let [(a, x), (b, y)] = per_transition.as_slice() {
            println!("requests per transition, {b} / {a}: {:.2}", y / x);
        }
    });
}

/// One run on a fresh moto with the journal `make` builds; returns requests per transition.
async fn run<J: Journal>(
    o: &Options,
    name: &str,
    make: impl FnOnce(Arc<DynamoStore>, Arc<SqsQueue>) -> Arc<J>,
) -> f64 {
    let moto = moto::Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("cost");
    orchestrator::aws::init::create_all(&sdk, &names, 10)
        .await
        .expect("init");
    let clock: SharedClock = Arc::new(SystemClock);

    // The benchmark's own clients: registering tenants, pushing, polling.
    let own = RequestCounter::new();
    let own_store = DynamoStore::connect(&sdk, &names, &own)
        .await
        .expect("dynamo");
    let ingress = RequestCounter::new();
    let ingress_queue = SqsQueue::connect(&sdk, &names, &ingress)
        .await
        .expect("sqs");

    let envs = [
        Environment::Dev,
        Environment::Staging,
        Environment::Production,
    ];
    let mut keys = Vec::new();
    for i in 0..o.tenants {
        let id = TenantId::new(format!("t{i:05}")).expect("id");
        let tenant = Tenant::new(
            id.clone(),
            Domain::new(format!("{id}.example")).expect("domain"),
            2 * i as u64 + 1,
            2 * i as u64 + 2,
            "00".repeat(32),
            clock.now(),
        );
        own_store.put_tenant(&tenant, true).await.expect("tenant");
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
                event_id: EventId::new(format!("cost-{n}")).expect("id"),
                repo,
                sha: sha(n),
                git_ref: "refs/heads/main".into(),
                author: "bench".into(),
                message: "bench".into(),
                received_at: clock.now(),
            });
            enqueue(&ingress_queue, k, event, clock.now())
                .await
                .expect("enqueue");
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
    let stack = orchestrator::aws::connect(&sdk, &names, &counter, o.concurrency)
        .await
        .expect("connect");
    let (store, queue) = (stack.store, stack.queue);
    let journal = make(store.clone(), queue.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = SimulatedCloud::open_with_clock(
        &dir.path().join("cloud.sqlite"),
        SimConfig::instant(),
        clock.clone(),
    )
    .expect("cloud");
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            queue,
            journal,
            Arc::new(cloud),
            clock.clone(),
            EngineConfig {
                concurrency: o.concurrency,
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
                    d.release.infra.as_ref().map_or(0, sha_number) == infra
                        && d.release.app.as_ref().map_or(0, sha_number) == app
                })
            {
                live += 1;
            }
        }
        if live == keys.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: only {live} of {} workflows live after 600 s",
            keys.len()
        );
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
    total as f64 / transitions as f64
}
