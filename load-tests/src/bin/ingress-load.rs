//! `ingress-load`: saturates the GitLab ingress with push webhooks and prints accepted
//! pushes/s and latency percentiles, then checks that every `202` is durably on the queue.
//!
//! By default it prepares a fresh embedded database with `--tenants` tenants and starts
//! `orchestrator ingress` on it as a separate process (`--orchestrator PATH`, default: the
//! binary next to this one), so client and server are separate processes as in production.
//! The pushes are GitLab's documented push payload, one per request, each with its own
//! `Idempotency-Key` and commit, spread over the tenants.
//!
//! ```sh
//! cargo build --release -p orchestrator -p load-tests
//! target/release/ingress-load --seconds 10 --connections 64
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use load_tests::analysis;
use load_tests::setup::{orchestrator_binary, push_template, register_tenants, wait_for_health};
use orchestrator::ports::{Queue, QueueKind};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use workflows::TenantId;

#[derive(Debug, Parser)]
#[command(
    about = "Saturate the GitLab ingress with push webhooks and report throughput and latency"
)]
struct Args {
    /// How long to send.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections, each sending its next request when the last one is answered.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Tenants to spread the pushes over.
    #[arg(long, default_value_t = 50)]
    tenants: usize,
    /// The orchestrator binary to start.
    #[arg(long)]
    orchestrator: Option<PathBuf>,
    /// Keep the database here instead of a temporary directory.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Port for the ingress.
    #[arg(long, default_value_t = 18080)]
    port: u16,
}

const TOKEN: &str = "load-test-token";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| dir.path().join("ingress-load.sqlite"));
    let backend = SqliteBackend::open(SqliteConfig::new(&db)).context("opening the database")?;
    register_tenants(
        &backend,
        args.tenants,
        |i| TenantId::new(format!("load{i:04}")).unwrap_or_else(|_| unreachable!("load + digits")),
        TOKEN,
    )
    .await?;
    let exe = orchestrator_binary(args.orchestrator.as_ref())?;
    let listen = format!("127.0.0.1:{}", args.port);
    let mut server = tokio::process::Command::new(&exe)
        .arg("--db")
        .arg(&db)
        .args(["ingress", "--listen", &listen])
        .env("RUST_LOG", "warn")
        // The load is the point: no per-tenant push limit.
        .env("ORCHESTRATOR__INGRESS__PUSHES_PER_SECOND", "1e9")
        .env("ORCHESTRATOR__INGRESS__PUSH_BURST", "1000000000")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let url: hyper::Uri = format!("http://{listen}/hooks/gitlab").parse()?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections)
        .build_http();
    wait_for_health(&client, &listen).await?;

    let template = Arc::new(push_template()?);
    let accepted = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    let began = Instant::now();
    for _ in 0..args.connections {
        let client = client.clone();
        let url = url.clone();
        let template = template.clone();
        let (accepted, other, next) = (accepted.clone(), other.clone(), next.clone());
        let tenants = args.tenants as u64;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let mut body = (*template).clone();
                let project = 1_000_000 + 2 * (n % tenants);
                body["project_id"] = serde_json::json!(project);
                body["after"] = serde_json::json!(format!("{:040x}", n + 1));
                let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                let Ok(req) = hyper::Request::post(url.clone())
                    .header("content-type", "application/json")
                    .header("x-gitlab-event", "Push Hook")
                    .header("x-gitlab-token", TOKEN)
                    .header("idempotency-key", format!("load-{n}"))
                    .body(Full::new(bytes))
                else {
                    continue;
                };
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        latencies.push(t.elapsed());
                        if status == hyper::StatusCode::ACCEPTED {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        } else {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await?);
    }
    let elapsed = began.elapsed();
    latencies.sort();
    let accepted = accepted.load(Ordering::Relaxed);
    let other = other.load(Ordering::Relaxed);
    println!(
        "ingress load: {} connections, {} tenants, {:.1} s: {accepted} accepted (202), {other} other; {:.0} accepted pushes/s",
        args.connections,
        args.tenants,
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        analysis::percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        analysis::percentile(&latencies, 0.9).as_secs_f64() * 1e3,
        analysis::percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    server.start_kill()?;
    let _ = server.wait().await;
    // Every 202 must be on the queue, durably: count what the file holds after the server is
    // gone.
    let stats = backend.stats(QueueKind::Events).await?;
    let queued = stats.visible + stats.in_flight + stats.delayed;
    println!("durable: {queued} events on the queue for {accepted} accepted pushes");
    if queued != accepted {
        bail!("{accepted} pushes were accepted but {queued} are queued");
    }
    if other > 0 {
        bail!("{other} requests were not accepted");
    }
    Ok(())
}
