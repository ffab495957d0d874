//! The binaries end to end on one `moto_server`: `orchestrator init --sandbox` creates the
//! queues, tables and shared infrastructure and prints its settings; a worker checks them at
//! start-up; then real GitLab push payloads (rewritten to a registered tenant's project ids and
//! to commits of local `file://` repositories) go over HTTP into `orchestrator ingress`, an
//! `orchestrator worker` with the AWS activities takes the workflow to live on SQS and
//! DynamoDB, and `wfctl show` names what was built.
//!
//! moto never runs user data, so the test stops builders as their scripts would.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::moto::Moto;

pub(crate) struct Env {
    pub(crate) moto: Moto,
    pub(crate) dir: tempfile::TempDir,
}

impl Env {
    pub(crate) async fn new() -> Self {
        Self {
            moto: Moto::start().await,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .current_dir(self.dir.path());
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("ORCHESTRATOR") || name.starts_with("AWS_") {
                cmd.env_remove(&name);
            }
        }
        cmd.env("ORCHESTRATOR__BACKEND", "aws")
            .env("ORCHESTRATOR__AWS__PREFIX", "e2e")
            .env("AWS_ENDPOINT_URL", &self.moto.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test");
        cmd
    }

    fn run(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Output {
        let mut cmd = self.command(program, args);
        cmd.envs(env.iter().copied());
        cmd.output().expect("runs")
    }

    pub(crate) fn orchestrator(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.run(testkit::binaries::sibling("orchestrator"), args, env)
    }

    pub(crate) fn wfctl(&self, args: &[&str]) -> Output {
        self.run(env!("CARGO_BIN_EXE_wfctl"), args, &[])
    }

    pub(crate) fn spawn(&self, args: &[&str], env: &[(&str, &str)], log: &str) -> Reaped {
        let mut cmd = self.command(testkit::binaries::sibling("orchestrator"), args);
        cmd.envs(env.iter().copied()).stdout(Stdio::null()).stderr(
            std::fs::File::create(self.dir.path().join(log))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        );
        Reaped(cmd.spawn().expect("starts"))
    }

    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// `orchestrator init --sandbox`, its settings written to `orchestrator.toml`.
    pub(crate) fn init(&self, source_url: &str) -> String {
        let out = self.orchestrator(
            &[
                "init",
                "--sandbox",
                "--sandbox-name",
                "e2e-sbx",
                "--source-url",
                source_url,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let settings = text(&out.stdout);
        std::fs::write(self.dir.path().join("orchestrator.toml"), &settings).expect("write");
        settings
    }
}

/// A child process killed when dropped.
pub(crate) struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// A bare repository `<name>.git` under `dir` with one commit of `files`; returns the commit.
pub(crate) fn repository(dir: &Path, name: &str, files: &[(&str, &str)]) -> String {
    let work = dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&work, &["init", "--quiet"]);
    for (path, content) in files {
        let p = work.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    let bare = dir.join(format!("{name}.git"));
    git(
        dir,
        &[
            "clone",
            "--quiet",
            "--bare",
            &work.to_string_lossy(),
            &bare.to_string_lossy(),
        ],
    );
    git(&work, &["rev-parse", "HEAD"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_checks_the_infrastructure_settings_at_start_up() {
    let env = Env::new().await;
    let init = env.orchestrator(&["init"], &[]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    // Without settings: each missing one is named.
    let out = env.orchestrator(&["worker"], &[("ORCHESTRATOR__ACTIVITIES", "aws")]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for setting in [
        "vpc_id",
        "subnet_ids",
        "listener_arn",
        "artifact_bucket",
        "base_image_id",
        "db_subnet_group",
        "source_url",
    ] {
        assert!(err.contains(setting), "{setting} not named: {err}");
    }

    // A sandbox's settings, printed once and found again on a second run.
    let settings = env.init("file:///nowhere/{tenant}-{repo}.git");
    assert_eq!(
        env.init("file:///nowhere/{tenant}-{repo}.git"),
        settings,
        "init --sandbox is idempotent"
    );
    let table: toml::Table = settings.parse().expect("TOML");
    assert_eq!(table["activities"].as_str(), Some("aws"));
    let infra = table["infrastructure"]
        .as_table()
        .expect("[infrastructure]");
    for key in [
        "vpc_id",
        "listener_arn",
        "alb_security_group_id",
        "artifact_bucket",
        "base_image_id",
        "db_subnet_group",
    ] {
        assert!(
            infra[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}: {settings}"
        );
    }

    // Settings that name what does not exist: the worker stops, naming each.
    let out = env.orchestrator(
        &["--config", "orchestrator.toml", "worker"],
        &[
            (
                "ORCHESTRATOR__INFRASTRUCTURE__SUBNET_IDS",
                r#"["subnet-0000nope"]"#,
            ),
            ("ORCHESTRATOR__INFRASTRUCTURE__DB_SUBNET_GROUP", "nope"),
            ("ORCHESTRATOR__INFRASTRUCTURE__HOSTED_ZONE_ID", "Z0000NOPE"),
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("subnet_ids") && err.contains("subnet-0000nope"),
        "{err}"
    );
    assert!(
        err.contains("db_subnet_group") && err.contains("nope"),
        "{err}"
    );
    assert!(
        err.contains("hosted_zone_id") && err.contains("Z0000NOPE"),
        "{err}"
    );
    assert!(!err.contains("vpc_id ="), "the VPC is fine: {err}");

    // The shared instance profile of older versions: refused, saying why.
    let out = env.orchestrator(
        &["--config", "orchestrator.toml", "worker"],
        &[("ORCHESTRATOR__INFRASTRUCTURE__INSTANCE_PROFILE", "shared")],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("instance_profile") && err.contains("no longer used"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_pushes_over_http_reach_live_on_aws() {
    let env = Env::new().await;
    let repos = env.dir.path().join("repos");
    std::fs::create_dir_all(&repos).expect("mkdir");
    let infra_sha = repository(
        &repos,
        "acme-infra",
        &[("provision/10-web.sh", "echo installing nginx\n")],
    );
    let app_sha = repository(&repos, "acme-app", &[("install.sh", "true\n")]);
    env.init(&format!(
        "file://{}/{{tenant}}-{{repo}}.git",
        repos.display()
    ));

    let add = env.wfctl(&[
        "--config",
        "orchestrator.toml",
        "tenant",
        "add",
        "acme",
        "--domain",
        "acme.example",
        "--infra-project",
        "101",
        "--app-project",
        "102",
    ]);
    assert!(add.status.success(), "{}", text(&add.stderr));
    let token = text(&add.stdout).trim().to_owned();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let _ingress = env.spawn(
        &[
            "--config",
            "orchestrator.toml",
            "ingress",
            "--listen",
            &listen,
        ],
        &[],
        "ingress.log",
    );
    let _worker = env.spawn(
        &["--config", "orchestrator.toml", "worker"],
        &[
            ("ORCHESTRATOR__INFRASTRUCTURE__RECHECK_SECS", "1"),
            ("ORCHESTRATOR__ENGINE__WAIT", "1s"),
            ("RUST_LOG", "debug"),
        ],
        "worker.log",
    );

    // The instances run their user data: builders report and power off, app instances report.
    let stopper = env.moto.run_user_data();

    // GitLab's documented push payload (ref master, so production), once per repository.
    let payload: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../orchestrator/tests/data/gitlab/gitlab-docs_push.json"
        ))
        .expect("payload"),
    )
    .expect("json");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (project, sha) in [(101, &infra_sha), (102, &app_sha)] {
        let mut body = payload.clone();
        body["project_id"] = json!(project);
        body["project"]["id"] = json!(project);
        body["after"] = json!(sha);
        body["checkout_sha"] = json!(sha);
        loop {
            let sent = client
                .post(format!("http://{listen}/hooks/gitlab"))
                .header("x-gitlab-event", "Push Hook")
                .header("x-gitlab-token", &token)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            match sent {
                Ok(r) => {
                    assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
                    break;
                }
                // The ingress may still be starting.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("ingress unreachable: {e}\n{}", env.log("ingress.log")),
            }
        }
    }

    let deadline = Instant::now() + Duration::from_secs(240);
    let shown = loop {
        let out = env.wfctl(&[
            "--config",
            "orchestrator.toml",
            "show",
            "acme",
            "--env",
            "production",
            "-o",
            "json",
        ]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            if v[0]["state"] == "live" && v[0]["deployed"]["release"]["app"] == app_sha.as_str() {
                break v[0].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not live in time: {}\nworker:\n{}",
            text(&out.stdout),
            env.log("worker.log")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stopper.abort();
    let r = &shown["resources"];
    assert!(
        r["image_id"]
            .as_str()
            .is_some_and(|v| v.starts_with("ami-")),
        "{r}"
    );
    assert_eq!(r["image_infra_sha"], infra_sha.as_str(), "{r}");
    assert!(
        r["auto_scaling_group"]
            .as_str()
            .is_some_and(|v| v.starts_with("acme-production-r")),
        "{r}"
    );
    assert!(
        r["target_group_arn"]
            .as_str()
            .is_some_and(|v| v.contains("targetgroup/acme-production")),
        "{r}"
    );
    assert!(
        r["rule_priority"]
            .as_u64()
            .is_some_and(|p| (1..=50_000).contains(&p)),
        "{r}"
    );
    assert!(
        r["database_endpoint"]
            .as_str()
            .is_some_and(|v| v.ends_with(":3306")),
        "{r}"
    );
    assert!(
        r["database_secret_arn"]
            .as_str()
            .is_some_and(|v| v.contains(":secret:")),
        "{r}"
    );
    assert_eq!(r["host"], "production.acme.example", "{r}");
    // The database password never reaches the logs.
    let worker = env.log("worker.log");
    assert!(
        !worker.contains("P@55w0rd"),
        "moto's managed password leaked"
    );
    assert!(!worker.contains(&token), "the webhook token leaked");
}
