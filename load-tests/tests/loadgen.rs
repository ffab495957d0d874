//! `loadgen` end to end on debug builds: a small steady run keeps every invariant and writes
//! both reports; a run that cannot finish exits with status 1 and names the broken invariant.
//! The worker binary is `orchestrator` from the same target directory (`cargo test
//! --workspace` builds it).

use std::path::PathBuf;
use std::process::Command;

fn orchestrator() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    let path = exe.parent().expect("target dir").join("orchestrator");
    assert!(
        path.exists(),
        "{} is missing: build it (cargo build -p orchestrator) or run cargo test --workspace",
        path.display()
    );
    path
}

fn loadgen(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    loadgen_with(dir, args, &[])
}

fn loadgen_with(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .envs(env.iter().copied())
        .arg("--dir")
        .arg(dir.join("run"))
        .arg("--out")
        .arg(dir.join("report.json"))
        .arg("--html")
        .arg(dir.join("report.html"))
        .arg("--orchestrator")
        .arg(orchestrator())
        .output()
        .expect("loadgen runs")
}

/// The report of a run that succeeded with its six invariants held.
fn held(out: &std::process::Output, dir: &std::path::Path) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("json"))
            .expect("a JSON report");
    let invariants = report["invariants"].as_array().expect("invariants");
    assert_eq!(invariants.len(), 6);
    assert!(
        invariants.iter().all(|i| i["held"] == true),
        "{invariants:?}"
    );
    report
}

#[test]
fn a_steady_run_keeps_every_invariant_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = loadgen(
        dir.path(),
        &[
            "steady",
            "--tenants",
            "8",
            "--rate",
            "20",
            "--seconds",
            "3",
            "--seed",
            "3",
            "--cap",
            "image=2",
        ],
    );
    let report = held(&out, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(report["pushes"], 60);
    assert!(report["transitions"].as_u64().expect("transitions") > 60);
    assert!(report["latency"]["count"] == 60, "{}", report["latency"]);
    assert!(report["worker_peak_rss_mib"].as_f64().expect("rss") > 1.0);
    let html = std::fs::read_to_string(dir.path().join("report.html")).expect("html");
    assert!(html.contains("<svg") && html.contains("every invariant held"));
    assert!(stdout.contains("ok   caps never exceeded"), "{stdout}");
}

#[test]
fn a_run_that_cannot_finish_exits_with_status_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Real AWS pace: nothing can be live within the second allowed.
    let out = loadgen(
        dir.path(),
        &[
            "steady",
            "--tenants",
            "2",
            "--rate",
            "4",
            "--seconds",
            "1",
            "--time-scale",
            "1",
            "--timeout",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL every workflow live at its newest push"),
        "{stdout}"
    );
    assert!(stdout.contains("ok   no event lost"), "{stdout}");
}

#[test]
fn a_steady_run_on_sqs_and_dynamodb_counts_aws_requests_per_transition() {
    let moto = testkit::moto::Moto::start_blocking();
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = moto.endpoint.clone();
    let out = loadgen_with(
        dir.path(),
        &[
            "steady",
            "--backend",
            "aws",
            "--prefix",
            "lg",
            "--tenants",
            "3",
            "--rate",
            "3",
            "--seconds",
            "2",
            "--seed",
            "5",
            "--cap",
            "image=1",
            "--timeout",
            "180",
        ],
        &[
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    );
    let report = held(&out, dir.path());
    assert_eq!(report["backend"], "aws");
    assert_eq!(report["pushes"], 6);
    // Every transition takes at least a receive, a record write and a delete.
    let per = report["aws_requests_per_transition"]
        .as_f64()
        .expect("requests per transition on the AWS backend");
    assert!(per > 1.0, "{per}");
    // The workers ran on the queues and tables loadgen made, not on a file.
    let config = std::fs::read_to_string(dir.path().join("run/orchestrator.toml")).expect("config");
    assert!(config.contains("backend = \"aws\"") && config.contains("prefix = \"lg\""));
}
