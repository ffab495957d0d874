//! Tenant boundaries of the AWS reconcilers, on `moto_server`: a resource found by a name or a
//! host that is not tagged as the environment's own is never adopted, changed or deleted.
//!
//! The stores refuse a second tenant with an existing tenant's domain (see the conformance
//! suite); these tests call the reconcilers as if that check had been bypassed (a tenant
//! registered before domains were unique), and with resources someone made by hand.

use std::sync::Arc;
use std::time::Duration;

use activities::aws::{AwsCloud, Clients, Infrastructure, MemoryAllocations};
use activities::{Activities, Invocation, Outcome};
use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Rule};
use orchestrator::clock::SystemClock;
use testkit::moto::Moto;
use workflows::{
    Domain, Environment, NetworkOutput, Release, Resources, RunId, StepKind, StepOutput, StepTask,
    TenantId, Timestamp, WorkflowKey,
};

struct Sandbox {
    moto: Moto,
    clients: Clients,
    infra: Infrastructure,
    cloud: AwsCloud,
}

impl Sandbox {
    async fn new() -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config();
        let infra = activities::aws::sandbox::create(&sdk, "sbx", "file:///nowhere/{tenant}")
            .await
            .expect("sandbox");
        let clients = Clients::new(&sdk);
        let cloud = AwsCloud::new(
            clients.clone(),
            infra.clone(),
            MemoryAllocations::default(),
            Arc::new(SystemClock),
        )
        .expect("complete infrastructure");
        Self {
            moto,
            clients,
            infra,
            cloud,
        }
    }

    /// Runs `step` of `tenant`'s dev environment (served under `domain`) once.
    async fn invoke(
        &self,
        tenant: &str,
        domain: &str,
        step: StepKind,
        run: u32,
        resources: Resources,
    ) -> Outcome {
        self.invoke_configured(tenant, domain, step, run, resources, &activities::NO_CONFIG)
            .await
    }

    /// Runs `step` as [`Self::invoke`] does, with the environment's config vars `config`.
    async fn invoke_configured(
        &self,
        tenant: &str,
        domain: &str,
        step: StepKind,
        run: u32,
        resources: Resources,
        config: &workflows::EnvConfig,
    ) -> Outcome {
        let key = WorkflowKey::new(TenantId::new(tenant).expect("id"), Environment::Dev);
        let domain = Domain::new(domain).expect("domain");
        let task = StepTask {
            run: RunId::new(run).expect("run"),
            step,
            token: 1,
            attempt: 1,
            first_attempt_at: Timestamp::from_unix_millis(1_000),
            delay: Duration::ZERO,
            release: Release::default(),
            resources,
            keep: Vec::new(),
            restore_database: false,
        };
        self.cloud
            .invoke(Invocation {
                key: &key,
                domain: &domain,
                task: &task,
                config,
                settings: &activities::NO_SETTINGS,
            })
            .await
    }

    /// Decommissions `tenant`'s dev environment, invoking until it is done.
    async fn decommission(&self, tenant: &str, domain: &str) {
        for _ in 0..60 {
            match self
                .invoke(
                    tenant,
                    domain,
                    StepKind::Decommission,
                    9,
                    Resources::default(),
                )
                .await
            {
                Outcome::Done(_) => return,
                Outcome::Progress { .. } => tokio::time::sleep(Duration::from_millis(200)).await,
                other => panic!("decommission of {tenant}: {other:?}"),
            }
        }
        panic!("decommission of {tenant} did not finish");
    }

    /// The listener's rule for `host`.
    async fn rule(&self, host: &str) -> Option<Rule> {
        let out = self
            .clients
            .elb
            .describe_rules()
            .listener_arn(&self.infra.listener_arn)
            .send()
            .await
            .expect("rules");
        out.rules()
            .iter()
            .find(|r| {
                r.conditions().iter().any(|c| {
                    c.values().iter().any(|v| v == host)
                        || c.host_header_config()
                            .is_some_and(|h| h.values().iter().any(|v| v == host))
                })
            })
            .cloned()
    }
}

fn terminal(outcome: Outcome) -> String {
    match outcome {
        Outcome::Terminal(e) => e,
        other => panic!("expected a terminal error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_host_is_never_taken_over_nor_deleted() {
    let s = Sandbox::new().await;
    let routed = s
        .invoke(
            "acme",
            "acme.example",
            StepKind::Routing,
            1,
            Resources::default(),
        )
        .await;
    let Outcome::Done(StepOutput::Routing(acme)) = routed else {
        panic!("acme's routing: {routed:?}");
    };

    // A second tenant with acme's domain: its host is acme's host.
    let e = terminal(
        s.invoke(
            "umbrella",
            "acme.example",
            StepKind::Routing,
            1,
            Resources::default(),
        )
        .await,
    );
    assert!(
        e.contains("listener rule") && e.contains("dev.acme.example") && e.contains("tenant acme"),
        "{e}"
    );
    let rule = s.rule("dev.acme.example").await.expect("acme's rule stays");
    assert_eq!(rule.rule_arn(), Some(acme.rule_arn.as_str()));
    let forwards: Vec<_> = rule
        .actions()
        .iter()
        .filter_map(|a| a.target_group_arn())
        .collect();
    assert_eq!(forwards, [acme.target_group_arn.as_str()], "still acme's");

    s.decommission("umbrella", "acme.example").await;
    let rule = s
        .rule("dev.acme.example")
        .await
        .expect("decommissioning the other tenant leaves acme's rule");
    assert_eq!(rule.rule_arn(), Some(acme.rule_arn.as_str()));
    let groups = s
        .clients
        .elb
        .describe_target_groups()
        .target_group_arns(&acme.target_group_arn)
        .send()
        .await
        .expect("acme's target group stays");
    assert_eq!(groups.target_groups().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_named_resources_of_someone_else_are_refused_and_left_alone() {
    let s = Sandbox::new().await;
    let c = &s.clients;
    // Made by hand, with the names globex's dev environment would use, and no tags of ours.
    let sg = c
        .ec2
        .create_security_group()
        .group_name("globex-dev-instances")
        .description("someone else's")
        .vpc_id(&s.infra.vpc_id)
        .send()
        .await
        .expect("security group");
    let sg_id = sg.group_id().expect("id").to_owned();
    let tg = c
        .elb
        .create_target_group()
        .name("globex-dev")
        .protocol(ProtocolEnum::Http)
        .port(8080)
        .vpc_id(&s.infra.vpc_id)
        .send()
        .await
        .expect("target group");
    let tg_arn = tg.target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_owned();
    c.rds
        .create_db_instance()
        .db_instance_identifier("globex-dev")
        .engine("mysql")
        .db_instance_class("db.t3.micro")
        .allocated_storage(20)
        .master_username("admin")
        .master_user_password("not-ours-123")
        .send()
        .await
        .expect("database");
    c.ec2
        .create_launch_template()
        .launch_template_name("globex-dev-r1")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(&s.infra.base_image_id)
                .build(),
        )
        .send()
        .await
        .expect("launch template");
    c.autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name("globex-dev-r2")
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_name("globex-dev-r1")
                .version("1")
                .build(),
        )
        .min_size(0)
        .max_size(0)
        .vpc_zone_identifier(s.infra.subnet_ids.join(","))
        .send()
        .await
        .expect("group");

    let none = Resources::default;
    let e = terminal(
        s.invoke("globex", "globex.example", StepKind::Network, 1, none())
            .await,
    );
    assert!(
        e.contains("security group globex-dev-instances")
            && e.contains("not created by the orchestrator"),
        "{e}"
    );
    let e = terminal(
        s.invoke("globex", "globex.example", StepKind::Routing, 1, none())
            .await,
    );
    assert!(e.contains("target group globex-dev"), "{e}");
    let e = terminal(
        s.invoke("globex", "globex.example", StepKind::Database, 1, none())
            .await,
    );
    assert!(e.contains("database globex-dev"), "{e}");

    // The rollout needs a target group; acme's serves, since the checks under test (of the
    // launch template and of the group) come before anything uses it.
    let routed = s
        .invoke("acme", "acme.example", StepKind::Routing, 1, none())
        .await;
    let Outcome::Done(StepOutput::Routing(routing)) = routed else {
        panic!("acme's routing: {routed:?}");
    };
    let with_routing = || Resources {
        network: Some(NetworkOutput {
            instance_security_group: sg_id.clone(),
            database_security_group: sg_id.clone(),
        }),
        routing: Some(routing.clone()),
        ..Resources::default()
    };
    let e = terminal(
        s.invoke(
            "globex",
            "globex.example",
            StepKind::Rollout,
            1,
            with_routing(),
        )
        .await,
    );
    assert!(e.contains("launch template globex-dev-r1"), "{e}");
    let e = terminal(
        s.invoke(
            "globex",
            "globex.example",
            StepKind::Rollout,
            2,
            with_routing(),
        )
        .await,
    );
    assert!(e.contains("auto scaling group globex-dev-r2"), "{e}");

    s.decommission("globex", "globex.example").await;
    let left = c
        .ec2
        .describe_security_groups()
        .group_ids(sg.group_id().expect("id"))
        .send()
        .await
        .expect("the security group is left alone");
    assert_eq!(left.security_groups().len(), 1);
    let left = c
        .elb
        .describe_target_groups()
        .target_group_arns(&tg_arn)
        .send()
        .await
        .expect("the target group is left alone");
    assert_eq!(left.target_groups().len(), 1);
    let left = c
        .rds
        .describe_db_instances()
        .db_instance_identifier("globex-dev")
        .send()
        .await
        .expect("the database is left alone");
    assert_ne!(
        left.db_instances()[0].db_instance_status(),
        Some("deleting")
    );
    let left = c
        .ec2
        .describe_launch_templates()
        .launch_template_names("globex-dev-r1")
        .send()
        .await
        .expect("the launch template is left alone");
    assert_eq!(left.launch_templates().len(), 1);
    let left = c
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("globex-dev-r2")
        .send()
        .await
        .expect("groups");
    assert_eq!(
        left.auto_scaling_groups().len(),
        1,
        "the group is left alone"
    );
}

/// Each environment's instances run with an IAM role of their own that reads only the
/// environment's artifacts and database secret, are told where that database is and which
/// secret it is, require IMDSv2 with one hop, and lose the role when decommissioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_environment_has_a_role_of_its_own() {
    let s = Sandbox::new().await;
    let iam = aws_sdk_iam::Client::new(&s.moto.sdk_config());
    let secrets = aws_sdk_secretsmanager::Client::new(&s.moto.sdk_config());
    let mut policies = Vec::new();
    // globex's, the last: what its next rollout is dispatched with.
    let mut last_resources = Resources::default();
    for tenant in ["acme", "globex"] {
        let domain = format!("{tenant}.example");
        let network = s
            .invoke(tenant, &domain, StepKind::Network, 1, Resources::default())
            .await;
        let Outcome::Done(StepOutput::Network(network)) = network else {
            panic!("{tenant}'s network: {network:?}");
        };
        let routing = s
            .invoke(tenant, &domain, StepKind::Routing, 1, Resources::default())
            .await;
        let Outcome::Done(StepOutput::Routing(routing)) = routing else {
            panic!("{tenant}'s routing: {routing:?}");
        };
        // The database, as the database step makes it (moto has it available at once or
        // after a recheck).
        let with_network = Resources {
            network: Some(network.clone()),
            ..Resources::default()
        };
        let mut database = None;
        for _ in 0..5 {
            match s
                .invoke(tenant, &domain, StepKind::Database, 1, with_network.clone())
                .await
            {
                Outcome::Done(StepOutput::Database(d)) => {
                    database = Some(d);
                    break;
                }
                Outcome::Progress { .. } => {}
                other => panic!("{tenant}'s database: {other:?}"),
            }
        }
        let database = database.expect("the database is available");
        let resources = Resources {
            network: Some(network),
            routing: Some(routing),
            database: Some(database.clone()),
            ..Resources::default()
        };
        // Config vars: a plain value, and a secret of the tenant's own (tagged as its).
        let own_secret = secrets
            .create_secret()
            .name(format!("{tenant}/api-key"))
            .secret_string("k")
            .tags(
                aws_sdk_secretsmanager::types::Tag::builder()
                    .key("tenant")
                    .value(tenant)
                    .build(),
            )
            .send()
            .await
            .expect("secret")
            .arn()
            .expect("arn")
            .to_owned();
        let config = workflows::EnvConfig {
            version: 2,
            vars: [
                (
                    "LOG_LEVEL".to_owned(),
                    workflows::ConfigValue::Value(format!("{tenant}-debug")),
                ),
                (
                    "API_KEY".to_owned(),
                    workflows::ConfigValue::SecretArn(own_secret.clone()),
                ),
            ]
            .into_iter()
            .collect(),
        };
        last_resources = resources.clone();
        let rollout = s
            .invoke_configured(tenant, &domain, StepKind::Rollout, 1, resources, &config)
            .await;
        assert!(
            matches!(rollout, Outcome::Progress { .. }),
            "{tenant}'s rollout: {rollout:?}"
        );

        let role = format!("{tenant}-dev-instances");
        let profile = iam
            .get_instance_profile()
            .instance_profile_name(&role)
            .send()
            .await
            .expect("the environment's profile");
        let profile = profile.instance_profile().expect("profile");
        assert_eq!(profile.path(), "/tenant-host/");
        let roles: Vec<_> = profile.roles().iter().map(|r| r.role_name()).collect();
        assert_eq!(roles, [role.as_str()]);
        let policy = iam
            .get_role_policy()
            .role_name(&role)
            .policy_name("environment-artifacts")
            .send()
            .await
            .expect("the role's policy");
        let document = urlencoding_free(policy.policy_document());
        assert!(
            document.contains(&format!("{}/{tenant}/dev/*", s.infra.artifact_bucket)),
            "{document}"
        );
        assert!(document.contains(&database.secret_arn), "{document}");
        assert!(document.contains(&own_secret), "{document}");

        let versions = s
            .clients
            .ec2
            .describe_launch_template_versions()
            .launch_template_name(format!("{tenant}-dev-r1"))
            .send()
            .await
            .expect("template");
        let data = versions.launch_template_versions()[0]
            .launch_template_data()
            .expect("data");
        assert_eq!(
            data.iam_instance_profile().and_then(|p| p.name()),
            Some(role.as_str())
        );
        let metadata = data.metadata_options().expect("metadata options");
        assert_eq!(metadata.http_tokens().map(|t| t.as_str()), Some("required"));
        assert_eq!(metadata.http_put_response_hop_limit(), Some(1));

        // The instances are told where their database is, and which secret holds its
        // credentials, in the environment file their user data writes.
        let script = decode_base64(data.user_data().expect("user data"));
        let env_file = script
            .split_whitespace()
            .filter_map(|word| word.strip_prefix('\'').and_then(|w| w.strip_suffix('\'')))
            .filter_map(|word| {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(word)
                    .ok()?;
                String::from_utf8(bytes).ok()
            })
            .find(|text| text.contains("DB_SECRET_ARN="))
            .unwrap_or_else(|| panic!("no environment file in\n{script}"));
        let (host, port) = database.endpoint.rsplit_once(':').expect("host:port");
        assert!(
            script.contains(&format!("--secret-id '{own_secret}'")),
            "the instance resolves its secret reference at start:\n{script}"
        );
        for line in [
            format!("LOG_LEVEL='{tenant}-debug'"),
            format!("TENANT_ID='{tenant}'"),
            format!("DB_HOST='{host}'"),
            format!("DB_PORT='{port}'"),
            "DB_NAME='app'".to_owned(),
            format!("DB_SECRET_ARN='{}'", database.secret_arn),
        ] {
            assert!(env_file.lines().any(|l| l == line), "{line} in\n{env_file}");
        }
        policies.push((
            tenant,
            document,
            format!("{env_file}{script}"),
            database.secret_arn,
            own_secret,
        ));
    }
    let (acme, globex) = (&policies[0], &policies[1]);
    assert_ne!(acme.3, globex.3, "each environment has its own secret");
    assert!(
        !acme.1.contains("globex") && !globex.1.contains("acme/"),
        "{}\n{}",
        acme.1,
        globex.1
    );
    // A config var of globex that references acme's secret is refused, naming it, and
    // globex's role is left as it was.
    let stolen = workflows::EnvConfig {
        version: 3,
        vars: [(
            "API_KEY".to_owned(),
            workflows::ConfigValue::SecretArn(acme.4.clone()),
        )]
        .into_iter()
        .collect(),
    };
    let refused = s
        .invoke_configured(
            "globex",
            "globex.example",
            StepKind::Rollout,
            2,
            last_resources,
            &stolen,
        )
        .await;
    match &refused {
        Outcome::Terminal(e) => {
            assert!(e.contains(&acme.4) && e.contains("tenant globex"), "{e}")
        }
        other => panic!("globex referencing acme's secret: {other:?}"),
    }
    let policy = iam
        .get_role_policy()
        .role_name("globex-dev-instances")
        .policy_name("environment-artifacts")
        .send()
        .await
        .expect("globex's policy");
    assert!(!urlencoding_free(policy.policy_document()).contains(&acme.4));
    for (mine, other) in [(acme, globex), (globex, acme)] {
        for secret in [&other.3, &other.4] {
            let (who, whose) = (mine.0, other.0);
            assert!(
                !mine.1.contains(secret.as_str()),
                "{who}'s policy names {whose}'s secret"
            );
            assert!(
                !mine.2.contains(secret.as_str()),
                "{who}'s instances are told {whose}'s secret"
            );
        }
    }

    s.decommission("acme", "acme.example").await;
    let gone = iam.get_role().role_name("acme-dev-instances").send().await;
    assert!(gone.is_err(), "acme's role is deleted: {gone:?}");
    iam.get_role()
        .role_name("globex-dev-instances")
        .send()
        .await
        .expect("globex's role stays");
}

/// IAM returns policy documents URL-encoded (as the API documents); moto may or may not.
fn urlencoding_free(document: &str) -> String {
    let mut out = Vec::with_capacity(document.len());
    let bytes = document.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&document[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 `text` decoded, as UTF-8.
fn decode_base64(text: &str) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{text:?} is not base64: {e}"));
    String::from_utf8(bytes).expect("UTF-8")
}

/// The alias record of an environment's host goes into a zone the tenant owns (named as its
/// domain and tagged with its id), points at the listener's load balancer, and goes with the
/// environment; a zone of another tenant's domain tagged for someone else is never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_records_go_into_the_tenants_own_zone_and_with_the_environment() {
    let s = Sandbox::new().await;
    let r53 = aws_sdk_route53::Client::new(&s.moto.sdk_config());
    let zone = |name: &'static str, owner: &'static str| {
        let r53 = r53.clone();
        async move {
            let made = r53
                .create_hosted_zone()
                .name(name)
                .caller_reference(format!("{name}-{owner}"))
                .send()
                .await
                .expect("zone");
            let id = made
                .hosted_zone()
                .map(|z| z.id().trim_start_matches("/hostedzone/").to_owned())
                .expect("id");
            r53.change_tags_for_resource()
                .resource_type(aws_sdk_route53::types::TagResourceType::Hostedzone)
                .resource_id(&id)
                .add_tags(
                    aws_sdk_route53::types::Tag::builder()
                        .key("tenant")
                        .value(owner)
                        .build(),
                )
                .send()
                .await
                .expect("tags");
            id
        }
    };
    let acme_zone = zone("acme.example", "acme").await;
    // A zone named as globex's domain, but tagged as acme's: not globex's to write to.
    let _ = zone("globex.example", "acme").await;
    let records = |id: String| {
        let r53 = r53.clone();
        async move {
            r53.list_resource_record_sets()
                .hosted_zone_id(id)
                .send()
                .await
                .expect("records")
                .resource_record_sets()
                .iter()
                .filter(|r| r.r#type() == &aws_sdk_route53::types::RrType::A)
                .map(|r| {
                    (
                        r.name().trim_end_matches('.').to_owned(),
                        r.alias_target().map(|a| a.dns_name().to_owned()),
                    )
                })
                .collect::<Vec<_>>()
        }
    };

    let routed = s
        .invoke(
            "acme",
            "acme.example",
            StepKind::Routing,
            1,
            Resources::default(),
        )
        .await;
    let Outcome::Done(StepOutput::Routing(acme)) = routed else {
        panic!("acme's routing: {routed:?}");
    };
    assert_eq!(acme.dns_zone.as_deref(), Some(acme_zone.as_str()));
    let lb = s
        .clients
        .elb
        .describe_load_balancers()
        .send()
        .await
        .expect("load balancers");
    let lb_name = lb.load_balancers()[0]
        .dns_name()
        .expect("dns name")
        .to_owned();
    let written = records(acme_zone.clone()).await;
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0].0, "dev.acme.example");
    assert!(
        written[0]
            .1
            .as_deref()
            .is_some_and(|target| target.trim_end_matches('.') == lb_name.trim_end_matches('.')),
        "{written:?} to {lb_name}"
    );

    let routed = s
        .invoke(
            "globex",
            "globex.example",
            StepKind::Routing,
            1,
            Resources::default(),
        )
        .await;
    let Outcome::Done(StepOutput::Routing(globex)) = routed else {
        panic!("globex's routing: {routed:?}");
    };
    assert_eq!(globex.dns_zone, None, "no zone of globex's takes its host");

    s.decommission("acme", "acme.example").await;
    assert!(
        records(acme_zone).await.is_empty(),
        "the record went with it"
    );

    // The platform's zone takes a host that is a name in it, for any tenant.
    let platform = r53
        .create_hosted_zone()
        .name("apps.example")
        .caller_reference("platform")
        .send()
        .await
        .expect("zone")
        .hosted_zone()
        .map(|z| z.id().trim_start_matches("/hostedzone/").to_owned())
        .expect("id");
    let infra = Infrastructure {
        hosted_zone_id: Some(platform.clone()),
        ..s.infra.clone()
    };
    let cloud = AwsCloud::new(
        s.clients.clone(),
        infra,
        MemoryAllocations::default(),
        Arc::new(SystemClock),
    )
    .expect("cloud");
    let key = WorkflowKey::new(TenantId::new("initech").expect("id"), Environment::Dev);
    let domain = Domain::new("initech.apps.example").expect("domain");
    let task = StepTask {
        run: RunId::FIRST,
        step: StepKind::Routing,
        token: 1,
        attempt: 1,
        first_attempt_at: Timestamp::from_unix_millis(1_000),
        delay: Duration::ZERO,
        release: Release::default(),
        resources: Resources::default(),
        keep: Vec::new(),
        restore_database: false,
    };
    let routed = cloud
        .invoke(Invocation {
            key: &key,
            domain: &domain,
            task: &task,
            config: &activities::NO_CONFIG,
            settings: &activities::NO_SETTINGS,
        })
        .await;
    let Outcome::Done(StepOutput::Routing(initech)) = routed else {
        panic!("initech's routing: {routed:?}");
    };
    assert_eq!(initech.dns_zone.as_deref(), Some(platform.as_str()));
    let written = records(platform).await;
    assert_eq!(
        written.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["dev.initech.apps.example"]
    );
}
