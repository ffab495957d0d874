//! `wfctl approve|retry|cancel|redeploy|decommission` on the embedded backend, with a worker
//! process applying them: refused signals are not sent and exit with 1, `--wait` prints the
//! transition the worker made, and a signal no worker applies times out.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn db(&self) -> PathBuf {
        self.dir.path().join("o.sqlite")
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        let db = self.db();
        cmd.arg("--db").arg(db).args(args).stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("ORCHESTRATOR") {
                cmd.env_remove(&name);
            }
        }
        cmd.env("ORCHESTRATOR__SIMULATED__TIME_SCALE", "0");
        cmd
    }

    fn wfctl(&self, args: &[&str]) -> Output {
        self.command(env!("CARGO_BIN_EXE_wfctl"), args)
            .output()
            .expect("wfctl runs")
    }

    fn orchestrator(&self, args: &[&str]) -> Output {
        self.command(testkit::binaries::sibling("orchestrator"), args)
            .output()
            .expect("orchestrator runs")
    }

    fn worker(&self) -> Child {
        self.command(testkit::binaries::sibling("orchestrator"), &["worker"])
            .env("ORCHESTRATOR__ENGINE__WAIT", "50ms")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts")
    }

    fn state(&self, env: &str) -> Option<String> {
        let out = self.wfctl(&["show", "acme", "--env", env, "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v[0]["state"].as_str().map(str::to_owned)
    }

    async fn until_state(&self, env: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.state(env).as_deref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "acme#{env} never reached {want}: {:?}",
                self.state(env)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_checked_sent_applied_and_reported() {
    let e = Env {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let add = e.wfctl(&[
        "tenant",
        "add",
        "acme",
        "--domain",
        "acme.example",
        "--infra-project",
        "1",
        "--app-project",
        "2",
        "--production-approval",
    ]);
    assert!(add.status.success(), "{}", text(&add.stderr));
    // One push, so that one run awaits approval (a second push would queue a second run).
    let sha = "2".repeat(40);
    let out = e.orchestrator(&[
        "inject",
        "push",
        "--tenant",
        "acme",
        "--env",
        "production",
        "--repo",
        "app",
        "--sha",
        &sha,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let worker = Reaped(e.worker());
    e.until_state("production", "awaiting_approval").await;

    // A run waiting for approval is listed as stuck once it waited longer than asked.
    let stuck = e.wfctl(&["list", "--stuck", "0s", "-o", "json"]);
    assert!(stuck.status.success(), "{}", text(&stuck.stderr));
    let v: Value = serde_json::from_slice(&stuck.stdout).expect("json");
    assert_eq!(v[0]["key"], "acme#production", "{v}");
    let table = text(&e.wfctl(&["list", "--stuck", "0s"]).stdout);
    assert!(table.contains("waits for `wfctl approve`"), "{table}");
    let recent = e.wfctl(&["list", "--stuck", "1h", "-o", "json"]);
    assert_eq!(text(&recent.stdout).trim(), "[]");

    // Nothing failed: retry is refused, says why, and nothing is sent.
    let out = e.wfctl(&["retry", "acme", "--env", "production"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("retry refused for acme#production (awaiting_approval)")
            && err.contains("nothing was sent"),
        "{err}"
    );

    // Someone follows the history meanwhile (JSON Lines).
    let mut follower = e
        .command(
            env!("CARGO_BIN_EXE_wfctl"),
            &[
                "history",
                "acme",
                "--env",
                "production",
                "--follow",
                "-o",
                "json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)
        .expect("follower starts");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = follower.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Approve, waiting for the worker's verdict.
    let out = e.wfctl(&[
        "approve",
        "acme",
        "--env",
        "production",
        "--wait",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["from"], "awaiting_approval");
    assert_eq!(v["to"], "rolling_out");
    assert_eq!(v["workflow"], "acme#production");
    // --wait returned once the rollout the approval started was done, not at its first step.
    assert_eq!(v["settled"], "live", "{v}");
    let shown = e.wfctl(&["show", "acme", "--env", "production", "-o", "json"]);
    assert!(
        text(&shown.stdout).contains("\"live\""),
        "live when the command returned: {}",
        text(&shown.stdout)
    );

    // The follower printed what came before, then the approval and the rollout, one JSON
    // object per line, as they were written.
    let mut seen: Vec<Value> = Vec::new();
    while !seen.iter().any(|v| v["to"] == "live") {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the follower prints new entries");
        seen.push(serde_json::from_str(&line).expect("one JSON object per line"));
    }
    drop(follower);
    assert_eq!(seen[0]["version"], 1, "from the start");
    let versions: Vec<u64> = seen.iter().filter_map(|v| v["version"].as_u64()).collect();
    assert!(
        versions.windows(2).all(|w| w[1] == w[0] + 1),
        "{versions:?}"
    );
    assert!(
        seen.iter().any(|v| v.to_string().contains("approve")),
        "{seen:?}"
    );

    // Live is at rest: never stuck.
    let stuck = e.wfctl(&["list", "--stuck", "0s", "-o", "json"]);
    assert_eq!(text(&stuck.stdout).trim(), "[]");

    // Approving again: nothing awaits approval.
    let out = e.wfctl(&["approve", "acme", "--env", "production"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("approve refused"),
        "{}",
        text(&out.stderr)
    );

    // Redeploy, in table form: the transition is printed.
    let out = e.wfctl(&["redeploy", "acme", "--env", "production", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("redeploy: acme#production live -> "),
        "{}",
        text(&out.stdout)
    );
    // Only the rollout runs, and it waits for approval at once: at rest, so --wait is done.
    assert!(
        text(&out.stdout).contains("live -> awaiting_approval"),
        "{}",
        text(&out.stdout)
    );
    // Production asks for approval again; this time without waiting.
    e.until_state("production", "awaiting_approval").await;
    let out = e.wfctl(&["approve", "acme", "--env", "production", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["status"], "sent", "{v}");
    e.until_state("production", "live").await;

    // The history records who sent the signals.
    let out = e.wfctl(&["history", "acme", "--env", "production", "-o", "json"]);
    assert!(out.status.success());
    let history = text(&out.stdout);
    assert!(history.contains("\"approve\""), "{history}");
    assert!(
        history.contains("@wfctl") || history.contains("\"wfctl\""),
        "{history}"
    );

    // A workflow that does not exist names the ones that do.
    let out = e.wfctl(&["decommission", "acme", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("production"),
        "{}",
        text(&out.stderr)
    );

    // Without workers, --wait gives up after --timeout and says so.
    drop(worker);
    let out = e.wfctl(&[
        "redeploy",
        "acme",
        "--env",
        "production",
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no worker applied it within 1s"), "{err}");

    // A malformed duration is a usage error.
    let out = e.wfctl(&["cancel", "acme", "--env", "production", "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid duration"),
        "{}",
        text(&out.stderr)
    );
}

/// An environment's lifecycle with a worker: a tenant with a live environment cannot be
/// removed; decommissioned, the environment is marked so in the tenant (the ingress then
/// answers its pushes as ignored); provisioned again from its snapshot it goes live at the same
/// commits; a sizing change is checked and rolls out; `tenant remove --decommission`
/// decommissions it and removes the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_decommissioned_provisioned_again_and_tenants_removed() {
    let e = Env {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let add = e.wfctl(&[
        "tenant",
        "add",
        "acme",
        "--domain",
        "acme.example",
        "--infra-project",
        "1",
        "--app-project",
        "2",
    ]);
    assert!(add.status.success(), "{}", text(&add.stderr));
    let sha = "3".repeat(40);
    let out = e.orchestrator(&[
        "inject", "push", "--tenant", "acme", "--env", "dev", "--repo", "app", "--sha", &sha,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _worker = Reaped(e.worker());
    e.until_state("dev", "live").await;

    let refused = e.wfctl(&["tenant", "remove", "acme"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    assert!(
        text(&refused.stderr).contains("not decommissioned: dev (live)"),
        "{}",
        text(&refused.stderr)
    );

    let out = e.wfctl(&["decommission", "acme", "--env", "dev", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tenant = |e: &Env| -> Value {
        let out = e.wfctl(&["tenant", "show", "acme", "-o", "json"]);
        serde_json::from_slice(&out.stdout).expect("json")
    };
    assert_eq!(tenant(&e)["environments"]["dev"]["decommissioned"], true);
    // Decommissioned: pushes are ignored by the workflow too.
    let rollback = e.wfctl(&["rollback", "acme", "--env", "dev"]);
    assert_eq!(rollback.status.code(), Some(1));

    let out = e.wfctl(&[
        "provision",
        "acme",
        "--env",
        "dev",
        "--from-snapshot",
        "--wait",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["settled"], "live", "{v}");
    assert!(
        tenant(&e)["environments"]["dev"].is_null(),
        "the mark is cleared"
    );
    let shown = e.wfctl(&["show", "acme", "--env", "dev", "-o", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).expect("json");
    assert_eq!(shown[0]["deployed"]["release"]["app"], sha.as_str());
    // One release kept since: nothing earlier to roll back to.
    let rollback = e.wfctl(&["rollback", "acme", "--env", "dev"]);
    assert_eq!(rollback.status.code(), Some(1));
    assert!(
        text(&rollback.stderr).contains("no earlier release is kept"),
        "{}",
        text(&rollback.stderr)
    );

    // Sizing: checked as a whole, then rolled out.
    let bad = e.wfctl(&["tenant", "set", "acme", "--env", "dev", "--desired", "3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("desired_size 3 is not within min_size 1 and max_size 1"),
        "{}",
        text(&bad.stderr)
    );
    let before = shown[0]["deployed"]["run"].clone();
    let set = e.wfctl(&[
        "tenant",
        "set",
        "acme",
        "--env",
        "dev",
        "--max",
        "3",
        "--desired",
        "2",
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(text(&set.stderr).contains("acme#dev: rolling out with the new settings"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = e.wfctl(&["show", "acme", "--env", "dev", "-o", "json"]);
        let shown: Value = serde_json::from_slice(&shown.stdout).expect("json");
        if shown[0]["state"] == "live" && shown[0]["deployed"]["run"] != before {
            break;
        }
        assert!(Instant::now() < deadline, "no rollout of the new sizing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = e.wfctl(&[
        "tenant",
        "remove",
        "acme",
        "--decommission",
        "--timeout",
        "60s",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tenant acme removed"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(e.wfctl(&["tenant", "show", "acme"]).status.code(), Some(1));
    // Its domain and projects are free again.
    let again = e.wfctl(&[
        "tenant",
        "add",
        "globex",
        "--domain",
        "acme.example",
        "--infra-project",
        "1",
        "--app-project",
        "2",
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}
