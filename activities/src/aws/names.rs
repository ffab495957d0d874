//! Deterministic names, tags and idempotency tokens of the resources of one environment.
//!
//! Every name is derived from tenant, environment and (for per-release resources) the commit
//! or run, so a reconciler that lost its response finds what it created by name. Names keep
//! each service's rules: a target group name holds at most 32 characters (tenant ids are at
//! most 20, environments at most 10, so `<tenant>-<env>` fits), an RDS identifier must not
//! hold two hyphens in a row (so a tenant id with `--` gets them folded and a digest of the
//! key appended, keeping identifiers distinct).

use sha2::{Digest, Sha256};
use workflows::{GitSha, RepoKind, RunId, StepKind, WorkflowKey};

/// The value of the `managed-by` tag on everything the orchestrator creates.
pub const MANAGED_BY: &str = "tenant-host-orchestrator";

/// Tag keys.
pub(crate) const TAG_TENANT: &str = "tenant";
pub(crate) const TAG_ENV: &str = "env";
pub(crate) const TAG_RUN: &str = "run";
pub(crate) const TAG_MANAGED_BY: &str = "managed-by";
pub(crate) const TAG_NAME: &str = "Name";
/// On a builder instance: the infrastructure commit it builds.
pub(crate) const TAG_INFRA_SHA: &str = "infra-sha";
/// On a builder instance: the key stem its script report is uploaded under.
pub(crate) const TAG_REPORT: &str = "report";

/// Where in the artifact bucket every environment's script reports are (see
/// [`Names::logs_prefix`]).
pub const LOGS_PREFIX: &str = "_logs/";

/// The names of one environment's resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    key: WorkflowKey,
    base: String,
}

impl Names {
    /// The names of `key`'s resources.
    pub fn new(key: &WorkflowKey) -> Self {
        Self {
            key: key.clone(),
            base: format!("{}-{}", key.tenant, key.env),
        }
    }

    /// `<tenant>-<env>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The workflow key.
    pub fn key(&self) -> &WorkflowKey {
        &self.key
    }

    /// The instances' security group.
    pub fn instance_security_group(&self) -> String {
        format!("{}-instances", self.base)
    }

    /// The database's security group.
    pub fn database_security_group(&self) -> String {
        format!("{}-database", self.base)
    }

    /// The target group (at most 31 characters).
    pub fn target_group(&self) -> String {
        self.base.clone()
    }

    /// The image built from infrastructure commit `sha`.
    pub fn image(&self, sha: &GitSha) -> String {
        format!("{}-{}", self.base, sha)
    }

    /// The builder instance of the image of `sha` (its `Name` tag).
    pub fn builder(&self, sha: &GitSha) -> String {
        format!("{}-builder-{}", self.base, sha.short())
    }

    /// The RDS instance identifier: letters, digits and single hyphens.
    pub fn database(&self) -> String {
        if self.base.contains("--") {
            let folded = self
                .base
                .split('-')
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("-");
            format!("{folded}-{}", &digest(&self.key.to_string())[..8])
        } else {
            self.base.clone()
        }
    }

    /// The snapshot taken when the database is deleted.
    pub fn final_snapshot(&self) -> String {
        format!("{}-final", self.database())
    }

    /// The launch template of run `run` (named like its group).
    pub fn launch_template(&self, run: RunId) -> String {
        self.group(run)
    }

    /// The Auto Scaling group of run `run`.
    pub fn group(&self, run: RunId) -> String {
        format!("{}-{run}", self.base)
    }

    /// Where the packed source of `repo` at `sha` is kept: under the environment's
    /// [`artifact_prefix`](Self::artifact_prefix), keyed by the commit (a git commit id
    /// addresses its content).
    pub fn artifact_key(&self, repo: RepoKind, sha: &GitSha) -> String {
        let repo = match repo {
            RepoKind::Infra => "infra",
            RepoKind::App => "app",
        };
        format!("{}{repo}/{sha}.tar.gz", self.artifact_prefix())
    }

    /// `<tenant>/<env>/`: the part of the artifact bucket the environment's instances may read
    /// (and no other environment's may).
    pub fn artifact_prefix(&self) -> String {
        format!("{}/{}/", self.key.tenant, self.key.env)
    }

    /// `_logs/<tenant>/<env>/`: where the environment's instances upload their script reports
    /// (the only part of the bucket they may write). Under one bucket-wide `_logs/` (no tenant id starts with `_`, so it is no tenant's prefix) so that
    /// one lifecycle rule expires every environment's reports.
    pub fn logs_prefix(&self) -> String {
        format!("{LOGS_PREFIX}{}/{}/", self.key.tenant, self.key.env)
    }

    /// The key stem of the script report of one build of `sha` (`build` tells the builds of
    /// one commit apart: the launch token).
    pub fn build_report(&self, sha: &GitSha, build: &str) -> String {
        format!("{}image/{sha}-{build}", self.logs_prefix())
    }

    /// The prefix of the `install.sh` reports of run `run`'s instances (one per instance).
    pub fn install_reports(&self, run: RunId) -> String {
        format!("{}rollout/{}/", self.logs_prefix(), self.group(run))
    }

    /// The environment's IAM role and instance profile (at most 64 characters).
    pub fn instance_role(&self) -> String {
        format!("{}-instances", self.base)
    }

    /// An idempotency token for `step`'s action on `what`: the same for every retry, distinct
    /// per workflow, step and target (32 hex characters; EC2 takes up to 64).
    pub fn token(&self, step: StepKind, what: &str) -> String {
        digest(&format!("{}|{step}|{what}", self.key))[..32].to_owned()
    }
}

fn digest(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflows::{Environment, TenantId};

    fn names(tenant: &str, env: Environment) -> Names {
        Names::new(&WorkflowKey::new(TenantId::new(tenant).expect("id"), env))
    }

    #[test]
    fn names_fit_the_services_rules() {
        let n = names("abcdefghijklmnopqrst", Environment::Production);
        assert!(n.target_group().len() <= 32, "{}", n.target_group());
        assert_eq!(n.database(), "abcdefghijklmnopqrst-production");
        let n = names("ac--me", Environment::Dev);
        let db = n.database();
        assert!(!db.contains("--") && db.starts_with("ac-me-dev-"), "{db}");
        assert_ne!(db, names("ac-me", Environment::Dev).database());
    }

    #[test]
    fn tokens_are_stable_and_distinct() {
        let a = names("acme", Environment::Dev);
        let b = names("acme", Environment::Staging);
        assert_eq!(a.token(StepKind::Image, "x"), a.token(StepKind::Image, "x"));
        assert_ne!(a.token(StepKind::Image, "x"), b.token(StepKind::Image, "x"));
        assert_ne!(a.token(StepKind::Image, "x"), a.token(StepKind::Image, "y"));
        assert_eq!(a.token(StepKind::Image, "x").len(), 32);
    }
}
