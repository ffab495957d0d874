//! `deploy-time`: time from push to live with the simulated cloud's AWS-like latencies, for a
//! first deployment (an infrastructure push to an environment that has nothing: network,
//! source, image, database, routing, rollout) and for an app-only push to a live environment
//! (source, rollout; no image, no database). Prints both beside the bound a first deployment
//! must meet, max(image, database) + rollout (preparation steps run concurrently), and the sum
//! a sequential pipeline takes.
//!
//! The engine, the SQLite backend and the simulated cloud run in this process on a temporary
//! file; `--time-scale` divides every latency (600: eight minutes of image build take 0.8 s).
//!
//! ```sh
//! cargo run --release -p load-tests --bin deploy-time -- --time-scale 600 --tenants 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use activities::simulated::{SimConfig, SimulatedCloud};
use anyhow::{Context, Result, bail};
use clap::Parser;
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::Store;
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio_util::sync::CancellationToken;
use workflows::{
    Domain, Environment, Event, EventId, GitSha, Push, RepoKind, State, StepKind, Tenant, TenantId,
    WorkflowKey,
};

#[derive(Debug, Parser)]
#[command(about = "Time from push to live for a first deployment and an app-only push")]
struct Args {
    /// Divide the simulated cloud's AWS-like latencies by this.
    #[arg(long, default_value_t = 600.0)]
    time_scale: f64,
    /// Tenants deploying at the same time (one workflow each).
    #[arg(long, default_value_t = 10)]
    tenants: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn push(id: String, repo: RepoKind, n: u32, clock: &SharedClock) -> Result<Event> {
    Ok(Event::Push(Push {
        event_id: EventId::new(id)?,
        repo,
        sha: GitSha::new(format!("{n:040x}"))?,
        before: None,
        git_ref: "refs/heads/dev".into(),
        author: "deploy-time".into(),
        message: "measure".into(),
        received_at: clock.now(),
    }))
}

/// Seconds, for printing.
fn s(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Enqueues `event` for every key and returns how long each took to be live at `app`.
async fn measure(
    backend: &SqliteBackend,
    clock: &SharedClock,
    keys: &[WorkflowKey],
    repo: RepoKind,
    n: u32,
    app: Option<u32>,
) -> Result<Vec<Duration>> {
    let started = Instant::now();
    for key in keys {
        let event = push(format!("{key}-{repo}-{n}"), repo, n, clock)?;
        enqueue(backend, key, event, clock.now()).await?;
    }
    let want_app = app.map(|a| GitSha::new(format!("{a:040x}"))).transpose()?;
    let mut done: Vec<Option<Duration>> = vec![None; keys.len()];
    while done.iter().any(Option::is_none) {
        for (i, key) in keys.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let Some(r) = backend.workflow(key).await? else {
                continue;
            };
            if r.state() == State::Failed {
                bail!("{key} failed: {:?}", r.workflow().run);
            }
            let live = r.state() == State::Live
                && r.workflow()
                    .deployed
                    .as_ref()
                    .is_some_and(|d| d.release.app == want_app);
            if live {
                done[i] = Some(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("not live within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut times: Vec<Duration> = done.into_iter().flatten().collect();
    times.sort();
    Ok(times)
}

async fn run(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("deploy-time.sqlite");
    let clock: SharedClock = Arc::new(SystemClock);
    let backend = Arc::new(SqliteBackend::open(SqliteConfig::new(&path))?);
    let sim = SimConfig {
        time_scale: args.time_scale,
        ..SimConfig::default()
    };
    let cloud = SimulatedCloud::open(&path, sim.clone()).context("opening the simulated cloud")?;
    let engine = Arc::new(Engine::new(
        backend.clone(),
        backend.clone(),
        backend.clone(),
        Arc::new(cloud),
        clock.clone(),
        EngineConfig {
            wait: Duration::from_millis(50),
            ..EngineConfig::default()
        },
    ));
    let mut keys = Vec::new();
    for i in 0..args.tenants {
        let id = TenantId::new(format!("tenant{i}"))?;
        let tenant = Tenant::new(
            id.clone(),
            Domain::new(format!("tenant{i}.example"))?,
            2 * i as u64 + 1,
            2 * i as u64 + 2,
            "00".repeat(32),
            clock.now(),
        );
        backend.put_tenant(&tenant, true).await?;
        keys.push(WorkflowKey::new(id, Environment::Dev));
    }
    let stop = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(stop.clone()));

    let first = measure(&backend, &clock, &keys, RepoKind::Infra, 1, None).await?;
    let app = measure(&backend, &clock, &keys, RepoKind::App, 2, Some(2)).await?;
    stop.cancel();
    running.await?;

    let lat = |k: StepKind| sim.scaled(sim.latency(k));
    let bound = lat(StepKind::Image).max(lat(StepKind::Database)) + lat(StepKind::Rollout);
    let sum = [
        StepKind::Network,
        StepKind::SourceInfra,
        StepKind::Image,
        StepKind::Database,
        StepKind::Routing,
        StepKind::Rollout,
    ]
    .into_iter()
    .map(lat)
    .sum::<Duration>();
    let median = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    println!(
        "simulated latencies at time scale {}: network {}, source {}, image {}, database {}, routing {}, rollout {}",
        args.time_scale,
        s(lat(StepKind::Network)),
        s(lat(StepKind::SourceInfra)),
        s(lat(StepKind::Image)),
        s(lat(StepKind::Database)),
        s(lat(StepKind::Routing)),
        s(lat(StepKind::Rollout)),
    );
    println!(
        "first deployment ({} tenants): median {}, max {}; bound max(image, database) + rollout = {}; sequential sum = {}",
        args.tenants,
        s(median(&first)),
        s(max(&first)),
        s(bound),
        s(sum)
    );
    println!(
        "app-only push: median {}, max {}; rollout alone = {}",
        s(median(&app)),
        s(max(&app)),
        s(lat(StepKind::Rollout))
    );
    println!(
        "ratios: first deployment max / bound = {:.3}, max / sequential sum = {:.3}",
        max(&first).as_secs_f64() / bound.as_secs_f64(),
        max(&first).as_secs_f64() / sum.as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({
            "time_scale": args.time_scale,
            "tenants": args.tenants,
            "first_deployment_median_s": median(&first).as_secs_f64(),
            "first_deployment_max_s": max(&first).as_secs_f64(),
            "bound_s": bound.as_secs_f64(),
            "sequential_sum_s": sum.as_secs_f64(),
            "app_push_median_s": median(&app).as_secs_f64(),
            "app_push_max_s": max(&app).as_secs_f64(),
        })
    );
    Ok(())
}
