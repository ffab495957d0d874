//! Writes the golden fixtures of the persisted and queued shapes into
//! `state-schemas/fixtures/v<version>/<stem>/`, by driving the real state machine through a
//! staging lifecycle (push, retries, a superseded push, live, a failed image, decommission) and
//! a production run that awaits approval.
//!
//! Fixtures are golden: once committed they stand for what a writer of that version produced,
//! and the tests read them, never this program. So by default it only adds missing files and
//! reports files whose content it would change; `--force` overwrites them (only for a version
//! that has not shipped yet).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use state_schemas::{HISTORY_ENTRY, QUEUE_ENVELOPE, TENANT_RECORD, WORKFLOW_RECORD};
use workflows::{
    Body, Command, ConfigChange, ConfigValue, DatabaseOutput, DeploymentOutput, Domain, EnvConfig,
    EnvSettings, Envelope, Environment, Event, EventId, GitSha, HistoryEntry, ImageOutput, Input,
    NetworkOutput, Persisted, Push, RepoKind, RoutingOutput, Scaling, Settings, Signal,
    SourceOutput, State, StepKind, StepOutcome, StepOutput, StepReport, StepTask, Tenant, TenantId,
    TimerFired, Timestamp, Verdict, WebhookAuth, WorkflowKey, WorkflowRecord,
};

/// 2025-06-03T09:14:07Z, when the staging story starts.
const START_MS: i64 = 1_748_942_047_000;
const TENANT: &str = "acme-shop";
const DOMAIN: &str = "acme-shop.example.com";
const ACCOUNT: &str = "123456789012";
const REGION: &str = "eu-west-1";

const INFRA_1: &str = "0b0450f2b1da531b08daaa27761d1d7780952c8e";
const INFRA_2: &str = "3a4776377eb896be237f7d4b1496a2531ea6f892";
const APP_0: &str = "fc4eea71aa898f3d0885da2aead43fdd501cf3f3";
const APP_1: &str = "a678c5056aa60cc17aa1e83bebb5e13b80165909";

/// Collected fixtures: (stem, version) to file name to bytes.
#[derive(Default)]
struct Fixtures(BTreeMap<(&'static str, u32), BTreeMap<String, String>>);

impl Fixtures {
    fn add<T: Persisted>(
        &mut self,
        stem: &'static str,
        name: &str,
        value: &T,
    ) -> anyhow::Result<()> {
        // Through the codec, so the file is exactly what a writer puts on the wire.
        let wire: serde_json::Value = serde_json::from_slice(&workflows::encode(value))?;
        let mut text = serde_json::to_string_pretty(&wire)?;
        text.push('\n');
        let files = self.0.entry((stem, T::SCHEMA_VERSION)).or_default();
        if files.insert(format!("{name}.json"), text).is_some() {
            bail!("fixture {stem}/{name} is written twice");
        }
        Ok(())
    }
}

/// One workflow driven event by event, as the engine would, with a clock that only moves
/// when told to.
struct Driver {
    record: WorkflowRecord,
    now: Timestamp,
    settings: Settings,
    /// Step messages sent and not yet answered.
    tasks: Vec<StepTask>,
    /// Timers set and not yet fired.
    timers: Vec<TimerFired>,
}

impl Driver {
    fn new(key: WorkflowKey, now: Timestamp, settings: Settings) -> Self {
        Self {
            record: WorkflowRecord::new(key, now),
            now,
            settings,
            tasks: Vec::new(),
            timers: Vec::new(),
        }
    }

    fn key(&self) -> WorkflowKey {
        self.record.key.clone()
    }

    fn wait(&mut self, secs: u64) {
        self.now = self.now.saturating_add(Duration::from_secs(secs));
    }

    fn millis(&mut self, ms: u64) {
        self.now = self.now.saturating_add(Duration::from_millis(ms));
    }

    /// Applies `event` and returns the history entry the engine writes with the record.
    fn apply(&mut self, event: Event) -> HistoryEntry {
        let input = Input {
            now: self.now,
            settings: self.settings,
        };
        let applied = self.record.apply(&event, input);
        let entry = self.record.history_entry(&event, &applied);
        for command in applied.commands {
            match command {
                Command::RunStep(task) => self.tasks.push(*task),
                Command::ScheduleTimer { timer, .. } => self.timers.push(timer),
                Command::RecordSuperseded { .. } => {}
            }
        }
        // Messages the machine no longer waits for are stale; a real engine would see them
        // dropped, the driver just forgets them.
        let run = self.record.workflow().active_run().cloned();
        let live = |step: StepKind, token: u32| {
            run.as_ref()
                .and_then(|r| r.step(step))
                .is_some_and(|s| s.is_outstanding() && s.token == token)
        };
        self.tasks.retain(|t| live(t.step, t.token));
        self.timers.retain(|t| live(t.step, t.token));
        entry
    }

    fn task(&self, step: StepKind) -> anyhow::Result<StepTask> {
        self.tasks
            .iter()
            .find(|t| t.step == step)
            .cloned()
            .with_context(|| format!("no step message for {step} is outstanding"))
    }

    fn report(&mut self, step: StepKind, outcome: StepOutcome) -> anyhow::Result<HistoryEntry> {
        let task = self.task(step)?;
        self.tasks.retain(|t| t.token != task.token);
        // Roughly how long each activity takes in the real world.
        self.wait(match step {
            StepKind::Network | StepKind::Routing => 4,
            StepKind::SourceInfra | StepKind::SourceApp => 6,
            StepKind::Image => 240,
            StepKind::Database => 410,
            StepKind::Rollout => 190,
            StepKind::Decommission => 620,
        });
        Ok(self.apply(Event::Step(StepReport {
            run: task.run,
            step,
            token: task.token,
            outcome,
        })))
    }

    fn finish(&mut self, step: StepKind) -> anyhow::Result<HistoryEntry> {
        let task = self.task(step)?;
        let output = output_of(&self.key(), &task)?;
        self.report(step, StepOutcome::Done { output })
    }

    /// Finishes every outstanding step, and the steps they lead to, until nothing is
    /// outstanding; returns the last rollout message seen.
    fn finish_all(&mut self) -> anyhow::Result<Option<StepTask>> {
        let mut rollout = None;
        while let Some(task) = self.tasks.first().cloned() {
            if task.step == StepKind::Rollout {
                rollout = Some(task.clone());
            }
            self.finish(task.step)?;
        }
        Ok(rollout)
    }

    fn fire_timer(&mut self) -> anyhow::Result<(TimerFired, HistoryEntry)> {
        let timer = self.timers.pop().context("no timer is set")?;
        Ok((timer, self.apply(Event::Timer(timer))))
    }

    fn expect(&self, state: State) -> anyhow::Result<()> {
        if self.record.state() != state {
            bail!(
                "{} is {} where the story expects {state}",
                self.record.key,
                self.record.state()
            );
        }
        Ok(())
    }
}

fn sha(hex: &str) -> anyhow::Result<GitSha> {
    Ok(GitSha::new(hex)?)
}

fn id(value: &str) -> anyhow::Result<EventId> {
    Ok(EventId::new(value)?)
}

/// GitLab's `before` of a push that creates the branch.
const CREATED: &str = "0000000000000000000000000000000000000000";

fn push(
    event_id: &str,
    repo: RepoKind,
    before: &str,
    hex: &str,
    author: &str,
    message: &str,
    at: Timestamp,
) -> anyhow::Result<Event> {
    Ok(Event::Push(Push {
        event_id: id(event_id)?,
        repo,
        sha: sha(hex)?,
        before: Some(sha(before)?),
        git_ref: "refs/heads/main".into(),
        author: author.into(),
        message: message.into(),
        received_at: at,
    }))
}

fn signal(event_id: &str, signal: Signal, actor: &str) -> anyhow::Result<Event> {
    Ok(Event::Signal {
        event_id: id(event_id)?,
        signal,
        actor: actor.into(),
    })
}

/// What a successful activity would report for `task`, with realistic AWS names.
fn output_of(key: &WorkflowKey, task: &StepTask) -> anyhow::Result<StepOutput> {
    let env = key.env;
    let name = format!("{}-{}", key.tenant, env);
    let suffix: &str = match env {
        Environment::Dev => "0d3c",
        Environment::Staging => "5e1a",
        Environment::Production => "9b72",
    };
    Ok(match task.step {
        StepKind::Network => StepOutput::Network(NetworkOutput {
            instance_security_group: format!("sg-0a1b2c3d4e5f6{suffix}"),
            database_security_group: format!("sg-0f9e8d7c6b5a4{suffix}"),
        }),
        StepKind::SourceInfra | StepKind::SourceApp => {
            let (repo, commit) = if task.step == StepKind::SourceInfra {
                ("infra", task.release.infra.clone())
            } else {
                ("app", task.release.app.clone())
            };
            let commit = commit.context("a source step runs only for a pushed commit")?;
            StepOutput::Source(SourceOutput {
                artifact_key: format!("sources/{}/{repo}/{commit}.tar.gz", key.tenant),
                sha: commit,
            })
        }
        StepKind::Image => {
            let infra_sha = task
                .release
                .infra
                .clone()
                .context("an image is built only for an infra commit")?;
            StepOutput::Image(ImageOutput {
                image_id: format!("ami-0{}{}", &infra_sha.as_str()[..13], &suffix[..3]),
                infra_sha,
            })
        }
        StepKind::Database => StepOutput::Database(DatabaseOutput {
            instance_id: name.clone(),
            endpoint: format!("{name}.c8xq2fjr6w1n.{REGION}.rds.amazonaws.com:3306"),
            secret_arn: format!(
                "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rds!db-6f2b1c9e-{suffix}-4d7a-9e3f-81c2a5b4d6e0-Qx7Lm2"
            ),
        }),
        StepKind::Routing => StepOutput::Routing(RoutingOutput {
            host: format!("{env}.{DOMAIN}"),
            target_group_arn: format!(
                "arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/{name}/6d0ecf831eec{suffix}"
            ),
            rule_arn: format!(
                "arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:listener-rule/app/tenants-alb/50dc6c495c0c9188/f2f7dc8efc522ab2/9683b2d02a6c{suffix}"
            ),
            priority: match env {
                Environment::Dev => 1205,
                Environment::Staging => 1206,
                Environment::Production => 1207,
            },
            dns_zone: Some("Z04173852QJ8XAMPLE7HK".into()),
        }),
        StepKind::Rollout => StepOutput::Rollout(DeploymentOutput {
            group_name: format!("{name}-{}", task.run),
            image_id: task.resources.image.as_ref().map_or_else(
                || "ami-0c1d2e3f4a5b6c7d8".to_owned(),
                |i| i.image_id.clone(),
            ),
            run: task.run,
            release: task.release.clone(),
        }),
        StepKind::Decommission => StepOutput::Decommissioned,
    })
}

fn envelope(key: &WorkflowKey, sent_at: Timestamp, body: Body, trace: Option<&str>) -> Envelope {
    let mut envelope = Envelope::new(key.clone(), sent_at, body);
    if let Some(traceparent) = trace {
        envelope
            .trace
            .insert("traceparent".into(), traceparent.into());
    }
    envelope
}

/// The staging story: everything but approval.
fn staging(out: &mut Fixtures) -> anyhow::Result<()> {
    let key = WorkflowKey::new(TenantId::new(TENANT)?, Environment::Staging);
    let mut d = Driver::new(
        key.clone(),
        Timestamp::from_unix_millis(START_MS),
        Settings::default(),
    );
    out.add(WORKFLOW_RECORD, "unprovisioned", &d.record)?;

    // The first infra push starts run r1.
    let first = push(
        "7080c3ee-2ca6-4ea2-8a22-52886247ca21",
        RepoKind::Infra,
        CREATED,
        INFRA_1,
        "mvasquez",
        "Install PHP 8.3 and the imagick extension",
        d.now,
    )?;
    out.add(
        QUEUE_ENVELOPE,
        "push",
        &envelope(
            &key,
            d.now,
            Body::Event(first.clone()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ),
    )?;
    d.millis(340);
    let entry = d.apply(first);
    d.expect(State::Preparing)?;
    out.add(HISTORY_ENTRY, "accepted-push", &entry)?;

    d.finish(StepKind::Network)?;
    out.add(WORKFLOW_RECORD, "preparing", &d.record)?;

    // The source fetch is throttled: a retry timer.
    let entry = d.report(
        StepKind::SourceInfra,
        StepOutcome::Retryable {
            error: "GitLab API answered 429 Too Many Requests (Retry-After: 60)".into(),
            retry_in: Some(Duration::from_secs(60)),
        },
    )?;
    out.add(HISTORY_ENTRY, "accepted-step-retryable", &entry)?;

    // Two app pushes while r1 is busy: the second supersedes the first.
    d.wait(20);
    let app_0 = push(
        "1e70ab31-222a-47a2-9b4b-41482bdeec2c",
        RepoKind::App,
        CREATED,
        APP_0,
        "jdoe",
        "Add the order export page",
        d.now,
    )?;
    d.apply(app_0);
    out.add(WORKFLOW_RECORD, "preparing-retry-wait", &d.record)?;
    d.wait(25);
    let app_1 = push(
        "c91681c4-b666-419f-aeaa-dbddb14fb46a",
        RepoKind::App,
        APP_0,
        APP_1,
        "jdoe",
        "Fix the CSV header of the order export",
        d.now,
    )?;
    let entry = d.apply(app_1.clone());
    out.add(HISTORY_ENTRY, "accepted-push-supersedes", &entry)?;

    // The timer fires; the source is fetched; the image build is pending for a while.
    d.wait(15);
    let (timer, _) = d.fire_timer()?;
    out.add(
        QUEUE_ENVELOPE,
        "timer",
        &envelope(&key, d.now, Body::Event(Event::Timer(timer)), None),
    )?;
    d.finish(StepKind::SourceInfra)?;
    d.report(
        StepKind::Image,
        StepOutcome::Progress {
            recheck_after: Duration::from_secs(30),
            note: "image build i-0c4f7e2a91d3b5086 is provisioning".into(),
        },
    )?;
    let recheck = d.task(StepKind::Image)?;
    out.add(
        QUEUE_ENVELOPE,
        "step-task-recheck",
        &envelope(&key, d.now, Body::Step(Box::new(recheck)), None),
    )?;

    // Everything finishes: r1 goes live and r2 (with the app push) starts and goes live.
    d.finish_all()?;
    d.expect(State::Live)?;
    let rollout = d.record.workflow().run.as_ref().map(|r| r.id);
    if rollout.map(|r| r.get()) != Some(2) {
        bail!("the pending app push should have made run r2, found {rollout:?}");
    }
    out.add(WORKFLOW_RECORD, "live", &d.record)?;

    // A redelivered webhook of the deployed app commit is ignored; an approval is refused.
    d.wait(600);
    let again = push(
        "8d6c1b9e-ebb2-4328-9f9a-82145d964459",
        RepoKind::App,
        APP_0,
        APP_1,
        "jdoe",
        "Fix the CSV header of the order export",
        d.now,
    )?;
    out.add(HISTORY_ENTRY, "ignored-push", &d.apply(again))?;
    // A late resend of the first app push (outside the deduplication window, with a new id):
    // the branch has moved past its commit, so it is ignored rather than rolled back to.
    d.wait(60);
    let late = push(
        "0d5a9e64-7c1f-4d0b-9d43-6a3f0f6f2b51",
        RepoKind::App,
        CREATED,
        APP_0,
        "jdoe",
        "Add the order export page",
        d.now,
    )?;
    let entry = d.apply(late);
    if !matches!(&entry.verdict, Verdict::Ignored(r) if r.contains("late or replayed")) {
        bail!("a late resend should be ignored, was {:?}", entry.verdict);
    }
    out.add(HISTORY_ENTRY, "ignored-late-push", &entry)?;
    // The config vars change (`wfctl config set`): the same release is rolled out again.
    d.wait(120);
    let configure = Event::Configure(ConfigChange {
        event_id: id("config:acme-shop#staging:1748944200000:5f1c9a2e")?,
        version: 4,
        actor: "ops:kwright@wfctl".into(),
    });
    out.add(
        QUEUE_ENVELOPE,
        "configure",
        &envelope(&key, d.now, Body::Event(configure.clone()), None),
    )?;
    let entry = d.apply(configure);
    d.expect(State::Preparing)?;
    out.add(HISTORY_ENTRY, "accepted-configure", &entry)?;
    d.finish_all()?;
    d.expect(State::Live)?;
    d.wait(30);
    out.add(
        HISTORY_ENTRY,
        "refused-signal",
        &d.apply(signal(
            "766cd15d-1c06-4b89-9751-c01b8bcd0160",
            Signal::Approve,
            "ops:kwright",
        )?),
    )?;

    // A new infra commit whose image build fails.
    d.wait(3_600);
    let infra_2 = push(
        "bee97f8c-5462-4e6e-b80b-437ae2263892",
        RepoKind::Infra,
        INFRA_1,
        INFRA_2,
        "mvasquez",
        "Switch the base image to Amazon Linux 2023",
        d.now,
    )?;
    d.apply(infra_2);
    d.finish(StepKind::SourceInfra)?;
    d.report(
        StepKind::Image,
        StepOutcome::Terminal {
            error: "provisioning script scripts/10-php.sh exited with status 2: package php8.3-imagick not found".into(),
        },
    )?;
    d.expect(State::Failed)?;
    out.add(WORKFLOW_RECORD, "failed", &d.record)?;

    // The operator gives up on staging.
    d.wait(900);
    let decommission = signal(
        "ec168e97-0302-4760-9272-6cdce3fc5403",
        Signal::Decommission,
        "ops:kwright",
    )?;
    out.add(
        QUEUE_ENVELOPE,
        "signal",
        &envelope(
            &key,
            d.now,
            Body::Event(decommission.clone()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ),
    )?;
    d.millis(120);
    d.apply(decommission);
    d.expect(State::Decommissioning)?;
    let task = d.task(StepKind::Decommission)?;
    out.add(
        QUEUE_ENVELOPE,
        "step-task-decommission",
        &envelope(&key, d.now, Body::Step(Box::new(task)), None),
    )?;
    d.finish(StepKind::Decommission)?;
    d.expect(State::Decommissioned)?;
    out.add(WORKFLOW_RECORD, "decommissioned", &d.record)?;

    // Provisioned again a week later, its database restored from the final snapshot.
    d.wait(7 * 86_400);
    let again = Event::Provision {
        event_id: id("provision:acme-shop:staging:1749552000000:8c2d")?,
        from_snapshot: true,
    };
    out.add(
        QUEUE_ENVELOPE,
        "provision-from-snapshot",
        &envelope(&key, d.now, Body::Event(again.clone()), None),
    )?;
    d.apply(again);
    d.expect(State::Preparing)?;
    d.finish(StepKind::Network)?;
    let task = d.task(StepKind::Database)?;
    if !task.restore_database {
        bail!("the database task of a provision from snapshot restores");
    }
    out.add(
        QUEUE_ENVELOPE,
        "step-task-database-restore",
        &envelope(&key, d.now, Body::Step(Box::new(task)), None),
    )?;
    out.add(WORKFLOW_RECORD, "provisioned-again", &d.record)?;
    Ok(())
}

/// Production with approval: provisioned without a push, prepared, waiting for `approve`,
/// then rolled out.
fn production(out: &mut Fixtures) -> anyhow::Result<()> {
    let key = WorkflowKey::new(TenantId::new(TENANT)?, Environment::Production);
    let settings = Settings {
        production_approval: true,
        ..Settings::default()
    };
    let start = Timestamp::from_unix_millis(START_MS).saturating_add(Duration::from_secs(86_400));
    let mut d = Driver::new(key.clone(), start, settings);
    let provision = Event::Provision {
        event_id: id("provision:acme-shop:production:9848e53b")?,
        from_snapshot: false,
    };
    out.add(
        QUEUE_ENVELOPE,
        "provision",
        &envelope(&key, d.now, Body::Event(provision.clone()), None),
    )?;
    d.millis(80);
    d.apply(provision);
    d.finish_all()?;
    d.expect(State::AwaitingApproval)?;
    out.add(WORKFLOW_RECORD, "awaiting-approval", &d.record)?;
    d.wait(1_800);
    d.apply(signal(
        "5f3e2d1c-0b9a-4876-a5d4-c3b2a1908f7e",
        Signal::Approve,
        "ops:kwright",
    )?);
    d.expect(State::RollingOut)?;
    let rollout = d.task(StepKind::Rollout)?;
    out.add(
        QUEUE_ENVELOPE,
        "step-task-rollout",
        &envelope(
            &key,
            d.now,
            Body::Step(Box::new(rollout)),
            Some("00-9f1c2b3a4d5e6f708192a3b4c5d6e7f8-1a2b3c4d5e6f7081-01"),
        ),
    )?;
    out.add(WORKFLOW_RECORD, "rolling-out", &d.record)?;
    d.finish_all()?;
    d.expect(State::Live)?;

    // An app release, approved and live, then rolled back to the first one.
    d.wait(7_200);
    d.apply(push(
        "2b1f0c3e-9d8a-4e7b-86c5-4d3e2f1a0b9c",
        RepoKind::App,
        APP_0,
        APP_1,
        "jlee",
        "Checkout: retry declined cards once",
        d.now,
    )?);
    d.finish_all()?;
    d.apply(signal(
        "c0ffee00-1d2e-4f3a-8b4c-5d6e7f8a9b0c",
        Signal::Approve,
        "ops:kwright",
    )?);
    d.finish_all()?;
    d.expect(State::Live)?;
    d.wait(600);
    let rollback = signal(
        "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
        Signal::Rollback { to: None },
        "ops:kwright",
    )?;
    out.add(
        QUEUE_ENVELOPE,
        "signal-rollback",
        &envelope(&key, d.now, Body::Event(rollback.clone()), None),
    )?;
    let entry = d.apply(rollback);
    d.expect(State::AwaitingApproval)?;
    out.add(HISTORY_ENTRY, "accepted-rollback", &entry)?;
    d.apply(signal(
        "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
        Signal::Approve,
        "ops:kwright",
    )?);
    let rollout = d.task(StepKind::Rollout)?;
    out.add(
        QUEUE_ENVELOPE,
        "step-task-rollout-keeping-releases",
        &envelope(&key, d.now, Body::Step(Box::new(rollout)), None),
    )?;
    d.finish_all()?;
    d.expect(State::Live)?;
    out.add(WORKFLOW_RECORD, "rolled-back", &d.record)?;
    Ok(())
}

fn tenants(out: &mut Fixtures) -> anyhow::Result<()> {
    let created = Timestamp::from_unix_millis(START_MS - 30 * 86_400_000);
    let rotated = Timestamp::from_unix_millis(START_MS - 2 * 86_400_000);
    let acme = Tenant {
        schema_version: Tenant::SCHEMA_VERSION,
        id: TenantId::new(TENANT)?,
        domain: Domain::new(DOMAIN)?,
        infra_project: 41_823,
        app_project: 41_824,
        branches: Tenant::default_branches(),
        production_approval: true,
        webhook: WebhookAuth {
            token_sha256: "30be009a52762b7ac56109a8006545eaa4d02e13c76dac582e5e39fbdbf0eaae".into(),
            previous_token_sha256: Some(
                "18b3b99d148da836acf768ba6921666ec45a3ab7a5d122257b381d9a00a89516".into(),
            ),
            previous_valid_until: Some(rotated.saturating_add(Duration::from_secs(7 * 86_400))),
            signing_secret: Some("whsec_RkbzSCvAYS2T0UMYhgIU4aKq/Zy4pnu2".into()),
        },
        config: BTreeMap::new(),
        environments: [
            (
                Environment::Production,
                EnvSettings {
                    min_size: Some(2),
                    max_size: Some(6),
                    instance_type: Some("m7g.large".into()),
                    scaling: Some(Scaling::Cpu(60)),
                    keep_releases: Some(5),
                    ..EnvSettings::default()
                },
            ),
            (
                Environment::Dev,
                EnvSettings {
                    decommissioned: true,
                    ..EnvSettings::default()
                },
            ),
        ]
        .into_iter()
        .collect(),
        created_at: created,
        updated_at: rotated,
    };
    out.add(TENANT_RECORD, "rotated-token-signed", &acme)?;
    let northwind = Tenant {
        schema_version: Tenant::SCHEMA_VERSION,
        id: TenantId::new("northwind")?,
        domain: Domain::new("northwind-traders.io")?,
        infra_project: 39_071,
        app_project: 39_072,
        branches: [
            ("develop", Environment::Dev),
            ("release", Environment::Staging),
            ("main", Environment::Production),
        ]
        .into_iter()
        .map(|(b, e)| (b.to_owned(), e))
        .collect(),
        production_approval: false,
        webhook: WebhookAuth {
            token_sha256: "839e8c3c9623e03dd1d9f540cb7a061023df637a64ab0735e76ad1f6282d902e".into(),
            previous_token_sha256: None,
            previous_valid_until: None,
            signing_secret: None,
        },
        config: BTreeMap::new(),
        environments: BTreeMap::new(),
        created_at: created.saturating_add(Duration::from_secs(3 * 86_400 + 4_321)),
        updated_at: created.saturating_add(Duration::from_secs(3 * 86_400 + 4_321)),
    };
    out.add(TENANT_RECORD, "token-only", &northwind)?;
    // Config vars in two environments: plain values and a secret reference.
    let configured = Tenant {
        config: [
            (
                Environment::Staging,
                EnvConfig {
                    version: 3,
                    vars: [
                        ("LOG_LEVEL", ConfigValue::Value("debug".into())),
                        ("MAIL_FROM", ConfigValue::Value("Northwind <shop@northwind-traders.io>".into())),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                },
            ),
            (
                Environment::Production,
                EnvConfig {
                    version: 1,
                    vars: [(
                        "STRIPE_API_KEY".to_owned(),
                        ConfigValue::SecretArn(format!(
                            "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:northwind/stripe-Qm3xT1"
                        )),
                    )]
                    .into_iter()
                    .collect(),
                },
            ),
        ]
        .into_iter()
        .collect(),
        updated_at: created.saturating_add(Duration::from_secs(9 * 86_400)),
        ..northwind
    };
    out.add(TENANT_RECORD, "configured", &configured)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let force = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--force") => true,
        Some(other) => bail!("unknown argument {other:?}; the only one is --force"),
    };
    let mut out = Fixtures::default();
    staging(&mut out)?;
    production(&mut out)?;
    tenants(&mut out)?;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut differing: Vec<PathBuf> = Vec::new();
    for ((stem, version), files) in &out.0 {
        let dir = root.join(format!("v{version}")).join(stem);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in files {
            let path = dir.join(name);
            match fs::read_to_string(&path) {
                Ok(old) if &old == text => println!("unchanged {}", path.display()),
                Ok(_) if !force => {
                    println!("differs   {} (kept)", path.display());
                    differing.push(path);
                }
                _ => {
                    fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote     {}", path.display());
                }
            }
        }
    }
    if !differing.is_empty() {
        bail!(
            "{} golden fixture(s) differ from what the machine produces now and were kept; \
             fixtures of a shipped version must not change (pass --force only for an unshipped one)",
            differing.len()
        );
    }
    Ok(())
}
