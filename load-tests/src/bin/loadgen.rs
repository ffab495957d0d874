//! `loadgen`: drives the orchestrator with a scenario, checks the invariants on what the store
//! recorded, and writes the figures as JSON and as a self-contained HTML report.
//!
//! - `steady`: `--tenants` tenants (one workflow each per environment pushed to) receive pushes
//!   at `--rate` per second for `--seconds`.
//! - `storm`: every tenant is brought live, then all of them push an infrastructure commit at
//!   once (a base image update: every tenant rebuilds its image), under the `--cap` limits.
//! - `chaos`: steady load with the simulated cloud injecting throttling, server errors, lost
//!   responses and terminal errors, while worker processes are killed (`SIGKILL`) and
//!   started again at random.
//!
//! Workers are `orchestrator worker` processes (`--workers`) on a fresh embedded file (or on
//! SQS and DynamoDB with `--backend aws`, for example against moto); pushes go straight to the
//! events queue or, with `--via ingress`, through an `orchestrator ingress` process over HTTP.
//! A failed invariant exits with status 1.
//!
//! ```sh
//! cargo build --release -p orchestrator -p load-tests
//! target/release/loadgen steady --tenants 200 --rate 100 --seconds 20 --html steady.html
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use activities::simulated::{ResourceKind, SimConfig, SimulatedCloud};
use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use load_tests::analysis::{self, Push};
use load_tests::report::{Fairness, Latency, Report, histogram};
use load_tests::setup::{
    infra_project, orchestrator_binary, push_template, register_tenants, wait_for_health,
};
use orchestrator::clock::{Clock, SystemClock};
use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, QueueKind, Store, WorkflowFilter};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use tokio::sync::Mutex;
use workflows::{
    Environment, Event, EventId, GitSha, RepoKind, Signal, State, StepKind, TenantId, WorkflowKey,
    WorkflowRecord,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N tenants pushing at rate R for T seconds.
    Steady,
    /// Every tenant live, then all push an infrastructure commit at once.
    Storm,
    /// Steady load with cloud faults and worker processes killed at random.
    Chaos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// The embedded SQLite file.
    Embedded,
    /// SQS and DynamoDB, found the standard AWS way (`AWS_ENDPOINT_URL` for a moto_server).
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    /// Straight to the events queue, as the ingress would put them.
    Queue,
    /// GitLab push webhooks over HTTP to an `orchestrator ingress` process.
    Ingress,
}

#[derive(Debug, Parser)]
#[command(about = "Load scenarios with invariant checks and a report")]
struct Args {
    /// The scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Tenants (default: 200 steady, 10000 storm, 100 chaos).
    #[arg(long)]
    tenants: Option<usize>,
    /// Pushes per second (steady, chaos).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long pushes are sent (steady, chaos).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Messages each worker handles at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The simulated cloud runs this many times faster than AWS (default: 600 steady and
    /// chaos, 20000 storm: an 8-minute image build takes 24 ms).
    #[arg(long)]
    time_scale: Option<f64>,
    /// Account-wide caps on concurrent activities, `KIND=N` (repeatable).
    #[arg(long = "cap", value_parser = parse_cap, default_value = "image=20")]
    caps: Vec<(StepKind, u32)>,
    /// Chaos: probability of each injected fault per invocation (throttling, server error,
    /// lost response; terminal errors at a tenth of it).
    #[arg(long, default_value_t = 0.05)]
    faults: f64,
    /// Chaos: a worker is killed about this often (seconds), and started again.
    #[arg(long, default_value_t = 4.0)]
    kill_every: f64,
    /// Seed of the generator's choices and of the cloud's faults.
    #[arg(long)]
    seed: Option<u64>,
    /// What the workers run on. With `aws`, loadgen creates queues and tables named
    /// `<prefix>-…` and leaves them; the simulated cloud stays in the run's directory.
    #[arg(long, value_enum, default_value_t = BackendKind::Embedded)]
    backend: BackendKind,
    /// The AWS backend's name prefix (default: `loadgen-` and 8 random hex digits).
    #[arg(long)]
    prefix: Option<String>,
    /// Where pushes go.
    #[arg(long, value_enum, default_value_t = Via::Queue)]
    via: Via,
    /// Give up waiting for every workflow to be live after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The HTML report.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Keep the database, configuration and worker logs here instead of a temporary
    /// directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The orchestrator binary (default: the one next to this binary).
    #[arg(long)]
    orchestrator: Option<PathBuf>,
}

fn parse_cap(s: &str) -> Result<(StepKind, u32), String> {
    let (kind, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=N, for example image=20"))?;
    let kind: StepKind = serde_json::from_value(serde_json::Value::String(kind.to_owned()))
        .map_err(|_| format!("{kind:?} is not a step kind"))?;
    let n: u32 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{n:?}: a cap is a number of at least 1"))?;
    Ok((kind, n))
}

const TOKEN: &str = "loadgen-token";

fn tenant_id(i: usize) -> TenantId {
    TenantId::new(format!("t{i:05}")).unwrap_or_else(|_| unreachable!("t + digits is valid"))
}

fn branch(env: Environment) -> &'static str {
    match env {
        Environment::Dev => "dev",
        Environment::Staging => "staging",
        Environment::Production => "main",
    }
}

/// The worker (and ingress) processes.
struct Processes {
    exe: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    workers: Vec<tokio::process::Child>,
    started: usize,
    peak_rss_kib: u64,
}

impl Processes {
    fn spawn(&mut self, what: &[&str]) -> Result<tokio::process::Child> {
        self.started += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("{}-{}.log", what[0], self.started)))?;
        tokio::process::Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(what)
            // Warnings, and the engine's counts when a worker stops.
            .env(
                "RUST_LOG",
                "warn,orchestrator=info,orchestrator::engine=warn,orchestrator::ingress=warn",
            )
            // The load is the point: no per-tenant push limit at the ingress.
            .env("ORCHESTRATOR__INGRESS__PUSHES_PER_SECOND", "1e9")
            .env("ORCHESTRATOR__INGRESS__PUSH_BURST", "1000000000")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it: cargo build --release -p orchestrator)",
                    self.exe.display()
                )
            })
    }

    fn start_workers(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            let child = self.spawn(&["worker"])?;
            self.workers.push(child);
        }
        Ok(())
    }

    /// Fails if a worker exited on its own (a bad configuration, a crash): its log says why.
    fn check_alive(&mut self) -> Result<()> {
        for w in &mut self.workers {
            if let Some(status) = w.try_wait()? {
                bail!(
                    "a worker exited ({status}); see its log in {}",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Records each worker's peak resident set so far (`VmHWM`).
    fn sample_rss(&mut self) {
        for w in &self.workers {
            if let Some(pid) = w.id()
                && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kib) = status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            {
                self.peak_rss_kib = self.peak_rss_kib.max(kib);
            }
        }
    }

    /// Kills one worker at random (`SIGKILL`: no shutdown, leases and messages abandoned) and
    /// starts a new one.
    async fn kill_one(&mut self) -> Result<()> {
        if self.workers.is_empty() {
            return Ok(());
        }
        self.sample_rss();
        let i = fastrand::usize(..self.workers.len());
        let mut w = self.workers.swap_remove(i);
        w.start_kill()?;
        w.wait().await?;
        let child = self.spawn(&["worker"])?;
        self.workers.push(child);
        Ok(())
    }

    /// Stops every worker with `SIGTERM` and waits for it.
    async fn stop_workers(&mut self) -> Result<()> {
        self.sample_rss();
        for w in &self.workers {
            if let Some(pid) = w.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for mut w in self.workers.drain(..) {
            if tokio::time::timeout(Duration::from_secs(30), w.wait())
                .await
                .is_err()
            {
                w.start_kill()?;
            }
        }
        Ok(())
    }
}

/// How pushes are sent: straight to the queue or over HTTP to the ingress.
enum Sender<B> {
    Queue(Arc<B>),
    Ingress(Box<Http>),
}

/// The ingress's address and the push payload to vary.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    url: hyper::Uri,
    template: serde_json::Value,
}

impl<B: Queue> Sender<B> {
    async fn send(
        &self,
        tenant: usize,
        key: &WorkflowKey,
        repo: RepoKind,
        sha: &GitSha,
    ) -> Result<Push> {
        let sent_at = SystemClock.now();
        let event_id = match self {
            Sender::Queue(queue) => {
                let id = EventId::new(format!("load:{key}:{repo}:{}", sha.as_str()))?;
                let event = Event::Push(workflows::Push {
                    event_id: id.clone(),
                    repo,
                    sha: sha.clone(),
                    before: None,
                    git_ref: format!("refs/heads/{}", branch(key.env)),
                    author: "loadgen".into(),
                    message: format!("{repo} load push"),
                    received_at: sent_at,
                });
                enqueue(&**queue, key, event, sent_at).await?;
                id
            }
            Sender::Ingress(http) => {
                let Http {
                    client,
                    url,
                    template,
                } = &**http;
                let mut body = template.clone();
                let project = infra_project(tenant) + u64::from(repo == RepoKind::App);
                body["project_id"] = serde_json::json!(project);
                body["project"]["id"] = serde_json::json!(project);
                body["ref"] = serde_json::json!(format!("refs/heads/{}", branch(key.env)));
                body["after"] = serde_json::json!(sha.as_str());
                // Every push as if it created the branch: its commit is new to the workflow's
                // lineage, so none is taken for a late resend (the template's own `before`
                // would be, from the second push on).
                body["before"] = serde_json::json!("0".repeat(40));
                let request = hyper::Request::post(url.clone())
                    .header("content-type", "application/json")
                    .header("x-gitlab-event", "Push Hook")
                    .header("x-gitlab-token", TOKEN)
                    .header(
                        "idempotency-key",
                        format!("load-{key}-{repo}-{}", sha.as_str()),
                    )
                    .body(Full::new(Bytes::from(body.to_string())))?;
                let answer = client.request(request).await?;
                let status = answer.status();
                let bytes = answer.into_body().collect().await?.to_bytes();
                if status.as_u16() != 202 {
                    bail!(
                        "the ingress answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
                let json: serde_json::Value = serde_json::from_slice(&bytes)?;
                EventId::new(
                    json["event_id"]
                        .as_str()
                        .context("no event_id in the ingress's answer")?,
                )?
            }
        };
        Ok(Push {
            key: key.clone(),
            repo,
            sha: sha.clone(),
            event_id,
            sent_at,
        })
    }
}

/// Pushes of one run: sends them with one push at a time per workflow, so a workflow's pushes
/// arrive in the order they were made, and records what was accepted.
struct Pusher<B> {
    sender: Sender<B>,
    turns: std::sync::Mutex<HashMap<WorkflowKey, Arc<Mutex<u64>>>>,
    pushes: std::sync::Mutex<Vec<Push>>,
    errors: AtomicU64,
    salt: u64,
}

impl<B: Queue> Pusher<B> {
    async fn push(&self, tenant: usize, key: &WorkflowKey, repo: RepoKind) {
        let turn = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            turns.entry(key.clone()).or_default().clone()
        };
        let mut n = turn.lock().await;
        *n += 1;
        // Distinct per run, workflow and push, so no two pushes share a commit.
        let sha = GitSha::new(format!(
            "{:08x}{:016x}{:016x}",
            self.salt as u32,
            (tenant as u64) << 8 | key.env as u64,
            *n
        ))
        .unwrap_or_else(|_| unreachable!("40 hex digits"));
        match self.sender.send(tenant, key, repo, &sha).await {
            Ok(p) => self
                .pushes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("loadgen: a push to {key} was not accepted: {e:#}");
            }
        }
    }

    fn sent(&self) -> usize {
        self.pushes.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// The pushes accepted so far.
    fn accepted(&self) -> Vec<Push> {
        self.pushes.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// The keys and versions of the workflows in `state`.
async fn in_state<S: Store>(store: &S, state: State) -> Result<Vec<(WorkflowKey, u64)>> {
    let filter = WorkflowFilter {
        state: Some(state),
        ..WorkflowFilter::default()
    };
    Ok(store
        .workflows(&filter, None, usize::MAX)
        .await?
        .into_iter()
        .map(|s| (s.key, s.version))
        .collect())
}

/// A workflow pushed to that is not live at its newest pushes, if any, described.
async fn not_live_at_newest<S: Store>(store: &S, pushes: &[Push]) -> Result<Option<String>> {
    let mut newest: HashMap<&WorkflowKey, (Option<&GitSha>, Option<&GitSha>)> = HashMap::new();
    for p in pushes {
        let e = newest.entry(&p.key).or_default();
        match p.repo {
            RepoKind::Infra => e.0 = Some(&p.sha),
            RepoKind::App => e.1 = Some(&p.sha),
        }
    }
    for (key, (infra, app)) in newest {
        let Some(r) = store.workflow(key).await? else {
            return Ok(Some(format!("{key} has no record")));
        };
        let deployed = r.workflow().deployed.as_ref().map(|d| &d.release);
        let ok = r.state() == State::Live
            && infra.is_none_or(|s| deployed.and_then(|d| d.infra.as_ref()) == Some(s))
            && app.is_none_or(|s| deployed.and_then(|d| d.app.as_ref()) == Some(s));
        if !ok {
            return Ok(Some(format!(
                "{key} is {} with {:?}; newest pushes: infra {:?} app {:?}",
                r.state(),
                deployed,
                infra.map(GitSha::as_str),
                app.map(GitSha::as_str)
            )));
        }
    }
    Ok(None)
}

/// What a scenario's run needs.
struct Run<B> {
    args: Args,
    backend: Arc<B>,
    procs: Processes,
    pusher: Arc<Pusher<B>>,
    tenants: usize,
    db: PathBuf,
    started: Instant,
    operator_retries: u64,
    restarts: u64,
    pushes_series: Vec<u64>,
}

impl<B: Store + Queue> Run<B> {
    /// Waits (printing progress) until every workflow pushed to is live at its newest push,
    /// retrying failed ones as an operator would (workers are killed only while pushes are
    /// sent, in `steady`).
    async fn drain(&mut self, workflows: usize) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        let mut retried: HashMap<WorkflowKey, u64> = HashMap::new();
        loop {
            let live = in_state(&*self.backend, State::Live).await?.len();
            let failed = in_state(&*self.backend, State::Failed).await?;
            for (key, version) in failed {
                // Once per failure: a retry moves the record on.
                if retried.get(&key) != Some(&version) {
                    let now = SystemClock.now();
                    let event = Event::Signal {
                        event_id: EventId::new(format!("loadgen-retry:{key}:{version}"))?,
                        signal: Signal::Retry,
                        actor: "loadgen".into(),
                    };
                    enqueue(&*self.backend, &key, event, now).await?;
                    retried.insert(key, version);
                    self.operator_retries += 1;
                }
            }
            self.procs.check_alive()?;
            self.procs.sample_rss();
            let events = self.backend.stats(QueueKind::Events).await?;
            let steps = self.backend.stats(QueueKind::Steps).await?;
            eprintln!(
                "[{:>6.1}s] pushes {:>6} · live {:>6}/{} · events queue {} · steps queue {} (+{} delayed) · dead {} · workers {} (restarts {})",
                self.started.elapsed().as_secs_f64(),
                self.pusher.sent(),
                live,
                workflows,
                events.visible + events.in_flight,
                steps.visible + steps.in_flight,
                steps.delayed,
                events.dead + steps.dead,
                self.procs.workers.len(),
                self.restarts,
            );
            if live >= workflows {
                let pushes = self.pusher.accepted();
                match not_live_at_newest(&*self.backend, &pushes).await? {
                    None => return Ok(true),
                    Some(why) => eprintln!("loadgen: waiting: {why}"),
                }
            }
            if Instant::now() > deadline {
                eprintln!("loadgen: gave up waiting after {} s", self.args.timeout);
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn kill_interval(&self) -> Duration {
        Duration::from_secs_f64(self.args.kill_every * (0.5 + fastrand::f64()))
    }

    /// Sends pushes at `--rate` for `--seconds` to random workflows of the tenants (about a
    /// third infrastructure pushes), then returns; in chaos, kills workers meanwhile.
    async fn steady(&mut self, envs: &[Environment]) -> Result<()> {
        let total = (self.args.rate * self.args.seconds as f64).round() as u64;
        let every = Duration::from_secs_f64(1.0 / self.args.rate.max(0.001));
        let began = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut next_kill = Instant::now() + self.kill_interval();
        for n in 0..total {
            let due = began + every.mul_f64(n as f64);
            tokio::time::sleep_until(due.into()).await;
            let second = began.elapsed().as_secs() as usize;
            if self.pushes_series.len() <= second {
                self.pushes_series.resize(second + 1, 0);
            }
            self.pushes_series[second] += 1;
            let tenant = fastrand::usize(..self.tenants);
            let env = envs[fastrand::usize(..envs.len())];
            let key = WorkflowKey::new(tenant_id(tenant), env);
            let repo = if fastrand::u8(..3) == 0 {
                RepoKind::Infra
            } else {
                RepoKind::App
            };
            let pusher = self.pusher.clone();
            tasks.spawn(async move { pusher.push(tenant, &key, repo).await });
            if self.args.scenario == Scenario::Chaos && Instant::now() >= next_kill {
                self.procs.kill_one().await?;
                self.restarts += 1;
                next_kill = Instant::now() + self.kill_interval();
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

fn write_config(
    args: &Args,
    dir: &Path,
    db: &Path,
    time_scale: f64,
    faults: bool,
) -> Result<PathBuf> {
    let mut caps = toml::Table::new();
    for (kind, n) in &args.caps {
        caps.insert(
            kind.as_str().to_owned(),
            toml::Value::Integer(i64::from(*n)),
        );
    }
    let p = if faults { args.faults } else { 0.0 };
    // TOML integers are signed.
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..)) & (i64::MAX as u64);
    let visibility = if args.scenario == Scenario::Chaos {
        "5s"
    } else {
        "60s"
    };
    // Waiters are woken when a slot comes free; they ask again only to keep their place, so
    // a storm's thousands of waiters ask rarely. Elsewhere leases lapse sooner, so a lease a
    // killed worker left behind frees its slot within seconds.
    let (slot_ttl, slot_poll) = if args.scenario == Scenario::Storm {
        ("60s", "30s")
    } else {
        ("15s", "5s")
    };
    let (backend, aws) = match (args.backend, &args.prefix) {
        (BackendKind::Aws, Some(prefix)) => ("aws", format!("[aws]\nprefix = {prefix:?}\n\n")),
        _ => ("embedded", String::new()),
    };
    // The simulated cloud lives in the embedded file whatever the backend.
    let text = format!(
        r#"backend = "{backend}"
activities = "simulated"

{aws}[embedded]
path = {db:?}

[engine]
concurrency = {concurrency}
wait = "100ms"
visibility = "{visibility}"
slot_ttl = "{slot_ttl}"
slot_poll = "{slot_poll}"

[limits]
{caps}
[simulated]
time_scale = {time_scale:?}
throttle_probability = {p}
server_error_probability = {p}
lost_response_probability = {p}
terminal_probability = {terminal}
seed = {seed}
"#,
        db = db.display().to_string(),
        concurrency = args.concurrency,
        caps = caps,
        terminal = p / 10.0,
    );
    let path = dir.join("orchestrator.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    if let Some(seed) = args.seed {
        fastrand::seed(seed);
    }
    let temp = tempfile::tempdir()?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => temp.path().to_owned(),
    };
    let db = dir.join("loadgen.sqlite");
    if db.exists() {
        bail!("{} exists: give an empty --dir", db.display());
    }
    let tenants = args.tenants.unwrap_or(match args.scenario {
        Scenario::Steady => 200,
        Scenario::Storm => 10_000,
        Scenario::Chaos => 100,
    });
    let time_scale = args.time_scale.unwrap_or(match args.scenario {
        Scenario::Storm => 20_000.0,
        _ => 600.0,
    });
    let setup = Setup {
        dir,
        db,
        tenants,
        time_scale,
    };
    match args.backend {
        BackendKind::Embedded => {
            let backend = SqliteBackend::open(SqliteConfig::new(&setup.db))
                .context("opening the database")?;
            drive(args, Arc::new(backend), setup).await
        }
        BackendKind::Aws => {
            let mut args = args;
            let prefix = args
                .prefix
                .get_or_insert_with(|| format!("loadgen-{:08x}", fastrand::u32(..)))
                .clone();
            let sdk = orchestrator::aws::load_sdk_config().await;
            let names = orchestrator::aws::Names::new(&prefix);
            orchestrator::aws::init::create_all(&sdk, &names, 10)
                .await
                .context("creating the queues and tables (for moto, set AWS_ENDPOINT_URL)")?;
            eprintln!("loadgen: SQS queues and DynamoDB tables {prefix}-… (left in place)");
            let counter = orchestrator::aws::RequestCounter::new();
            let stack = orchestrator::aws::connect(&sdk, &names, &counter, 64).await?;
            drive(args, Arc::new(stack), setup).await
        }
    }
}

/// Where a run keeps its files, and what every scenario needs to know.
struct Setup {
    dir: PathBuf,
    db: PathBuf,
    tenants: usize,
    time_scale: f64,
}

/// Runs the scenario on `backend`, checks the invariants and writes the reports.
async fn drive<B: Store + Queue>(args: Args, backend: Arc<B>, setup: Setup) -> Result<bool> {
    let Setup {
        dir,
        db,
        tenants,
        time_scale,
    } = setup;
    register_tenants(&*backend, tenants, tenant_id, TOKEN).await?;
    let exe = orchestrator_binary(args.orchestrator.as_ref())?;
    // The storm's tenants are brought live with the cloud at zero latency first.
    let first_scale = if args.scenario == Scenario::Storm {
        0.0
    } else {
        time_scale
    };
    let config = write_config(
        &args,
        &dir,
        &db,
        first_scale,
        args.scenario == Scenario::Chaos,
    )?;
    let mut procs = Processes {
        exe,
        config: config.clone(),
        dir: dir.clone(),
        workers: Vec::new(),
        started: 0,
        peak_rss_kib: 0,
    };
    let mut ingress = None;
    let sender = match args.via {
        Via::Queue => Sender::Queue(backend.clone()),
        Via::Ingress => {
            let port = free_port()?;
            let listen = format!("127.0.0.1:{port}");
            ingress = Some(procs.spawn(&["ingress", "--listen", &listen])?);
            let client = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http();
            wait_for_health(&client, &listen)
                .await
                .with_context(|| format!("see {}", dir.join("ingress-1.log").display()))?;
            let template = push_template()?;
            Sender::Ingress(Box::new(Http {
                client,
                url: format!("http://{listen}/hooks/gitlab").parse()?,
                template,
            }))
        }
    };
    procs.start_workers(args.workers)?;
    let pusher = Arc::new(Pusher {
        sender,
        turns: std::sync::Mutex::default(),
        pushes: std::sync::Mutex::default(),
        errors: AtomicU64::new(0),
        salt: fastrand::u64(..),
    });
    let started_at = jiff::Timestamp::now().to_string();
    let mut run = Run {
        args,
        backend: backend.clone(),
        procs,
        pusher,
        tenants,
        db: db.clone(),
        started: Instant::now(),
        operator_retries: 0,
        restarts: 0,
        pushes_series: Vec::new(),
    };

    let mut fairness_from = None;
    let (load_began, load_s, drained) = match run.args.scenario {
        Scenario::Steady | Scenario::Chaos => {
            let envs = [
                Environment::Dev,
                Environment::Staging,
                Environment::Production,
            ];
            let began = Instant::now();
            let start_ts = SystemClock.now();
            run.steady(&envs).await?;
            let load_s = began.elapsed().as_secs_f64();
            let workflows = run
                .pusher
                .pushes
                .lock()
                .map(|p| {
                    p.iter()
                        .map(|p| &p.key)
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                })
                .unwrap_or(0);
            let drained = run.drain(workflows).await?;
            (start_ts, load_s, drained)
        }
        Scenario::Storm => {
            eprintln!("loadgen: bringing {tenants} tenants live (cloud at zero latency)");
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..tenants {
                let pusher = run.pusher.clone();
                tasks.spawn(async move {
                    let key = WorkflowKey::new(tenant_id(i), Environment::Dev);
                    pusher.push(i, &key, RepoKind::Infra).await;
                    pusher.push(i, &key, RepoKind::App).await;
                });
                if tasks.len() >= 64 {
                    tasks.join_next().await;
                }
            }
            while tasks.join_next().await.is_some() {}
            if !run.drain(tenants).await? {
                bail!("the tenants did not all go live before the storm");
            }
            // Workers start again on the scaled cloud; the storm is measured from here.
            run.procs.stop_workers().await?;
            write_config(&run.args, &dir, &db, time_scale, false)?;
            run.procs.start_workers(run.args.workers)?;
            let before = run.pusher.sent();
            eprintln!("loadgen: storm: {tenants} tenants push an infrastructure commit at once");
            let began = Instant::now();
            let start_ts = SystemClock.now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..tenants {
                let pusher = run.pusher.clone();
                tasks.spawn(async move {
                    let key = WorkflowKey::new(tenant_id(i), Environment::Dev);
                    pusher.push(i, &key, RepoKind::Infra).await;
                });
                if tasks.len() >= 256 {
                    tasks.join_next().await;
                }
            }
            while tasks.join_next().await.is_some() {}
            let load_s = began.elapsed().as_secs_f64();
            run.pushes_series = vec![(run.pusher.sent() - before) as u64];
            fairness_from = Some(before);
            let drained = run.drain(tenants).await?;
            (start_ts, load_s, drained)
        }
    };
    let total_s = SystemClock.now().since(load_began).as_secs_f64();
    run.procs.stop_workers().await?;
    if let Some(mut i) = ingress {
        i.start_kill()?;
        let _ = i.wait().await;
    }
    if !drained {
        eprintln!("loadgen: not every workflow went live; the invariants say which");
    }

    // What the store and the cloud recorded.
    let all_pushes = run.pusher.accepted();
    let measured: Vec<Push> = match fairness_from {
        Some(from) => all_pushes[from..].to_vec(),
        None => all_pushes.clone(),
    };
    let mut histories = BTreeMap::new();
    let mut records: BTreeMap<WorkflowKey, WorkflowRecord> = BTreeMap::new();
    let keys: std::collections::BTreeSet<&WorkflowKey> =
        all_pushes.iter().map(|p| &p.key).collect();
    for key in keys {
        histories.insert(key.clone(), backend.history(key, 0, usize::MAX).await?);
        if let Some(r) = backend.workflow(key).await? {
            records.insert(key.clone(), r);
        }
    }
    let cloud = SimulatedCloud::open(&run.db, SimConfig::instant())?;
    let created_twice = cloud
        .creations()?
        .into_iter()
        .filter(|c| c.duplicates() > 0)
        .map(|c| (format!("{} {}", c.kind, c.name), c.count - c.abandoned))
        .collect();
    // Builders are transient: with every workflow at rest, none should be left.
    let builders_left = cloud
        .resources()?
        .into_iter()
        .filter(|r| r.kind == ResourceKind::Builder)
        .map(|r| r.name)
        .collect();
    let peaks: HashMap<ResourceKind, u64> = cloud.peaks()?.into_iter().collect();
    let caps = run
        .args
        .caps
        .iter()
        .filter_map(|(kind, cap)| {
            // The cloud's own count of what ran at once: builders for image builds.
            let resource = match kind {
                StepKind::Image => ResourceKind::Builder,
                _ => return None,
            };
            Some((*kind, *cap, peaks.get(&resource).copied().unwrap_or(0)))
        })
        .collect();
    // A worker killed between committing a step's report and giving its slot back leaves
    // the lease behind; it must lapse on its own (slot_ttl) for the line to move.
    let abandoned = slots_left(&*backend, &run.args.caps).await?;
    if abandoned.0 > 0 {
        let wait = abandoned.1.since(SystemClock.now()) + Duration::from_secs(1);
        eprintln!(
            "loadgen: {} slot leases abandoned by killed workers; waiting {:.1} s for them to lapse",
            abandoned.0,
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
    let slots_left = slots_left(&*backend, &run.args.caps).await?.0;
    let dead =
        backend.stats(QueueKind::Events).await?.dead + backend.stats(QueueKind::Steps).await?.dead;
    let invariants = analysis::check(&analysis::Outcome {
        pushes: &all_pushes,
        histories: &histories,
        records: &records,
        created_twice,
        caps,
        dead_letters: dead,
        slots_left,
        builders_left,
    });

    let latencies = analysis::latencies(&measured, &histories);
    let mut live: Vec<Duration> = latencies.iter().flatten().copied().collect();
    live.sort();
    let missing = latencies.len() - live.len();
    let fairness = fairness_from.map(|_| {
        let waits = &live;
        let median = analysis::percentile(waits, 0.5).as_secs_f64();
        let longest = waits.last().copied().unwrap_or_default().as_secs_f64();
        Fairness {
            tenants: waits.len(),
            median_wait_s: median,
            longest_wait_s: longest,
            ratio: if median > 0.0 { longest / median } else { 0.0 },
        }
    });
    let measured_histories: BTreeMap<WorkflowKey, Vec<workflows::HistoryEntry>> = histories
        .iter()
        .map(|(k, h)| {
            (
                k.clone(),
                h.iter().filter(|e| e.at >= load_began).cloned().collect(),
            )
        })
        .collect();
    let transitions: u64 = measured_histories.values().map(|h| h.len() as u64).sum();
    let mut settings = BTreeMap::new();
    settings.insert("tenants".to_owned(), tenants.to_string());
    settings.insert("workers".to_owned(), run.args.workers.to_string());
    settings.insert(
        "concurrency per worker".to_owned(),
        run.args.concurrency.to_string(),
    );
    settings.insert("time scale".to_owned(), time_scale.to_string());
    settings.insert(
        "caps".to_owned(),
        run.args
            .caps
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if run.args.scenario != Scenario::Storm {
        settings.insert("rate (pushes/s)".to_owned(), run.args.rate.to_string());
        settings.insert("seconds".to_owned(), run.args.seconds.to_string());
    }
    if run.args.scenario == Scenario::Chaos {
        settings.insert("fault probability".to_owned(), run.args.faults.to_string());
        settings.insert("kill every (s)".to_owned(), run.args.kill_every.to_string());
    }
    settings.insert(
        "push errors".to_owned(),
        run.pusher.errors.load(Ordering::Relaxed).to_string(),
    );
    settings.insert(
        "slot leases that had to lapse".to_owned(),
        abandoned.0.to_string(),
    );
    // The workers count their own requests, and log the counts when they stop (and now and
    // then before: a killed worker's last count stands for it).
    let aws_requests_per_transition = match run.args.backend {
        BackendKind::Embedded => None,
        BackendKind::Aws => {
            let mut logs = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if name.starts_with("worker-") && name.ends_with(".log") {
                    logs.push(std::fs::read_to_string(&path)?);
                }
            }
            analysis::requests_per_transition(&logs)
        }
    };
    let report = Report {
        scenario: format!("{:?}", run.args.scenario).to_lowercase(),
        backend: format!("{:?}", run.args.backend).to_lowercase(),
        via: format!("{:?}", run.args.via).to_lowercase(),
        started_at,
        settings,
        pushes: measured.len() as u64,
        load_s,
        total_s,
        events_per_s: measured.len() as f64 / load_s.max(1e-3),
        transitions,
        transitions_per_s: transitions as f64 / total_s.max(1e-3),
        latency: Latency::of(&mut live, missing),
        aws_requests_per_transition,
        worker_peak_rss_mib: run.procs.peak_rss_kib as f64 / 1024.0,
        worker_restarts: run.restarts,
        operator_retries: run.operator_retries,
        fairness,
        invariants,
        transitions_series: analysis::per_second(&measured_histories, load_began),
        pushes_series: run.pushes_series.clone(),
        histogram: histogram(&live),
    };
    print!("{}", report.text());
    let name = report.scenario.clone();
    let out = run
        .args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("loadgen-{name}.json")));
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    let html = run
        .args
        .html
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("loadgen-{name}.html")));
    std::fs::write(&html, report.html())?;
    eprintln!("loadgen: wrote {} and {}", out.display(), html.display());
    Ok(report.ok() && run.pusher.errors.load(Ordering::Relaxed) == 0)
}

/// Leases and places in line of the capped kinds, and when the last of them lapses.
async fn slots_left<S: Store>(
    store: &S,
    caps: &[(StepKind, u32)],
) -> Result<(usize, workflows::Timestamp)> {
    let mut n = 0;
    let mut last = SystemClock.now();
    for (kind, _) in caps {
        let view = store.slots(kind.as_str()).await?;
        n += view.held.len() + view.waiting.len();
        for e in view.held.iter().chain(view.waiting.iter()) {
            last = last.max(e.expires_at);
        }
    }
    Ok((n, last))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
