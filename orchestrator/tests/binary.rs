//! The `orchestrator` binary as operators run it: `dev` takes a demo push to live, a push
//! injected with `inject` travels to live, and SIGTERM stops a worker cleanly.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

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
async fn dev_takes_the_demo_push_to_live_and_wfctl_shows_it() {
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
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_wfctl"))
        .arg("--db")
        .arg(&db)
        .args(["-o", "json", "show", "demo", "--env", "dev"])
        .output()
        .expect("wfctl runs");
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(json[0]["state"], "live");
    assert!(json[0]["resources"]["auto_scaling_group"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_push_travels_to_live_and_sigterm_stops_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("w.sqlite");
    let add = std::process::Command::new(env!("CARGO_BIN_EXE_wfctl"))
        .arg("--db")
        .arg(&db)
        .args([
            "tenant",
            "add",
            "acme",
            "--domain",
            "acme.example",
            "--infra-project",
            "7",
            "--app-project",
            "8",
        ])
        .output()
        .expect("wfctl runs");
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
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
        let show = std::process::Command::new(env!("CARGO_BIN_EXE_wfctl"))
            .arg("--db")
            .arg(&db)
            .args(["-o", "json", "show", "acme", "--env", "staging"])
            .output()
            .expect("wfctl runs");
        if show.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
            if json[0]["state"] == "live" {
                assert_eq!(json[0]["deployed"]["release"]["app"], sha);
                break;
            }
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
