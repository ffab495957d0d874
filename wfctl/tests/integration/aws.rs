//! `wfctl` on the AWS backend (moto): the same commands as on the embedded file, against
//! tables `orchestrator init` created and a worker process filled; and the one-line errors of
//! a backend whose tables are missing or cannot be reached.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::moto::Moto;

struct Aws {
    moto: Moto,
    dir: tempfile::TempDir,
}

impl Aws {
    fn env(&self, cmd: &mut Command, endpoint: &str) {
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("ORCHESTRATOR") || name.starts_with("AWS_") {
                cmd.env_remove(&name);
            }
        }
        cmd.current_dir(self.dir.path())
            .env("ORCHESTRATOR__BACKEND", "aws")
            .env("ORCHESTRATOR__AWS__PREFIX", "ops")
            // The simulated cloud's own file.
            .env(
                "ORCHESTRATOR__EMBEDDED__PATH",
                self.dir.path().join("cloud.sqlite"),
            )
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test");
    }

    fn run(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        self.env(&mut cmd, &self.moto.endpoint);
        cmd.output().expect("runs")
    }

    fn wfctl(&self, args: &[&str]) -> Output {
        self.run(env!("CARGO_BIN_EXE_wfctl"), args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.wfctl(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    }
}

/// Waits until `wfctl dlq list` shows `n` dead letters, and returns them.
async fn until_dead_letters(aws: &Aws, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = aws.json(&["dlq", "list"]);
        let rows = listed.as_array().cloned().unwrap_or_default();
        if rows.len() == n {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "{n} dead letters expected: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A child process that is killed when dropped, so a failing test leaves no worker behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wfctl_reads_and_registers_on_dynamodb() {
    let aws = Aws {
        moto: Moto::start().await,
        dir: tempfile::tempdir().expect("tempdir"),
    };

    // Before `orchestrator init`: one line naming the missing table and what to do.
    let out = aws.wfctl(&["list"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("ops-") && err.contains("orchestrator init"),
        "{err}"
    );

    let orchestrator = &testkit::binaries::sibling("orchestrator");
    let init = aws.run(orchestrator, &["init"]);
    assert!(init.status.success(), "{}", text(&init.stderr));

    let add = aws.wfctl(&[
        "tenant",
        "add",
        "acme",
        "--domain",
        "acme.example",
        "--infra-project",
        "11",
        "--app-project",
        "12",
    ]);
    assert!(add.status.success(), "{}", text(&add.stderr));
    assert!(!text(&add.stdout).trim().is_empty(), "the token is printed");
    let tenants = aws.json(&["tenant", "list"]);
    assert_eq!(tenants[0]["id"], "acme", "{tenants}");

    for (repo, sha) in [("infra", "1"), ("app", "2")] {
        let sha = sha.repeat(40);
        let inject = aws.run(
            orchestrator,
            &[
                "inject", "push", "--tenant", "acme", "--env", "dev", "--repo", repo, "--sha", &sha,
            ],
        );
        assert!(inject.status.success(), "{}", text(&inject.stderr));
    }
    let worker = {
        let mut cmd = Command::new(orchestrator);
        cmd.arg("worker")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(aws.dir.path().join("worker.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            );
        aws.env(&mut cmd, &aws.moto.endpoint);
        cmd.env("ORCHESTRATOR__SIMULATED__TIME_SCALE", "0")
            .env("ORCHESTRATOR__ENGINE__WAIT", "1s");
        Reaped(cmd.spawn().expect("worker starts"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let shown = loop {
        let out = aws.wfctl(&["show", "acme", "--env", "dev", "-o", "json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            // Live with both pushes: the infra push alone goes live first, then the app
            // push starts a run of its own.
            if v[0]["state"] == "live" && v[0]["deployed"]["release"]["app"] == "2".repeat(40) {
                break v[0].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not live in time: {}\nworker: {}",
            text(&out.stdout),
            std::fs::read_to_string(aws.dir.path().join("worker.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // `history --follow` streams what the worker writes from here on.
    let version = shown["version"].as_u64().expect("version").to_string();
    let follow = {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wfctl"));
        cmd.args([
            "history", "acme", "--env", "dev", "--follow", "--after", &version, "-o", "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        aws.env(&mut cmd, &aws.moto.endpoint);
        Reaped(cmd.spawn().expect("wfctl history --follow starts"))
    };
    // Signals travel through SQS: a redeploy, waited for; a refused retry is not sent.
    let redeploy = aws.json(&["redeploy", "acme", "--env", "dev", "--wait"]);
    assert_eq!(redeploy["status"], "accepted", "{redeploy}");
    assert_eq!(redeploy["from"], "live", "{redeploy}");
    let retry = aws.wfctl(&["retry", "acme", "--env", "dev"]);
    assert_eq!(retry.status.code(), Some(1));
    assert!(
        text(&retry.stderr).contains("retry refused"),
        "{}",
        text(&retry.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while aws.json(&["show", "acme", "--env", "dev"])[0]["state"] != "live" {
        assert!(Instant::now() < deadline, "not live again in time");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Dead letters on SQS: garbage the worker quarantines is listed, shown, redriven (and
    // quarantined again), then discarded.
    let queue = orchestrator::aws::sqs::SqsQueue::connect(
        &aws.moto.sdk_config(),
        &orchestrator::aws::Names::new("ops"),
        &orchestrator::aws::RequestCounter::new(),
    )
    .await
    .expect("queues");
    orchestrator::ports::Queue::send(
        &queue,
        vec![orchestrator::ports::Outgoing {
            queue: orchestrator::ports::QueueKind::Events,
            group: Some("acme#dev".into()),
            dedup_id: Some("garbage".into()),
            delay: Duration::ZERO,
            body: b"garbage".to_vec(),
            attributes: std::collections::BTreeMap::new(),
        }],
    )
    .await
    .expect("send");
    let dead = until_dead_letters(&aws, 1).await;
    assert_eq!(dead[0]["status"], "undecodable", "{dead:?}");
    assert_eq!(dead[0]["workflow"], "acme#dev", "{dead:?}");
    let id = dead[0]["id"].as_str().expect("id").to_owned();
    let letter = aws.json(&["dlq", "show", &id]);
    assert_eq!(letter["raw"], "garbage", "{letter}");
    let moved = aws.json(&["dlq", "redrive", &id]);
    assert_eq!(moved[0]["action"], "redriven", "{moved}");
    let dead = until_dead_letters(&aws, 1).await;
    assert_ne!(
        dead[0]["id"],
        id.as_str(),
        "quarantined again, under a new id"
    );
    let gone = aws.json(&["dlq", "discard", "--all"]);
    assert_eq!(gone[0]["action"], "discarded", "{gone}");
    assert_eq!(aws.json(&["dlq", "list"]), Value::Array(vec![]));
    drop(worker);
    let mut follow = follow;
    let _ = follow.0.kill();
    let mut streamed = String::new();
    if let Some(mut out) = follow.0.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut streamed).expect("read");
    }
    let entries: Vec<Value> = streamed
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(
        entries.iter().any(|e| e["event"] == "signal"
            && e["summary"]
                .as_str()
                .is_some_and(|s| s.starts_with("redeploy"))),
        "the redeploy was streamed: {streamed}"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["version"].as_u64() > shown["version"].as_u64())
    );
    assert_eq!(shown["key"], "acme#dev");
    assert_eq!(
        shown["deployed"]["release"]["app"],
        "2".repeat(40),
        "{shown}"
    );

    let listed = aws.json(&["list"]);
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "live");
    let live = aws.json(&["list", "--status", "live"]);
    assert_eq!(live.as_array().map(Vec::len), Some(1));
    // Live is at rest: never stuck.
    assert_eq!(aws.json(&["list", "--stuck", "0s"]), Value::Array(vec![]));

    let history = aws.json(&["history", "acme", "--env", "dev"]);
    let history = history.as_array().expect("array");
    assert!(history.len() >= 4, "pushes, steps, rollout: {history:?}");
    assert_eq!(history[0]["version"], 1);

    // A table for people, aligned, without colour on a pipe.
    let table = aws.wfctl(&["list"]);
    assert!(table.status.success());
    let table = text(&table.stdout);
    assert!(table.contains("acme") && table.contains("live"), "{table}");
    assert!(!table.contains('\u{1b}'), "{table}");

    // An unknown tenant names the ones that exist.
    let out = aws.wfctl(&["show", "ghost", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("acme"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_one_line_and_exit_code_3() {
    let aws = Aws {
        moto: Moto::start().await,
        dir: tempfile::tempdir().expect("tempdir"),
    };
    // Nothing listens on port 9 of localhost.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wfctl"));
    cmd.args(["tenant", "list"]).stdin(Stdio::null());
    aws.env(&mut cmd, "http://127.0.0.1:9");
    let out = cmd.output().expect("runs");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("AWS backend (prefix ops)"), "{err}");
}
