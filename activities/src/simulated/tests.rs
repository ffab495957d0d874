//! Tests of the simulated cloud. Time comes from a manual clock; nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use workflows::testing::{Driver, InFlight, sha};
use workflows::{
    Domain, Environment, ImageOutput, Release, Resources, RunId, State, StepKind, StepOutcome,
    StepOutput, StepTask, TenantId, Timestamp, WorkflowKey,
};

use super::{ManualClock, ResourceKind, SimConfig, SimulatedCloud};
use crate::{Activities, Invocation, Outcome};

const START_MS: i64 = 1_800_000_000_000;

fn key(tenant: &str, env: Environment) -> WorkflowKey {
    WorkflowKey::new(TenantId::new(tenant).expect("tenant id"), env)
}

fn staging() -> WorkflowKey {
    key("acme", Environment::Staging)
}

fn domain_of(key: &WorkflowKey) -> Domain {
    Domain::new(format!("{}.example", key.tenant)).expect("domain")
}

fn release(infra: Option<u32>, app: Option<u32>) -> Release {
    Release {
        infra: infra.map(sha),
        app: app.map(sha),
    }
}

fn task(step: StepKind, run: u32, release: Release, resources: Resources) -> StepTask {
    StepTask {
        run: RunId::new(run).expect("run"),
        step,
        token: 1,
        attempt: 1,
        first_attempt_at: Timestamp::from_unix_millis(START_MS),
        delay: Duration::ZERO,
        release,
        resources,
        keep: Vec::new(),
        restore_database: false,
    }
}

struct Sim {
    cloud: SimulatedCloud,
    clock: ManualClock,
}

fn sim(config: SimConfig) -> Sim {
    let clock = ManualClock::new(Timestamp::from_unix_millis(START_MS));
    let cloud = SimulatedCloud::in_memory_with_clock(config, Arc::new(clock.clone()))
        .expect("in-memory cloud");
    Sim { cloud, clock }
}

async fn invoke(cloud: &SimulatedCloud, key: &WorkflowKey, task: &StepTask) -> Outcome {
    let domain = domain_of(key);
    cloud
        .invoke(Invocation {
            key,
            domain: &domain,
            task,
            config: &crate::NO_CONFIG,
            settings: &crate::NO_SETTINGS,
        })
        .await
}

/// What driving a step to the end saw.
struct Finished {
    output: StepOutput,
    elapsed: Duration,
    progresses: usize,
    first_recheck: Option<Duration>,
}

impl Sim {
    async fn invoke(&self, key: &WorkflowKey, task: &StepTask) -> Outcome {
        invoke(&self.cloud, key, task).await
    }

    /// Invokes `task` until it is done, moving the clock by each `recheck_after`.
    async fn until_done(&self, key: &WorkflowKey, task: &StepTask) -> Finished {
        let start = self.cloud.now();
        let mut progresses = 0;
        let mut first_recheck = None;
        for _ in 0..10_000 {
            match self.invoke(key, task).await {
                Outcome::Done(output) => {
                    return Finished {
                        output,
                        elapsed: self.cloud.now().since(start),
                        progresses,
                        first_recheck,
                    };
                }
                Outcome::Progress { recheck_after, .. } => {
                    assert!(recheck_after >= Duration::from_millis(1));
                    first_recheck.get_or_insert(recheck_after);
                    progresses += 1;
                    self.clock.advance(recheck_after);
                }
                other => panic!("{} failed: {other:?}", task.step),
            }
        }
        panic!("{} never finished", task.step)
    }

    /// Runs every step of a first deployment of `release` in `key`'s environment (run 1) and
    /// returns the resources they reported.
    async fn deploy(&self, key: &WorkflowKey, release: &Release, run: u32) -> Resources {
        let mut resources = Resources::default();
        for step in [
            StepKind::Network,
            StepKind::SourceInfra,
            StepKind::SourceApp,
            StepKind::Routing,
            StepKind::Image,
            StepKind::Database,
            StepKind::Rollout,
        ] {
            let t = task(step, run, release.clone(), resources.clone());
            let done = self.until_done(key, &t).await;
            record(&mut resources, step, done.output);
        }
        resources
    }
}

fn record(resources: &mut Resources, step: StepKind, output: StepOutput) {
    match (step, output) {
        (StepKind::Network, StepOutput::Network(o)) => resources.network = Some(o),
        (StepKind::SourceInfra, StepOutput::Source(o)) => resources.infra_source = Some(o),
        (StepKind::SourceApp, StepOutput::Source(o)) => resources.app_source = Some(o),
        (StepKind::Image, StepOutput::Image(o)) => resources.image = Some(o),
        (StepKind::Database, StepOutput::Database(o)) => resources.database = Some(o),
        (StepKind::Routing, StepOutput::Routing(o)) => resources.routing = Some(o),
        (StepKind::Rollout, StepOutput::Rollout(o)) => resources.deployment = Some(o),
        (StepKind::Decommission, StepOutput::Decommissioned) => *resources = Resources::default(),
        (step, output) => panic!("{step} reported {output:?}"),
    }
}

fn names(cloud: &SimulatedCloud, kind: ResourceKind) -> Vec<String> {
    cloud
        .resources()
        .expect("resources")
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.name)
        .collect()
}

#[tokio::test]
async fn each_step_is_done_after_its_latency_with_progress_before() {
    let s = sim(SimConfig::default());
    let key = staging();
    let rel = release(Some(1), Some(2));
    let mut resources = Resources::default();
    for step in [
        StepKind::Network,
        StepKind::SourceInfra,
        StepKind::SourceApp,
        StepKind::Routing,
        StepKind::Image,
        StepKind::Database,
        StepKind::Rollout,
    ] {
        let t = task(step, 1, rel.clone(), resources.clone());
        let done = s.until_done(&key, &t).await;
        assert_eq!(done.elapsed, s.cloud.config().latency(step), "{step}");
        assert!(done.progresses >= 1, "{step} reported progress first");
        let first = done.first_recheck.expect("a recheck");
        assert!(first <= Duration::from_secs(30), "{step}: {first:?}");
        record(&mut resources, step, done.output);
    }
    let db = resources.database.expect("database");
    assert_eq!(db.instance_id, "acme-staging");
    assert!(db.endpoint.ends_with(":3306"), "{}", db.endpoint);
    assert!(db.secret_arn.starts_with("arn:aws:secretsmanager:"));
    let json = serde_json::to_string(&s.cloud.resources().expect("resources")).expect("json");
    assert!(!json.to_lowercase().contains("password"), "{json}");
    let routing = resources.routing.expect("routing");
    assert_eq!(routing.host, "staging.acme.example");
    assert_eq!(routing.priority, 1);
    let image = resources.image.expect("image");
    assert!(image.image_id.starts_with("ami-"));
    assert_eq!(
        resources.infra_source.expect("infra").artifact_key,
        format!("src/{}.tar.gz", sha(1))
    );
    let deployment = resources.deployment.expect("deployment");
    assert_eq!(deployment.group_name, "acme-staging-r1");
    assert_eq!(deployment.image_id, image.image_id);
    assert_eq!(deployment.release, rel);
    assert!(
        names(&s.cloud, ResourceKind::Builder).is_empty(),
        "builder terminated"
    );
    assert_eq!(s.cloud.max_creations().expect("creations"), 1);
}

#[tokio::test]
async fn progress_is_reported_until_the_last_millisecond() {
    let s = sim(SimConfig::default());
    let t = task(
        StepKind::Database,
        1,
        release(None, None),
        Resources::default(),
    );
    let first = s.invoke(&staging(), &t).await;
    assert!(
        matches!(first, Outcome::Progress { recheck_after, .. } if recheck_after == Duration::from_secs(30)),
        "{first:?}"
    );
    s.clock
        .advance(Duration::from_secs(600) - Duration::from_millis(1));
    let almost = s.invoke(&staging(), &t).await;
    assert!(
        matches!(almost, Outcome::Progress { recheck_after, ref note } if recheck_after == Duration::from_millis(1) && note.contains("acme-staging")),
        "{almost:?}"
    );
    s.clock.advance(Duration::from_millis(1));
    assert!(matches!(
        s.invoke(&staging(), &t).await,
        Outcome::Done(StepOutput::Database(_))
    ));
}

#[tokio::test]
async fn the_time_scale_divides_latencies_and_rechecks() {
    let s = sim(SimConfig {
        time_scale: 600.0,
        ..SimConfig::default()
    });
    let t = task(
        StepKind::Database,
        1,
        release(None, None),
        Resources::default(),
    );
    let done = s.until_done(&staging(), &t).await;
    assert_eq!(done.elapsed, Duration::from_secs(1), "10 min / 600");
    assert_eq!(
        done.first_recheck,
        Some(Duration::from_millis(50)),
        "30 s / 600"
    );
    assert_eq!(done.progresses, 20);
}

#[tokio::test]
async fn zero_latency_is_done_on_the_first_invocation() {
    for config in [
        SimConfig::instant(),
        SimConfig {
            network_latency_ms: 0,
            source_latency_ms: 0,
            image_latency_ms: 0,
            database_latency_ms: 0,
            routing_latency_ms: 0,
            rollout_latency_ms: 0,
            ..SimConfig::default()
        },
    ] {
        let s = sim(config);
        let key = staging();
        let rel = release(Some(1), Some(2));
        let mut resources = Resources::default();
        for step in [
            StepKind::Network,
            StepKind::SourceInfra,
            StepKind::SourceApp,
            StepKind::Routing,
            StepKind::Image,
            StepKind::Database,
            StepKind::Rollout,
            StepKind::Decommission,
        ] {
            let t = task(step, 1, rel.clone(), resources.clone());
            match s.invoke(&key, &t).await {
                Outcome::Done(output) => record(&mut resources, step, output),
                other => panic!("{step}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn invoking_after_done_gives_the_same_output_and_creates_nothing() {
    let s = sim(SimConfig::default());
    let key = staging();
    let rel = release(Some(1), Some(2));
    let resources = s.deploy(&key, &rel, 1).await;
    let before = s.cloud.creations().expect("creations");
    assert!(before.iter().all(|c| c.count == 1), "{before:?}");
    assert_eq!(
        before.len(),
        10,
        "2 sg, 2 artifacts, builder, image, db, tg, rule, group"
    );
    for step in [
        StepKind::Network,
        StepKind::SourceInfra,
        StepKind::SourceApp,
        StepKind::Routing,
        StepKind::Image,
        StepKind::Database,
        StepKind::Rollout,
    ] {
        let t = task(step, 1, rel.clone(), resources.clone());
        let mut expected = resources.clone();
        for _ in 0..2 {
            match s.invoke(&key, &t).await {
                Outcome::Done(output) => {
                    let mut again = resources.clone();
                    record(&mut again, step, output);
                    assert_eq!(again, expected, "{step}");
                    expected = again;
                }
                other => panic!("{step}: {other:?}"),
            }
        }
    }
    assert_eq!(s.cloud.creations().expect("creations"), before);
    assert_eq!(s.cloud.max_creations().expect("max"), 1);
}

#[tokio::test]
async fn routing_priorities_are_distinct_and_stable() {
    let s = sim(SimConfig::instant());
    let keys = [
        key("acme", Environment::Staging),
        key("acme", Environment::Production),
        key("globex", Environment::Staging),
    ];
    let mut seen = Vec::new();
    for k in &keys {
        let t = task(
            StepKind::Routing,
            1,
            Release::default(),
            Resources::default(),
        );
        let Outcome::Done(StepOutput::Routing(r)) = s.invoke(k, &t).await else {
            panic!("routing of {k}");
        };
        assert_eq!(r.host, format!("{}.{}.example", k.env, k.tenant));
        seen.push(r.priority);
        // A retry finds the rule by its name and keeps the priority.
        let Outcome::Done(StepOutput::Routing(again)) = s.invoke(k, &t).await else {
            panic!("routing of {k} again");
        };
        assert_eq!(again.priority, r.priority);
        assert_eq!(again.rule_arn, r.rule_arn);
    }
    assert_eq!(seen, [1, 2, 3]);
    let held: Vec<_> = s
        .cloud
        .priorities()
        .expect("priorities")
        .into_iter()
        .map(|p| (p.priority, p.rule_name))
        .collect();
    assert_eq!(
        held,
        [
            (1, "acme-staging".to_owned()),
            (2, "acme-production".to_owned()),
            (3, "globex-staging".to_owned())
        ]
    );

    let s = sim(SimConfig {
        first_listener_priority: 10,
        ..SimConfig::instant()
    });
    let t = task(
        StepKind::Routing,
        1,
        Release::default(),
        Resources::default(),
    );
    let Outcome::Done(StepOutput::Routing(r)) = s.invoke(&staging(), &t).await else {
        panic!("routing");
    };
    assert_eq!(r.priority, 10);
}

#[tokio::test]
async fn a_second_release_replaces_the_first_group_once_healthy() {
    let s = sim(SimConfig::default());
    let key = staging();
    let first = task(
        StepKind::Rollout,
        1,
        release(None, Some(1)),
        Resources::default(),
    );
    let done = s.until_done(&key, &first).await;
    let StepOutput::Rollout(d1) = done.output else {
        panic!("rollout output");
    };
    assert_eq!(d1.group_name, "acme-staging-r1");
    assert_eq!(d1.image_id, "ami-base");

    let second = task(
        StepKind::Rollout,
        2,
        release(None, Some(2)),
        Resources::default(),
    );
    assert!(matches!(
        s.invoke(&key, &second).await,
        Outcome::Progress { .. }
    ));
    assert_eq!(
        names(&s.cloud, ResourceKind::AutoScalingGroup),
        ["acme-staging-r1", "acme-staging-r2"],
        "the old group serves until the new one is healthy"
    );
    let done = s.until_done(&key, &second).await;
    let StepOutput::Rollout(d2) = done.output else {
        panic!("rollout output");
    };
    assert_eq!(d2.group_name, "acme-staging-r2");
    assert_eq!(d2.run, RunId::new(2).expect("run"));
    assert_eq!(
        names(&s.cloud, ResourceKind::AutoScalingGroup),
        ["acme-staging-r2"]
    );
    assert_eq!(s.cloud.max_creations().expect("max"), 1);
}

#[tokio::test]
async fn an_older_rollout_never_touches_a_newer_group() {
    let s = sim(SimConfig::default());
    let key = staging();
    let r1 = task(
        StepKind::Rollout,
        1,
        release(None, Some(1)),
        Resources::default(),
    );
    let r2 = task(
        StepKind::Rollout,
        2,
        release(None, Some(2)),
        Resources::default(),
    );
    s.until_done(&key, &r1).await;
    assert!(matches!(
        s.invoke(&key, &r2).await,
        Outcome::Progress { .. }
    ));
    // A late message of run 1 while run 2's group is pending: it must not delete it.
    let late = s.invoke(&key, &r1).await;
    assert!(
        matches!(&late, Outcome::Terminal(m) if m.contains("superseded") && m.contains("acme-staging-r2")),
        "{late:?}"
    );
    s.until_done(&key, &r2).await;
    // And after run 2 replaced it: run 1's group is not created again.
    assert!(matches!(s.invoke(&key, &r1).await, Outcome::Terminal(_)));
    assert_eq!(
        names(&s.cloud, ResourceKind::AutoScalingGroup),
        ["acme-staging-r2"]
    );
    assert_eq!(s.cloud.max_creations().expect("max"), 1);
}

#[tokio::test]
async fn a_rollout_runs_the_image_it_is_given_and_refuses_unknown_ones() {
    let s = sim(SimConfig::instant());
    let key = staging();
    let rel = release(Some(5), None);
    let Outcome::Done(StepOutput::Image(image)) = s
        .invoke(
            &key,
            &task(StepKind::Image, 1, rel.clone(), Resources::default()),
        )
        .await
    else {
        panic!("image");
    };
    assert_eq!(image.infra_sha, sha(5));
    let with_image = Resources {
        image: Some(image.clone()),
        ..Resources::default()
    };
    let Outcome::Done(StepOutput::Rollout(d)) = s
        .invoke(&key, &task(StepKind::Rollout, 1, rel.clone(), with_image))
        .await
    else {
        panic!("rollout");
    };
    assert_eq!(d.image_id, image.image_id);

    let unknown = Resources {
        image: Some(ImageOutput {
            infra_sha: sha(6),
            image_id: "ami-0123456789abcdef0".into(),
        }),
        ..Resources::default()
    };
    let outcome = s
        .invoke(&key, &task(StepKind::Rollout, 2, rel, unknown))
        .await;
    assert!(
        matches!(&outcome, Outcome::Terminal(m) if m.starts_with("InvalidAMIID.NotFound")),
        "{outcome:?}"
    );
    assert_eq!(
        names(&s.cloud, ResourceKind::AutoScalingGroup),
        ["acme-staging-r1"]
    );
}

#[tokio::test]
async fn steps_without_their_commit_fail_terminally() {
    let s = sim(SimConfig::instant());
    for step in [StepKind::SourceInfra, StepKind::SourceApp, StepKind::Image] {
        let t = task(step, 1, Release::default(), Resources::default());
        let outcome = s.invoke(&staging(), &t).await;
        assert!(
            matches!(&outcome, Outcome::Terminal(m) if m.starts_with("InvalidParameterValue")),
            "{step}: {outcome:?}"
        );
    }
    assert!(s.cloud.resources().expect("resources").is_empty());
}

#[tokio::test]
async fn decommission_removes_everything_and_frees_the_priority() {
    let s = sim(SimConfig::instant());
    let acme = staging();
    let globex = key("globex", Environment::Staging);
    let rel = release(Some(1), Some(2));
    s.deploy(&acme, &rel, 1).await;
    let routing = task(
        StepKind::Routing,
        1,
        Release::default(),
        Resources::default(),
    );
    let Outcome::Done(StepOutput::Routing(g)) = s.invoke(&globex, &routing).await else {
        panic!("globex routing");
    };
    assert_eq!(g.priority, 2);
    assert!(!s.cloud.resources_of(&acme).expect("resources").is_empty());

    let decommission = task(StepKind::Decommission, 2, rel.clone(), Resources::default());
    for _ in 0..2 {
        assert_eq!(
            s.invoke(&acme, &decommission).await,
            Outcome::Done(StepOutput::Decommissioned)
        );
    }
    assert!(s.cloud.resources_of(&acme).expect("resources").is_empty());
    assert!(s.cloud.is_decommissioned(&acme).expect("decommissioned"));
    let held: Vec<_> = s
        .cloud
        .priorities()
        .expect("priorities")
        .into_iter()
        .map(|p| p.priority)
        .collect();
    assert_eq!(held, [2]);
    // Artifacts are shared by content and stay; the other tenant's rule stays.
    assert_eq!(names(&s.cloud, ResourceKind::Artifact).len(), 2);
    assert_eq!(
        names(&s.cloud, ResourceKind::ListenerRule),
        ["globex-staging"]
    );

    // The freed priority goes to the next rule.
    let initech = key("initech", Environment::Dev);
    let Outcome::Done(StepOutput::Routing(i)) = s.invoke(&initech, &routing).await else {
        panic!("initech routing");
    };
    assert_eq!(i.priority, 1);

    // A late step message of the decommissioned environment creates nothing.
    let before = s.cloud.creations().expect("creations");
    for step in [StepKind::Database, StepKind::Rollout, StepKind::Network] {
        let outcome = s
            .invoke(&acme, &task(step, 1, rel.clone(), Resources::default()))
            .await;
        assert!(
            matches!(&outcome, Outcome::Terminal(m) if m.contains("decommissioned")),
            "{step}: {outcome:?}"
        );
    }
    assert_eq!(s.cloud.creations().expect("creations"), before);
    assert!(s.cloud.resources_of(&acme).expect("resources").is_empty());
}

#[tokio::test]
async fn faults_at_probability_one_produce_their_outcome_and_change_nothing() {
    type Expect = fn(&Outcome) -> bool;
    let cases: [(SimConfig, Expect); 3] = [
        (
            SimConfig {
                throttle_probability: 1.0,
                ..SimConfig::instant()
            },
            |o| matches!(o, Outcome::Retryable(m) if m == "Throttling: Rate exceeded"),
        ),
        (
            SimConfig {
                server_error_probability: 1.0,
                ..SimConfig::instant()
            },
            |o| matches!(o, Outcome::Retryable(m) if m.starts_with("InternalError (500)")),
        ),
        (
            SimConfig {
                terminal_probability: 1.0,
                ..SimConfig::instant()
            },
            |o| matches!(o, Outcome::Terminal(m) if m.starts_with("InvalidParameterValue")),
        ),
    ];
    for (config, expected) in cases {
        let s = sim(config);
        for step in StepKind::ALL {
            let t = task(step, 1, release(Some(1), Some(2)), Resources::default());
            let outcome = s.invoke(&staging(), &t).await;
            assert!(expected(&outcome), "{step}: {outcome:?}");
        }
        assert!(s.cloud.resources().expect("resources").is_empty());
        assert!(s.cloud.creations().expect("creations").is_empty());
        assert!(!s.cloud.is_decommissioned(&staging()).expect("tombstone"));
    }
}

#[tokio::test]
async fn seeded_faults_repeat() {
    let draw = |seed| async move {
        let s = sim(SimConfig {
            throttle_probability: 0.3,
            server_error_probability: 0.2,
            seed: Some(seed),
            ..SimConfig::instant()
        });
        let t = task(
            StepKind::Network,
            1,
            Release::default(),
            Resources::default(),
        );
        let mut kinds = Vec::new();
        for _ in 0..40 {
            kinds.push(match s.invoke(&staging(), &t).await {
                Outcome::Done(_) => 'd',
                Outcome::Retryable(m) if m.starts_with("Throttling") => 't',
                Outcome::Retryable(_) => 'e',
                other => panic!("{other:?}"),
            });
        }
        kinds
    };
    let a = draw(7).await;
    assert_eq!(a, draw(7).await);
    assert!(
        a.contains(&'d') && a.contains(&'t') && a.contains(&'e'),
        "{a:?}"
    );
}

#[tokio::test]
async fn a_lost_response_is_adopted_by_the_next_invocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.db");
    let lossy = SimulatedCloud::open(
        &path,
        SimConfig {
            lost_response_probability: 1.0,
            ..SimConfig::instant()
        },
    )
    .expect("open");
    let t = task(
        StepKind::Database,
        1,
        Release::default(),
        Resources::default(),
    );
    let outcome = invoke(&lossy, &staging(), &t).await;
    assert!(
        matches!(&outcome, Outcome::Retryable(m) if m.starts_with("RequestTimeout")),
        "{outcome:?}"
    );
    assert_eq!(names(&lossy, ResourceKind::Database), ["acme-staging"]);
    let healthy = SimulatedCloud::open(&path, SimConfig::instant()).expect("open");
    assert!(matches!(
        invoke(&healthy, &staging(), &t).await,
        Outcome::Done(StepOutput::Database(_))
    ));
    assert_eq!(healthy.max_creations().expect("max"), 1);
}

#[tokio::test]
async fn state_survives_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.db");
    let clock = ManualClock::new(Timestamp::from_unix_millis(START_MS));
    let open = || {
        SimulatedCloud::open_with_clock(&path, SimConfig::default(), Arc::new(clock.clone()))
            .expect("open")
    };
    let database = task(
        StepKind::Database,
        1,
        Release::default(),
        Resources::default(),
    );
    let routing = task(
        StepKind::Routing,
        1,
        Release::default(),
        Resources::default(),
    );
    {
        let cloud = open();
        assert!(matches!(
            invoke(&cloud, &staging(), &database).await,
            Outcome::Progress { .. }
        ));
        assert!(matches!(
            invoke(&cloud, &staging(), &routing).await,
            Outcome::Progress { .. }
        ));
    }
    clock.advance(Duration::from_secs(600));
    let cloud = open();
    let Outcome::Done(StepOutput::Database(db)) = invoke(&cloud, &staging(), &database).await
    else {
        panic!("database done after reopening");
    };
    assert_eq!(db.instance_id, "acme-staging");
    let Outcome::Done(StepOutput::Routing(r)) = invoke(&cloud, &staging(), &routing).await else {
        panic!("routing done after reopening");
    };
    assert_eq!(r.priority, 1);
    let other = key("globex", Environment::Dev);
    invoke(&cloud, &other, &routing).await;
    assert_eq!(
        cloud
            .priorities()
            .expect("priorities")
            .iter()
            .map(|p| p.priority)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(cloud.max_creations().expect("max"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_invocations_create_a_resource_once() {
    let s = sim(SimConfig::instant());
    let t = task(
        StepKind::Database,
        1,
        Release::default(),
        Resources::default(),
    );
    let mut handles = Vec::new();
    for _ in 0..8 {
        let cloud = s.cloud.clone();
        let t = t.clone();
        handles.push(tokio::spawn(
            async move { invoke(&cloud, &staging(), &t).await },
        ));
    }
    let mut outputs = Vec::new();
    for h in handles {
        outputs.push(h.await.expect("task"));
    }
    assert!(matches!(outputs[0], Outcome::Done(StepOutput::Database(_))));
    assert!(outputs.iter().all(|o| *o == outputs[0]), "{outputs:?}");
    assert_eq!(s.cloud.max_creations().expect("max"), 1);

    // Eight tenants allocating priorities at once get eight different ones.
    let routing = task(
        StepKind::Routing,
        1,
        Release::default(),
        Resources::default(),
    );
    let mut handles = Vec::new();
    for i in 0..8 {
        let cloud = s.cloud.clone();
        let t = routing.clone();
        handles.push(tokio::spawn(async move {
            invoke(&cloud, &key(&format!("tenant{i}"), Environment::Dev), &t).await
        }));
    }
    let mut priorities = Vec::new();
    for h in handles {
        let Outcome::Done(StepOutput::Routing(r)) = h.await.expect("task") else {
            panic!("routing");
        };
        priorities.push(r.priority);
    }
    priorities.sort_unstable();
    assert_eq!(priorities, (1..=8).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_connections_to_one_file_create_a_resource_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.db");
    // Two clouds on one file stand for two processes sharing it.
    let clouds = [
        SimulatedCloud::open(&path, SimConfig::instant()).expect("open"),
        SimulatedCloud::open(&path, SimConfig::instant()).expect("open"),
    ];
    let mut handles = Vec::new();
    for i in 0..8 {
        let cloud = clouds[i % 2].clone();
        handles.push(tokio::spawn(async move {
            let t = task(
                StepKind::Routing,
                1,
                Release::default(),
                Resources::default(),
            );
            let a = invoke(&cloud, &staging(), &t).await;
            let b = invoke(&cloud, &key(&format!("tenant{i}"), Environment::Dev), &t).await;
            (a, b)
        }));
    }
    let mut priorities = Vec::new();
    let mut staging_outputs = Vec::new();
    for h in handles {
        let (a, b) = h.await.expect("task");
        let Outcome::Done(StepOutput::Routing(b)) = b else {
            panic!("{b:?}");
        };
        priorities.push(b.priority);
        staging_outputs.push(a);
    }
    assert!(staging_outputs.iter().all(|o| *o == staging_outputs[0]));
    priorities.push(1); // acme-staging's, which went first or somewhere between
    priorities.sort_unstable();
    priorities.dedup();
    assert_eq!(priorities.len(), 9, "{priorities:?}");
    assert_eq!(clouds[0].max_creations().expect("max"), 1);
    assert_eq!(clouds[1].priorities().expect("priorities").len(), 9);
}

#[tokio::test]
async fn a_locked_file_gives_a_retryable_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.db");
    let cloud = SimulatedCloud::open(
        &path,
        SimConfig {
            busy_timeout_ms: 20,
            ..SimConfig::instant()
        },
    )
    .expect("open");
    let blocker = rusqlite::Connection::open(&path).expect("open");
    blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let t = task(
        StepKind::Database,
        1,
        Release::default(),
        Resources::default(),
    );
    let outcome = invoke(&cloud, &staging(), &t).await;
    assert!(
        matches!(&outcome, Outcome::Retryable(m) if m.contains("locked") || m.contains("busy")),
        "{outcome:?}"
    );
    blocker.execute_batch("ROLLBACK").expect("unlock");
    assert!(cloud.creations().expect("creations").is_empty());
    assert!(matches!(
        invoke(&cloud, &staging(), &t).await,
        Outcome::Done(_)
    ));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.db");
    drop(SimulatedCloud::open(&path, SimConfig::instant()).expect("open"));
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute(
        "UPDATE sim_meta SET value = 99 WHERE key = 'schema_version'",
        [],
    )
    .expect("update");
    let err = SimulatedCloud::open(&path, SimConfig::instant()).expect_err("newer schema");
    assert!(err.to_string().contains("schema version 99"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn retry_policies_differ_per_kind_and_follow_the_time_scale() {
    let real = SimulatedCloud::in_memory(SimConfig::default()).expect("cloud");
    let network = real.retry_policy(StepKind::Network);
    let image = real.retry_policy(StepKind::Image);
    let decommission = real.retry_policy(StepKind::Decommission);
    assert!(
        image.max_attempts > network.max_attempts,
        "image polls longer"
    );
    assert!(decommission.max_attempts > network.max_attempts);
    assert_eq!(network.initial_delay, Duration::from_secs(1));
    for step in StepKind::ALL {
        let p = real.retry_policy(step);
        assert!(p.full_jitter);
        let within = p.max_elapsed.expect("bounded");
        assert!(within > real.config().latency(step) * 2, "{step}");
        assert!(p.next_delay(1, Duration::ZERO, 0.5).is_some());
    }
    let fast = SimulatedCloud::in_memory(SimConfig {
        time_scale: 600.0,
        ..SimConfig::default()
    })
    .expect("cloud");
    let p = fast.retry_policy(StepKind::Network);
    assert_eq!(
        p.initial_delay,
        Duration::from_millis(2),
        "1 s / 600, rounded up"
    );
    assert_eq!(p.max_delay, Duration::from_millis(50));
    assert_eq!(
        p.max_elapsed, network.max_elapsed,
        "elapsed bound not scaled"
    );
    let instant = SimulatedCloud::in_memory(SimConfig::instant()).expect("cloud");
    assert_eq!(
        instant.retry_policy(StepKind::Database).initial_delay,
        Duration::from_millis(1)
    );
}

#[test]
fn the_config_loads_from_toml_with_defaults_and_is_checked() {
    #[derive(serde::Deserialize)]
    struct File {
        simulated: SimConfig,
    }
    let file: File = toml::from_str(
        "[simulated]\ntime_scale = 600.0\nthrottle_probability = 0.1\nseed = 7\nbase_image_id = \"ami-0abc\"\n",
    )
    .expect("toml");
    let c = file.simulated;
    assert_eq!(c.time_scale, 600.0);
    assert_eq!(c.throttle_probability, 0.1);
    assert_eq!(c.seed, Some(7));
    assert_eq!(c.base_image_id, "ami-0abc");
    assert_eq!(c.database_latency_ms, 600_000);
    assert_eq!(c.first_listener_priority, 1);
    assert!(c.validate().is_ok());
    let empty: SimConfig = toml::from_str("").expect("empty");
    assert_eq!(empty, SimConfig::default());
    assert!(toml::from_str::<SimConfig>("image_latency = 5").is_err());

    for bad in [
        SimConfig {
            throttle_probability: 1.5,
            ..SimConfig::default()
        },
        SimConfig {
            throttle_probability: 0.6,
            terminal_probability: 0.6,
            ..SimConfig::default()
        },
        SimConfig {
            time_scale: -1.0,
            ..SimConfig::default()
        },
        SimConfig {
            time_scale: f64::NAN,
            ..SimConfig::default()
        },
        SimConfig {
            first_listener_priority: 0,
            ..SimConfig::default()
        },
        SimConfig {
            base_image_id: String::new(),
            ..SimConfig::default()
        },
    ] {
        let err = SimulatedCloud::in_memory(bad).expect_err("invalid config");
        assert!(
            err.to_string()
                .starts_with("invalid simulated cloud configuration"),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
}

/// Plays the engine around one workflow record: every step message is run on the simulated
/// cloud, with faults, until the workflow is live; then a second infra push, then a
/// decommission.
#[tokio::test]
async fn a_workflow_driven_by_the_machine_goes_live_and_is_decommissioned() {
    let s = sim(SimConfig {
        time_scale: 600.0,
        throttle_probability: 0.1,
        server_error_probability: 0.05,
        lost_response_probability: 0.05,
        seed: Some(11),
        ..SimConfig::default()
    });
    let mut driver = Driver::new(Environment::Staging);
    let key = driver.record.key.clone();
    let domain = domain_of(&key);

    async fn run_until_idle(s: &Sim, driver: &mut Driver, key: &WorkflowKey, domain: &Domain) {
        for _ in 0..10_000 {
            if driver.in_flight.is_empty() {
                return;
            }
            let message = driver.in_flight.remove(0);
            let outcome = match &message {
                InFlight::Step(task) => {
                    let outcome = s
                        .cloud
                        .invoke(Invocation {
                            key,
                            domain,
                            task,
                            config: &crate::NO_CONFIG,
                            settings: &crate::NO_SETTINGS,
                        })
                        .await;
                    match outcome {
                        Outcome::Done(output) => StepOutcome::Done { output },
                        Outcome::Progress {
                            recheck_after,
                            note,
                        } => {
                            s.clock.advance(recheck_after);
                            StepOutcome::Progress {
                                recheck_after,
                                note,
                            }
                        }
                        Outcome::Retryable(error) => {
                            let retry_in = s.cloud.retry_policy(task.step).next_delay(
                                task.attempt,
                                Duration::ZERO,
                                0.5,
                            );
                            StepOutcome::Retryable { error, retry_in }
                        }
                        Outcome::Terminal(error) => StepOutcome::Terminal { error },
                    }
                }
                InFlight::Timer(_) => StepOutcome::Terminal {
                    error: "unused for timers".into(),
                },
            };
            let event = Driver::delivery(&message, |_| outcome);
            driver.apply(&event);
        }
        panic!("the workflow never ran out of messages");
    }

    driver.push(workflows::RepoKind::Infra, 1);
    driver.push(workflows::RepoKind::App, 2);
    run_until_idle(&s, &mut driver, &key, &domain).await;
    assert_eq!(
        driver.state(),
        State::Live,
        "{:#?}",
        driver.record.workflow()
    );
    driver.push(workflows::RepoKind::Infra, 3);
    run_until_idle(&s, &mut driver, &key, &domain).await;
    assert_eq!(driver.state(), State::Live);

    let retries = driver
        .log
        .iter()
        .filter(|c| matches!(c, workflows::Command::ScheduleTimer { .. }))
        .count();
    assert!(retries > 0, "faults were injected and retried");
    assert_eq!(s.cloud.max_creations().expect("max"), 1);
    let groups = names(&s.cloud, ResourceKind::AutoScalingGroup);
    assert_eq!(groups.len(), 1, "{groups:?}");
    let images = names(&s.cloud, ResourceKind::Image);
    assert_eq!(
        images,
        [
            format!("acme-staging-{}", sha(1)),
            format!("acme-staging-{}", sha(3))
        ]
    );
    assert!(names(&s.cloud, ResourceKind::Builder).is_empty());
    let deployed = driver
        .record
        .workflow()
        .resources
        .deployment
        .clone()
        .expect("deployed");
    assert_eq!(groups[0], deployed.group_name);

    driver.signal(workflows::Signal::Decommission);
    run_until_idle(&s, &mut driver, &key, &domain).await;
    assert_eq!(driver.state(), State::Decommissioned);
    assert!(s.cloud.resources_of(&key).expect("resources").is_empty());
    assert!(s.cloud.priorities().expect("priorities").is_empty());
}

#[tokio::test]
async fn a_closure_is_a_clock() {
    let cloud = SimulatedCloud::in_memory_with_clock(
        SimConfig::default(),
        Arc::new(|| Timestamp::from_unix_millis(START_MS)),
    )
    .expect("cloud");
    assert_eq!(cloud.now(), Timestamp::from_unix_millis(START_MS));
}

#[tokio::test]
async fn peaks_count_the_resources_that_existed_at_once() {
    let s = sim(SimConfig::default());
    let rel = release(Some(1), Some(2));
    // Three tenants: environments of one tenant would copy one build's image.
    let keys = [
        key("acme", Environment::Dev),
        key("initech", Environment::Staging),
        key("globex", Environment::Dev),
    ];
    let mut images = Vec::new();
    for k in &keys {
        let mut resources = Resources::default();
        let source = task(StepKind::SourceInfra, 1, rel.clone(), resources.clone());
        record(
            &mut resources,
            StepKind::SourceInfra,
            s.until_done(k, &source).await.output,
        );
        images.push(task(StepKind::Image, 1, rel.clone(), resources));
    }
    // Two builds at once, then the third alone.
    assert!(matches!(
        s.invoke(&keys[0], &images[0]).await,
        Outcome::Progress { .. }
    ));
    assert!(matches!(
        s.invoke(&keys[1], &images[1]).await,
        Outcome::Progress { .. }
    ));
    s.until_done(&keys[0], &images[0]).await;
    s.until_done(&keys[1], &images[1]).await;
    s.until_done(&keys[2], &images[2]).await;
    let peaks = s.cloud.peaks().expect("peaks");
    assert!(peaks.contains(&(ResourceKind::Builder, 2)), "{peaks:?}");
    assert!(names(&s.cloud, ResourceKind::Builder).is_empty());
}

#[tokio::test]
async fn an_abandoned_build_loses_its_builder_and_starts_again() {
    let s = sim(SimConfig::default());
    let k = staging();
    let rel = release(Some(1), Some(2));
    let mut resources = Resources::default();
    let source = task(StepKind::SourceInfra, 1, rel.clone(), resources.clone());
    record(
        &mut resources,
        StepKind::SourceInfra,
        s.until_done(&k, &source).await.output,
    );
    let image = task(StepKind::Image, 1, rel, resources);
    assert!(matches!(
        s.invoke(&k, &image).await,
        Outcome::Progress { .. }
    ));
    assert_eq!(names(&s.cloud, ResourceKind::Builder).len(), 1);
    let domain = domain_of(&k);
    let abandon = || {
        s.cloud.abandon(Invocation {
            key: &k,
            domain: &domain,
            task: &image,
            config: &crate::NO_CONFIG,
            settings: &crate::NO_SETTINGS,
        })
    };
    abandon().await.expect("abandoned");
    assert!(names(&s.cloud, ResourceKind::Builder).is_empty());
    abandon().await.expect("abandoning again changes nothing");
    // Resumed, the build launches a builder of the same name again: not a duplicate.
    s.until_done(&k, &image).await;
    let builder = s
        .cloud
        .creations()
        .expect("creations")
        .into_iter()
        .find(|c| c.kind == ResourceKind::Builder)
        .expect("builder");
    assert_eq!((builder.count, builder.abandoned), (2, 1));
    assert_eq!(builder.duplicates(), 0);
    assert_eq!(s.cloud.max_creations().expect("max"), 1);
    assert!(names(&s.cloud, ResourceKind::Builder).is_empty());
}

#[tokio::test]
async fn abandoning_fails_retryably_under_faults_and_ignores_other_steps() {
    let s = sim(SimConfig {
        throttle_probability: 1.0,
        ..SimConfig::instant()
    });
    let k = staging();
    let domain = domain_of(&k);
    for step in StepKind::ALL {
        let t = task(step, 1, release(Some(1), Some(2)), Resources::default());
        let result = s
            .cloud
            .abandon(Invocation {
                key: &k,
                domain: &domain,
                task: &t,
                config: &crate::NO_CONFIG,
                settings: &crate::NO_SETTINGS,
            })
            .await;
        assert_eq!(
            result.is_err(),
            step == StepKind::Image,
            "{step}: {result:?}"
        );
    }
}

#[tokio::test]
async fn a_group_records_the_environment_file_its_instances_get() {
    let s = sim(SimConfig::instant());
    let key = staging();
    let resources = Resources {
        database: Some(workflows::DatabaseOutput {
            instance_id: "acme-staging".into(),
            endpoint: "db.sim:3306".into(),
            secret_arn: "arn:sim:secretsmanager:acme-staging".into(),
        }),
        ..Resources::default()
    };
    let rollout = task(StepKind::Rollout, 1, release(None, Some(1)), resources);
    s.until_done(&key, &rollout).await;
    let group = s
        .cloud
        .resources_of(&key)
        .expect("resources")
        .into_iter()
        .find(|r| r.kind == ResourceKind::AutoScalingGroup)
        .expect("the group");
    let env_file = group.attributes["env_file"].as_str().expect("env_file");
    for line in [
        "TENANT_ENV='staging'",
        "DB_HOST='db.sim'",
        "DB_SECRET_ARN='arn:sim:secretsmanager:acme-staging'",
    ] {
        assert!(env_file.lines().any(|l| l == line), "{line} in {env_file}");
    }
}

/// Invokes `task` until it is no longer progressing, moving the clock; returns that outcome
/// and the (simulated) time it took.
async fn until_settled(s: &Sim, key: &WorkflowKey, task: &StepTask) -> (Outcome, Duration) {
    let start = s.cloud.now();
    loop {
        match s.invoke(key, task).await {
            Outcome::Progress { recheck_after, .. } => s.clock.advance(recheck_after),
            other => return (other, s.cloud.now().since(start)),
        }
    }
}

#[tokio::test]
async fn failing_provisioning_scripts_fail_the_build_when_the_builder_powers_off() {
    let s = sim(SimConfig {
        script_failure_probability: 1.0,
        ..SimConfig::default()
    });
    let key = staging();
    let build = task(
        StepKind::Image,
        1,
        release(Some(1), None),
        Resources::default(),
    );
    let (outcome, took) = until_settled(&s, &key, &build).await;
    let Outcome::Terminal(message) = outcome else {
        panic!("a failed build: {outcome:?}");
    };
    assert!(
        message.starts_with("provision/10-base.sh exited 1 on builder i-"),
        "{message}"
    );
    assert!(message.contains("\n  simulated failure of provision/10-base.sh"));
    assert_eq!(
        took,
        SimConfig::default().latency(StepKind::Image) / 2,
        "noticed when the builder powers off, not at a timeout"
    );
    assert!(names(&s.cloud, ResourceKind::Builder).is_empty());
    assert!(names(&s.cloud, ResourceKind::Image).is_empty());
}

#[tokio::test]
async fn a_failing_install_rolls_back_early_and_the_old_group_keeps_serving() {
    // Two clouds on one file and one clock: the first release installs, the second does not.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sim.db");
    let clock = ManualClock::new(Timestamp::from_unix_millis(START_MS));
    let open = |install_failure_probability| Sim {
        cloud: SimulatedCloud::open_with_clock(
            &file,
            SimConfig {
                install_failure_probability,
                ..SimConfig::default()
            },
            Arc::new(clock.clone()),
        )
        .expect("cloud"),
        clock: clock.clone(),
    };
    let key = staging();
    let first = task(
        StepKind::Rollout,
        1,
        release(None, Some(1)),
        Resources::default(),
    );
    open(0.0).until_done(&key, &first).await;
    let failing = open(1.0);
    let second = task(
        StepKind::Rollout,
        2,
        release(None, Some(2)),
        Resources::default(),
    );
    let (outcome, took) = until_settled(&failing, &key, &second).await;
    let Outcome::Terminal(message) = outcome else {
        panic!("a failed rollout: {outcome:?}");
    };
    assert!(
        message.starts_with("install.sh exited 1 on an instance of group acme-staging-r2"),
        "{message}"
    );
    assert!(
        message.ends_with(
            "group acme-staging-r2 rolled back (deleted); acme-staging-r1 keeps serving"
        ),
        "{message}"
    );
    assert_eq!(took, SimConfig::default().latency(StepKind::Rollout) / 4);
    assert_eq!(
        names(&failing.cloud, ResourceKind::AutoScalingGroup),
        ["acme-staging-r1"]
    );
}

#[tokio::test]
async fn an_image_built_for_one_environment_is_copied_by_another() {
    let s = sim(SimConfig::default());
    let build = task(
        StepKind::Image,
        1,
        release(Some(1), None),
        Resources::default(),
    );
    let built = s.until_done(&key("acme", Environment::Dev), &build).await;
    let promoted = s
        .until_done(&key("acme", Environment::Production), &build)
        .await;
    assert_eq!(
        names(&s.cloud, ResourceKind::Image),
        [
            format!("acme-dev-{}", sha(1)),
            format!("acme-production-{}", sha(1))
        ]
    );
    assert_eq!(
        s.cloud
            .creations()
            .expect("creations")
            .iter()
            .filter(|c| c.kind == ResourceKind::Builder)
            .count(),
        1,
        "one build for both"
    );
    assert_eq!(
        promoted.elapsed,
        SimConfig::default().latency(StepKind::Image) / 4,
        "a copy, not a build ({:?})",
        built.elapsed
    );
    // Another tenant's image of the same commit is never copied.
    s.until_done(&key("globex", Environment::Production), &build)
        .await;
    assert_eq!(
        s.cloud
            .creations()
            .expect("creations")
            .iter()
            .filter(|c| c.kind == ResourceKind::Builder)
            .count(),
        2
    );
}

#[tokio::test]
async fn a_build_under_way_in_another_environment_is_waited_for_then_copied() {
    let s = sim(SimConfig::default());
    let build = task(
        StepKind::Image,
        1,
        release(Some(1), None),
        Resources::default(),
    );
    let (dev, production) = (
        key("acme", Environment::Dev),
        key("acme", Environment::Production),
    );
    assert!(matches!(
        s.invoke(&dev, &build).await,
        Outcome::Progress { .. }
    ));
    match s.invoke(&production, &build).await {
        Outcome::Progress { note, .. } => {
            assert!(note.starts_with("waiting for acme-dev-builder-"), "{note}")
        }
        other => panic!("{other:?}"),
    }
    s.until_done(&dev, &build).await;
    s.until_done(&production, &build).await;
    let builders = s
        .cloud
        .creations()
        .expect("creations")
        .iter()
        .filter(|c| c.kind == ResourceKind::Builder)
        .count();
    assert_eq!(builders, 1, "built once for both");
}
