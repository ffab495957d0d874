//! The waiting and error paths moto cannot show (it has no pending states, no unhealthy
//! targets, and accepts duplicates AWS refuses), on clients answered by `aws-smithy-mocks`.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::operation::create_auto_scaling_group::CreateAutoScalingGroupError;
use aws_sdk_autoscaling::operation::delete_auto_scaling_group::DeleteAutoScalingGroupOutput;
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput;
use aws_sdk_autoscaling::types::{
    AutoScalingGroup, Instance as AsgInstance, TagDescription as AsgTagDescription,
};
use aws_sdk_ec2::operation::create_image::CreateImageError;
use aws_sdk_ec2::operation::create_launch_template::CreateLaunchTemplateOutput;
use aws_sdk_ec2::operation::delete_launch_template::DeleteLaunchTemplateOutput;
use aws_sdk_ec2::operation::describe_images::DescribeImagesOutput;
use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
use aws_sdk_ec2::operation::describe_launch_templates::DescribeLaunchTemplatesOutput;
use aws_sdk_ec2::operation::describe_security_groups::DescribeSecurityGroupsError;
use aws_sdk_ec2::operation::terminate_instances::TerminateInstancesOutput;
use aws_sdk_ec2::types::{
    Image, ImageState, Instance, InstanceState, InstanceStateName, Reservation,
};
use aws_sdk_elasticloadbalancingv2::operation::create_rule::{CreateRuleError, CreateRuleOutput};
use aws_sdk_elasticloadbalancingv2::operation::describe_rules::DescribeRulesOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_tags::DescribeTagsOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_target_groups::DescribeTargetGroupsOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_target_health::DescribeTargetHealthOutput;
use aws_sdk_elasticloadbalancingv2::types::{
    Rule, Tag as ElbTag, TagDescription, TargetDescription, TargetGroup, TargetHealth,
    TargetHealthDescription, TargetHealthStateEnum,
};
use aws_sdk_rds::operation::describe_db_instances::DescribeDbInstancesOutput;
use aws_sdk_rds::types::{DbInstance, Endpoint, MasterUserSecret};
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use aws_smithy_types::error::ErrorMetadata;
use workflows::{
    DeploymentOutput, Domain, Environment, GitSha, NetworkOutput, Release, Resources,
    RoutingOutput, RunId, StepKind, StepOutput, StepTask, TenantId, Timestamp, WorkflowKey,
};

use super::{Allocations, AwsCloud, Clients, Infrastructure, MemoryAllocations};
use crate::clock::ManualClock;
use crate::{Activities, Invocation, Outcome};

const NOW_MS: i64 = 1_800_000_000_000;

fn infra() -> Infrastructure {
    Infrastructure {
        vpc_id: "vpc-1".into(),
        subnet_ids: vec!["subnet-a".into(), "subnet-b".into()],
        listener_arn: "arn:listener".into(),
        alb_security_group_id: "sg-alb".into(),
        artifact_bucket: "artifacts".into(),
        base_image_id: "ami-base".into(),
        db_subnet_group: "dbs".into(),
        source_url: "file:///x/{tenant}-{repo}.git".into(),
        ..Infrastructure::default()
    }
}

/// A client of a service the test does not call.
fn idle<C>(make: impl FnOnce(&aws_config::SdkConfig) -> C) -> C {
    make(
        &aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build(),
    )
}

#[derive(Default)]
struct Mocks {
    ec2: Option<aws_sdk_ec2::Client>,
    autoscaling: Option<aws_sdk_autoscaling::Client>,
    elb: Option<aws_sdk_elasticloadbalancingv2::Client>,
    rds: Option<aws_sdk_rds::Client>,
    iam: Option<aws_sdk_iam::Client>,
    s3: Option<aws_sdk_s3::Client>,
}

/// A Route 53 client that knows no hosted zone: no alias record is written.
fn no_zones() -> aws_sdk_route53::Client {
    let zones = mock!(aws_sdk_route53::Client::list_hosted_zones_by_name).then_output(|| {
        aws_sdk_route53::operation::list_hosted_zones_by_name::ListHostedZonesByNameOutput::builder(
        )
        .set_hosted_zones(Some(Vec::new()))
        .is_truncated(false)
        .max_items(10)
        .build()
        .expect("output")
    });
    mock_client!(aws_sdk_route53, RuleMode::MatchAny, [&zones])
}

/// An S3 client whose every listing holds reports with these keys.
fn reports(keys: &'static [&'static str]) -> aws_sdk_s3::Client {
    let list = mock!(aws_sdk_s3::Client::list_objects_v2).then_output(|| {
        aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output::builder()
            .set_contents(Some(
                keys.iter()
                    .map(|k| aws_sdk_s3::types::Object::builder().key(*k).build())
                    .collect(),
            ))
            .build()
    });
    mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&list])
}

fn cloud(m: Mocks, clock: &ManualClock) -> AwsCloud {
    cloud_with(m, clock, MemoryAllocations::default())
}

/// [`cloud`] holding `allocations` (a clone shares them with the caller).
fn cloud_with(m: Mocks, clock: &ManualClock, allocations: MemoryAllocations) -> AwsCloud {
    let clients = Clients {
        ec2: m.ec2.unwrap_or_else(|| idle(aws_sdk_ec2::Client::new)),
        autoscaling: m
            .autoscaling
            .unwrap_or_else(|| idle(aws_sdk_autoscaling::Client::new)),
        elb: m
            .elb
            .unwrap_or_else(|| idle(aws_sdk_elasticloadbalancingv2::Client::new)),
        rds: m.rds.unwrap_or_else(|| idle(aws_sdk_rds::Client::new)),
        s3: m.s3.unwrap_or_else(|| idle(aws_sdk_s3::Client::new)),
        route53: no_zones(),
        secrets: idle(aws_sdk_secretsmanager::Client::new),
        iam: m.iam.unwrap_or_else(|| idle(aws_sdk_iam::Client::new)),
    };
    AwsCloud::new(clients, infra(), allocations, Arc::new(clock.clone())).expect("complete")
}

fn key() -> WorkflowKey {
    WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Staging)
}

fn domain() -> Domain {
    Domain::new("acme.example").expect("domain")
}

fn sha() -> GitSha {
    GitSha::new("1".repeat(40)).expect("sha")
}

fn task(step: StepKind, run: u32) -> StepTask {
    let mut resources = Resources {
        network: Some(NetworkOutput {
            instance_security_group: "sg-i".into(),
            database_security_group: "sg-d".into(),
        }),
        routing: Some(RoutingOutput {
            host: "staging.acme.example".into(),
            target_group_arn: "arn:tg".into(),
            rule_arn: "arn:rule".into(),
            priority: 7,
            dns_zone: None,
        }),
        ..Resources::default()
    };
    resources.deployment = Some(DeploymentOutput {
        group_name: "acme-staging-r1".into(),
        image_id: "ami-base".into(),
        run: RunId::FIRST,
        release: Release::default(),
    });
    StepTask {
        run: RunId::new(run).expect("run"),
        step,
        token: 1,
        attempt: 1,
        first_attempt_at: Timestamp::from_unix_millis(NOW_MS),
        delay: Duration::ZERO,
        release: Release {
            infra: None,
            app: None,
        },
        resources,
        keep: Vec::new(),
        restore_database: false,
    }
}

async fn invoke(c: &AwsCloud, task: &StepTask) -> Outcome {
    c.invoke(Invocation {
        key: &key(),
        domain: &domain(),
        task,
        config: &crate::NO_CONFIG,
        settings: &crate::NO_SETTINGS,
    })
    .await
}

/// The metadata of a service error with `code`.
fn ec2_error(code: &str) -> ErrorMetadata {
    ErrorMetadata::builder()
        .code(code)
        .message("refused by the test")
        .build()
}

/// The tags of the environment of [`key`], as the orchestrator puts them.
fn ours() -> [(&'static str, &'static str); 3] {
    [
        ("managed-by", super::MANAGED_BY),
        ("tenant", "acme"),
        ("env", "staging"),
    ]
}

fn ec2_ours() -> Vec<aws_sdk_ec2::types::Tag> {
    ours()
        .into_iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

fn builder(state: InstanceStateName) -> DescribeInstancesOutput {
    DescribeInstancesOutput::builder()
        .reservations(
            Reservation::builder()
                .instances(
                    Instance::builder()
                        .instance_id("i-builder")
                        .state(InstanceState::builder().name(state).build())
                        .set_tags(Some(ec2_ours()))
                        .build(),
                )
                .build(),
        )
        .build()
}

fn image(state: ImageState) -> DescribeImagesOutput {
    DescribeImagesOutput::builder()
        .images(
            Image::builder()
                .image_id("ami-new")
                .name(format!("acme-staging-{}", sha()))
                .state(state)
                .set_tags(Some(ec2_ours()))
                .build(),
        )
        .build()
}

#[tokio::test]
async fn an_image_is_waited_for_until_available_then_its_builder_is_terminated() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let instances = mock!(aws_sdk_ec2::Client::describe_instances)
        .then_output(|| builder(InstanceStateName::Stopped));
    let images = mock!(aws_sdk_ec2::Client::describe_images)
        .sequence()
        .output(|| image(ImageState::Pending))
        .output(|| image(ImageState::Available))
        .build();
    let terminate = mock!(aws_sdk_ec2::Client::terminate_instances)
        .match_requests(|r| r.instance_ids() == ["i-builder".to_owned()])
        .then_output(|| TerminateInstancesOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&instances, &images, &terminate]
    );
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            ..Mocks::default()
        },
        &clock,
    );
    let mut t = task(StepKind::Image, 2);
    t.release.infra = Some(sha());
    match invoke(&c, &t).await {
        Outcome::Progress {
            note,
            recheck_after,
        } => {
            assert!(note.contains("pending"), "{note}");
            assert_eq!(recheck_after, Duration::from_secs(15));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        terminate.num_calls(),
        0,
        "the builder stays while the image is pending"
    );
    match invoke(&c, &t).await {
        Outcome::Done(StepOutput::Image(i)) => {
            assert_eq!(i.image_id, "ami-new");
            assert_eq!(i.infra_sha, sha());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(terminate.num_calls(), 1);
}

#[tokio::test]
async fn a_duplicate_image_name_is_adopted_and_a_failed_image_is_built_again() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let instances = mock!(aws_sdk_ec2::Client::describe_instances)
        .then_output(|| builder(InstanceStateName::Stopped));
    let images = mock!(aws_sdk_ec2::Client::describe_images)
        .sequence()
        .output(|| DescribeImagesOutput::builder().build())
        .output(|| image(ImageState::Failed))
        .build();
    let create = mock!(aws_sdk_ec2::Client::create_image)
        .then_error(|| CreateImageError::generic(ec2_error("InvalidAMIName.Duplicate")));
    let deregister = mock!(aws_sdk_ec2::Client::deregister_image).then_output(|| {
        aws_sdk_ec2::operation::deregister_image::DeregisterImageOutput::builder().build()
    });
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&instances, &images, &create, &deregister]
    );
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            ..Mocks::default()
        },
        &clock,
    );
    let mut t = task(StepKind::Image, 2);
    t.release.infra = Some(sha());
    assert!(
        matches!(invoke(&c, &t).await, Outcome::Progress { .. }),
        "another attempt's image is adopted, not an error"
    );
    assert_eq!(create.num_calls(), 1);
    match invoke(&c, &t).await {
        Outcome::Retryable(e) => assert!(e.contains("failed") && e.contains("deregistered"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(deregister.num_calls(), 1);
}

#[tokio::test]
async fn a_builder_that_never_powers_off_fails_the_build() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let instances = mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| {
        DescribeInstancesOutput::builder()
            .reservations(
                Reservation::builder()
                    .instances(
                        Instance::builder()
                            .instance_id("i-builder")
                            .state(
                                InstanceState::builder()
                                    .name(InstanceStateName::Running)
                                    .build(),
                            )
                            .launch_time(aws_smithy_types::DateTime::from_millis(NOW_MS))
                            .set_tags(Some(ec2_ours()))
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    let images = mock!(aws_sdk_ec2::Client::describe_images)
        .then_output(|| DescribeImagesOutput::builder().build());
    let terminate = mock!(aws_sdk_ec2::Client::terminate_instances)
        .then_output(|| TerminateInstancesOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&instances, &images, &terminate]
    );
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            ..Mocks::default()
        },
        &clock,
    );
    let mut t = task(StepKind::Image, 2);
    t.release.infra = Some(sha());
    assert!(matches!(invoke(&c, &t).await, Outcome::Progress { .. }));
    clock.advance(Duration::from_secs(3601));
    match invoke(&c, &t).await {
        Outcome::Terminal(e) => assert!(e.contains("did not power off"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(terminate.num_calls(), 1);
}

fn db(status: &str) -> DescribeDbInstancesOutput {
    DescribeDbInstancesOutput::builder()
        .db_instances(
            DbInstance::builder()
                .db_instance_identifier("acme-staging")
                .db_instance_status(status)
                .endpoint(
                    Endpoint::builder()
                        .address("acme-staging.rds.example")
                        .port(3306)
                        .build(),
                )
                .master_user_secret(
                    MasterUserSecret::builder()
                        .secret_arn("arn:secret:db")
                        .build(),
                )
                .set_tag_list(Some(
                    ours()
                        .into_iter()
                        .map(|(k, v)| aws_sdk_rds::types::Tag::builder().key(k).value(v).build())
                        .collect(),
                ))
                .build(),
        )
        .build()
}

#[tokio::test]
async fn a_database_is_waited_for_until_available() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe = mock!(aws_sdk_rds::Client::describe_db_instances)
        .sequence()
        .output(|| db("creating"))
        .output(|| db("backing-up"))
        .output(|| db("available"))
        .build();
    let rds = mock_client!(aws_sdk_rds, RuleMode::MatchAny, [&describe]);
    let c = cloud(
        Mocks {
            rds: Some(rds),
            ..Mocks::default()
        },
        &clock,
    );
    let t = task(StepKind::Database, 2);
    for expected in ["creating", "backing-up"] {
        match invoke(&c, &t).await {
            Outcome::Progress { note, .. } => assert!(note.contains(expected), "{note}"),
            other => panic!("{other:?}"),
        }
    }
    match invoke(&c, &t).await {
        Outcome::Done(StepOutput::Database(d)) => {
            assert_eq!(d.endpoint, "acme-staging.rds.example:3306");
            assert_eq!(d.secret_arn, "arn:secret:db");
            assert_eq!(d.instance_id, "acme-staging");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failed_database_needs_an_operator() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe = mock!(aws_sdk_rds::Client::describe_db_instances).then_output(|| db("failed"));
    let rds = mock_client!(aws_sdk_rds, RuleMode::MatchAny, [&describe]);
    let c = cloud(
        Mocks {
            rds: Some(rds),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Database, 2)).await {
        Outcome::Terminal(e) => assert!(e.contains("failed") && e.contains("operator"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn throttling_is_retryable_and_access_denied_is_terminal() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let t = task(StepKind::Network, 2);
    // Throttled on every try the SDK makes: retryable for the step's policy.
    let throttled = mock!(aws_sdk_ec2::Client::describe_security_groups)
        .sequence()
        .error(|| DescribeSecurityGroupsError::generic(ec2_error("RequestLimitExceeded")))
        .repeatedly()
        .build();
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&throttled]);
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &t).await {
        Outcome::Retryable(e) => assert!(e.contains("RequestLimitExceeded"), "{e}"),
        other => panic!("{other:?}"),
    }
    let denied = mock!(aws_sdk_ec2::Client::describe_security_groups)
        .then_error(|| DescribeSecurityGroupsError::generic(ec2_error("UnauthorizedOperation")));
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&denied]);
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &t).await {
        Outcome::Terminal(e) => assert!(e.contains("UnauthorizedOperation"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(denied.num_calls(), 1, "not retried by the SDK either");
}

#[tokio::test]
async fn a_priority_held_by_a_foreign_rule_is_given_up_for_another() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let groups =
        mock!(aws_sdk_elasticloadbalancingv2::Client::describe_target_groups).then_output(|| {
            DescribeTargetGroupsOutput::builder()
                .target_groups(TargetGroup::builder().target_group_arn("arn:tg").build())
                .build()
        });
    let rules = mock!(aws_sdk_elasticloadbalancingv2::Client::describe_rules)
        .then_output(|| DescribeRulesOutput::builder().build());
    let tags = elb_ours("arn:tg");
    let create = mock!(aws_sdk_elasticloadbalancingv2::Client::create_rule)
        .sequence()
        .error(|| {
            CreateRuleError::PriorityInUseException(
                aws_sdk_elasticloadbalancingv2::types::error::PriorityInUseException::builder()
                    .message("Priority '1' is currently in use")
                    .meta(ec2_error("PriorityInUse"))
                    .build(),
            )
        })
        .output(|| {
            CreateRuleOutput::builder()
                .rules(
                    Rule::builder()
                        .rule_arn("arn:rule:new")
                        .priority("x")
                        .build(),
                )
                .build()
        })
        .build();
    let elb = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&groups, &rules, &tags, &create]
    );
    let allocations = MemoryAllocations::default();
    let c = cloud_with(
        Mocks {
            elb: Some(elb),
            ..Mocks::default()
        },
        &clock,
        allocations.clone(),
    );
    let t = task(StepKind::Routing, 2);
    let pool = c.priority_pool();
    let owner = key().to_string();
    match invoke(&c, &t).await {
        Outcome::Retryable(e) => assert!(e.contains("in use"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        allocations
            .allocation_of(&pool, &owner)
            .await
            .expect("read"),
        None
    );
    let first = {
        let held = allocations.held();
        let (taken, by) = held.iter().next().expect("one marked");
        assert!(by.starts_with("foreign-rule:"), "{by}");
        taken.1
    };
    match invoke(&c, &t).await {
        Outcome::Done(StepOutput::Routing(r)) => {
            assert_ne!(u64::from(r.priority), first, "another priority");
            assert_eq!(r.rule_arn, "arn:rule:new");
            assert_eq!(r.host, "staging.acme.example");
        }
        other => panic!("{other:?}"),
    }
    let held = allocations
        .allocation_of(&pool, &owner)
        .await
        .expect("read");
    assert!(held.is_some_and(|p| p != first));
}

/// `DescribeTags` of load balancer resource `arn`: the environment's tags.
fn elb_ours(arn: &'static str) -> aws_smithy_mocks::Rule {
    mock!(aws_sdk_elasticloadbalancingv2::Client::describe_tags).then_output(move || {
        DescribeTagsOutput::builder()
            .tag_descriptions(
                TagDescription::builder()
                    .resource_arn(arn)
                    .set_tags(Some(
                        ours()
                            .into_iter()
                            .map(|(k, v)| ElbTag::builder().key(k).value(v).build())
                            .collect(),
                    ))
                    .build(),
            )
            .build()
    })
}

fn group(name: &str, run: &str) -> AutoScalingGroup {
    let tag = |k: &str, v: &str| AsgTagDescription::builder().key(k).value(v).build();
    AutoScalingGroup::builder()
        .auto_scaling_group_name(name)
        .tags(tag("tenant", "acme"))
        .tags(tag("env", "staging"))
        .tags(tag("run", run))
        .tags(tag("managed-by", super::MANAGED_BY))
        .instances(
            AsgInstance::builder()
                .instance_id(format!("i-{name}"))
                .build(),
        )
        .target_group_arns("arn:tg")
        .build()
}

fn health(state: TargetHealthStateEnum) -> DescribeTargetHealthOutput {
    DescribeTargetHealthOutput::builder()
        .target_health_descriptions(
            TargetHealthDescription::builder()
                .target(TargetDescription::builder().id("i-acme-staging-r2").build())
                .target_health(TargetHealth::builder().state(state).build())
                .build(),
        )
        .build()
}

#[tokio::test]
async fn a_group_whose_targets_stay_unhealthy_is_rolled_back() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe =
        mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups).then_output(|| {
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group("acme-staging-r1", "r1"))
                .auto_scaling_groups(group("acme-staging-r2", "r2"))
                .build()
        });
    let delete = mock!(aws_sdk_autoscaling::Client::delete_auto_scaling_group)
        .then_output(|| DeleteAutoScalingGroupOutput::builder().build());
    let autoscaling = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &delete]
    );
    let target_health = mock!(aws_sdk_elasticloadbalancingv2::Client::describe_target_health)
        .then_output(|| health(TargetHealthStateEnum::Unhealthy));
    let elb = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&target_health]
    );
    let delete_template = mock!(aws_sdk_ec2::Client::delete_launch_template)
        .then_output(|| DeleteLaunchTemplateOutput::builder().build());
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&delete_template]);
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            autoscaling: Some(autoscaling),
            elb: Some(elb),
            s3: Some(reports(&[])),
            ..Mocks::default()
        },
        &clock,
    );
    let t = task(StepKind::Rollout, 2);
    match invoke(&c, &t).await {
        Outcome::Progress { note, .. } => assert!(note.contains("0 of 1"), "{note}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(delete.num_calls(), 0, "nothing is deleted while waiting");
    clock.advance(Duration::from_secs(1201));
    match invoke(&c, &t).await {
        Outcome::Terminal(e) => {
            assert!(
                e.contains("rolled back") && e.contains("acme-staging-r1 keeps serving"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(delete.num_calls(), 1, "only the new group is deleted");
    assert_eq!(delete_template.num_calls(), 1);
}

#[tokio::test]
async fn a_healthy_group_retires_the_previous_one() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe =
        mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups).then_output(|| {
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group("acme-staging-r1", "r1"))
                .auto_scaling_groups(group("acme-staging-r2", "r2"))
                .build()
        });
    let detach = mock!(aws_sdk_autoscaling::Client::detach_load_balancer_target_groups)
        .match_requests(|r| r.auto_scaling_group_name() == Some("acme-staging-r1"))
        .then_output(|| {
            aws_sdk_autoscaling::operation::detach_load_balancer_target_groups::DetachLoadBalancerTargetGroupsOutput::builder().build()
        });
    let delete = mock!(aws_sdk_autoscaling::Client::delete_auto_scaling_group)
        .match_requests(|r| r.auto_scaling_group_name() == Some("acme-staging-r1"))
        .then_output(|| DeleteAutoScalingGroupOutput::builder().build());
    let autoscaling = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &detach, &delete]
    );
    let target_health = mock!(aws_sdk_elasticloadbalancingv2::Client::describe_target_health)
        .then_output(|| health(TargetHealthStateEnum::Healthy));
    let elb = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&target_health]
    );
    let delete_template = mock!(aws_sdk_ec2::Client::delete_launch_template)
        .match_requests(|r| r.launch_template_name() == Some("acme-staging-r1"))
        .then_output(|| DeleteLaunchTemplateOutput::builder().build());
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&delete_template]);
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            autoscaling: Some(autoscaling),
            elb: Some(elb),
            s3: Some(reports(&[
                "_logs/acme/staging/rollout/acme-staging-r2/i-1.ok.log",
            ])),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Rollout, 2)).await {
        Outcome::Done(StepOutput::Rollout(d)) => {
            assert_eq!(d.group_name, "acme-staging-r2");
            assert_eq!(d.image_id, "ami-base", "no infra commit: the base image");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (
            detach.num_calls(),
            delete.num_calls(),
            delete_template.num_calls()
        ),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn a_late_rollout_of_an_older_run_touches_nothing() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe =
        mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups).then_output(|| {
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group("acme-staging-r3", "r3"))
                .build()
        });
    let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&describe]);
    let c = cloud(
        Mocks {
            autoscaling: Some(autoscaling),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Rollout, 2)).await {
        Outcome::Terminal(e) => assert!(
            e.contains("superseded") && e.contains("acme-staging-r3"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
}

/// IAM answering that the environment's role and instance profile exist, tagged as its own.
fn iam_ours() -> aws_sdk_iam::Client {
    use aws_sdk_iam::types::{InstanceProfile, Role, Tag};
    let role = || {
        Role::builder()
            .path("/tenant-host/")
            .role_name("acme-staging-instances")
            .role_id("AROA1")
            .arn("arn:aws:iam::1:role/tenant-host/acme-staging-instances")
            .create_date(aws_smithy_types::DateTime::from_millis(NOW_MS))
            .set_tags(Some(
                ours()
                    .into_iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build().expect("tag"))
                    .collect(),
            ))
            .build()
            .expect("role")
    };
    let get_role = mock!(aws_sdk_iam::Client::get_role).then_output(move || {
        aws_sdk_iam::operation::get_role::GetRoleOutput::builder()
            .role(role())
            .build()
    });
    let put_policy = mock!(aws_sdk_iam::Client::put_role_policy)
        .match_requests(|r| {
            r.policy_document()
                .is_some_and(|d| d.contains("artifacts/acme/staging/*"))
        })
        .then_output(|| {
            aws_sdk_iam::operation::put_role_policy::PutRolePolicyOutput::builder().build()
        });
    let get_profile = mock!(aws_sdk_iam::Client::get_instance_profile).then_output(move || {
        let profile = InstanceProfile::builder()
            .path("/tenant-host/")
            .instance_profile_name("acme-staging-instances")
            .instance_profile_id("AIPA1")
            .arn("arn:aws:iam::1:instance-profile/tenant-host/acme-staging-instances")
            .create_date(aws_smithy_types::DateTime::from_millis(NOW_MS))
            .roles(role())
            .set_tags(role().tags.clone())
            .build()
            .expect("profile");
        aws_sdk_iam::operation::get_instance_profile::GetInstanceProfileOutput::builder()
            .instance_profile(profile)
            .build()
    });
    mock_client!(
        aws_sdk_iam,
        RuleMode::MatchAny,
        [&get_role, &put_policy, &get_profile]
    )
}

#[tokio::test]
async fn a_group_created_meanwhile_is_adopted() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    // Not listed by tag nor found by name, then (created meanwhile) found by name with the
    // environment's tags.
    let describe = mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups)
        .sequence()
        .output(|| DescribeAutoScalingGroupsOutput::builder().build())
        .output(|| DescribeAutoScalingGroupsOutput::builder().build())
        .output(|| {
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group("acme-staging-r2", "r2"))
                .build()
        })
        .build();
    let create = mock!(aws_sdk_autoscaling::Client::create_auto_scaling_group).then_error(|| {
        CreateAutoScalingGroupError::AlreadyExistsFault(
            aws_sdk_autoscaling::types::error::AlreadyExistsFault::builder()
                .message("AutoScalingGroup by this name already exists")
                .meta(ec2_error("AlreadyExists"))
                .build(),
        )
    });
    let autoscaling = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &create]
    );
    let templates = mock!(aws_sdk_ec2::Client::describe_launch_templates)
        .then_output(|| DescribeLaunchTemplatesOutput::builder().build());
    // The environment's own profile, and IMDSv2 only, one hop.
    let create_template = mock!(aws_sdk_ec2::Client::create_launch_template)
        .match_requests(|r| {
            let data = r.launch_template_data();
            let profile = data
                .and_then(|d| d.iam_instance_profile())
                .and_then(|p| p.name());
            let metadata = data.and_then(|d| d.metadata_options());
            r.launch_template_name() == Some("acme-staging-r2")
                && profile == Some("acme-staging-instances")
                && metadata.and_then(|m| m.http_tokens())
                    == Some(&aws_sdk_ec2::types::LaunchTemplateHttpTokensState::Required)
                && metadata.and_then(|m| m.http_put_response_hop_limit()) == Some(1)
        })
        .then_output(|| CreateLaunchTemplateOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&templates, &create_template]
    );
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            autoscaling: Some(autoscaling),
            iam: Some(iam_ours()),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Rollout, 2)).await {
        Outcome::Progress { note, .. } => assert!(note.contains("acme-staging-r2"), "{note}"),
        other => panic!("{other:?}"),
    }
    assert_eq!((create_template.num_calls(), create.num_calls()), (1, 1));
}

#[tokio::test]
async fn someone_elses_group_of_the_name_is_refused_and_left_alone() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let foreign = || {
        let tag = |k: &str, v: &str| AsgTagDescription::builder().key(k).value(v).build();
        DescribeAutoScalingGroupsOutput::builder()
            .auto_scaling_groups(
                AutoScalingGroup::builder()
                    .auto_scaling_group_name("acme-staging-r2")
                    .tags(tag("managed-by", super::MANAGED_BY))
                    .tags(tag("tenant", "globex"))
                    .tags(tag("env", "staging"))
                    .build(),
            )
            .build()
    };
    let describe = mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups)
        .sequence()
        .output(|| DescribeAutoScalingGroupsOutput::builder().build())
        .output(foreign)
        .build();
    let create = mock!(aws_sdk_autoscaling::Client::create_auto_scaling_group).then_output(|| {
        aws_sdk_autoscaling::operation::create_auto_scaling_group::CreateAutoScalingGroupOutput::builder().build()
    });
    let autoscaling = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &create]
    );
    let c = cloud(
        Mocks {
            autoscaling: Some(autoscaling),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Rollout, 2)).await {
        Outcome::Terminal(e) => assert!(
            e.contains("auto scaling group acme-staging-r2") && e.contains("tenant globex"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(create.num_calls(), 0, "nothing is created over it");
}

#[tokio::test]
async fn a_failed_install_report_rolls_back_at_once() {
    let clock = ManualClock::new(Timestamp::from_unix_millis(NOW_MS));
    let describe =
        mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups).then_output(|| {
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group("acme-staging-r1", "r1"))
                .auto_scaling_groups(group("acme-staging-r2", "r2"))
                .build()
        });
    let delete = mock!(aws_sdk_autoscaling::Client::delete_auto_scaling_group)
        .match_requests(|r| r.auto_scaling_group_name() == Some("acme-staging-r2"))
        .then_output(|| DeleteAutoScalingGroupOutput::builder().build());
    let autoscaling = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &delete]
    );
    let delete_template = mock!(aws_sdk_ec2::Client::delete_launch_template)
        .then_output(|| DeleteLaunchTemplateOutput::builder().build());
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&delete_template]);
    let key = "_logs/acme/staging/rollout/acme-staging-r2/i-7.failed.log";
    let list = mock!(aws_sdk_s3::Client::list_objects_v2).then_output(move || {
        aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output::builder()
            .contents(aws_sdk_s3::types::Object::builder().key(key).build())
            .build()
    });
    let get = mock!(aws_sdk_s3::Client::get_object)
        .match_requests(move |r| r.key() == Some(key))
        .then_output(|| {
            aws_sdk_s3::operation::get_object::GetObjectOutput::builder()
                .body(aws_sdk_s3::primitives::ByteStream::from_static(
                    b"# tenant-host script report v1\nok environment\nok fetch\nfailed 2 install.sh\n| migrating\n| table users exists\n",
                ))
                .build()
        });
    let s3 = mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&list, &get]);
    let c = cloud(
        Mocks {
            ec2: Some(ec2),
            autoscaling: Some(autoscaling),
            s3: Some(s3),
            ..Mocks::default()
        },
        &clock,
    );
    match invoke(&c, &task(StepKind::Rollout, 2)).await {
        Outcome::Terminal(e) => {
            assert!(
                e.starts_with(
                    "install.sh exited 2 on an instance of group acme-staging-r2; its last lines:\n  migrating\n  table users exists\n"
                ),
                "{e}"
            );
            assert!(e.contains("acme-staging-r1 keeps serving"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((delete.num_calls(), delete_template.num_calls()), (1, 1));
}
