//! The `orchestrator` binary as operators run it: `dev` takes a demo push to live, a push
//! injected with `inject` travels to live, SIGTERM stops a worker cleanly, and
//! `--log-format json` writes one JSON object per log line. (`wfctl` reading what `dev` did
//! is tested with `wfctl`.)

use std::process::Stdio;
use std::time::Duration;

use orchestrator::ports::Store;
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use testkit::fixtures::{key, tenant};
use tokio::process::Command;
use workflows::{Environment, State};

fn orchestrator(db: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    c.arg("--db")
        .arg(db)
        .env("RUST_LOG", "warn")
        .env("ORCHESTRATOR__ENGINE__WAIT", "50ms")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_takes_the_demo_push_to_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("dev.sqlite");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        orchestrator(&db)
            .args([
                "dev",
                "--exit-when-live",
                "--time-scale",
                "6000",
                "--listen",
                "127.0.0.1:0",
            ])
            .output(),
    )
    .await
    .expect("dev finishes")
    .expect("dev runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("demo#dev"),
        "per-step progress is shown: {stderr}"
    );
    assert!(stderr.contains("rollout done"), "{stderr}");
    let store = SqliteBackend::open(SqliteConfig::new(&db)).expect("open");
    let record = store
        .workflow(&key("demo", Environment::Dev))
        .await
        .expect("read")
        .expect("the demo workflow");
    assert_eq!(record.state(), State::Live);
    assert!(record.workflow().resources.deployment.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_push_travels_to_live_and_sigterm_stops_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("w.sqlite");
    let store = SqliteBackend::open(SqliteConfig::new(&db)).expect("open");
    store
        .put_tenant(&tenant("acme", 7, 8), true)
        .await
        .expect("registered");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let inject = orchestrator(&db)
        .args([
            "inject", "push", "--tenant", "acme", "--env", "staging", "--repo", "app", "--sha", sha,
        ])
        .output()
        .await
        .expect("inject runs");
    assert!(
        inject.status.success(),
        "{}",
        String::from_utf8_lossy(&inject.stderr)
    );
    let bad = orchestrator(&db)
        .args([
            "inject", "push", "--tenant", "nobody", "--env", "staging", "--repo", "app", "--sha",
            sha,
        ])
        .output()
        .await
        .expect("inject runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tenants: acme"));

    let mut worker = orchestrator(&db)
        .env("ORCHESTRATOR__SIMULATED__TIME_SCALE", "0")
        .arg("worker")
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let record = store
            .workflow(&key("acme", Environment::Staging))
            .await
            .expect("read");
        if let Some(r) = record.filter(|r| r.state() == State::Live) {
            let deployed = r.workflow().deployed.as_ref().expect("deployed");
            assert_eq!(deployed.release.app.as_ref().map(|s| s.as_str()), Some(sha));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not live in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = worker.id().expect("running");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("the worker stops within its grace period")
        .expect("reaped");
    assert!(status.success(), "a clean exit on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_are_json_with_log_format_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("json.sqlite");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        orchestrator(&db)
            .env("RUST_LOG", "info")
            .args([
                "--log-format",
                "json",
                "dev",
                "--exit-when-live",
                "--time-scale",
                "0",
                "--no-ingress",
            ])
            .output(),
    )
    .await
    .expect("dev finishes")
    .expect("dev runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{stderr}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l["fields"]["workflow"] == "demo#dev"
            || l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("demo#dev"))),
        "{stderr}"
    );
    let bad = orchestrator(&db)
        .args(["--log-format", "yaml", "worker"])
        .output()
        .await
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2), "a usage error");
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans go to that collector over OTLP/HTTP (here a
/// stand-in that records what it receives); without it nothing is sent (the other tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_when_asked() {
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(String, String, usize, bool)>>>;
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let record = record.clone();
            async move {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let names_service = body.windows(12).any(|w| w == b"orchestrator");
                if let Ok(mut s) = record.lock() {
                    s.push((
                        uri.path().to_owned(),
                        content_type,
                        body.len(),
                        names_service,
                    ));
                }
                axum::http::StatusCode::OK
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("otel.sqlite");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        orchestrator(&db)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))
            .args([
                "dev",
                "--exit-when-live",
                "--time-scale",
                "0",
                "--no-ingress",
            ])
            .output(),
    )
    .await
    .expect("dev finishes")
    .expect("dev runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = seen.lock().expect("lock").clone();
    let traces: Vec<_> = seen.iter().filter(|(p, ..)| p == "/v1/traces").collect();
    assert!(!traces.is_empty(), "no spans exported: {seen:?}");
    assert!(
        traces
            .iter()
            .all(|(_, ct, len, _)| ct == "application/x-protobuf" && *len > 0),
        "{seen:?}"
    );
    assert!(
        traces.iter().any(|t| t.3),
        "service.name orchestrator: {seen:?}"
    );
}
