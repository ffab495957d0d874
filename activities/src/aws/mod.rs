//! The reconcilers on AWS: EC2 security groups, builder instances, images and
//! launch templates; S3 artifacts; RDS MySQL with a managed master secret; ELBv2 target
//! groups and listener rules; Auto Scaling groups rolled out blue/green.
//!
//! Every invocation observes, takes at most one action that has to be waited for, and says
//! where the step stands. Resources are named by [`Names`] from tenant, environment and
//! release, tagged `tenant`, `env`, `run`, `managed-by`, and looked up before anything is
//! created: an "already exists" answer means adopt, and only what is tagged as the
//! environment's is adopted (`ownership`). Idempotency tokens come from the workflow
//! key, the step and the target ([`Names::token`]), never from randomness. Errors are
//! classified by code ([`error::classify`]).
//!
//! | step | what it does |
//! |---|---|
//! | network | security groups `<t>-<e>-instances` (HTTP from the load balancer's group only) and `<t>-<e>-database` (3306 from the instances' group only); the environment's IAM role and instance profile (see [`identity`]) |
//! | source_infra, source_app | `git` fetches the pushed commit (a deploy token from Secrets Manager for private repositories), `git archive` packs it, S3 keeps it at `<tenant>/<env>/<repo>/<sha>.tar.gz` (skipped when present) |
//! | image | a builder instance from the base image runs the tenant's scripts from the infra artifact and powers off; the image `<t>-<e>-<sha>` is made from the stopped builder (its volumes encrypted with the KMS key when one is configured); once available the builder is terminated |
//! | database | RDS MySQL `<t>-<e>`, encrypted, `ManageMasterUserPassword`, in the configured subnet group behind the database group; endpoint and secret ARN are recorded, never a password |
//! | routing | target group `<t>-<e>`, a listener priority held through [`Allocations`] (a conditional write), a rule for host `<env>.<domain>` tagged with tenant and env so a retry finds it |
//! | rollout | a launch template version per run (image, user data that installs the app artifact), a new Auto Scaling group `<t>-<e>-<run>` on the target group; once its targets are healthy the previous group is detached and deleted; if they never are, the new group is deleted and the old one keeps serving |
//! | decommission | groups, launch template, rule (priority freed), target group, builders and images, the database (with a final snapshot), then the security groups, the instance profile and role |

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use tracing::instrument;
use workflows::{RetryPolicy, StepKind};

use crate::clock::Clock;
use crate::{Activities, Invocation, Outcome};

mod database;
mod decommission;
mod dns;
pub mod error;
pub mod identity;
mod image;
mod names;
mod network;
mod ownership;
mod reports;
mod retention;
mod rollout;
mod routing;
pub mod sandbox;
mod scaling;
mod source;
#[cfg(test)]
mod tests;

pub use crate::infrastructure::Infrastructure;
pub use error::Error;
pub use names::{LOGS_PREFIX, MANAGED_BY, Names};

/// Exclusive values of named pools (listener rule priorities), held by owners: the store's
/// allocations (a conditional write), so no two workflows ever hold one priority.
pub trait Allocations: Send + Sync + 'static {
    /// Takes `value` of `pool` for `owner`; false if someone else holds it (or `owner` holds
    /// another value of the pool).
    fn allocate(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Frees `value` of `pool` if `owner` holds it.
    fn release(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// The value of `pool` that `owner` holds.
    fn allocation_of(
        &self,
        pool: &str,
        owner: &str,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send;
}

/// A boxed future: what [`Allocations`] calls return behind a trait object.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Allocations`] as a trait object. The reconcilers hold their allocations through it, so
/// they are compiled once here rather than once per implementation in every binary that uses
/// them; allocations are a few calls per routing step.
trait DynAllocations: Send + Sync {
    fn allocate<'a>(
        &'a self,
        pool: &'a str,
        value: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>>;
    fn release<'a>(
        &'a self,
        pool: &'a str,
        value: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>>;
    fn allocation_of<'a>(
        &'a self,
        pool: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, Error>>;
}

impl<A: Allocations> DynAllocations for A {
    fn allocate<'a>(
        &'a self,
        pool: &'a str,
        value: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(Allocations::allocate(self, pool, value, owner))
    }
    fn release<'a>(
        &'a self,
        pool: &'a str,
        value: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(Allocations::release(self, pool, value, owner))
    }
    fn allocation_of<'a>(
        &'a self,
        pool: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, Error>> {
        Box::pin(Allocations::allocation_of(self, pool, owner))
    }
}

/// Allocations in memory, for tests and a single process; the orchestrator uses its store.
/// Clones share the allocations.
#[derive(Debug, Clone, Default)]
pub struct MemoryAllocations {
    held: Arc<std::sync::Mutex<std::collections::BTreeMap<(String, u64), String>>>,
}

impl MemoryAllocations {
    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(String, u64), String>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Allocations for MemoryAllocations {
    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        let mut held = self.held();
        let owns_other = held
            .iter()
            .any(|((p, v), o)| p == pool && *v != value && o == owner);
        match held.get(&(pool.to_owned(), value)) {
            Some(o) => Ok(o == owner),
            None if owns_other => Ok(false),
            None => {
                held.insert((pool.to_owned(), value), owner.to_owned());
                Ok(true)
            }
        }
    }

    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        let mut held = self.held();
        if held
            .get(&(pool.to_owned(), value))
            .is_some_and(|o| o == owner)
        {
            held.remove(&(pool.to_owned(), value));
        }
        Ok(())
    }

    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        Ok(self
            .held()
            .iter()
            .find(|((p, _), o)| p == pool && o.as_str() == owner)
            .map(|((_, v), _)| *v))
    }
}

/// The AWS service clients.
#[derive(Debug, Clone)]
pub struct Clients {
    /// EC2.
    pub ec2: aws_sdk_ec2::Client,
    /// Auto Scaling.
    pub autoscaling: aws_sdk_autoscaling::Client,
    /// Elastic Load Balancing v2.
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    /// RDS.
    pub rds: aws_sdk_rds::Client,
    /// S3.
    pub s3: aws_sdk_s3::Client,
    /// Route 53.
    pub route53: aws_sdk_route53::Client,
    /// Secrets Manager.
    pub secrets: aws_sdk_secretsmanager::Client,
    /// IAM (read at start-up only).
    pub iam: aws_sdk_iam::Client,
}

impl Clients {
    /// Clients of every service from one SDK configuration. S3 uses path-style addressing
    /// when the configuration has an endpoint override (a local endpoint has no bucket
    /// subdomains).
    pub fn new(sdk: &SdkConfig) -> Self {
        let s3 = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build();
        Self {
            ec2: aws_sdk_ec2::Client::new(sdk),
            autoscaling: aws_sdk_autoscaling::Client::new(sdk),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(sdk),
            rds: aws_sdk_rds::Client::new(sdk),
            s3: aws_sdk_s3::Client::from_conf(s3),
            route53: aws_sdk_route53::Client::new(sdk),
            secrets: aws_sdk_secretsmanager::Client::new(sdk),
            iam: aws_sdk_iam::Client::new(sdk),
        }
    }
}

/// The reconcilers on AWS.
pub struct AwsCloud {
    clients: Clients,
    infra: Infrastructure,
    allocations: Box<dyn DynAllocations>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AwsCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCloud")
            .field("infra", &self.infra)
            .finish_non_exhaustive()
    }
}

impl AwsCloud {
    /// Reconcilers on `clients`, building on `infra`; refuses an `infra` with missing
    /// settings, naming each.
    pub fn new(
        clients: Clients,
        infra: Infrastructure,
        allocations: impl Allocations,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        if let Some(profile) = &infra.instance_profile {
            return Err(Error::Terminal(format!(
                "instance_profile ({profile:?}) is no longer used: each environment gets an IAM role and instance profile of its own under {}; remove the setting",
                identity::IAM_PATH
            )));
        }
        let missing = infra.missing();
        if !missing.is_empty() {
            return Err(Error::Terminal(format!(
                "the AWS infrastructure settings lack: {}",
                missing.join("; ")
            )));
        }
        Ok(Self {
            clients,
            infra,
            allocations: Box::new(allocations),
            clock,
        })
    }

    /// Checks that the configured infrastructure exists and can be seen: one line per
    /// setting whose resource is missing or cannot be read, naming the setting, the value and
    /// what the service said. Run at start-up, so a worker with a wrong setting stops at once
    /// instead of failing every step.
    pub async fn verify(&self) -> Result<(), Error> {
        let c = &self.clients;
        let i = &self.infra;
        let mut problems: Vec<String> = Vec::new();
        let mut retryable = false;
        let mut note = |setting: &str, value: &str, e: Option<Error>| {
            if let Some(e) = e {
                retryable |= e.is_retryable();
                problems.push(format!("{setting} = {value:?}: {e}"));
            }
        };
        let vpc = c.ec2.describe_vpcs().vpc_ids(&i.vpc_id).send().await;
        note(
            "vpc_id",
            &i.vpc_id,
            match vpc {
                Ok(out) if out.vpcs().is_empty() => Some(Error::Terminal("no such VPC".into())),
                Ok(_) => None,
                Err(e) => Some(error::classify("ec2:DescribeVpcs", &i.vpc_id, &e)),
            },
        );
        let subnets = c
            .ec2
            .describe_subnets()
            .set_subnet_ids(Some(i.subnet_ids.clone()))
            .send()
            .await;
        let joined = i.subnet_ids.join(",");
        note(
            "subnet_ids",
            &joined,
            match subnets {
                Ok(out) if out.subnets().len() < i.subnet_ids.len() => {
                    Some(Error::Terminal("not every subnet exists".into()))
                }
                Ok(out)
                    if out
                        .subnets()
                        .iter()
                        .any(|s| s.vpc_id() != Some(i.vpc_id.as_str())) =>
                {
                    Some(Error::Terminal("a subnet is not in vpc_id".into()))
                }
                Ok(_) => None,
                Err(e) => Some(error::classify("ec2:DescribeSubnets", &joined, &e)),
            },
        );
        let listener = c
            .elb
            .describe_listeners()
            .listener_arns(&i.listener_arn)
            .send()
            .await;
        note(
            "listener_arn",
            &i.listener_arn,
            match listener {
                Ok(out) if out.listeners().is_empty() => {
                    Some(Error::Terminal("no such listener".into()))
                }
                Ok(_) => None,
                Err(e) => Some(error::classify(
                    "elasticloadbalancing:DescribeListeners",
                    &i.listener_arn,
                    &e,
                )),
            },
        );
        let alb = c
            .ec2
            .describe_security_groups()
            .group_ids(&i.alb_security_group_id)
            .send()
            .await;
        note(
            "alb_security_group_id",
            &i.alb_security_group_id,
            match alb {
                Ok(out) if out.security_groups().is_empty() => {
                    Some(Error::Terminal("no such security group".into()))
                }
                Ok(_) => None,
                Err(e) => Some(error::classify(
                    "ec2:DescribeSecurityGroups",
                    &i.alb_security_group_id,
                    &e,
                )),
            },
        );
        let bucket = c.s3.head_bucket().bucket(&i.artifact_bucket).send().await;
        note(
            "artifact_bucket",
            &i.artifact_bucket,
            match bucket {
                Ok(_) => None,
                Err(e) => Some(error::classify("s3:HeadBucket", &i.artifact_bucket, &e)),
            },
        );
        let image = c
            .ec2
            .describe_images()
            .image_ids(&i.base_image_id)
            .send()
            .await;
        note(
            "base_image_id",
            &i.base_image_id,
            match image {
                Ok(out) if out.images().is_empty() => Some(Error::Terminal("no such image".into())),
                Ok(_) => None,
                Err(e) => Some(error::classify("ec2:DescribeImages", &i.base_image_id, &e)),
            },
        );
        let subnet_group = c
            .rds
            .describe_db_subnet_groups()
            .db_subnet_group_name(&i.db_subnet_group)
            .send()
            .await;
        note(
            "db_subnet_group",
            &i.db_subnet_group,
            match subnet_group {
                Ok(out) if out.db_subnet_groups().is_empty() => {
                    Some(Error::Terminal("no such DB subnet group".into()))
                }
                Ok(_) => None,
                Err(e) => Some(error::classify(
                    "rds:DescribeDBSubnetGroups",
                    &i.db_subnet_group,
                    &e,
                )),
            },
        );
        if let Some(zone) = &i.hosted_zone_id {
            let found = c.route53.get_hosted_zone().id(dns::bare(zone)).send().await;
            note(
                "hosted_zone_id",
                zone,
                found
                    .err()
                    .map(|e| error::classify("route53:GetHostedZone", zone, &e)),
            );
        }
        if problems.is_empty() {
            return Ok(());
        }
        let text = format!(
            "the AWS infrastructure settings name resources that cannot be used:\n  {}",
            problems.join("\n  ")
        );
        Err(if retryable {
            Error::Retryable(text)
        } else {
            Error::Terminal(text)
        })
    }

    /// The service clients.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The infrastructure settings.
    pub fn infrastructure(&self) -> &Infrastructure {
        &self.infra
    }

    /// The pool of listener rule priorities of the configured listener.
    pub fn priority_pool(&self) -> String {
        format!("listener-priority:{}", self.infra.listener_arn)
    }

    fn progress(&self, note: impl Into<String>) -> Outcome {
        Outcome::Progress {
            recheck_after: self.infra.recheck(),
            note: note.into(),
        }
    }
}

impl Activities for AwsCloud {
    #[instrument(level = "debug", skip_all, fields(tenant.id = %invocation.key.tenant, workflow.env = %invocation.key.env, step = %invocation.task.step, run = %invocation.task.run))]
    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        let names = Names::new(invocation.key);
        let result = match invocation.task.step {
            StepKind::Network => network::reconcile(self, &names, invocation).await,
            StepKind::SourceInfra => {
                source::reconcile(self, &names, invocation, workflows::RepoKind::Infra).await
            }
            StepKind::SourceApp => {
                source::reconcile(self, &names, invocation, workflows::RepoKind::App).await
            }
            StepKind::Image => image::reconcile(self, &names, invocation).await,
            StepKind::Database => database::reconcile(self, &names, invocation).await,
            StepKind::Routing => routing::reconcile(self, &names, invocation).await,
            StepKind::Rollout => rollout::reconcile(self, &names, invocation).await,
            StepKind::Decommission => decommission::reconcile(self, &names, invocation).await,
        };
        match result {
            Ok(outcome) => {
                if let Outcome::Progress { note, .. } = &outcome {
                    tracing::debug!(note = %note, "step under way");
                }
                outcome
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "step failed retryably");
                Outcome::Retryable(e.to_string())
            }
            Err(e) => {
                tracing::warn!(error = %e, "step failed terminally");
                Outcome::Terminal(e.to_string())
            }
        }
    }

    #[instrument(level = "debug", skip_all, fields(tenant.id = %invocation.key.tenant, workflow.env = %invocation.key.env, step = %invocation.task.step, run = %invocation.task.run))]
    async fn abandon(&self, invocation: Invocation<'_>) -> Result<(), String> {
        if invocation.task.step != StepKind::Image {
            return Ok(());
        }
        image::abandon(self, &Names::new(invocation.key), invocation)
            .await
            .map_err(|e| e.to_string())
    }

    fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        let (initial_s, max_s, max_attempts, within_min) = match step {
            StepKind::Network | StepKind::SourceInfra | StepKind::SourceApp | StepKind::Routing => {
                (2, 60, 8, 30)
            }
            StepKind::Image | StepKind::Database => (10, 300, 10, 120),
            StepKind::Rollout => (5, 120, 10, 60),
            StepKind::Decommission => (5, 300, 20, 240),
        };
        RetryPolicy {
            initial_delay: Duration::from_secs(initial_s),
            factor: 2.0,
            max_delay: Duration::from_secs(max_s),
            max_attempts,
            max_elapsed: Some(Duration::from_secs(within_min * 60)),
            full_jitter: true,
        }
    }
}

/// The tags of a resource of `names`' environment created by `run`.
fn tags(names: &Names, run: workflows::RunId) -> Vec<(&'static str, String)> {
    vec![
        (names::TAG_TENANT, names.key().tenant.to_string()),
        (names::TAG_ENV, names.key().env.to_string()),
        (names::TAG_RUN, run.to_string()),
        (names::TAG_MANAGED_BY, MANAGED_BY.to_owned()),
    ]
}
