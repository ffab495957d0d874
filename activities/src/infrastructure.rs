//! The settings of the shared infrastructure the AWS reconcilers build on (`[infrastructure]`
//! of the orchestrator's configuration). Plain data, so that configurations parse in builds
//! without the `aws` feature too.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shared infrastructure the reconcilers build on, from configuration
/// (`[aws.infrastructure]` of the orchestrator); `orchestrator init --sandbox` creates one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Infrastructure {
    /// The VPC everything lives in.
    pub vpc_id: String,
    /// Subnets of the Auto Scaling groups and builders (at least two zones for the load
    /// balancer).
    pub subnet_ids: Vec<String>,
    /// The shared load balancer's HTTP(S) listener that gets one rule per environment.
    pub listener_arn: String,
    /// The load balancer's security group: the only source the instances admit.
    pub alb_security_group_id: String,
    /// The S3 bucket of source artifacts.
    pub artifact_bucket: String,
    /// The image builders start from (and that serves before the first infra push).
    pub base_image_id: String,
    /// No longer used: each environment has an IAM role and instance profile of its own
    /// (`activities::aws::identity`). Still read, so that a configuration that sets it is
    /// refused with that explanation rather than as an unknown field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    /// The DB subnet group of the databases.
    pub db_subnet_group: String,
    /// KMS key for image volumes and databases; none: the services' default keys.
    pub kms_key_id: Option<String>,
    /// Where the repositories are: `{tenant}` and `{repo}` (`infra` or `app`) are replaced,
    /// e.g. `https://gitlab.example.com/{tenant}/{repo}.git` or `file:///srv/git/{tenant}-{repo}.git`.
    pub source_url: String,
    /// Secrets Manager secret (name or ARN; `{tenant}` is replaced) holding a GitLab deploy
    /// token for private repositories: `{"username": ..., "token": ...}`. None: public.
    pub deploy_token_secret: Option<String>,
    /// Instance type of the serving instances.
    pub instance_type: String,
    /// Instance type of the image builders.
    pub builder_instance_type: String,
    /// RDS instance class.
    pub db_instance_class: String,
    /// RDS storage in GiB.
    pub db_allocated_storage_gib: i32,
    /// Days of automated backups kept of a dev or staging database (0 turns them off).
    pub db_backup_days: i32,
    /// Days of automated backups kept of a production database.
    pub production_db_backup_days: i32,
    /// Production databases have a standby in another availability zone.
    pub production_db_multi_az: bool,
    /// Production databases cannot be deleted while this holds; decommission lifts it as its
    /// last act before the final snapshot.
    pub production_db_deletion_protection: bool,
    /// The platform's Route 53 hosted zone: an environment whose host is a name in it gets its
    /// alias record there (a tenant domain elsewhere needs a zone of that name tagged
    /// `tenant=<id>`). Unset: only such tenant zones.
    pub hosted_zone_id: Option<String>,
    /// Instances per Auto Scaling group: the desired size of every environment that does not
    /// set its own (`wfctl tenant set --desired`).
    pub group_size: i32,
    /// The groups' minimum size by default (default: `group_size`).
    pub min_size: Option<u32>,
    /// The groups' maximum size by default (default: `group_size`).
    pub max_size: Option<u32>,
    /// The groups' target-tracking policy by default, e.g. `scaling = { cpu = 60 }` or
    /// `{ requests_per_target = 1000 }` (default: none, a fixed size).
    pub scaling: Option<workflows::Scaling>,
    /// The port the application listens on.
    pub app_port: i32,
    /// The target group's health check path.
    pub health_check_path: String,
    /// How long a builder may run the scripts before the build fails.
    pub builder_timeout_secs: u64,
    /// How long a new group may take to become healthy before it is rolled back.
    pub rollout_timeout_secs: u64,
    /// How long to wait before looking again at something under way.
    pub recheck_secs: u64,
    /// How long each git command of a source step may run (a remote that stalls).
    pub source_timeout_secs: u64,
    /// How large a commit's fetched source and its archive may grow, in MiB; past it the
    /// step fails rather than filling the disk.
    pub source_max_mib: u64,
}

impl Default for Infrastructure {
    fn default() -> Self {
        Self {
            vpc_id: String::new(),
            subnet_ids: Vec::new(),
            listener_arn: String::new(),
            alb_security_group_id: String::new(),
            artifact_bucket: String::new(),
            base_image_id: String::new(),
            instance_profile: None,
            db_subnet_group: String::new(),
            kms_key_id: None,
            source_url: String::new(),
            deploy_token_secret: None,
            instance_type: "t3.micro".to_owned(),
            builder_instance_type: "t3.small".to_owned(),
            db_instance_class: "db.t3.micro".to_owned(),
            db_allocated_storage_gib: 20,
            db_backup_days: 1,
            production_db_backup_days: 7,
            production_db_multi_az: true,
            production_db_deletion_protection: true,
            hosted_zone_id: None,
            group_size: 1,
            min_size: None,
            max_size: None,
            scaling: None,
            app_port: 80,
            health_check_path: "/".to_owned(),
            builder_timeout_secs: 3600,
            rollout_timeout_secs: 1200,
            recheck_secs: 15,
            source_timeout_secs: 600,
            source_max_mib: 1024,
        }
    }
}

impl Infrastructure {
    /// The partition of the account (`aws`, `aws-cn`, `aws-us-gov`), from the listener's ARN.
    pub fn partition(&self) -> &str {
        self.listener_arn
            .split(':')
            .nth(1)
            .filter(|p| !p.is_empty())
            .unwrap_or("aws")
    }

    /// The region of the shared infrastructure, from the listener's ARN.
    pub fn region(&self) -> Option<&str> {
        self.listener_arn
            .split(':')
            .nth(3)
            .filter(|r| !r.is_empty())
    }

    /// The required settings that are empty, each with what it is.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        let mut need = |empty: bool, what: &'static str| {
            if empty {
                missing.push(what);
            }
        };
        need(self.vpc_id.is_empty(), "vpc_id (the VPC of everything)");
        need(
            self.subnet_ids.is_empty(),
            "subnet_ids (subnets of the groups and builders)",
        );
        need(
            self.listener_arn.is_empty(),
            "listener_arn (the load balancer listener that gets the rules)",
        );
        need(
            self.alb_security_group_id.is_empty(),
            "alb_security_group_id (the load balancer's security group)",
        );
        need(
            self.artifact_bucket.is_empty(),
            "artifact_bucket (S3 bucket of source artifacts)",
        );
        need(
            self.base_image_id.is_empty(),
            "base_image_id (the AMI builders start from)",
        );
        need(
            self.db_subnet_group.is_empty(),
            "db_subnet_group (DB subnet group of the databases)",
        );
        need(
            self.source_url.is_empty(),
            "source_url (where the repositories are, with {tenant} and {repo})",
        );
        missing
    }

    /// The sizing of an environment that sets none of its own.
    pub fn default_sizing(&self) -> workflows::Sizing {
        let size = u32::try_from(self.group_size.max(1)).unwrap_or(1);
        workflows::Sizing {
            min: self.min_size.unwrap_or(size),
            max: self.max_size.unwrap_or(size),
            desired: size,
            instance_type: self.instance_type.clone(),
            scaling: self.scaling,
        }
    }

    /// How long to wait before looking again at something under way (at least a second).
    pub fn recheck(&self) -> Duration {
        Duration::from_secs(self.recheck_secs.max(1))
    }
}
