//! The AWS reconcilers through the engine, on a `moto_server` with a sandbox of shared
//! infrastructure: two tenants x two environments are provisioned from local bare git
//! repositories (`file://`), and the SDK then shows every resource once, tagged and linked as
//! designed. Re-running any reconciler creates nothing new; an app push replaces the Auto
//! Scaling group without building an image; decommissioning releases everything.
//!
//! moto runs instances at once and never runs user data, so a builder never powers itself
//! off: a task of the test stops running builders, as their scripts would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use activities::aws::{AwsCloud, Clients, Infrastructure};
use activities::{Activities, Invocation, Outcome};
use aws_sdk_ec2::types::Filter;
use orchestrator::allocations::StoreAllocations;
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig, enqueue};
use orchestrator::ports::Store;
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use testkit::moto::Moto;
use tokio_util::sync::CancellationToken;
use workflows::{
    Command, Domain, Environment, Event, EventId, GitSha, Push, RepoKind, Signal, State, StepKind,
    StepTask, Tenant, TenantId, Timestamp, WorkflowKey, WorkflowRecord,
};

type Cloud = AwsCloud;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Bare repositories `<tenant>-<repo>.git` in a directory, served as `file://`.
struct Repos {
    dir: tempfile::TempDir,
}

impl Repos {
    fn url_template(&self) -> String {
        format!(
            "file://{}/{{tenant}}-{{repo}}.git",
            self.dir.path().display()
        )
    }

    /// Commits `files` to `tenant`'s `repo` (creating it) and returns the commit.
    fn commit(&self, tenant: &str, repo: &str, files: &[(&str, &str)]) -> GitSha {
        let bare: PathBuf = self.dir.path().join(format!("{tenant}-{repo}.git"));
        let work = self.dir.path().join(format!("{tenant}-{repo}-work"));
        if !bare.exists() {
            git(
                self.dir.path(),
                &["init", "--quiet", "--bare", &bare.to_string_lossy()],
            );
            git(
                self.dir.path(),
                &["init", "--quiet", &work.to_string_lossy()],
            );
            git(&work, &["remote", "add", "origin", &bare.to_string_lossy()]);
        }
        for (path, content) in files {
            let p = work.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, content).expect("write");
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "--quiet", "-m", "change"]);
        git(
            &work,
            &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
        );
        GitSha::new(git(&work, &["rev-parse", "HEAD"])).expect("sha")
    }
}

struct World {
    moto: Moto,
    _dir: tempfile::TempDir,
    clients: Clients,
    infra: Infrastructure,
    backend: Arc<SqliteBackend>,
    cloud: Arc<Cloud>,
    clock: SharedClock,
    repos: Repos,
}

impl World {
    async fn new() -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config();
        let repos = Repos {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let mut infra = activities::aws::sandbox::create(&sdk, "sbx", &repos.url_template())
            .await
            .expect("sandbox");
        let again = activities::aws::sandbox::create(&sdk, "sbx", &repos.url_template())
            .await
            .expect("sandbox again");
        assert_eq!(again, infra, "the sandbox is found again, not made twice");
        infra.recheck_secs = 1;
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = Arc::new(
            SqliteBackend::open(SqliteConfig::new(dir.path().join("o.sqlite"))).expect("open"),
        );
        let clock: SharedClock = Arc::new(SystemClock);
        let clients = Clients::new(&sdk);
        let cloud = Arc::new(
            AwsCloud::new(
                clients.clone(),
                infra.clone(),
                StoreAllocations(backend.clone()),
                Arc::new(SystemClock),
            )
            .expect("complete infrastructure"),
        );
        Self {
            moto,
            _dir: dir,
            clients,
            infra,
            backend,
            cloud,
            clock,
            repos,
        }
    }

    fn start(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let engine = Arc::new(Engine::new(
            self.backend.clone(),
            self.backend.clone(),
            self.backend.clone(),
            self.cloud.clone(),
            self.clock.clone(),
            EngineConfig {
                wait: Duration::from_millis(100),
                ..EngineConfig::default()
            },
        ));
        let stop = CancellationToken::new();
        let handle = tokio::spawn(engine.run(stop.clone()));
        (stop, handle)
    }

    async fn push(&self, key: &WorkflowKey, repo: RepoKind, sha: &GitSha) {
        let event = Event::Push(Push {
            event_id: EventId::new(format!("{key}-{repo}-{sha}")).expect("id"),
            repo,
            sha: sha.clone(),
            before: None,
            git_ref: "refs/heads/main".into(),
            author: "jane".into(),
            message: "change".into(),
            received_at: self.clock.now(),
        });
        enqueue(&*self.backend, key, event, self.clock.now())
            .await
            .expect("enqueue");
    }

    async fn record(&self, key: &WorkflowKey) -> WorkflowRecord {
        self.backend
            .workflow(key)
            .await
            .expect("read")
            .expect("exists")
    }

    async fn until(
        &self,
        what: &str,
        keys: &[WorkflowKey],
        check: impl Fn(&WorkflowRecord) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            let mut all = true;
            for k in keys {
                all &= matches!(self.backend.workflow(k).await, Ok(Some(r)) if check(&r));
            }
            if all {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let mut states = Vec::new();
                for k in keys {
                    if let Ok(Some(r)) = self.backend.workflow(k).await {
                        states.push(format!(
                            "{k}: {:?} {:?}",
                            r.state(),
                            r.workflow().run.as_ref().map(|run| run
                                .steps
                                .iter()
                                .map(|s| (s.kind, s.status, s.last_error.clone(), s.note.clone()))
                                .collect::<Vec<_>>())
                        ));
                    }
                }
                panic!("timed out waiting for {what}:\n{}", states.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn tenant(id: &str, infra: u64, app: u64) -> Tenant {
    Tenant::new(
        TenantId::new(id).expect("id"),
        Domain::new(format!("{id}.example")).expect("domain"),
        infra,
        app,
        "00".repeat(32),
        Timestamp::from_unix_millis(1_000),
    )
}

fn live_at(r: &WorkflowRecord, infra: &GitSha, app: &GitSha) -> bool {
    r.state() == State::Live
        && r.workflow().deployed.as_ref().is_some_and(|d| {
            d.release.infra.as_ref() == Some(infra) && d.release.app.as_ref() == Some(app)
        })
}

fn tag<'a>(
    tags: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
    key: &str,
) -> Option<&'a str> {
    tags.into_iter()
        .find(|(k, _)| *k == Some(key))
        .and_then(|(_, v)| v)
}

/// What exists, counted, for the "nothing new" check.
async fn census(w: &World) -> BTreeMap<&'static str, usize> {
    let c = &w.clients;
    let groups = c
        .ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("vpc-id")
                .values(&w.infra.vpc_id)
                .build(),
        )
        .send()
        .await
        .expect("groups")
        .security_groups()
        .len();
    let target_groups = c
        .elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups()
        .len();
    let rules = c
        .elb
        .describe_rules()
        .listener_arn(&w.infra.listener_arn)
        .send()
        .await
        .expect("rules")
        .rules()
        .len();
    let images = c
        .ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect("images")
        .images()
        .len();
    let instances = c
        .ec2
        .describe_instances()
        .send()
        .await
        .expect("instances")
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    let asgs = c
        .autoscaling
        .describe_auto_scaling_groups()
        .send()
        .await
        .expect("asgs")
        .auto_scaling_groups()
        .len();
    let dbs = c
        .rds
        .describe_db_instances()
        .send()
        .await
        .expect("dbs")
        .db_instances()
        .len();
    let templates = c
        .ec2
        .describe_launch_templates()
        .send()
        .await
        .expect("lts")
        .launch_templates()
        .len();
    let objects =
        c.s3.list_objects_v2()
            .bucket(&w.infra.artifact_bucket)
            .send()
            .await
            .expect("objects")
            .contents()
            .len();
    BTreeMap::from([
        ("security groups", groups),
        ("target groups", target_groups),
        ("rules", rules),
        ("images", images),
        ("instances", instances),
        ("auto scaling groups", asgs),
        ("databases", dbs),
        ("launch templates", templates),
        ("artifacts", objects),
    ])
}

/// The last step message the engine sent for each step of `key`'s current or last run.
async fn last_tasks(w: &World, key: &WorkflowKey) -> BTreeMap<StepKind, StepTask> {
    let mut tasks = BTreeMap::new();
    for entry in w
        .backend
        .history(key, 0, usize::MAX)
        .await
        .expect("history")
    {
        for c in entry.commands {
            if let Command::RunStep(task) = c {
                tasks.insert(task.step, *task);
            }
        }
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_two_environments_on_moto() {
    let w = World::new().await;
    let _stopper = w.moto.run_user_data();
    let mut keys = Vec::new();
    let mut commits: BTreeMap<String, (GitSha, GitSha)> = BTreeMap::new();
    for (id, infra_project, app_project) in [("acme", 1, 2), ("globex", 3, 4)] {
        w.backend
            .put_tenant(&tenant(id, infra_project, app_project), true)
            .await
            .expect("tenant");
        let infra = w.repos.commit(
            id,
            "infra",
            &[("provision/10-web.sh", "echo installing nginx\n")],
        );
        let app = w.repos.commit(
            id,
            "app",
            &[("install.sh", "grep -q . index.html\n"), ("index.html", id)],
        );
        for env in [Environment::Dev, Environment::Production] {
            let key = WorkflowKey::new(TenantId::new(id).expect("id"), env);
            w.push(&key, RepoKind::Infra, &infra).await;
            w.push(&key, RepoKind::App, &app).await;
            keys.push(key);
        }
        commits.insert(id.to_owned(), (infra, app));
    }
    let (stop, engine) = w.start();
    w.until("every workflow live", &keys, |r| {
        let (infra, app) = &commits[r.key.tenant.as_str()];
        live_at(r, infra, app)
    })
    .await;

    let c = &w.clients;
    // Security groups: two per environment, tagged; instances admit the load balancer only,
    // databases the environment's instances only.
    let groups = c
        .ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("vpc-id")
                .values(&w.infra.vpc_id)
                .build(),
        )
        .send()
        .await
        .expect("groups");
    let by_name: BTreeMap<&str, &aws_sdk_ec2::types::SecurityGroup> = groups
        .security_groups()
        .iter()
        .map(|g| (g.group_name().unwrap_or_default(), g))
        .collect();
    let mut priorities = BTreeSet::new();
    for key in &keys {
        let record = w.record(key).await;
        let res = &record.workflow().resources;
        let base = format!("{}-{}", key.tenant, key.env);
        let instances = by_name[format!("{base}-instances").as_str()];
        let database = by_name[format!("{base}-database").as_str()];
        assert_eq!(
            groups
                .security_groups()
                .iter()
                .filter(|g| g.group_name() == instances.group_name())
                .count(),
            1
        );
        for g in [instances, database] {
            let t = g.tags().iter().map(|t| (t.key(), t.value()));
            assert_eq!(tag(t.clone(), "tenant"), Some(key.tenant.as_str()));
            assert_eq!(tag(t.clone(), "env"), Some(key.env.to_string().as_str()));
            assert_eq!(tag(t, "managed-by"), Some("tenant-host-orchestrator"));
        }
        let sources =
            |g: &aws_sdk_ec2::types::SecurityGroup| -> Vec<(Option<i32>, Vec<String>, usize)> {
                g.ip_permissions()
                    .iter()
                    .map(|p| {
                        (
                            p.from_port(),
                            p.user_id_group_pairs()
                                .iter()
                                .filter_map(|u| u.group_id().map(str::to_owned))
                                .collect(),
                            p.ip_ranges().len(),
                        )
                    })
                    .collect()
            };
        assert_eq!(
            sources(instances),
            [(Some(80), vec![w.infra.alb_security_group_id.clone()], 0)]
        );
        assert_eq!(
            sources(database),
            [(
                Some(3306),
                vec![instances.group_id().expect("id").to_owned()],
                0
            )]
        );
        let network = res.network.as_ref().expect("network");
        assert_eq!(
            Some(network.instance_security_group.as_str()),
            instances.group_id()
        );

        // Routing: the target group, a rule for <env>.<domain> forwarding to it, tagged.
        let routing = res.routing.as_ref().expect("routing");
        assert_eq!(routing.host, format!("{}.{}.example", key.env, key.tenant));
        assert!(
            priorities.insert(routing.priority),
            "priority {} held twice",
            routing.priority
        );
        let tg = c
            .elb
            .describe_target_groups()
            .names(&base)
            .send()
            .await
            .expect("tg");
        assert_eq!(
            tg.target_groups()[0].target_group_arn(),
            Some(routing.target_group_arn.as_str())
        );
        let rule = c
            .elb
            .describe_rules()
            .rule_arns(&routing.rule_arn)
            .send()
            .await
            .expect("rule");
        let rule = &rule.rules()[0];
        assert_eq!(rule.priority(), Some(routing.priority.to_string().as_str()));
        assert!(
            rule.actions()
                .iter()
                .any(|a| a.target_group_arn() == Some(routing.target_group_arn.as_str()))
        );
        let hosts: Vec<String> = rule
            .conditions()
            .iter()
            .flat_map(|c| {
                c.values().iter().cloned().chain(
                    c.host_header_config()
                        .map(|h| h.values().to_vec())
                        .unwrap_or_default(),
                )
            })
            .collect();
        assert!(hosts.contains(&routing.host), "{hosts:?}");
        let rule_tags = c
            .elb
            .describe_tags()
            .resource_arns(&routing.rule_arn)
            .send()
            .await
            .expect("tags");
        let t = rule_tags.tag_descriptions()[0]
            .tags()
            .iter()
            .map(|t| (t.key(), t.value()));
        assert_eq!(tag(t, "tenant"), Some(key.tenant.as_str()));

        // Image: built from the infra commit; its builder is gone.
        let (infra_sha, app_sha) = &commits[key.tenant.as_str()];
        let image = res.image.as_ref().expect("image");
        assert_eq!(&image.infra_sha, infra_sha);
        let images = c
            .ec2
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name("name")
                    .values(format!("{base}-{infra_sha}"))
                    .build(),
            )
            .send()
            .await
            .expect("images");
        assert_eq!(
            images.images().len(),
            1,
            "one image per environment and commit"
        );
        assert_eq!(images.images()[0].image_id(), Some(image.image_id.as_str()));

        // Rollout: the group uses the launch template version with the built image and sits on
        // the environment's target group.
        let deployment = res.deployment.as_ref().expect("deployment");
        assert_eq!(deployment.group_name, format!("{base}-{}", deployment.run));
        let asg = c
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&deployment.group_name)
            .send()
            .await
            .expect("asg");
        let asg = &asg.auto_scaling_groups()[0];
        assert_eq!(
            asg.target_group_arns(),
            std::slice::from_ref(&routing.target_group_arn)
        );
        let spec = asg.launch_template().expect("launch template");
        let version = c
            .ec2
            .describe_launch_template_versions()
            .launch_template_name(spec.launch_template_name().expect("name"))
            .versions(spec.version().expect("version"))
            .send()
            .await
            .expect("versions");
        let data = version.launch_template_versions()[0]
            .launch_template_data()
            .expect("data");
        assert_eq!(data.image_id(), Some(image.image_id.as_str()));
        assert_eq!(
            data.security_group_ids(),
            std::slice::from_ref(&network.instance_security_group)
        );

        // Database: encrypted, with a managed secret, behind the database group.
        let db = res.database.as_ref().expect("database");
        let found = c
            .rds
            .describe_db_instances()
            .db_instance_identifier(&db.instance_id)
            .send()
            .await
            .expect("db");
        let found = &found.db_instances()[0];
        assert_eq!(found.storage_encrypted(), Some(true));
        assert_eq!(
            found.master_user_secret().and_then(|s| s.secret_arn()),
            Some(db.secret_arn.as_str())
        );
        assert!(db.endpoint.ends_with(":3306"), "{}", db.endpoint);
        assert_eq!(
            found
                .vpc_security_groups()
                .iter()
                .filter_map(|g| g.vpc_security_group_id())
                .collect::<Vec<_>>(),
            [network.database_security_group.as_str()]
        );
        assert_eq!(
            found
                .db_subnet_group()
                .and_then(|g| g.db_subnet_group_name()),
            Some(w.infra.db_subnet_group.as_str())
        );

        // Artifacts under the environment's prefix, keyed by commit.
        for (repo, sha) in [("infra", infra_sha), ("app", app_sha)] {
            c.s3.head_object()
                .bucket(&w.infra.artifact_bucket)
                .key(format!("{}/{}/{repo}/{sha}.tar.gz", key.tenant, key.env))
                .send()
                .await
                .expect("artifact");
        }
    }

    // Every reconciler again, as after an interruption: the same outputs, nothing new.
    stop.cancel();
    engine.await.expect("engine stops");
    let before = census(&w).await;
    assert_eq!(before["auto scaling groups"], 4, "{before:?}");
    assert_eq!(before["databases"], 4, "{before:?}");
    assert_eq!(before["rules"], 5, "four and the default: {before:?}");
    for key in &keys {
        let record = w.record(key).await;
        let domain = Domain::new(format!("{}.example", key.tenant)).expect("domain");
        for (step, task) in last_tasks(&w, key).await {
            let outcome = w
                .cloud
                .invoke(Invocation {
                    key,
                    domain: &domain,
                    task: &task,
                    config: &activities::NO_CONFIG,
                    settings: &activities::NO_SETTINGS,
                })
                .await;
            let Outcome::Done(output) = outcome else {
                panic!("{key} {step} again: {outcome:?}");
            };
            let mut res = record.workflow().resources.clone();
            let recorded = match &output {
                workflows::StepOutput::Network(n) => Some(n) == res.network.as_ref(),
                workflows::StepOutput::Image(i) => Some(i) == res.image.as_ref(),
                workflows::StepOutput::Database(d) => Some(d) == res.database.as_ref(),
                workflows::StepOutput::Routing(r) => Some(r) == res.routing.as_ref(),
                workflows::StepOutput::Rollout(d) => Some(d) == res.deployment.take().as_ref(),
                workflows::StepOutput::Source(s) => {
                    Some(s) == res.infra_source.as_ref() || Some(s) == res.app_source.as_ref()
                }
                workflows::StepOutput::Decommissioned => false,
            };
            assert!(
                recorded,
                "{key} {step}: {output:?} is not what was recorded"
            );
        }
    }
    assert_eq!(
        census(&w).await,
        before,
        "re-running the reconcilers created nothing"
    );

    // An app push: a new group replaces the old one; no image is built.
    let acme_dev = keys[0].clone();
    let (acme_infra, _) = commits["acme"].clone();
    let app2 = w.repos.commit("acme", "app", &[("index.html", "acme v2")]);
    w.push(&acme_dev, RepoKind::App, &app2).await;
    let (stop, engine) = w.start();
    w.until(
        "acme#dev live at the new app",
        std::slice::from_ref(&acme_dev),
        |r| live_at(r, &acme_infra, &app2),
    )
    .await;
    let groups = c
        .autoscaling
        .describe_auto_scaling_groups()
        .send()
        .await
        .expect("asgs");
    let acme_dev_groups: Vec<&str> = groups
        .auto_scaling_groups()
        .iter()
        .filter_map(|g| g.auto_scaling_group_name())
        .filter(|n| n.starts_with("acme-dev-"))
        .collect();
    let record = w.record(&acme_dev).await;
    let serving = record
        .workflow()
        .resources
        .deployment
        .as_ref()
        .expect("deployment");
    assert_eq!(
        acme_dev_groups,
        [serving.group_name.as_str()],
        "the new group replaced the old one"
    );
    let after = census(&w).await;
    assert_eq!(
        after["images"], before["images"],
        "an app push builds no image"
    );
    assert_eq!(
        after["launch templates"], before["launch templates"],
        "the old group's template went with it"
    );
    let run = record.workflow().run.as_ref().expect("last run");
    assert!(
        run.steps
            .iter()
            .any(|s| s.kind == StepKind::Image && s.status == workflows::StepStatus::Skipped),
        "{:?}",
        run.steps
    );

    // Production's database has a standby, a week of backups and deletion protection; dev's
    // has none of these.
    for (id, production) in [("acme-production", true), ("acme-dev", false)] {
        let found = c
            .rds
            .describe_db_instances()
            .db_instance_identifier(id)
            .send()
            .await
            .expect("database");
        let db = &found.db_instances()[0];
        assert_eq!(db.multi_az(), Some(production), "{id}");
        assert_eq!(db.deletion_protection(), Some(production), "{id}");
        assert_eq!(
            db.backup_retention_period(),
            Some(if production { 7 } else { 1 }),
            "{id}"
        );
    }

    // Decommissioning acme#production releases what it held, its images' snapshots too.
    let acme_prod = keys[1].clone();
    let image_snapshots = async |w: &World| {
        w.clients
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(Filter::builder().name("tag:tenant").values("acme").build())
            .filters(
                Filter::builder()
                    .name("tag:env")
                    .values("production")
                    .build(),
            )
            .send()
            .await
            .expect("snapshots")
            .snapshots()
            .len()
    };
    assert!(
        image_snapshots(&w).await > 0,
        "the image's snapshots are tagged like it"
    );
    let held = w.record(&acme_prod).await.workflow().resources.clone();
    enqueue(
        &*w.backend,
        &acme_prod,
        Event::Signal {
            event_id: EventId::new("decommission-acme-production").expect("id"),
            signal: Signal::Decommission,
            actor: "test".into(),
        },
        w.clock.now(),
    )
    .await
    .expect("signal");
    w.until(
        "acme#production decommissioned",
        std::slice::from_ref(&acme_prod),
        |r| r.state() == State::Decommissioned,
    )
    .await;
    stop.cancel();
    engine.await.expect("engine stops");
    let gone = census(&w).await;
    assert_eq!(
        image_snapshots(&w).await,
        0,
        "no snapshot of its images is left"
    );
    assert_eq!(
        gone["auto scaling groups"],
        after["auto scaling groups"] - 1,
        "{gone:?}"
    );
    assert_eq!(gone["databases"], after["databases"] - 1, "{gone:?}");
    assert_eq!(gone["rules"], after["rules"] - 1, "{gone:?}");
    assert_eq!(
        gone["target groups"],
        after["target groups"] - 1,
        "{gone:?}"
    );
    assert_eq!(
        gone["security groups"],
        after["security groups"] - 2,
        "{gone:?}"
    );
    assert_eq!(
        gone["launch templates"],
        after["launch templates"] - 1,
        "{gone:?}"
    );
    let snapshots = c
        .rds
        .describe_db_snapshots()
        .db_instance_identifier(&held.database.expect("db").instance_id)
        .send()
        .await
        .expect("snapshots");
    let manual: Vec<&str> = snapshots
        .db_snapshots()
        .iter()
        .filter(|s| s.snapshot_type() == Some("manual"))
        .filter_map(|s| s.db_snapshot_identifier())
        .collect();
    assert_eq!(manual.len(), 1, "a final snapshot was taken: {manual:?}");
    assert!(manual[0].starts_with("acme-production-final"), "{manual:?}");
    // Its artifacts and script reports are gone; another environment's stay.
    let listed = |prefix: &'static str| {
        c.s3.list_objects_v2()
            .bucket(&w.infra.artifact_bucket)
            .prefix(prefix)
            .send()
    };
    for prefix in ["acme/production/", "_logs/acme/production/"] {
        let out = listed(prefix).await.expect("list");
        assert!(out.contents().is_empty(), "{prefix}: {:?}", out.contents());
    }
    let dev = listed("acme/dev/").await.expect("list");
    let keys: Vec<&str> = dev.contents().iter().filter_map(|o| o.key()).collect();
    assert!(
        keys.iter().any(|k| k.starts_with("acme/dev/infra/"))
            && keys.iter().any(|k| k.starts_with("acme/dev/app/")),
        "acme#dev keeps its artifacts: {keys:?}"
    );
    assert_eq!(
        w.backend
            .allocation_of(&w.cloud.priority_pool(), &acme_prod.to_string())
            .await
            .expect("allocation"),
        None,
        "the priority was freed"
    );
}

/// Private repositories: the deploy token comes from Secrets Manager; a missing or malformed
/// secret is a terminal error that names the secret and never quotes its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_token_is_read_from_secrets_manager() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let repos = Repos {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let mut infra = activities::aws::sandbox::create(&sdk, "sbx", &repos.url_template())
        .await
        .expect("sandbox");
    infra.deploy_token_secret = Some("paas/{tenant}/deploy-token".into());
    let clients = Clients::new(&sdk);
    let cloud = AwsCloud::new(
        clients.clone(),
        infra.clone(),
        activities::aws::MemoryAllocations::default(),
        Arc::new(SystemClock),
    )
    .expect("complete");
    let sha = repos.commit("acme", "app", &[("index.html", "acme")]);
    let key = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Dev);
    let domain = Domain::new("acme.example").expect("domain");
    let task = StepTask {
        run: workflows::RunId::FIRST,
        step: StepKind::SourceApp,
        token: 1,
        attempt: 1,
        first_attempt_at: Timestamp::from_unix_millis(1_000),
        delay: Duration::ZERO,
        release: workflows::Release {
            infra: None,
            app: Some(sha.clone()),
        },
        resources: workflows::Resources::default(),
        keep: Vec::new(),
        restore_database: false,
    };
    let invoke = || {
        cloud.invoke(Invocation {
            key: &key,
            domain: &domain,
            task: &task,
            config: &activities::NO_CONFIG,
            settings: &activities::NO_SETTINGS,
        })
    };
    match invoke().await {
        Outcome::Terminal(e) => assert!(
            e.contains("paas/acme/deploy-token") && e.contains("does not exist"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    let secrets = aws_sdk_secretsmanager::Client::new(&sdk);
    secrets
        .create_secret()
        .name("paas/acme/deploy-token")
        .secret_string("hunter2-not-json")
        .send()
        .await
        .expect("secret");
    match invoke().await {
        Outcome::Terminal(e) => {
            assert!(e.contains("not JSON"), "{e}");
            assert!(
                !e.contains("hunter2"),
                "the secret's content is never quoted: {e}"
            );
        }
        other => panic!("{other:?}"),
    }
    secrets
        .put_secret_value()
        .secret_id("paas/acme/deploy-token")
        .secret_string(r#"{"username": "gitlab+deploy-token-1", "token": "s3cr3t"}"#)
        .send()
        .await
        .expect("secret value");
    match invoke().await {
        Outcome::Done(workflows::StepOutput::Source(s)) => {
            assert_eq!(s.sha, sha);
            assert_eq!(s.artifact_key, format!("acme/dev/app/{sha}.tar.gz"));
        }
        other => panic!("{other:?}"),
    }
    let object = clients
        .s3
        .get_object()
        .bucket(&infra.artifact_bucket)
        .key(format!("acme/dev/app/{sha}.tar.gz"))
        .send()
        .await
        .expect("artifact");
    let bytes = object.body.collect().await.expect("body").into_bytes();
    assert_eq!(&bytes[..2], [0x1f, 0x8b], "a gzip archive");
}

/// The builder instances named for `key`'s build of `sha`: (instance id, state), oldest first.
async fn builders(w: &World, key: &WorkflowKey, sha: &GitSha) -> Vec<(String, String)> {
    let name = format!("{}-{}-builder-{}", key.tenant, key.env, sha.short());
    let out = w
        .clients
        .ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:Name").values(&name).build())
        .send()
        .await
        .expect("instances");
    let mut found: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect();
    found.sort();
    found
}

/// An abandoned build's builder is terminated; the build, resumed, launches a new one. (moto
/// ignores client tokens; that a resumed build gets a new one is a unit test of `image`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_build_has_its_builder_terminated_and_starts_again() {
    let w = World::new().await;
    let k = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Dev);
    let domain = Domain::new("acme.example").expect("domain");
    let sha = GitSha::new("a".repeat(40)).expect("sha");
    let mut task = StepTask {
        run: workflows::RunId::FIRST,
        step: StepKind::Network,
        token: 1,
        attempt: 1,
        first_attempt_at: w.clock.now(),
        delay: Duration::ZERO,
        release: workflows::Release {
            infra: Some(sha.clone()),
            app: None,
        },
        resources: workflows::Resources::default(),
        keep: Vec::new(),
        restore_database: false,
    };
    let invoke = async |task: &StepTask| {
        w.cloud
            .invoke(Invocation {
                key: &k,
                domain: &domain,
                task,
                config: &activities::NO_CONFIG,
                settings: &activities::NO_SETTINGS,
            })
            .await
    };
    match invoke(&task).await {
        Outcome::Done(workflows::StepOutput::Network(n)) => task.resources.network = Some(n),
        other => panic!("network: {other:?}"),
    }
    // The infra artifact the source step would have stored.
    w.clients
        .s3
        .put_object()
        .bucket(&w.infra.artifact_bucket)
        .key(format!("acme/dev/infra/{sha}.tar.gz"))
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"packed"))
        .send()
        .await
        .expect("artifact");
    task.step = StepKind::Image;
    let launched = invoke(&task).await;
    assert!(matches!(launched, Outcome::Progress { .. }), "{launched:?}");
    let first = builders(&w, &k, &sha).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, "running");
    let abandon = async |task: &StepTask| {
        w.cloud
            .abandon(Invocation {
                key: &k,
                domain: &domain,
                task,
                config: &activities::NO_CONFIG,
                settings: &activities::NO_SETTINGS,
            })
            .await
    };
    abandon(&task).await.expect("abandoned");
    abandon(&task).await.expect("abandoning again is harmless");
    let gone = builders(&w, &k, &sha).await;
    assert!(
        gone.iter()
            .all(|(_, state)| state == "terminated" || state == "shutting-down"),
        "{gone:?}"
    );
    // Resumed later (a fresh start): a new builder.
    task.first_attempt_at = Timestamp::from_unix_millis(task.first_attempt_at.as_unix_millis() + 1);
    assert!(matches!(invoke(&task).await, Outcome::Progress { .. }));
    let again = builders(&w, &k, &sha).await;
    let running: Vec<_> = again.iter().filter(|(_, s)| s == "running").collect();
    assert_eq!(running.len(), 1, "{again:?}");
    assert_ne!(running[0].0, first[0].0);
}

/// A source step never fills the disk nor waits forever: a commit whose source is over
/// `source_max_mib` fails the step terminally, and a remote that stalls is given up after
/// `source_timeout_secs` (retryable: the remote may come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_the_cap_or_from_a_stalled_remote_is_given_up() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let repos = Repos {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let mut infra = activities::aws::sandbox::create(&sdk, "sbx", &repos.url_template())
        .await
        .expect("sandbox");
    infra.source_max_mib = 1;
    infra.source_timeout_secs = 2;
    let cloud = |infra: &Infrastructure| {
        AwsCloud::new(
            Clients::new(&sdk),
            infra.clone(),
            activities::aws::MemoryAllocations::default(),
            Arc::new(SystemClock),
        )
        .expect("complete")
    };
    // 3 MiB that do not compress.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: String = (0..3 * 1024 * 1024 / 16)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("{state:016x}")
        })
        .collect();
    let sha = repos.commit("acme", "app", &[("blob.txt", noise.as_str())]);
    let key = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Dev);
    let domain = Domain::new("acme.example").expect("domain");
    let task = StepTask {
        run: workflows::RunId::FIRST,
        step: StepKind::SourceApp,
        token: 1,
        attempt: 1,
        first_attempt_at: Timestamp::from_unix_millis(1_000),
        delay: Duration::ZERO,
        release: workflows::Release {
            infra: None,
            app: Some(sha),
        },
        resources: workflows::Resources::default(),
        keep: Vec::new(),
        restore_database: false,
    };
    let invocation = Invocation {
        key: &key,
        domain: &domain,
        task: &task,
        config: &activities::NO_CONFIG,
        settings: &activities::NO_SETTINGS,
    };
    match cloud(&infra).invoke(invocation).await {
        Outcome::Terminal(e) => assert!(e.contains("more than 1 MiB"), "{e}"),
        other => panic!("over the cap: {other:?}"),
    }

    // A remote that accepts the connection and never answers.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = stalled.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = stalled.accept().await {
            open.push(c);
        }
    });
    infra.source_url = format!("http://127.0.0.1:{port}/{{tenant}}-{{repo}}.git");
    let started = std::time::Instant::now();
    match cloud(&infra).invoke(invocation).await {
        Outcome::Retryable(e) => assert!(e.contains("took longer than 2 s"), "{e}"),
        other => panic!("stalled remote: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    held.abort();
}
