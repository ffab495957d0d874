//! `orchestrator`: runs the workers, the sweeper, or everything at once on the embedded
//! default; injects events without GitLab.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::cloud::Cloud;
use orchestrator::config::{Backend, Config};
use orchestrator::dev;
use orchestrator::engine::{Engine, enqueue, run_sweeper};
use orchestrator::ports::{Journal, Queue, Store};
use orchestrator::requests::RequestCounter;
use orchestrator::sqlite::SqliteBackend;
use orchestrator::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing::info;
use workflows::{Environment, Event, EventId, GitSha, Push, RepoKind, TenantId, WorkflowKey};

const ABOUT: &str = "The tenant-host orchestrator: durable workflows that turn git pushes into \
running virtual hosts.";

const LONG_ABOUT: &str = "The tenant-host orchestrator: durable workflows that turn git pushes \
into running virtual hosts.

Configuration comes from a TOML file (--config or $ORCHESTRATOR_CONFIG), then environment \
variables ORCHESTRATOR__<SECTION>__<KEY> (for example ORCHESTRATOR__ENGINE__CONCURRENCY=16), then \
flags. Every setting has a default; see the README's configuration section.

Logs go to stderr; RUST_LOG filters them (default: info).";

#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    /// The embedded backend's SQLite file (overrides [embedded] path).
    #[arg(long, global = true)]
    db: Option<PathBuf>,
    /// Log lines on stderr: readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process on the embedded default (SQLite and the simulated cloud):
    /// the GitLab ingress, workers and the sweeper. Registers a demo tenant and pushes to it
    /// unless told not to.
    Dev(DevArgs),
    /// Run the GitLab webhook ingress only: POST /hooks/gitlab, until SIGTERM or SIGINT.
    Ingress(IngressArgs),
    /// Run workers only: receive, handle, commit, until SIGTERM or SIGINT.
    Worker(WorkerArgs),
    /// Run the sweeper only: re-arm workflows that have made no progress for too long.
    Sweeper,
    /// Put an event on the events queue, as the GitLab ingress or wfctl would.
    #[command(subcommand)]
    Inject(Inject),
    /// Create the backend's queues and tables (the embedded file, or on AWS the SQS queues and
    /// DynamoDB tables); with --sandbox also a sandbox of the shared AWS infrastructure.
    Init(InitArgs),
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Also create (or find) a sandbox of the infrastructure the AWS activities build on: a
    /// VPC with two subnets, a load balancer with a listener, an artifact bucket, an instance
    /// profile, a DB subnet group, and the newest Amazon Linux 2023 image as the base image.
    /// Its `[infrastructure]` settings are printed on stdout, to add to the configuration.
    #[arg(long)]
    sandbox: bool,
    /// The name of the sandbox (the prefix of its resources).
    #[arg(long, default_value = "orchestrator-sandbox", requires = "sandbox")]
    sandbox_name: String,
    /// Where the tenants' repositories are, with {tenant} and {repo}; printed as the
    /// sandbox's source_url.
    #[arg(
        long,
        default_value = "https://gitlab.example.com/{tenant}/{repo}.git",
        requires = "sandbox"
    )]
    source_url: String,
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Do not register the demo tenant or push to it.
    #[arg(long)]
    no_demo: bool,
    /// Divide the simulated cloud's AWS-like latencies by this (dev's default: 60, so a first
    /// deployment takes about 15 s instead of 15 min).
    #[arg(long)]
    time_scale: Option<f64>,
    /// Stop once every demo workflow is live (for scripts and tests).
    #[arg(long)]
    exit_when_live: bool,
    /// Where the ingress listens (overrides [ingress] listen).
    #[arg(long)]
    listen: Option<String>,
    /// Do not serve the GitLab ingress.
    #[arg(long)]
    no_ingress: bool,
}

#[derive(Debug, Args)]
struct IngressArgs {
    /// Where to listen (overrides [ingress] listen), for example 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Messages handled at once (overrides [engine] concurrency).
    #[arg(long)]
    concurrency: Option<usize>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Repo {
    Infra,
    App,
}

#[derive(Debug, Subcommand)]
enum Inject {
    /// A push to one of a tenant's repositories.
    Push {
        /// The tenant.
        #[arg(long)]
        tenant: TenantId,
        /// The environment the pushed branch maps to.
        #[arg(long)]
        env: Environment,
        /// Which repository.
        #[arg(long, value_enum)]
        repo: Repo,
        /// The pushed commit (40 or 64 hex digits).
        #[arg(long)]
        sha: GitSha,
        /// The pushed ref.
        #[arg(long, default_value = "refs/heads/main")]
        git_ref: String,
        /// Who pushed.
        #[arg(long, default_value = "local")]
        author: String,
        /// The head commit's title.
        #[arg(long, default_value = "pushed with orchestrator inject")]
        message: String,
        /// The event id (default: derived from tenant, env, repo and sha, so injecting the same
        /// push twice within the deduplication window queues it once).
        #[arg(long)]
        event_id: Option<EventId>,
    },
    /// Create an environment without waiting for a push.
    Provision {
        /// The tenant.
        #[arg(long)]
        tenant: TenantId,
        /// The environment.
        #[arg(long)]
        env: Environment,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `dev` prints a line per history entry of its demo workflows; the engine's and the
    // simulated cloud's own info logs would only repeat them.
    let default_filter = match cli.command {
        Command::Dev(_) => "info,orchestrator::engine=warn,activities=warn",
        _ => "info",
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The OTLP exporters need the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        match telemetry::init("orchestrator", cli.log_format, default_filter, ansi) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    let result = runtime.block_on(run(cli));
    {
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The ports of the configured backend, with the configuration and the clock.
struct Parts<S, Q, J> {
    config: Config,
    store: Arc<S>,
    queue: Arc<Q>,
    journal: Arc<J>,
    clock: SharedClock,
    /// Where the backend lives, for people.
    location: String,
    /// The adapters' request counts (empty for SQLite, which sends no requests).
    requests: RequestCounter,
}

fn load_config(cli: &Cli) -> Result<Config> {
    let mut config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    if let Some(db) = &cli.db {
        config.embedded.path = db.clone();
    }
    Ok(config)
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutting down: finishing in-flight work");
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> Result<()> {
    let config = load_config(&cli)?;
    let clock: SharedClock = Arc::new(SystemClock);
    match config.backend {
        Backend::Embedded => {
            let backend = Arc::new(
                SqliteBackend::open_with_clock(config.sqlite(), clock.clone())
                    .with_context(|| format!("opening {}", config.embedded.path.display()))?,
            );
            let location = backend.path().display().to_string();
            let parts = Parts {
                config,
                store: backend.clone(),
                queue: backend.clone(),
                journal: backend,
                clock,
                location,
                requests: RequestCounter::new(),
            };
            execute(&cli, parts).await
        }
        #[cfg(not(feature = "aws"))]
        Backend::Aws => bail!(
            "backend = \"aws\" needs a build with the `aws` feature (cargo build -p orchestrator --features aws)"
        ),
        #[cfg(feature = "aws")]
        Backend::Aws => {
            let sdk = orchestrator::aws::load_sdk_config().await;
            let names = orchestrator::aws::Names::new(&config.aws.prefix);
            if let Command::Init(args) = &cli.command {
                orchestrator::aws::init::create_all(&sdk, &names, config.aws.max_receives)
                    .await
                    .context("creating the queues and tables")?;
                eprintln!(
                    "queues and tables with prefix {} are ready",
                    config.aws.prefix
                );
                return sandbox(args).await;
            }
            let counter = RequestCounter::new();
            // Commits of concurrent handlers share their send and delete requests.
            let stack =
                orchestrator::aws::connect(&sdk, &names, &counter, config.engine.concurrency)
                    .await?;
            let parts = Parts {
                config,
                store: stack.store,
                queue: stack.queue,
                journal: stack.journal,
                clock,
                location: format!(
                    "AWS ({} queues and tables)",
                    names.events_queue.trim_end_matches("-events.fifo")
                ),
                requests: counter,
            };
            execute(&cli, parts).await
        }
    }
}

async fn execute<S: Store, Q: Queue, J: Journal>(
    cli: &Cli,
    mut parts: Parts<S, Q, J>,
) -> Result<()> {
    match &cli.command {
        Command::Init(args) => {
            eprintln!("{}", parts.location);
            sandbox(args).await
        }
        Command::Inject(inject) => inject_event(&parts, inject).await,
        Command::Sweeper => {
            let stop = shutdown_signal();
            run_sweeper(
                &*parts.store,
                &*parts.queue,
                parts.clock.clone(),
                parts.config.sweeper(),
                stop,
            )
            .await;
            Ok(())
        }
        Command::Worker(args) => {
            if let Some(c) = args.concurrency {
                parts.config.engine.concurrency = c;
            }
            let cloud = open_cloud(&parts, 1.0, None).await?;
            let stop = shutdown_signal();
            let engine = engine(&parts, cloud);
            info!(backend = %parts.location, "worker started");
            let reporter = tokio::spawn(report_stats(engine.clone(), STATS_EVERY));
            engine.clone().run(stop).await;
            reporter.abort();
            log_stats(&engine);
            info!("worker stopped");
            Ok(())
        }
        Command::Dev(args) => dev(&parts, args, cli.log_format).await,
        Command::Ingress(args) => {
            let stop = shutdown_signal();
            let listen = args
                .listen
                .clone()
                .unwrap_or_else(|| parts.config.ingress.listen.clone());
            let server = start_ingress(&parts, &listen, stop).await?;
            server.await.context("the ingress stopped")??;
            Ok(())
        }
    }
}

/// Binds `listen` and serves the ingress until `stop`; the task ends when the server does.
async fn start_ingress<S: Store, Q: Queue, J: Journal>(
    parts: &Parts<S, Q, J>,
    listen: &str,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let ingress = Arc::new(orchestrator::ingress::Ingress::new(
        parts.store.clone(),
        parts.queue.clone(),
        parts.clock.clone(),
        parts.config.ingress(),
    ));
    info!(%addr, "GitLab webhooks: POST http://{addr}/hooks/gitlab/<tenant> (or /hooks/gitlab)");
    Ok(tokio::spawn(ingress.serve(listener, stop)))
}

/// How often a worker logs what its engine did.
const STATS_EVERY: Duration = Duration::from_secs(60);

async fn report_stats<S: Store, Q: Queue, J: Journal, A: activities::Activities>(
    engine: Arc<Engine<S, Q, J, A>>,
    every: Duration,
) {
    // The gauges are sampled only when metrics are exported: counting workflows per state
    // lists them.
    let observe = telemetry::metrics_requested();
    loop {
        if observe {
            engine.observe(true).await;
        }
        tokio::time::sleep(every).await;
        log_stats(&engine);
    }
}

/// One line of counts since the worker started: transitions, and the requests the adapters
/// sent (per operation, and per transition).
fn log_stats<S: Store, Q: Queue, J: Journal, A: activities::Activities>(
    engine: &Engine<S, Q, J, A>,
) {
    let stats = engine.stats().snapshot();
    let requests = engine.requests();
    let total: u64 = requests.iter().map(|r| r.count).sum();
    let by_operation = requests
        .iter()
        .map(|r| format!("{}:{}={}", r.service, r.operation, r.count))
        .collect::<Vec<_>>()
        .join(" ");
    let per_transition = if stats.transitions == 0 {
        0.0
    } else {
        total as f64 / stats.transitions as f64
    };
    info!(
        transitions = stats.transitions,
        activities = stats.activities,
        duplicates = stats.duplicates,
        conflicts = stats.conflicts,
        errors = stats.errors,
        slot_waits = stats.slot_waits,
        requests = total,
        requests_per_transition = format!("{per_transition:.2}"),
        by_operation,
        "engine stats"
    );
}

/// With `--sandbox`, creates (or finds) the sandbox and prints its `[infrastructure]`.
#[cfg(not(feature = "aws"))]
async fn sandbox(args: &InitArgs) -> Result<()> {
    if args.sandbox {
        bail!(
            "--sandbox needs a build with the `aws` feature (cargo build -p orchestrator --features aws)"
        );
    }
    Ok(())
}

/// With `--sandbox`, creates (or finds) the sandbox and prints its `[infrastructure]`.
#[cfg(feature = "aws")]
async fn sandbox(args: &InitArgs) -> Result<()> {
    if !args.sandbox {
        return Ok(());
    }
    let sdk = orchestrator::aws::load_sdk_config().await;
    let infra = activities::aws::sandbox::create(&sdk, &args.sandbox_name, &args.source_url)
        .await
        .context("creating the sandbox")?;
    let mut doc = toml::Table::new();
    doc.insert(
        "infrastructure".into(),
        toml::Value::try_from(&infra).context("writing the settings")?,
    );
    println!("activities = \"aws\"\n\n{}", toml::to_string(&doc)?);
    eprintln!(
        "sandbox {} is ready; add the settings above to the configuration",
        args.sandbox_name
    );
    Ok(())
}

/// The configured activities (see [`Cloud::open`]).
async fn open_cloud<S: Store, Q: Queue, J: Journal>(
    parts: &Parts<S, Q, J>,
    default_scale: f64,
    time_scale: Option<f64>,
) -> Result<Cloud> {
    Ok(Cloud::open(
        &parts.config,
        parts.store.clone(),
        parts.clock.clone(),
        default_scale,
        time_scale,
    )
    .await?)
}

fn engine<S: Store, Q: Queue, J: Journal>(
    parts: &Parts<S, Q, J>,
    cloud: Cloud,
) -> Arc<Engine<S, Q, J, Cloud>> {
    Arc::new(
        Engine::new(
            parts.store.clone(),
            parts.queue.clone(),
            parts.journal.clone(),
            Arc::new(cloud),
            parts.clock.clone(),
            parts.config.engine(),
        )
        .with_requests(parts.requests.clone()),
    )
}

async fn inject_event<S: Store, Q: Queue, J: Journal>(
    parts: &Parts<S, Q, J>,
    inject: &Inject,
) -> Result<()> {
    let now = parts.clock.now();
    let (key, event) = match inject {
        Inject::Push {
            tenant,
            env,
            repo,
            sha,
            git_ref,
            author,
            message,
            event_id,
        } => {
            let repo = match repo {
                Repo::Infra => RepoKind::Infra,
                Repo::App => RepoKind::App,
            };
            let key = WorkflowKey::new(tenant.clone(), *env);
            let event_id = match event_id {
                Some(id) => id.clone(),
                None => EventId::new(format!("inject:{key}:{repo}:{sha}"))?,
            };
            let event = Event::Push(Push {
                event_id,
                repo,
                sha: sha.clone(),
                // Taken as sent: an operator's push is not screened against the branch's
                // lineage.
                before: None,
                git_ref: git_ref.clone(),
                author: author.clone(),
                message: message.clone(),
                received_at: now,
            });
            (key, event)
        }
        Inject::Provision { tenant, env } => {
            let key = WorkflowKey::new(tenant.clone(), *env);
            let event_id = EventId::new(format!("provision:{key}:{}", now.as_unix_millis()))?;
            (
                key,
                Event::Provision {
                    event_id,
                    from_snapshot: false,
                },
            )
        }
    };
    if parts.store.tenant(&key.tenant).await?.is_none() {
        let known: Vec<String> = parts
            .store
            .tenants()
            .await?
            .into_iter()
            .map(|t| t.id.to_string())
            .collect();
        bail!(
            "no tenant {:?}; tenants: {}",
            key.tenant.as_str(),
            if known.is_empty() {
                "none (add one with wfctl tenant add)".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    let id = event.id();
    enqueue(&*parts.queue, &key, event, now).await?;
    println!("{id}");
    eprintln!("queued {id} for {key}");
    Ok(())
}

async fn dev<S: Store, Q: Queue, J: Journal>(
    parts: &Parts<S, Q, J>,
    args: &DevArgs,
    log_format: LogFormat,
) -> Result<()> {
    let cloud = open_cloud(parts, 60.0, args.time_scale).await?;
    let stop = shutdown_signal();
    let time_scale = cloud.time_scale();
    let engine = engine(parts, cloud);
    info!(backend = %parts.location, time_scale, "dev: ingress, workers and sweeper in one process");
    let ingress = if args.no_ingress {
        None
    } else {
        let listen = args
            .listen
            .clone()
            .unwrap_or_else(|| parts.config.ingress.listen.clone());
        Some(start_ingress(parts, &listen, stop.clone()).await?)
    };
    let mut demo_keys = Vec::new();
    let mut watchers = Vec::new();
    if !args.no_demo {
        demo_keys = dev::start_demo(&*parts.store, &*parts.queue, parts.clock.now()).await?;
        for key in &demo_keys {
            watchers.push(tokio::spawn(dev::watch(
                parts.store.clone(),
                key.clone(),
                stop.clone(),
                log_format == LogFormat::Json,
            )));
        }
    }
    let sweeper = {
        let (store, queue) = (parts.store.clone(), parts.queue.clone());
        let clock = parts.clock.clone();
        let config = parts.config.sweeper();
        let stop = stop.clone();
        tokio::spawn(async move { run_sweeper(&*store, &*queue, clock, config, stop).await })
    };
    if args.exit_when_live {
        tokio::spawn(dev::stop_when_live(
            parts.store.clone(),
            demo_keys,
            stop.clone(),
        ));
    }
    engine.run(stop).await;
    let _ = sweeper.await;
    for w in watchers {
        let _ = w.await;
    }
    if let Some(ingress) = ingress {
        ingress.await.context("the ingress stopped")??;
    }
    Ok(())
}
