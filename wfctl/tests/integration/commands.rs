//! `wfctl` as operators run it: the real binary against a temporary SQLite file, with records
//! written through the store the way the engine writes them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use orchestrator::ports::{RecordWrite, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::tenants::{SIGNING_SECRET_PREFIX, TOKEN_PREFIX, token_sha256, verify_token};
use serde_json::Value;
use workflows::testing::{Driver, event_id};
use workflows::{
    Body, ConfigValue, Envelope, Environment, Event, GitSha, Input, Push, RepoKind, Settings,
    Signal, StepKind, StepOutcome, TenantId, Timestamp, WorkflowKey, WorkflowRecord,
};

const WFCTL: &str = env!("CARGO_BIN_EXE_wfctl");

/// A temporary database and a runtime to write into it.
struct Fixture {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    store: SqliteBackend,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let store =
            SqliteBackend::open(SqliteConfig::new(dir.path().join("o.sqlite"))).expect("open");
        Self { dir, rt, store }
    }

    /// The stored tenant `id`, read through the store.
    fn tenant(&self, id: &str) -> workflows::Tenant {
        let id = TenantId::new(id).expect("valid");
        self.rt
            .block_on(self.store.tenant(&id))
            .expect("read")
            .expect("registered")
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("o.sqlite")
    }

    /// Runs `wfctl --db <db> args...` with a clean environment (no configuration, no colour
    /// settings) and stdout and stderr piped.
    fn wfctl(&self, args: &[&str]) -> Run {
        let db = self.db();
        let mut all = vec!["--db", db.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        wfctl_in(self.dir.path(), &all)
    }

    fn add_tenant(&self, id: &str, infra: u64, app: u64) -> String {
        let run = self.wfctl(&[
            "tenant",
            "add",
            id,
            "--domain",
            &format!("{id}.example"),
            "--infra-project",
            &infra.to_string(),
            "--app-project",
            &app.to_string(),
        ]);
        run.ok();
        run.stdout.trim().to_owned()
    }

    /// Applies `event` to `record` and writes the record and its history entry, as the engine
    /// does.
    fn apply(&self, record: &mut WorkflowRecord, event: &Event, now: Timestamp) {
        let applied = record.apply(
            event,
            Input {
                now,
                settings: Settings::default(),
            },
        );
        if applied.verdict.changes_record() {
            let entry = record.history_entry(event, &applied);
            self.rt
                .block_on(self.store.write(RecordWrite::new(record, &entry)))
                .expect("write");
        }
    }

    /// Plays `event` through the driver and writes what it produced.
    fn drive(&self, d: &mut Driver, event: &Event) {
        let applied = d.apply(event);
        if applied.verdict.changes_record() {
            let entry = d.record.history_entry(event, &applied);
            self.rt
                .block_on(self.store.write(RecordWrite::new(&d.record, &entry)))
                .expect("write");
        }
    }

    /// Delivers the newest message about `step` with `outcome` and writes the result.
    fn deliver(&self, d: &mut Driver, step: StepKind, outcome: StepOutcome) {
        let message = d.take(step).unwrap_or_else(|| panic!("{step} in flight"));
        let event = Driver::delivery(&message, |_| outcome);
        self.drive(d, &event);
    }

    /// Pushes commit `n` (see [`commit`]) to `repo` through the driver.
    fn push(&self, d: &mut Driver, repo: RepoKind, n: u32) {
        let event = Event::Push(Push {
            event_id: d.fresh_id("push"),
            repo,
            sha: commit(n),
            before: None,
            git_ref: "refs/heads/main".into(),
            author: "jane".into(),
            message: format!("commit {n}"),
            received_at: d.record.updated_at,
        });
        self.drive(d, &event);
    }

    /// Completes every message in flight, writing each transition.
    fn complete_all(&self, d: &mut Driver) {
        while let Some(message) = d.in_flight.first().cloned() {
            d.in_flight.remove(0);
            let event = Driver::delivery(&message, |task| StepOutcome::Done {
                output: workflows::testing::output_for(task),
            });
            self.drive(d, &event);
        }
    }

    /// Completes every step in flight, and those they let start, except `step`.
    fn complete_all_but(&self, d: &mut Driver, step: StepKind) {
        while let Some(i) = d.in_flight.iter().position(|m| m.step() != step) {
            let message = d.in_flight.remove(i);
            let event = Driver::delivery(&message, |task| StepOutcome::Done {
                output: workflows::testing::output_for(task),
            });
            self.drive(d, &event);
        }
    }

    /// Workflows of acme (registered with the default branches) and a corrupt one of globex:
    /// - acme#production: deployed r1 (infra 1, app 2), then r2 for app 3 with `source_app`
    ///   waiting to retry, app 4 pending, and a refused `approve`;
    /// - acme#dev: failed on a terminal `network` error;
    /// - globex#dev: a record that no longer decodes, marked corrupt by the engine.
    fn populate(&self) {
        self.add_tenant("acme", 11, 12);
        self.add_tenant("globex", 21, 22);

        let mut prod = Driver::new(Environment::Production);
        self.push(&mut prod, RepoKind::Infra, 1);
        self.push(&mut prod, RepoKind::App, 2);
        self.complete_all(&mut prod);
        assert_eq!(prod.state(), workflows::State::Live);
        self.push(&mut prod, RepoKind::App, 3);
        self.deliver(
            &mut prod,
            StepKind::SourceApp,
            StepOutcome::Retryable {
                error: "gitlab answered 503".into(),
                retry_in: Some(Duration::from_secs(30)),
            },
        );
        self.push(&mut prod, RepoKind::App, 4);
        let e = prod.signal_event(Signal::Approve);
        self.drive(&mut prod, &e);

        let mut dev = Driver::new(Environment::Dev);
        self.push(&mut dev, RepoKind::App, 5);
        self.deliver(
            &mut dev,
            StepKind::Network,
            StepOutcome::Terminal {
                error: "VPC vpc-1 not found".into(),
            },
        );
        assert_eq!(dev.state(), workflows::State::Failed);

        let key = WorkflowKey::new(TenantId::new("globex").expect("valid"), Environment::Dev);
        let t0 = Timestamp::from_unix_millis(1_800_000_000_000);
        let mut record = WorkflowRecord::new(key.clone(), t0);
        let push = |n: u32, id: &str| {
            Event::Push(Push {
                event_id: event_id(id),
                repo: RepoKind::App,
                sha: commit(n),
                before: None,
                git_ref: "refs/heads/dev".into(),
                author: "bob".into(),
                message: format!("commit {n}"),
                received_at: t0,
            })
        };
        self.apply(&mut record, &push(7, "globex-1"), t0);
        // The next write stores a record that does not decode (as a newer or buggy writer
        // might), with a valid history entry.
        let event = push(8, "globex-2");
        let applied = record.apply(
            &event,
            Input {
                now: t0,
                settings: Settings::default(),
            },
        );
        let entry = record.history_entry(&event, &applied);
        let mut write = RecordWrite::new(&record, &entry);
        let mut json: Value = serde_json::from_slice(&write.record).expect("json");
        json["machine"]["state"] = Value::from("exploded");
        write.record = serde_json::to_vec(&json).expect("encode");
        self.rt.block_on(self.store.write(write)).expect("write");
        self.rt
            .block_on(
                self.store
                    .mark_corrupt(&key, "machine.state: unknown variant `exploded`"),
            )
            .expect("mark");
    }
}

/// Commit `n` (1 to 15): its digit forty times, so short shas tell commits apart.
fn commit(n: u32) -> GitSha {
    GitSha::new(format!("{n:x}").repeat(40)).expect("valid sha")
}

fn wfctl_in(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(WFCTL);
    cmd.args(args).current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("ORCHESTRATOR") || name == "NO_COLOR" {
            cmd.env_remove(&name);
        }
    }
    // A terminal type that would allow colour: only the pipe must keep escapes out.
    cmd.env("TERM", "xterm-256color");
    let output: Output = cmd.output().expect("run wfctl");
    Run {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// One finished run of wfctl.
#[derive(Debug)]
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        self.code(0)
    }

    fn code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "wfctl {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stdout.contains('\u{1b}') && !self.stderr.contains('\u{1b}'),
            "no escapes into a pipe: {self:?}"
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout of {:?} is not JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn sorted(mut k: Vec<&str>) -> Vec<&str> {
    k.sort_unstable();
    k
}

const TENANT_FIELDS: [&str; 11] = [
    "id",
    "domain",
    "infra_project",
    "app_project",
    "branches",
    "production_approval",
    "signing_secret_set",
    "previous_token_valid_until",
    "environments",
    "created_at",
    "updated_at",
];

#[test]
fn tenant_add_prints_the_secret_once_and_stores_only_its_hash() {
    let f = Fixture::new();
    let run = f.wfctl(&[
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
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "the secret alone on stdout: {:?}",
        run.stdout
    );
    let secret = lines[0];
    assert!(secret.starts_with(TOKEN_PREFIX), "{secret}");
    assert_eq!(secret.len(), TOKEN_PREFIX.len() + 64);
    assert!(
        run.stderr.contains("will not be shown again"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(secret), "the secret only on stdout");

    let id = TenantId::new("acme").expect("valid");
    let stored =
        f.rt.block_on(f.store.tenant(&id))
            .expect("read")
            .expect("registered");
    assert_eq!(stored.webhook.token_sha256, token_sha256(secret));
    assert_eq!(stored.branches, workflows::Tenant::default_branches());
    assert_eq!((stored.infra_project, stored.app_project), (11, 12));
    assert!(!stored.production_approval);
    let encoded = String::from_utf8(workflows::encode(&stored)).expect("utf-8");
    assert!(!encoded.contains(secret), "the secret itself is not stored");
    let now = Timestamp::from(jiff::Timestamp::now());
    assert!(orchestrator::tenants::verify_token(&stored, secret, now));

    // The secret is never shown again.
    for args in [
        &["tenant", "show", "acme"][..],
        &["tenant", "show", "acme", "-o", "json"],
        &["tenant", "list"],
        &["tenant", "list", "-o", "json"],
    ] {
        let run = f.wfctl(args);
        run.ok();
        let all = format!("{}{}", run.stdout, run.stderr);
        assert!(!all.contains(secret), "{args:?} shows the secret");
        assert!(
            !all.contains(&stored.webhook.token_sha256),
            "{args:?} shows the hash"
        );
    }

    // JSON mode: the tenant and the secret in one object; branches and approval as given.
    let run = f.wfctl(&[
        "-o",
        "json",
        "tenant",
        "add",
        "globex",
        "--domain",
        "globex.example",
        "--infra-project",
        "21",
        "--app-project",
        "22",
        "--branch",
        "trunk=production",
        "--branch",
        "develop=dev",
        "--production-approval",
    ]);
    run.ok();
    let v = run.json();
    assert_eq!(keys(&v), vec!["tenant", "webhook_secret"]);
    assert_eq!(keys(&v["tenant"]), sorted(TENANT_FIELDS.to_vec()));
    let secret = v["webhook_secret"].as_str().expect("secret");
    assert_eq!(v["tenant"]["branches"]["trunk"], "production");
    assert_eq!(v["tenant"]["branches"]["develop"], "dev");
    assert_eq!(v["tenant"]["production_approval"], true);
    let stored =
        f.rt.block_on(f.store.tenant(&TenantId::new("globex").expect("valid")))
            .expect("read")
            .expect("registered");
    assert_eq!(stored.webhook.token_sha256, token_sha256(secret));
    assert_eq!(stored.branches.len(), 2);
    assert!(stored.production_approval);
}

#[test]
fn a_duplicate_tenant_project_or_domain_is_refused() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    let add = |id: &str, infra: &str, app: &str| {
        f.wfctl(&[
            "tenant",
            "add",
            id,
            "--domain",
            "x.example",
            "--infra-project",
            infra,
            "--app-project",
            app,
        ])
    };
    let run = add("acme", "31", "32");
    run.code(1);
    assert!(run.stdout.is_empty(), "no secret for a refused tenant");
    assert!(
        run.stderr.contains("tenant acme already exists"),
        "{}",
        run.stderr
    );
    let run = add("globex", "12", "40");
    run.code(1);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .contains("GitLab project 12 already belongs to tenant acme"),
        "{}",
        run.stderr
    );
    let run = f.wfctl(&[
        "tenant",
        "add",
        "umbrella",
        "--domain",
        "acme.example",
        "--infra-project",
        "50",
        "--app-project",
        "51",
    ]);
    run.code(1);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .contains("domain acme.example already belongs to tenant acme"),
        "{}",
        run.stderr
    );
    let run = add("globex", "40", "40");
    run.code(2);
    assert!(
        run.stderr.contains("two different GitLab projects"),
        "{}",
        run.stderr
    );
    let run = f.wfctl(&["tenant", "list", "-o", "json"]);
    run.ok();
    assert_eq!(
        run.json().as_array().map(Vec::len),
        Some(1),
        "nothing was added"
    );
}

#[test]
fn tenant_list_and_show_in_table_and_json() {
    let f = Fixture::new();
    let run = f.wfctl(&["tenant", "list"]);
    run.ok();
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("no tenants"), "{}", run.stderr);

    f.add_tenant("acme", 11, 12);
    f.add_tenant("globex", 21, 22);

    let run = f.wfctl(&["tenant", "list"]);
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    assert!(lines[0].starts_with("ID") && lines[0].contains("DOMAIN"));
    assert!(lines[1].starts_with("acme ") && lines[1].contains("acme.example"));
    assert!(lines[2].starts_with("globex ") && lines[2].contains("21"));
    assert!(lines[1].contains("main,master=production"), "{}", lines[1]);
    assert!(lines[1].contains("ago") || lines[1].contains("just now"));
    // Aligned: the domain column starts at the same place on every line.
    let col = |l: &str, word: &str| l.find(word).expect("column");
    assert_eq!(col(lines[1], "acme.example"), col(lines[0], "DOMAIN"));
    assert_eq!(col(lines[2], "globex.example"), col(lines[0], "DOMAIN"));

    let run = f.wfctl(&["tenant", "list", "-o", "json"]);
    run.ok();
    let v = run.json();
    let all = v.as_array().expect("array");
    assert_eq!(all.len(), 2);
    for t in all {
        assert_eq!(keys(t), sorted(TENANT_FIELDS.to_vec()));
    }
    assert_eq!(all[0]["id"], "acme");
    assert_eq!(all[1]["infra_project"], 21);

    let run = f.wfctl(&["tenant", "show", "acme"]);
    run.ok();
    for expected in [
        "acme.example",
        "infra project",
        "11",
        "production approval",
        "not required",
        "signing secret",
        "branches",
        "master",
        "production",
        "created",
    ] {
        assert!(run.stdout.contains(expected), "{expected}:\n{}", run.stdout);
    }

    let run = f.wfctl(&["tenant", "show", "globex", "-o", "json"]);
    run.ok();
    let v = run.json();
    assert_eq!(keys(&v), sorted(TENANT_FIELDS.to_vec()));
    assert_eq!(v["domain"], "globex.example");
    assert_eq!(v["signing_secret_set"], false);
    assert_eq!(v["previous_token_valid_until"], Value::Null);
    assert_eq!(v["branches"]["main"], "production");
}

#[test]
fn list_shows_workflows_and_marks_the_corrupt_one() {
    let f = Fixture::new();
    f.populate();

    let run = f.wfctl(&["list"]);
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["KEY", "STATE", "VERSION", "UPDATED", "NOTE"]);
    assert!(lines[1].starts_with("acme#dev") && lines[1].contains("failed"));
    assert!(lines[2].starts_with("acme#production") && lines[2].contains("preparing"));
    assert!(lines[3].starts_with("globex#dev"));
    assert!(
        lines[3].contains("corrupt: machine.state: unknown variant `exploded`"),
        "{}",
        lines[3]
    );
    // Driver's clock runs from 2027-01-15, ahead of or behind the wall clock: relative either way.
    assert!(
        lines[1].contains(" ago") || lines[1].contains(" in "),
        "{}",
        lines[1]
    );
    let state_col = lines[0].find("STATE").expect("STATE");
    for l in &lines[1..] {
        assert_eq!(&l[state_col - 2..state_col], "  ", "aligned: {l}");
        assert_ne!(&l[state_col..=state_col], " ", "aligned: {l}");
    }

    let run = f.wfctl(&["list", "-o", "json"]);
    run.ok();
    let v = run.json();
    let all = v.as_array().expect("array");
    assert_eq!(all.len(), 3);
    for w in all {
        assert_eq!(
            keys(w),
            sorted(vec![
                "key",
                "tenant",
                "env",
                "state",
                "version",
                "updated_at",
                "corrupt"
            ])
        );
    }
    assert_eq!(all[0]["key"], "acme#dev");
    assert_eq!(all[0]["state"], "failed");
    assert_eq!(all[0]["corrupt"], Value::Null);
    assert_eq!(all[1]["env"], "production");
    assert!(all[1]["version"].as_u64().is_some_and(|v| v > 5));
    assert_eq!(all[2]["tenant"], "globex");
    assert_eq!(
        all[2]["corrupt"],
        "machine.state: unknown variant `exploded`"
    );

    let filtered = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["list", "-o", "json"];
        all.extend_from_slice(args);
        let run = f.wfctl(&all);
        run.ok();
        run.json()
            .as_array()
            .expect("array")
            .iter()
            .map(|w| w["key"].as_str().expect("key").to_owned())
            .collect()
    };
    assert_eq!(filtered(&["--status", "failed"]), ["acme#dev"]);
    assert_eq!(filtered(&["--env", "dev"]), ["acme#dev", "globex#dev"]);
    assert_eq!(
        filtered(&["--tenant", "acme"]),
        ["acme#dev", "acme#production"]
    );
    assert!(filtered(&["--status", "live"]).is_empty());

    let run = f.wfctl(&["list", "--status", "stuck"]);
    run.code(2);
    assert!(
        run.stderr.contains("awaiting_approval"),
        "lists the states: {}",
        run.stderr
    );
}

#[test]
fn show_prints_state_run_steps_resources_and_pending_pushes() {
    let f = Fixture::new();
    f.populate();

    let run = f.wfctl(&["show", "acme", "--env", "production"]);
    run.ok();
    let out = &run.stdout;
    for expected in [
        "acme#production",
        "preparing",
        "r3 deploy: infra 11111111 app 33333333",
        "steps of r3",
        "STEP",
        "ATTEMPT",
        "NEXT RETRY",
        "LAST ERROR",
        "retry_wait",
        "gitlab answered 503",
        "resources",
        "sg-i-r1",
        "ami-11111111",
        "db-r1.example:3306",
        "arn:aws:secretsmanager:eu-west-1:1:secret:db-r1",
        "arn:aws:elasticloadbalancing:tg/r1",
        "rule priority",
        "acme-r2",
        "deployed",
        "infra 11111111 app 22222222 (run r2,",
        "pending pushes",
        "app 44444444 by jane on main",
        "commit 4",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    let source_app = out
        .lines()
        .find(|l| l.trim_start().starts_with("source_app"))
        .expect("source_app row");
    assert!(
        source_app.contains("retry_wait") && source_app.contains(" 1 "),
        "{source_app}"
    );
    assert!(
        source_app.contains(" in ") || source_app.contains(" ago"),
        "relative next retry: {source_app}"
    );
    let network = out
        .lines()
        .find(|l| l.trim_start().starts_with("network"))
        .expect("network row");
    assert!(network.contains("skipped"), "{network}");

    // Without --env: every environment of the tenant, and the failed one shows its error.
    let run = f.wfctl(&["show", "acme"]);
    run.ok();
    assert!(run.stdout.contains("acme#dev") && run.stdout.contains("acme#production"));
    assert!(run.stdout.contains("VPC vpc-1 not found"));

    let run = f.wfctl(&["show", "acme", "-o", "json"]);
    run.ok();
    let v = run.json();
    let all = v.as_array().expect("array");
    assert_eq!(all.len(), 2);
    let prod = &all[1];
    assert_eq!(
        keys(prod),
        sorted(vec![
            "key",
            "tenant",
            "env",
            "state",
            "version",
            "created_at",
            "updated_at",
            "corrupt",
            "desired",
            "run",
            "resources",
            "deployed",
            "releases",
            "pending"
        ])
    );
    assert_eq!(prod["key"], "acme#production");
    // The releases kept for rollback end with the one deployed.
    let releases = prod["releases"].as_array().expect("releases");
    assert!(!releases.is_empty());
    assert_eq!(releases[releases.len() - 1], prod["deployed"]);
    assert_eq!(prod["state"], "preparing");
    assert_eq!(prod["corrupt"], Value::Null);
    let run_v = &prod["run"];
    assert_eq!(
        keys(run_v),
        sorted(vec![
            "id",
            "kind",
            "release",
            "trigger",
            "started_at",
            "finished_at",
            "ended",
            "needs_approval",
            "approved",
            "steps"
        ])
    );
    assert_eq!(run_v["id"], "r3");
    assert_eq!(run_v["kind"], "deploy");
    assert_eq!(run_v["release"]["app"], commit(3).as_str());
    let steps = run_v["steps"].as_array().expect("steps");
    let step = steps
        .iter()
        .find(|s| s["step"] == "source_app")
        .expect("source_app");
    assert_eq!(
        keys(step),
        sorted(vec![
            "step",
            "status",
            "attempt",
            "first_attempt_at",
            "finished_at",
            "next_attempt_at",
            "last_error",
            "note"
        ])
    );
    assert_eq!(step["status"], "retry_wait");
    assert_eq!(step["attempt"], 1);
    assert_eq!(step["last_error"], "gitlab answered 503");
    assert!(step["next_attempt_at"].is_string());
    let res = &prod["resources"];
    assert_eq!(res["instance_security_group"], "sg-i-r1");
    assert_eq!(res["database_endpoint"], "db-r1.example:3306");
    assert_eq!(res["rule_priority"], 7);
    assert_eq!(res["auto_scaling_group"], "acme-r2");
    assert_eq!(
        keys(res),
        sorted(vec![
            "instance_security_group",
            "database_security_group",
            "infra_artifact",
            "app_artifact",
            "image_id",
            "image_infra_sha",
            "database_instance_id",
            "database_endpoint",
            "database_secret_arn",
            "host",
            "target_group_arn",
            "rule_arn",
            "rule_priority",
            "dns_zone",
            "auto_scaling_group",
            "serving_image_id"
        ])
    );
    assert_eq!(prod["deployed"]["run"], "r2");
    assert_eq!(prod["deployed"]["release"]["infra"], commit(1).as_str());
    let pending = prod["pending"].as_array().expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(
        keys(&pending[0]),
        sorted(vec![
            "repo",
            "sha",
            "ref",
            "author",
            "message",
            "event_id",
            "received_at"
        ])
    );
    assert_eq!(pending[0]["sha"], commit(4).as_str());
    assert_eq!(pending[0]["ref"], "refs/heads/main");
}

#[test]
fn show_of_a_corrupt_record_names_the_decode_error_and_exits_1() {
    let f = Fixture::new();
    f.populate();
    let run = f.wfctl(&["show", "globex"]);
    run.code(1);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stdout.contains("globex#dev"), "{}", run.stdout);
    assert!(run.stdout.contains("corrupt"), "{}", run.stdout);
    let error = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .expect("an error line");
    assert!(
        error.contains("record of globex#dev is corrupt")
            && error.contains("machine.state")
            && error.contains("exploded"),
        "{error}"
    );

    let run = f.wfctl(&["show", "globex", "--env", "dev", "-o", "json"]);
    run.code(1);
    let v = run.json();
    let w = &v.as_array().expect("array")[0];
    assert_eq!(w["key"], "globex#dev");
    assert!(
        w["corrupt"]
            .as_str()
            .is_some_and(|c| c.contains("machine.state")),
        "{w}"
    );
    assert_eq!(w["run"], Value::Null);

    // Its history decodes: entries are separate from the record.
    let run = f.wfctl(&["history", "globex", "--env", "dev"]);
    run.ok();
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
}

#[test]
fn history_prints_one_line_per_entry() {
    let f = Fixture::new();
    f.populate();

    let run = f.wfctl(&["history", "acme", "--env", "production"]);
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split("  ").filter(|s| !s.is_empty()).collect();
    assert_eq!(
        header.iter().map(|s| s.trim()).collect::<Vec<_>>(),
        [
            "VERSION",
            "AT (UTC)",
            "RUN",
            "TRANSITION",
            "EVENT",
            "VERDICT",
            "DESCRIPTION"
        ]
    );
    let first = lines[1];
    assert!(first.starts_with("1 "), "{first}");
    assert!(first.contains("2027-01-15 08:00:01"), "{first}");
    assert!(first.contains("unprovisioned -> preparing"), "{first}");
    assert!(
        first.contains("push") && first.contains("infra 11111111 by jane on main"),
        "{first}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("step") && l.contains("rollout done"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("source_app retryable: gitlab answered 503 (retry in 30s)")),
        "{}",
        run.stdout
    );
    let approve = lines
        .iter()
        .find(|l| l.contains("approve by ops"))
        .expect("the approve signal");
    assert!(approve.contains("refused: "), "{approve}");
    let total = lines.len() - 1;

    let run = f.wfctl(&["history", "acme", "--env", "production", "--limit", "2"]);
    run.ok();
    let last_two: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(last_two.len(), 2);
    assert!(
        last_two[1].contains("approve by ops"),
        "the newest: {last_two:?}"
    );

    let run = f.wfctl(&[
        "history",
        "acme",
        "--env",
        "production",
        "--after",
        "1",
        "--limit",
        "1",
        "-o",
        "json",
    ]);
    run.ok();
    let v = run.json();
    let entries = v.as_array().expect("array");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(
        keys(e),
        sorted(vec![
            "version", "at", "event", "event_id", "summary", "verdict", "reason", "from", "to",
            "run", "detail"
        ])
    );
    assert_eq!(e["version"], 2);
    assert_eq!(e["event"], "push");
    assert_eq!(e["verdict"], "accepted");
    assert_eq!(e["reason"], Value::Null);
    assert_eq!(e["run"], "r1");
    assert_eq!(e["detail"]["push"]["repo"], "app");
    assert!(e["summary"].as_str().is_some_and(|s| s.starts_with("app ")));

    let run = f.wfctl(&["history", "acme", "--env", "production", "-o", "json"]);
    run.ok();
    let v = run.json();
    let entries = v.as_array().expect("array");
    assert_eq!(entries.len(), total);
    let refused = entries
        .iter()
        .find(|e| e["verdict"] == "refused")
        .expect("refused entry");
    assert!(refused["reason"].is_string());
    assert_eq!(refused["event"], "signal");
}

#[test]
fn unknown_tenants_and_environments_list_what_exists() {
    let f = Fixture::new();
    f.populate();

    for args in [
        &["show", "acm"][..],
        &["history", "acm", "--env", "dev"],
        &["tenant", "show", "acm"],
        &["list", "--tenant", "acm"],
    ] {
        let run = f.wfctl(args);
        run.code(1);
        assert!(
            run.stderr
                .contains("no tenant \"acm\"; tenants: acme, globex"),
            "{args:?}: {}",
            run.stderr
        );
    }
    let run = f.wfctl(&["show", "acme", "--env", "staging"]);
    run.code(1);
    assert!(
        run.stderr
            .contains("no workflow acme#staging; acme has workflows in: dev, production"),
        "{}",
        run.stderr
    );
    let run = f.wfctl(&["history", "globex", "--env", "production"]);
    run.code(1);
    assert!(
        run.stderr.contains("globex has workflows in: dev"),
        "{}",
        run.stderr
    );

    // A registered tenant without workflows is no error for `show`, but is for one env.
    f.add_tenant("initech", 31, 32);
    let run = f.wfctl(&["show", "initech"]);
    run.ok();
    assert!(run.stderr.contains("no workflows yet"), "{}", run.stderr);
    let run = f.wfctl(&["show", "initech", "-o", "json"]);
    run.ok();
    assert_eq!(run.json(), Value::Array(Vec::new()));
    let run = f.wfctl(&["show", "initech", "--env", "dev"]);
    run.code(1);
    assert!(run.stderr.contains("no workflows yet"), "{}", run.stderr);
}

#[test]
fn malformed_input_is_a_usage_error_naming_the_rule() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    let cases: [(&[&str], &str); 6] = [
        (&["show", "Acme"], "lowercase letters"),
        (
            &["show", "acme", "--env", "prod"],
            "dev, staging, production",
        ),
        (
            &[
                "tenant",
                "add",
                "x",
                "--domain",
                "x.example",
                "--infra-project",
                "1",
                "--app-project",
                "2",
            ],
            "3 to 20 characters",
        ),
        (
            &[
                "tenant",
                "add",
                "globex",
                "--domain",
                "Globex",
                "--infra-project",
                "1",
                "--app-project",
                "2",
            ],
            "invalid domain",
        ),
        (
            &[
                "tenant",
                "add",
                "globex",
                "--domain",
                "globex.example",
                "--infra-project",
                "1",
                "--app-project",
                "2",
                "--branch",
                "main",
            ],
            "BRANCH=ENV",
        ),
        (&["history", "acme"], "--env"),
    ];
    for (args, expected) in cases {
        let run = f.wfctl(args);
        run.code(2);
        assert!(
            run.stderr.contains(expected),
            "{args:?}: {expected:?} not in {}",
            run.stderr
        );
    }
}

#[test]
fn a_missing_or_broken_database_exits_3_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.sqlite");
    let run = wfctl_in(
        dir.path(),
        &["--db", missing.to_str().expect("utf-8"), "list"],
    );
    run.code(3);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    assert!(
        run.stderr.contains("missing.sqlite") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
    assert!(!missing.exists(), "a reader creates no database");

    let broken = dir.path().join("broken.sqlite");
    std::fs::write(&broken, vec![b'x'; 4096]).expect("write");
    let run = wfctl_in(
        dir.path(),
        &["--db", broken.to_str().expect("utf-8"), "tenant", "list"],
    );
    run.code(3);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    assert!(
        run.stderr.contains("broken.sqlite") && run.stderr.contains("not a database"),
        "{}",
        run.stderr
    );

    // The database path can come from the configuration file instead of --db.
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "[embedded]\npath = {:?}\n",
            missing.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let run = wfctl_in(
        dir.path(),
        &["--config", config.to_str().expect("utf-8"), "show", "acme"],
    );
    run.code(3);
    assert!(run.stderr.contains("missing.sqlite"), "{}", run.stderr);
    let run = wfctl_in(dir.path(), &["--config", "nope.toml", "list"]);
    run.code(2);
    assert!(run.stderr.contains("nope.toml"), "{}", run.stderr);
}

#[test]
fn piped_output_carries_no_escapes() {
    let f = Fixture::new();
    f.populate();
    for args in [
        &["tenant", "list"][..],
        &["tenant", "show", "acme"],
        &["list"],
        &["show", "acme"],
        &["show", "globex"],
        &["history", "acme", "--env", "production"],
        &["list", "-o", "json"],
    ] {
        // `Run::code` checks stdout and stderr for escapes.
        let run = f.wfctl(args);
        assert!(run.code.is_some(), "{args:?}");
        let code = run.code.unwrap_or_default();
        run.code(code);
        assert!(!run.stdout.is_empty(), "{args:?} printed something");
    }
}

#[test]
fn help_documents_exit_codes_and_json_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = wfctl_in(dir.path(), &["--help"]);
    run.ok();
    for expected in [
        "Exit codes",
        "0  success",
        "1  the operation failed",
        "2  usage",
        "3  the backend cannot be reached",
        "tenant",
        "history",
        "--db",
        "--config",
        "--output",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {}", run.stdout);
    }
    let run = wfctl_in(dir.path(), &["show", "--help"]);
    run.ok();
    assert!(
        run.stdout.contains("next_attempt_at") && run.stdout.contains("database_secret_arn"),
        "{}",
        run.stdout
    );
    let run = wfctl_in(dir.path(), &["history", "--help"]);
    run.ok();
    assert!(run.stdout.contains("verdict"), "{}", run.stdout);
    let run = wfctl_in(dir.path(), &["frobnicate"]);
    run.code(2);
}

const DEAD_LETTER_FIELDS: [&str; 12] = [
    "queue",
    "id",
    "workflow",
    "message",
    "event_id",
    "summary",
    "reason",
    "receive_count",
    "sent_at",
    "dead_at",
    "status",
    "status_detail",
];

impl Fixture {
    /// Sends `messages` and quarantines each with `reason`, as a worker does with a message it
    /// cannot handle.
    fn dead_letter(&self, messages: Vec<orchestrator::ports::Outgoing>, reason: &str) {
        use orchestrator::ports::{Queue, QueueKind};
        self.rt.block_on(async {
            let n = messages.len();
            self.store.send(messages).await.expect("send");
            let mut done = 0;
            while done < n {
                for q in QueueKind::ALL {
                    let got = self
                        .store
                        .receive(q, 10, Duration::from_secs(30), Duration::ZERO)
                        .await
                        .expect("receive");
                    for d in got {
                        self.store.quarantine(&d, reason).await.expect("quarantine");
                        done += 1;
                    }
                }
            }
        });
    }
}

fn event_message(
    key: &WorkflowKey,
    event: Event,
    body: Option<&[u8]>,
) -> orchestrator::ports::Outgoing {
    let envelope =
        workflows::Envelope::new(key.clone(), now(), workflows::Body::Event(event.clone()));
    orchestrator::ports::Outgoing {
        queue: orchestrator::ports::QueueKind::Events,
        group: Some(key.to_string()),
        dedup_id: Some(event.id().to_string()),
        delay: Duration::ZERO,
        body: body.map_or_else(|| workflows::encode(&envelope), <[u8]>::to_vec),
        attributes: std::collections::BTreeMap::new(),
    }
}

#[test]
fn dlq_lists_shows_redrives_and_discards_dead_letters() {
    let f = Fixture::new();
    f.wfctl(&["dlq", "list"]).ok();
    let empty = f.wfctl(&["dlq", "list"]);
    assert_eq!(empty.stdout, "", "{empty:?}");
    assert!(empty.stderr.contains("no dead letters"), "{empty:?}");
    assert_eq!(
        f.wfctl(&["dlq", "list", "-o", "json"]).ok().json(),
        Value::Array(vec![])
    );

    let ghost = WorkflowKey::new(TenantId::new("ghost").expect("id"), Environment::Dev);
    let push = Event::Push(Push {
        event_id: event_id("ghost-1"),
        repo: RepoKind::App,
        sha: commit(7),
        before: None,
        git_ref: "refs/heads/dev".into(),
        author: "jane".into(),
        message: "first".into(),
        received_at: now(),
    });
    let mut garbage = event_message(&ghost, push.clone(), Some(b"\x1b[31mnot json"));
    garbage.dedup_id = Some("garbage".into());
    f.dead_letter(
        vec![event_message(&ghost, push, None), garbage],
        "unknown tenant ghost",
    );

    let listed = f.wfctl(&["dlq", "list", "-o", "json"]).ok().json();
    let rows = listed.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{listed:#}");
    for row in rows {
        assert_eq!(keys(row), sorted(DEAD_LETTER_FIELDS.to_vec()), "{row:#}");
        assert_eq!(row["reason"], "unknown tenant ghost");
        assert_eq!(row["queue"], "events");
    }
    let (push_row, garbage_row) = (&rows[0], &rows[1]);
    assert_eq!(push_row["status"], "pending", "{push_row:#}");
    assert_eq!(push_row["message"], "push");
    assert_eq!(push_row["event_id"], "ghost-1");
    assert_eq!(push_row["workflow"], "ghost#dev");
    assert_eq!(garbage_row["status"], "undecodable", "{garbage_row:#}");
    let push_id = push_row["id"].as_str().expect("id").to_owned();
    let garbage_id = garbage_row["id"].as_str().expect("id").to_owned();

    let table = f.wfctl(&["dlq", "list"]);
    table.ok();

    for expected in [
        "QUEUE",
        "STATUS",
        "REASON",
        "ghost#dev",
        "pending",
        "undecodable",
        "push: app",
    ] {
        assert!(
            table.stdout.contains(expected),
            "{expected}: {}",
            table.stdout
        );
    }
    assert_eq!(
        f.wfctl(&["dlq", "list", "--queue", "steps", "-o", "json"])
            .ok()
            .json(),
        Value::Array(vec![])
    );
    let one = f
        .wfctl(&["dlq", "list", "--limit", "1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(one.as_array().map(Vec::len), Some(1));

    // show: every field, the envelope, or the body that does not decode (escapes removed).
    let shown = f
        .wfctl(&["dlq", "show", &push_id, "-o", "json"])
        .ok()
        .json();
    assert_eq!(shown["envelope"]["key"], "ghost#dev", "{shown:#}");
    let shown = f.wfctl(&["dlq", "show", &garbage_id]);
    shown.ok();
    assert!(
        shown.stdout.contains("undecodable") && shown.stdout.contains("not json"),
        "{}",
        shown.stdout
    );
    let missing = f.wfctl(&["dlq", "show", "12345"]);
    missing.code(1);
    assert!(
        missing.stderr.contains("12345") && missing.stderr.contains(&push_id),
        "{}",
        missing.stderr
    );

    // Usage errors: exit 2, nothing moved.
    f.wfctl(&["dlq", "redrive"]).code(2);
    f.wfctl(&["dlq", "redrive", "--all", &push_id]).code(2);
    let bad = f.wfctl(&["dlq", "list", "--queue", "nope"]);
    bad.code(2);
    assert!(bad.stderr.contains("events, steps"), "{}", bad.stderr);
    f.wfctl(&["dlq", "redrive", &push_id, "999"]).code(1);
    assert_eq!(
        f.wfctl(&["dlq", "list", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Redrive one: it is back on the events queue, in its group.
    let moved = f
        .wfctl(&["dlq", "redrive", &push_id, "-o", "json"])
        .ok()
        .json();
    assert_eq!(moved[0]["action"], "redriven", "{moved:#}");
    assert_eq!(moved[0]["id"], push_id.as_str());
    let back = f.rt.block_on(async {
        use orchestrator::ports::{Queue, QueueKind};
        f.store
            .receive(
                QueueKind::Events,
                10,
                Duration::from_secs(30),
                Duration::ZERO,
            )
            .await
            .expect("receive")
    });
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].group.as_deref(), Some("ghost#dev"));

    // Discard the rest.
    let discarded = f.wfctl(&["dlq", "discard", "--all"]);
    discarded.ok();

    assert!(
        discarded.stdout.contains("discarded"),
        "{}",
        discarded.stdout
    );
    assert!(
        discarded.stderr.contains("0 redriven, 1 discarded"),
        "{}",
        discarded.stderr
    );
    assert_eq!(
        f.wfctl(&["dlq", "list", "-o", "json"]).ok().json(),
        Value::Array(vec![])
    );
    let help = wfctl_in(f.dir.path(), &["dlq", "redrive", "--help"]);
    help.ok();
    assert!(
        help.stdout.contains("applied") && help.stdout.contains("discards it"),
        "{}",
        help.stdout
    );
}

/// Now, from the system clock, as wfctl reads it.
fn now() -> Timestamp {
    Timestamp::from(jiff::Timestamp::now())
}

/// The single line a table-mode command printed on stdout: a new secret.
fn printed_secret(run: &Run) -> &str {
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "the secret alone on stdout: {:?}",
        run.stdout
    );
    assert!(
        !run.stderr.contains(lines[0]),
        "the secret only on stdout: {}",
        run.stderr
    );
    lines[0]
}

#[test]
fn rotate_token_prints_a_new_secret_and_accepts_the_old_one_until_the_grace_ends() {
    let f = Fixture::new();
    let first = f.add_tenant("acme", 11, 12);
    let created = f.tenant("acme");

    let before = now();
    let run = f.wfctl(&["tenant", "rotate-token", "acme", "--grace", "2h"]);
    let after = now();
    run.ok();
    let second = printed_secret(&run).to_owned();
    assert!(second.starts_with(TOKEN_PREFIX), "{second}");
    assert_eq!(second.len(), TOKEN_PREFIX.len() + 64);
    assert_ne!(second, first);
    assert!(
        run.stderr.contains("will not be shown again")
            && run.stderr.contains("previous token is accepted until")
            && run.stderr.contains("(in 2h)"),
        "{}",
        run.stderr
    );

    let stored = f.tenant("acme");
    assert_eq!(stored.webhook.token_sha256, token_sha256(&second));
    assert_eq!(
        stored.webhook.previous_token_sha256,
        Some(token_sha256(&first))
    );
    let until = stored.webhook.previous_valid_until.expect("a grace end");
    let two_hours = Duration::from_secs(2 * 3600);
    assert!(
        before.saturating_add(two_hours) <= until && until <= after.saturating_add(two_hours),
        "{until}"
    );
    assert!(stored.updated_at >= before && stored.updated_at <= after);
    assert_eq!(stored.created_at, created.created_at);
    let encoded = String::from_utf8(workflows::encode(&stored)).expect("utf-8");
    assert!(!encoded.contains(&second), "only the hash is stored");

    // Both secrets now; only the new one once the grace period has ended.
    let t = now();
    assert!(verify_token(&stored, &second, t));
    assert!(verify_token(&stored, &first, t));
    let ended = until.saturating_add(Duration::from_millis(1));
    assert!(!verify_token(&stored, &first, until));
    assert!(!verify_token(&stored, &first, ended));
    assert!(verify_token(&stored, &second, ended));

    // `tenant show` reports the grace period, never a secret or hash.
    let run = f.wfctl(&["tenant", "show", "acme"]);
    run.ok();
    assert!(
        run.stdout.contains("previous token") && run.stdout.contains("accepted until"),
        "{}",
        run.stdout
    );
    let run = f.wfctl(&["tenant", "show", "acme", "-o", "json"]);
    run.ok();
    let shown: Timestamp =
        serde_json::from_value(run.json()["previous_token_valid_until"].clone()).expect("instant");
    assert_eq!(shown, until);
    for secret in [&first, &second] {
        assert!(!run.stdout.contains(secret.as_str()));
    }

    // The default grace is 24h; the older previous token (the first) is replaced.
    let before = now();
    let run = f.wfctl(&["tenant", "rotate-token", "acme"]);
    let after = now();
    run.ok();
    let third = printed_secret(&run).to_owned();
    assert!(
        run.stderr.contains("no longer is") && run.stderr.contains("(in 1d)"),
        "{}",
        run.stderr
    );
    let stored = f.tenant("acme");
    let day = Duration::from_secs(24 * 3600);
    let until = stored.webhook.previous_valid_until.expect("a grace end");
    assert!(before.saturating_add(day) <= until && until <= after.saturating_add(day));
    let t = now();
    assert!(verify_token(&stored, &third, t));
    assert!(verify_token(&stored, &second, t));
    assert!(!verify_token(&stored, &first, t), "one previous token only");

    // JSON: the tenant, the new secret and the end of the old one's grace.
    let run = f.wfctl(&[
        "-o",
        "json",
        "tenant",
        "rotate-token",
        "acme",
        "--grace",
        "30m",
    ]);
    run.ok();
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    let v = run.json();
    assert_eq!(
        keys(&v),
        vec!["previous_valid_until", "tenant", "webhook_secret"]
    );
    assert_eq!(keys(&v["tenant"]), sorted(TENANT_FIELDS.to_vec()));
    assert_eq!(v["tenant"]["id"], "acme");
    let fourth = v["webhook_secret"].as_str().expect("secret");
    let until: Timestamp =
        serde_json::from_value(v["previous_valid_until"].clone()).expect("instant");
    assert_eq!(
        v["tenant"]["previous_token_valid_until"],
        v["previous_valid_until"]
    );
    let stored = f.tenant("acme");
    assert_eq!(stored.webhook.token_sha256, token_sha256(fourth));
    assert_eq!(stored.webhook.previous_valid_until, Some(until));
    let t = now();
    assert!(verify_token(&stored, fourth, t) && verify_token(&stored, &third, t));
    assert!(!verify_token(&stored, &third, until));
}

#[test]
fn rotate_token_with_no_grace_rejects_the_old_secret_at_once() {
    let f = Fixture::new();
    let old = f.add_tenant("acme", 11, 12);
    let run = f.wfctl(&["tenant", "rotate-token", "acme", "--grace", "0"]);
    run.ok();
    let new = printed_secret(&run).to_owned();
    assert!(
        run.stderr.contains("will not be shown again")
            && run.stderr.contains("previous token is no longer accepted"),
        "{}",
        run.stderr
    );
    let stored = f.tenant("acme");
    let t = now();
    assert!(verify_token(&stored, &new, t));
    assert!(!verify_token(&stored, &old, t));
    assert_eq!(stored.webhook.previous_token_sha256, None);
    assert_eq!(stored.webhook.previous_valid_until, None);

    let run = f.wfctl(&[
        "tenant",
        "rotate-token",
        "acme",
        "--grace",
        "0",
        "-o",
        "json",
    ]);
    run.ok();
    let v = run.json();
    assert_eq!(v["previous_valid_until"], Value::Null);
    assert_eq!(v["tenant"]["previous_token_valid_until"], Value::Null);
    let newest = v["webhook_secret"].as_str().expect("secret");
    let stored = f.tenant("acme");
    assert!(verify_token(&stored, newest, now()));
    assert!(!verify_token(&stored, &new, now()));

    // A grace that is no duration is a usage error, and nothing changes.
    let run = f.wfctl(&["tenant", "rotate-token", "acme", "--grace", "soon"]);
    run.code(2);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("30m, 2h or 7d"), "{}", run.stderr);
    assert_eq!(f.tenant("acme"), stored);
}

#[test]
fn signing_secret_generate_stores_the_printed_secret_and_remove_clears_it() {
    let f = Fixture::new();
    let token = f.add_tenant("acme", 11, 12);
    let before = now();
    let run = f.wfctl(&["tenant", "signing-secret", "acme", "--generate"]);
    run.ok();
    let secret = printed_secret(&run).to_owned();
    assert!(secret.starts_with(SIGNING_SECRET_PREFIX), "{secret}");
    assert_eq!(secret.len(), SIGNING_SECRET_PREFIX.len() + 44, "{secret}");
    assert!(
        run.stderr.contains("will not be shown again") && run.stderr.contains("signature"),
        "{}",
        run.stderr
    );
    let stored = f.tenant("acme");
    assert_eq!(
        stored.webhook.signing_secret.as_deref(),
        Some(secret.as_str())
    );
    assert!(stored.updated_at >= before);
    assert!(
        verify_token(&stored, &token, now()),
        "the token is unchanged"
    );

    // What was printed signs webhooks that the stored secret verifies.
    let signer = standardwebhooks::Webhook::new(&secret).expect("a whsec_ secret");
    let payload = br#"{"object_kind":"push"}"#;
    let at = jiff::Timestamp::now().as_second();
    let signature = signer.sign("msg_1", at, payload).expect("sign");
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("webhook-id", "msg_1".parse().expect("header"));
    headers.insert("webhook-timestamp", at.to_string().parse().expect("header"));
    headers.insert("webhook-signature", signature.parse().expect("header"));
    let verifier =
        standardwebhooks::Webhook::new(stored.webhook.signing_secret.as_deref().expect("set"))
            .expect("a whsec_ secret");
    verifier
        .verify(payload, &headers)
        .expect("the signature verifies");

    // `tenant show` says a secret is set, and never shows it.
    let run = f.wfctl(&["tenant", "show", "acme"]);
    run.ok();
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("signing secret"))
        .expect("signing secret row");
    assert!(line.ends_with("yes"), "{line}");
    assert!(!run.stdout.contains(&secret));

    // JSON: a new secret replaces the old one.
    let run = f.wfctl(&[
        "tenant",
        "signing-secret",
        "acme",
        "--generate",
        "-o",
        "json",
    ]);
    run.ok();
    let v = run.json();
    assert_eq!(keys(&v), vec!["signing_secret", "tenant"]);
    assert_eq!(keys(&v["tenant"]), sorted(TENANT_FIELDS.to_vec()));
    assert_eq!(v["tenant"]["signing_secret_set"], true);
    let second = v["signing_secret"].as_str().expect("secret");
    assert_ne!(second, secret);
    assert!(second.starts_with(SIGNING_SECRET_PREFIX));
    assert_eq!(
        f.tenant("acme").webhook.signing_secret.as_deref(),
        Some(second)
    );

    // --remove clears it; removing again changes nothing.
    let run = f.wfctl(&["tenant", "signing-secret", "acme", "--remove"]);
    run.ok();
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains("Removed the signing secret"),
        "{}",
        run.stderr
    );
    let stored = f.tenant("acme");
    assert_eq!(stored.webhook.signing_secret, None);
    assert!(verify_token(&stored, &token, now()));
    let run = f.wfctl(&["tenant", "signing-secret", "acme", "--remove", "-o", "json"]);
    run.ok();
    let v = run.json();
    assert_eq!(v["signing_secret"], Value::Null);
    assert_eq!(v["tenant"]["signing_secret_set"], false);
    assert_eq!(f.tenant("acme"), stored, "nothing changed");
    let run = f.wfctl(&["tenant", "show", "acme", "-o", "json"]);
    run.ok();
    assert_eq!(run.json()["signing_secret_set"], false);

    // Exactly one of the two flags.
    for args in [
        &["tenant", "signing-secret", "acme"][..],
        &["tenant", "signing-secret", "acme", "--generate", "--remove"],
    ] {
        let run = f.wfctl(args);
        run.code(2);
        assert!(run.stdout.is_empty());
        assert!(
            run.stderr.contains("--generate") && run.stderr.contains("--remove"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(f.tenant("acme"), stored);
}

#[test]
fn secrets_of_an_unknown_tenant_are_refused_listing_the_tenants() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    f.add_tenant("globex", 21, 22);
    for args in [
        &["tenant", "rotate-token", "acm"][..],
        &["tenant", "rotate-token", "acm", "-o", "json"],
        &["tenant", "signing-secret", "acm", "--generate"],
        &["tenant", "signing-secret", "acm", "--remove"],
    ] {
        let run = f.wfctl(args);
        run.code(1);
        assert!(run.stdout.is_empty(), "no secret: {}", run.stdout);
        assert!(
            run.stderr
                .contains("no tenant \"acm\"; tenants: acme, globex"),
            "{args:?}: {}",
            run.stderr
        );
    }
}

#[test]
fn help_documents_rotate_token_and_signing_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = wfctl_in(dir.path(), &["tenant", "--help"]);
    run.ok();
    assert!(
        run.stdout.contains("rotate-token") && run.stdout.contains("signing-secret"),
        "{}",
        run.stdout
    );
    let run = wfctl_in(dir.path(), &["tenant", "rotate-token", "--help"]);
    run.ok();
    for expected in [
        "--grace <DURATION>",
        "[default: 24h]",
        "30m",
        "0 ends it at once",
        "grace period",
        "webhook_secret",
        "previous_valid_until",
        "previous_token_valid_until",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {}", run.stdout);
    }
    let run = wfctl_in(dir.path(), &["tenant", "signing-secret", "--help"]);
    run.ok();
    for expected in [
        "--generate",
        "--remove",
        "whsec_",
        "Standard Webhooks",
        "webhook-signature",
        "\"signing_secret\"",
        "signing_secret_set",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {}", run.stdout);
    }
}

#[test]
fn slots_lists_holders_and_the_line_and_show_notes_a_waiting_step() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    f.add_tenant("globex", 21, 22);
    // acme#staging's run r1 has its image step running: it waits behind globex for the one
    // image slot.
    let mut d = Driver::new(Environment::Staging);
    f.push(&mut d, RepoKind::Infra, 1);
    for step in [StepKind::Network, StepKind::SourceInfra] {
        let message = d.take(step).expect("in flight");
        let event = Driver::delivery(&message, |task| StepOutcome::Done {
            output: workflows::testing::output_for(task),
        });
        f.drive(&mut d, &event);
    }
    assert!(d.in_flight.iter().any(|m| m.step() == StepKind::Image));
    let acme = workflows::testing::key(Environment::Staging);
    let globex = WorkflowKey::new(TenantId::new("globex").expect("id"), Environment::Dev);
    let ttl = Duration::from_secs(600);
    let run = workflows::RunId::FIRST;
    let held = orchestrator::engine::holder_of(&globex, run);
    let waiting = orchestrator::engine::holder_of(&acme, run);
    f.rt.block_on(async {
        let (grant, _) = f
            .store
            .acquire_slot("image", &globex, &held, 1, ttl, b"wake")
            .await
            .expect("acquire");
        assert!(matches!(grant, orchestrator::ports::SlotGrant::Held { .. }));
        let (grant, _) = f
            .store
            .acquire_slot("image", &acme, &waiting, 1, ttl, b"wake")
            .await
            .expect("acquire");
        assert!(matches!(
            grant,
            orchestrator::ports::SlotGrant::Waiting { ahead: 0 }
        ));
    });

    let table = f.wfctl(&["slots"]);
    table.ok();
    let rows: Vec<&str> = table.stdout.lines().collect();
    assert!(
        rows[0].contains("KIND") && rows[0].contains("LAPSES"),
        "{rows:?}"
    );
    assert!(
        rows[1].contains("image") && rows[1].contains("globex#dev") && rows[1].contains("held"),
        "{rows:?}"
    );
    assert!(
        rows[2].contains("acme#staging")
            && rows[2].contains("r1")
            && rows[2].contains("waiting #1"),
        "{rows:?}"
    );
    assert!(
        rows[2].contains("in 9m") || rows[2].contains("in 10m"),
        "{rows:?}"
    );

    let json = f.wfctl(&["slots", "image", "-o", "json"]).ok().json();
    let entries = json.as_array().expect("an array");
    assert_eq!(entries.len(), 2);
    assert_eq!(
        keys(&entries[1]),
        sorted(vec![
            "kind",
            "status",
            "position",
            "workflow",
            "run",
            "tenant",
            "since",
            "expires_at"
        ])
    );
    assert_eq!(entries[0]["status"], "held");
    assert!(entries[0].get("position").is_none());
    assert_eq!(
        (
            &entries[1]["workflow"],
            &entries[1]["run"],
            &entries[1]["position"]
        ),
        (
            &Value::from("acme#staging"),
            &Value::from("r1"),
            &Value::from(1)
        )
    );
    let none = f.wfctl(&["slots", "database"]);
    none.ok();
    assert!(
        none.stdout.is_empty() && none.stderr.contains("nobody waits"),
        "{none:?}"
    );
    f.wfctl(&["slots", "builders"]).code(2);

    let show = f.wfctl(&["show", "acme", "--env", "staging"]);
    show.ok();
    let image = show
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("image"))
        .expect("image row");
    assert!(
        image.contains("running") && image.contains("waiting for a slot: #1 in line"),
        "{}",
        show.stdout
    );
}

#[test]
fn config_set_unset_and_list_keep_versioned_vars_per_environment() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:acme/stripe-AbCdEf";
    let run = f.wfctl(&[
        "config",
        "set",
        "acme",
        "--env",
        "staging",
        "LOG_LEVEL=debug",
        "DATABASE_URL_PARAMS=ssl=true&pool=5",
        "--secret",
        &format!("STRIPE_KEY={arn}"),
    ]);
    run.ok();
    assert!(run.stderr.contains("version 1"), "{}", run.stderr);
    assert!(
        run.stderr.contains("first deployment gives it to the app"),
        "no workflow yet: {}",
        run.stderr
    );
    let stored = f.tenant("acme").config_of(Environment::Staging);
    assert_eq!(stored.version, 1);
    assert_eq!(
        stored.vars.get("DATABASE_URL_PARAMS"),
        Some(&ConfigValue::Value("ssl=true&pool=5".into()))
    );
    assert_eq!(
        stored.vars.get("STRIPE_KEY"),
        Some(&ConfigValue::SecretArn(arn.into()))
    );
    assert_eq!(
        f.tenant("acme").config_of(Environment::Production).version,
        0,
        "other environments are untouched"
    );

    let run = f.wfctl(&["config", "list", "acme", "--env", "staging"]);
    run.ok();
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        [
            "DATABASE_URL_PARAMS=ssl=true&pool=5",
            "LOG_LEVEL=debug",
            &format!("STRIPE_KEY from secret {arn}"),
        ]
    );

    // Unsetting makes a new version; unsetting what is not set changes nothing.
    f.wfctl(&["config", "unset", "acme", "--env", "staging", "LOG_LEVEL"])
        .ok();
    let run = f.wfctl(&["config", "unset", "acme", "--env", "staging", "LOG_LEVEL"]);
    run.ok();
    assert!(
        run.stderr.contains("unchanged (version 2)"),
        "{}",
        run.stderr
    );
    let run = f.wfctl(&["config", "list", "acme", "--env", "staging", "-o", "json"]);
    run.ok();
    let v = run.json();
    assert_eq!(v["version"], 2);
    assert_eq!(v["vars"]["STRIPE_KEY"]["secret_arn"], arn);
    assert!(v["vars"].get("LOG_LEVEL").is_none());
}

#[test]
fn bad_config_vars_are_refused_naming_the_var_and_change_nothing() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    f.wfctl(&["config", "set", "acme", "--env", "dev", "KEPT=1"])
        .ok();
    let big = format!("BIG={}", "x".repeat(4097));
    for (args, says) in [
        (vec!["2FAST=1"], "not an environment variable name"),
        (vec!["OK=1", "DB_HOST=elsewhere"], "set by the platform"),
        (vec![big.as_str()], "more than 4096"),
        (
            vec!["--secret", "S=arn:aws:s3:::bucket"],
            "not a Secrets Manager secret ARN",
        ),
    ] {
        let mut all = vec!["config", "set", "acme", "--env", "dev"];
        all.extend(args.iter().copied());
        let run = f.wfctl(&all);
        run.code(2);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
    let stored = f.tenant("acme").config_of(Environment::Dev);
    assert_eq!(stored.version, 1, "nothing changed");
    assert_eq!(stored.vars.keys().collect::<Vec<_>>(), ["KEPT"]);
    let run = f.wfctl(&["config", "set", "acme", "--env", "dev", "NOEQUALS"]);
    run.code(2);
    let run = f.wfctl(&["config", "list", "nobody", "--env", "dev"]);
    assert!(run.stderr.contains("no tenant"), "{}", run.stderr);
}

#[test]
fn tenant_set_changes_the_branch_map_and_approval_and_nothing_else() {
    let f = Fixture::new();
    let token = f.add_tenant("acme", 11, 12);
    let before = f.tenant("acme");
    let run = f.wfctl(&[
        "tenant",
        "set",
        "acme",
        "--branch",
        "trunk=production",
        "--branch",
        "next=staging",
        "--production-approval",
        "true",
        "-o",
        "json",
    ]);
    run.ok();
    let after = f.tenant("acme");
    assert_eq!(
        after
            .branches
            .iter()
            .map(|(b, e)| format!("{b}={e}"))
            .collect::<Vec<_>>(),
        ["next=staging", "trunk=production"],
        "the whole map is replaced"
    );
    assert!(after.production_approval);
    assert_eq!(after.webhook, before.webhook, "the secrets are untouched");
    assert!(verify_token(&after, &token, now()));
    assert_eq!(after.domain, before.domain);
    assert!(after.updated_at >= before.updated_at);
    assert_eq!(run.json()["production_approval"], true, "{}", run.stdout);

    // Approval alone; the map stays.
    f.wfctl(&["tenant", "set", "acme", "--production-approval", "false"])
        .ok();
    let again = f.tenant("acme");
    assert!(!again.production_approval);
    assert_eq!(again.branches, after.branches);

    // Nothing to change, a contradictory map, an unknown tenant: refused, nothing written.
    f.wfctl(&["tenant", "set", "acme"]).code(2);
    let run = f.wfctl(&[
        "tenant",
        "set",
        "acme",
        "--branch",
        "a=dev",
        "--branch",
        "a=staging",
    ]);
    run.code(2);
    assert!(run.stderr.contains("mapped to both"), "{}", run.stderr);
    assert_eq!(f.tenant("acme"), again);
    let run = f.wfctl(&["tenant", "set", "nobody", "--production-approval", "true"]);
    run.code(1);
    assert!(run.stderr.contains("no tenant"), "{}", run.stderr);
}

#[test]
fn a_config_change_of_an_environment_with_a_workflow_is_sent_to_it() {
    use orchestrator::ports::{Queue, QueueKind};
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    let key = WorkflowKey::new(TenantId::new("acme").expect("valid"), Environment::Dev);
    let t0 = now();
    let mut record = WorkflowRecord::new(key.clone(), t0);
    let push = Event::Push(Push {
        event_id: event_id("p1"),
        repo: RepoKind::App,
        sha: commit(1),
        before: None,
        git_ref: "refs/heads/dev".into(),
        author: "jane".into(),
        message: "first".into(),
        received_at: t0,
    });
    f.apply(&mut record, &push, t0);
    let run = f.wfctl(&["config", "set", "acme", "--env", "dev", "LOG_LEVEL=info"]);
    run.ok();
    assert!(run.stderr.contains("rolls it out"), "{}", run.stderr);
    // Setting the same again changes nothing and sends nothing.
    f.wfctl(&["config", "set", "acme", "--env", "dev", "LOG_LEVEL=info"])
        .ok();
    let got =
        f.rt.block_on(f.store.receive(
            QueueKind::Events,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        ))
        .expect("receive");
    let events: Vec<Event> = got
        .iter()
        .filter_map(|d| {
            match workflows::decode::<Envelope>(&d.body)
                .expect("decodes")
                .body
            {
                Body::Event(e) => Some(e),
                Body::Step(_) => None,
            }
        })
        .collect();
    match events.as_slice() {
        [Event::Configure(c)] => {
            assert_eq!(c.version, 1);
            assert!(
                c.event_id.as_str().starts_with("config:acme#dev:"),
                "{}",
                c.event_id
            );
            assert!(!c.actor.is_empty());
        }
        other => panic!("one Configure event expected, got {other:?}"),
    }
}

/// A failed build's script output: `show` prints it under the steps, `logs` prints the run's
/// image and rollout reports with it in full, and escapes what could drive a terminal.
#[test]
fn logs_and_show_print_a_failed_scripts_last_lines() {
    let f = Fixture::new();
    f.add_tenant("acme", 11, 12);
    let mut d = Driver::new(Environment::Staging);
    f.push(&mut d, RepoKind::Infra, 1);
    f.complete_all_but(&mut d, StepKind::Image);
    f.deliver(
        &mut d,
        StepKind::Image,
        StepOutcome::Progress {
            recheck_after: Duration::from_secs(30),
            note: "builder i-1 running the provisioning scripts".into(),
        },
    );
    f.deliver(
        &mut d,
        StepKind::Image,
        StepOutcome::Terminal {
            error: "provision/20-app.sh exited 3 on builder i-1; its last lines:\n  E: nginxx not found\n  \u{1b}[2Jgone\n(the builder was terminated)".into(),
        },
    );
    assert_eq!(d.state(), workflows::State::Failed);

    let show = f.wfctl(&["show", "acme", "--env", "staging"]);
    show.ok();
    assert!(
        show.stdout
            .contains("provision/20-app.sh exited 3 on builder i-1; its last lines: (below)"),
        "{}",
        show.stdout
    );
    assert!(
        show.stdout.contains("\n      E: nginxx not found\n"),
        "{}",
        show.stdout
    );
    assert!(!show.stdout.contains('\u{1b}'), "escapes are escaped");

    let logs = f.wfctl(&["logs", "acme", "--env", "staging"]);
    logs.ok();
    let lines: Vec<&str> = logs.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", logs.stdout);
    assert!(
        lines[0].contains("r1 image    progress  builder i-1 running"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("r1 image    failed    provision/20-app.sh exited 3"));
    assert_eq!(lines[2], "      E: nginxx not found");
    assert_eq!(lines[3], "      \\u{1b}[2Jgone");

    let json = f.wfctl(&[
        "-o", "json", "logs", "acme", "--env", "staging", "--step", "image", "--run", "r1",
    ]);
    json.ok();
    let v: Value = serde_json::from_str(&json.stdout).expect("json");
    let all = v.as_array().expect("array");
    assert_eq!(all.len(), 2);
    assert_eq!(all[1]["outcome"], "failed");
    assert_eq!(all[1]["run"], "r1");
    assert!(
        all[1]["text"]
            .as_str()
            .expect("text")
            .contains("\n  E: nginxx not found\n")
    );

    let none = f.wfctl(&["logs", "acme", "--env", "staging", "--step", "rollout"]);
    none.ok();
    assert!(none.stdout.is_empty());
    assert!(none.stderr.contains("nothing captured"), "{}", none.stderr);
    f.wfctl(&["logs", "acme", "--env", "dev"]).code(1);
    f.wfctl(&["logs", "acme", "--env", "staging", "--run", "rx"])
        .code(2);
}
