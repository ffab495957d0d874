//! One tenant environment's runtime on AWS (moto), driven as an operator and a tenant's pushes
//! would drive it, with the binaries: a config change, a failing provisioning script (the build
//! fails at once with the script's output in `wfctl show` and `wfctl logs`), its fix, a failing
//! `install.sh` (the rollout fails fast, the old group keeps serving, the output is in
//! `wfctl logs`), its fix, three more releases (only the last three images, their snapshots and
//! artifacts remain), a rollback to an earlier release, a scaling change, a secret of another
//! tenant refused, a new domain, production promoted from dev's image, and a decommission
//! followed by a provision that restores the database from the final snapshot.
//!
//! The instances' user data runs on this machine (`testkit::instances`): the provisioning
//! scripts and `install.sh` below are real scripts, run by the real start-up scripts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::e2e::{Env, git, repository, text};

/// A tenant's two repositories, each a bare repository with a work tree beside it.
struct Repos {
    dir: PathBuf,
}

impl Repos {
    /// Commits `files` (a `None` content removes the file) to `name`'s work tree, pushes it
    /// to the bare repository, and returns the commit.
    fn commit(&self, name: &str, files: &[(&str, Option<&str>)], message: &str) -> String {
        let work = self.dir.join(format!("{name}-work"));
        for (path, content) in files {
            let p = work.join(path);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                    std::fs::write(p, c).expect("write");
                }
                None => std::fs::remove_file(p).expect("remove"),
            }
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "--quiet", "-m", message]);
        let bare = self.dir.join(format!("{name}.git"));
        git(
            &work,
            &[
                "push",
                "--quiet",
                &bare.to_string_lossy(),
                "HEAD:refs/heads/dev",
            ],
        );
        git(&work, &["rev-parse", "HEAD"])
    }
}

struct Story {
    env: Env,
    repos: Repos,
    _worker: crate::e2e::Reaped,
    _instances: tokio::task::JoinHandle<()>,
    sdk: aws_config::SdkConfig,
}

impl Story {
    fn wfctl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--config", "orchestrator.toml"];
        all.extend_from_slice(args);
        self.env.wfctl(&all)
    }

    fn push(&self, repo: &str, sha: &str) {
        let out = self.env.orchestrator(
            &[
                "--config",
                "orchestrator.toml",
                "inject",
                "push",
                "--tenant",
                "acme",
                "--env",
                "dev",
                "--repo",
                repo,
                "--sha",
                sha,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// `wfctl show acme --env dev -o json`.
    fn show(&self) -> Value {
        let out = self.wfctl(&["show", "acme", "--env", "dev", "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v[0].clone()
    }

    /// Waits until the workflow shows what `done` accepts; returns it.
    async fn until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let shown = self.show();
            if done(&shown) {
                return shown;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not in time\n{shown:#}\nworker:\n{}",
                tail(&self.env.log("worker.log"))
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn live_at(&self, what: &str, infra: &str, app: &str) -> Value {
        self.until(what, |v| {
            v["state"] == "live"
                && v["deployed"]["release"]["infra"] == infra
                && v["deployed"]["release"]["app"] == app
        })
        .await
    }

    async fn failed(&self, what: &str) -> Value {
        self.until(what, |v| v["state"] == "failed").await
    }

    fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk)
    }

    /// The names of the environment's images, sorted.
    async fn images(&self) -> Vec<(String, Vec<String>)> {
        let out = self
            .ec2()
            .describe_images()
            .owners("self")
            .filters(tag("tenant", "acme"))
            .filters(tag("env", "dev"))
            .send()
            .await
            .expect("images");
        let mut images: Vec<(String, Vec<String>)> = out
            .images()
            .iter()
            .map(|i| {
                let snapshots = i
                    .block_device_mappings()
                    .iter()
                    .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
                    .map(str::to_owned)
                    .collect();
                (i.name().unwrap_or_default().to_owned(), snapshots)
            })
            .collect();
        images.sort();
        images
    }

    /// The ids of the environment's EBS snapshots, sorted.
    async fn snapshots(&self) -> Vec<String> {
        let out = self
            .ec2()
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag("tenant", "acme"))
            .filters(tag("env", "dev"))
            .send()
            .await
            .expect("snapshots");
        let mut ids: Vec<String> = out
            .snapshots()
            .iter()
            .filter_map(|s| s.snapshot_id())
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids
    }

    /// The keys under `prefix` in the artifact bucket.
    async fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.sdk)
                .force_path_style(true)
                .build(),
        );
        let out = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list");
        let mut keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// The environment's Auto Scaling groups: (name, min, max, desired).
    async fn groups(&self) -> Vec<(String, i32, i32, i32)> {
        let asg = aws_sdk_autoscaling::Client::new(&self.sdk);
        let out = asg
            .describe_auto_scaling_groups()
            .send()
            .await
            .expect("groups");
        let mut groups: Vec<_> = out
            .auto_scaling_groups()
            .iter()
            .filter(|g| {
                g.auto_scaling_group_name()
                    .is_some_and(|n| n.starts_with("acme-dev-r"))
            })
            .map(|g| {
                (
                    g.auto_scaling_group_name().unwrap_or_default().to_owned(),
                    g.min_size().unwrap_or(-1),
                    g.max_size().unwrap_or(-1),
                    g.desired_capacity().unwrap_or(-1),
                )
            })
            .collect();
        groups.sort();
        groups
    }
}

fn tag(key: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// The last 60 lines of `log`.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn infra_files(version: &str) -> Vec<(&'static str, Option<String>)> {
    vec![(
        "provision/10-base.sh",
        Some(format!("echo 'installing the web server, {version}'\n")),
    )]
}

fn owned<'a>(files: &'a [(&'static str, Option<String>)]) -> Vec<(&'static str, Option<&'a str>)> {
    files.iter().map(|(p, c)| (*p, c.as_deref())).collect()
}

fn artifact_bucket(dir: &Path) -> String {
    let settings = std::fs::read_to_string(dir.join("orchestrator.toml")).expect("settings");
    let table: toml::Table = settings.parse().expect("TOML");
    table["infrastructure"]["artifact_bucket"]
        .as_str()
        .expect("bucket")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runtime_through_failures_retention_rollback_and_scaling() {
    let env = Env::new().await;
    let dir = env.dir.path().join("repos");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let infra_1 = repository(
        &dir,
        "acme-infra",
        &[(
            "provision/10-base.sh",
            "echo 'installing the web server, v1'\n",
        )],
    );
    let app_1 = repository(
        &dir,
        "acme-app",
        &[
            ("install.sh", "grep -q . index.html\n"),
            ("index.html", "v1"),
        ],
    );
    env.init(&format!("file://{}/{{tenant}}-{{repo}}.git", dir.display()));
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
    let worker = env.spawn(
        &["--config", "orchestrator.toml", "worker"],
        &[
            ("ORCHESTRATOR__INFRASTRUCTURE__RECHECK_SECS", "1"),
            ("ORCHESTRATOR__ENGINE__WAIT", "1s"),
        ],
        "worker.log",
    );
    let instances = env.moto.run_user_data();
    let sdk = env.moto.sdk_config();
    let story = Story {
        repos: Repos { dir },
        _worker: worker,
        _instances: instances,
        sdk,
        env,
    };
    let bucket = artifact_bucket(story.env.dir.path());

    // First deployment.
    story.push("infra", &infra_1);
    story.push("app", &app_1);
    let first = story.live_at("first deployment", &infra_1, &app_1).await;

    // A config change rolls the same release out again.
    let set = story.wfctl(&["config", "set", "acme", "--env", "dev", "GREETING=hello"]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let configured = story
        .until("config rolled out", |v| {
            v["state"] == "live" && v["deployed"]["run"] != first["deployed"]["run"]
        })
        .await;

    // A failing provisioning script: the build fails when the builder powers off, with the
    // script's name and last lines.
    let mut bad = infra_files("v2");
    bad.push((
        "provision/20-extras.sh",
        Some(
            "echo 'installing extras'\necho 'E: Unable to locate package nginxx' >&2\nexit 3\n"
                .into(),
        ),
    ));
    let infra_2 = story.repos.commit("acme-infra", &owned(&bad), "extras");
    let pushed = Instant::now();
    story.push("infra", &infra_2);
    story.failed("failing provisioning script").await;
    let failed_after = pushed.elapsed();
    assert!(
        failed_after < Duration::from_secs(120),
        "failed after {failed_after:?}, not at the builder timeout"
    );
    let show = story.wfctl(&["show", "acme", "--env", "dev"]);
    let shown = text(&show.stdout);
    assert!(
        shown.contains("provision/20-extras.sh exited 3 on builder i-"),
        "{shown}"
    );
    assert!(
        shown.contains("E: Unable to locate package nginxx"),
        "{shown}"
    );
    let logs = story.wfctl(&["logs", "acme", "--env", "dev", "--step", "image"]);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    let logged = text(&logs.stdout);
    assert!(logged.contains("installing extras"), "{logged}");
    assert!(
        logged.contains("E: Unable to locate package nginxx"),
        "{logged}"
    );
    assert_eq!(
        story.show()["deployed"],
        configured["deployed"],
        "what served keeps serving"
    );

    // The fix.
    let mut fixed = infra_files("v3");
    fixed.push(("provision/20-extras.sh", None));
    let infra_3 = story
        .repos
        .commit("acme-infra", &owned(&fixed), "no extras");
    story.push("infra", &infra_3);
    let before_install = story.live_at("fixed build", &infra_3, &app_1).await;
    let serving_group = before_install["resources"]["auto_scaling_group"]
        .as_str()
        .expect("group")
        .to_owned();

    // A failing install: the rollout fails fast, the new group goes, the old one serves.
    let app_2 = story.repos.commit(
        "acme-app",
        &[(
            "install.sh",
            Some("echo 'migrating'\necho 'ERROR 1050: table users exists' >&2\nexit 2\n"),
        )],
        "migrate",
    );
    let pushed = Instant::now();
    story.push("app", &app_2);
    let failed = story.failed("failing install").await;
    assert!(pushed.elapsed() < Duration::from_secs(120));
    assert_eq!(failed["deployed"], before_install["deployed"]);
    let groups: Vec<String> = story.groups().await.into_iter().map(|g| g.0).collect();
    assert_eq!(
        groups,
        std::slice::from_ref(&serving_group),
        "only the serving group is left"
    );
    let logs = story.wfctl(&["logs", "acme", "--env", "dev", "--step", "rollout"]);
    let logged = text(&logs.stdout);
    assert!(logged.contains("install.sh exited 2"), "{logged}");
    assert!(
        logged.contains("ERROR 1050: table users exists"),
        "{logged}"
    );
    assert!(
        logged.contains(&format!("{serving_group} keeps serving")),
        "{logged}"
    );

    // Its fix.
    let app_3 = story.repos.commit(
        "acme-app",
        &[("install.sh", Some("grep -q . index.html\n"))],
        "no migration",
    );
    story.push("app", &app_3);
    story.live_at("fixed install", &infra_3, &app_3).await;

    // Three more releases: only the last three images (and their snapshots and artifacts)
    // remain.
    let mut infras = Vec::new();
    for version in ["v4", "v5", "v6"] {
        let sha = story
            .repos
            .commit("acme-infra", &owned(&infra_files(version)), version);
        story.push("infra", &sha);
        story.live_at(version, &sha, &app_3).await;
        infras.push(sha);
    }
    let images = story.images().await;
    let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected: Vec<String> = infras.iter().map(|s| format!("acme-dev-{s}")).collect();
    expected.sort();
    assert_eq!(names, expected, "the last three images");
    let mut kept_snapshots: Vec<String> = images.iter().flat_map(|(_, s)| s.clone()).collect();
    kept_snapshots.sort();
    assert!(!kept_snapshots.is_empty());
    assert_eq!(
        story.snapshots().await,
        kept_snapshots,
        "and only their snapshots"
    );
    let artifacts = story.objects(&bucket, "acme/dev/infra/").await;
    let mut expected: Vec<String> = infras
        .iter()
        .map(|s| format!("acme/dev/infra/{s}.tar.gz"))
        .collect();
    expected.sort();
    assert_eq!(artifacts, expected, "and only their artifacts");

    // A rollback to an earlier release, by its run.
    let shown = story.show();
    let releases = shown["releases"].as_array().expect("releases").clone();
    assert_eq!(releases.len(), 3, "{releases:#?}");
    let target = releases[0].clone();
    assert_eq!(target["release"]["infra"], infras[0].as_str());
    let run = target["run"].as_str().expect("run");
    let rollback = story.wfctl(&[
        "rollback",
        "acme",
        "--env",
        "dev",
        "--to",
        run,
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(
        rollback.status.success(),
        "{}{}",
        text(&rollback.stdout),
        text(&rollback.stderr)
    );
    let rolled = story.live_at("rolled back", &infras[0], &app_3).await;
    assert_ne!(rolled["deployed"]["run"], target["run"], "as a new run");

    // Sizing: a bad one is refused naming the field, a good one rolls out a new group.
    let refused = story.wfctl(&[
        "tenant", "set", "acme", "--env", "dev", "--min", "5", "--max", "2",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("min_size 5 is greater than max_size 2"),
        "{}",
        text(&refused.stderr)
    );
    let set = story.wfctl(&[
        "tenant",
        "set",
        "acme",
        "--env",
        "dev",
        "--min",
        "2",
        "--max",
        "4",
        "--desired",
        "2",
        "--scaling",
        "cpu:50",
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let scaled = story
        .until("scaled", |v| {
            v["state"] == "live" && v["deployed"]["run"] != rolled["deployed"]["run"]
        })
        .await;
    let group = scaled["resources"]["auto_scaling_group"]
        .as_str()
        .expect("group")
        .to_owned();
    assert_eq!(story.groups().await, [(group.clone(), 2, 4, 2)]);
    let policies = aws_sdk_autoscaling::Client::new(&story.sdk)
        .describe_policies()
        .auto_scaling_group_name(&group)
        .send()
        .await
        .expect("policies");
    let policy = policies.scaling_policies().first().expect("a policy");
    assert_eq!(policy.policy_type(), Some("TargetTrackingScaling"));
    assert_eq!(
        policy
            .target_tracking_configuration()
            .and_then(|c| c.target_value()),
        Some(50.0)
    );

    // A secret that is not the tenant's is refused at `config set`, nothing changed.
    let secrets = aws_sdk_secretsmanager::Client::new(&story.sdk);
    let foreign = secrets
        .create_secret()
        .name("globex/stripe")
        .secret_string("sk_globex")
        .tags(
            aws_sdk_secretsmanager::types::Tag::builder()
                .key("tenant")
                .value("globex")
                .build(),
        )
        .send()
        .await
        .expect("secret");
    let arn = foreign.arn().expect("arn");
    let refused = story.wfctl(&[
        "config",
        "set",
        "acme",
        "--env",
        "dev",
        "--secret",
        &format!("STRIPE_KEY={arn}"),
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stdout));
    let err = text(&refused.stderr);
    assert!(
        err.contains("--secret STRIPE_KEY") && err.contains("not tenant acme's"),
        "{err}"
    );
    let listed = text(
        &story
            .wfctl(&["config", "list", "acme", "--env", "dev"])
            .stdout,
    );
    assert!(!listed.contains("STRIPE_KEY"), "{listed}");

    // The artifact bucket's lifecycle rules.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&story.sdk)
            .force_path_style(true)
            .build(),
    );
    let lifecycle = s3
        .get_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .send()
        .await
        .expect("lifecycle");
    let ids: Vec<&str> = lifecycle.rules().iter().filter_map(|r| r.id()).collect();
    assert_eq!(ids, ["expire-script-reports", "abort-incomplete-uploads"]);

    // A new domain: the environment's rule moves to the new host.
    let live_run = story.show()["deployed"]["run"].clone();
    let set = story.wfctl(&["tenant", "set", "acme", "--domain", "acme-shop.example"]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let moved = story
        .until("rerouted", |v| {
            v["state"] == "live" && v["deployed"]["run"] != live_run
        })
        .await;
    assert_eq!(moved["resources"]["host"], "dev.acme-shop.example");
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&story.sdk);
    let rule = elb
        .describe_rules()
        .rule_arns(moved["resources"]["rule_arn"].as_str().expect("rule"))
        .send()
        .await
        .expect("rule");
    let hosts: Vec<String> = rule.rules()[0]
        .conditions()
        .iter()
        .flat_map(|c| {
            c.values()
                .iter()
                .chain(
                    c.host_header_config()
                        .map(|h| h.values())
                        .unwrap_or_default(),
                )
                .cloned()
        })
        .collect();
    assert_eq!(hosts, ["dev.acme-shop.example"]);

    // Build once, promote: production takes dev's image of the commit as a copy.
    let infra_live = moved["deployed"]["release"]["infra"]
        .as_str()
        .expect("infra")
        .to_owned();
    for (repo, sha) in [("infra", infra_live.as_str()), ("app", app_3.as_str())] {
        let out = story.env.orchestrator(
            &[
                "--config",
                "orchestrator.toml",
                "inject",
                "push",
                "--tenant",
                "acme",
                "--env",
                "production",
                "--repo",
                repo,
                "--sha",
                sha,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = story.wfctl(&["show", "acme", "--env", "production", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v[0]["state"] == "live" {
            break;
        }
        assert!(Instant::now() < deadline, "production not live: {v:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let builders = story
        .ec2()
        .describe_instances()
        .filters(tag("env", "production"))
        .filters(tag("infra-sha", &infra_live))
        .send()
        .await
        .expect("builders");
    assert!(
        builders
            .reservations()
            .iter()
            .all(|r| r.instances().is_empty()),
        "production built nothing"
    );

    // Decommissioned, then provisioned again with its database restored from the snapshot.
    let out = story.wfctl(&[
        "decommission",
        "acme",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(story.images().await.is_empty(), "dev's images are gone");
    assert!(story.objects(&bucket, "acme/dev/").await.is_empty());
    let out = story.wfctl(&[
        "provision",
        "acme",
        "--env",
        "dev",
        "--from-snapshot",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let again = story.show();
    assert_eq!(again["state"], "live");
    // From scratch, at the branches' newest commits (not the release rolled back to).
    assert_eq!(again["deployed"]["release"]["infra"], infras[2].as_str());
    assert_eq!(again["deployed"]["release"]["app"], app_3.as_str());
    let logs = story.wfctl(&["logs", "acme", "--env", "dev", "--step", "database"]);
    let logged = text(&logs.stdout);
    assert!(
        logged.contains("database acme-dev restoring from acme-dev-final-r"),
        "{logged}"
    );
    let rds = aws_sdk_rds::Client::new(&story.sdk);
    let snapshots = rds
        .describe_db_snapshots()
        .snapshot_type("manual")
        .send()
        .await
        .expect("snapshots");
    assert!(
        snapshots.db_snapshots().iter().any(|s| s
            .db_snapshot_identifier()
            .is_some_and(|id| id.starts_with("acme-dev-final"))),
        "the final snapshot it was restored from"
    );
}
