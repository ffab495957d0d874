//! The tenant record: who a tenant is, which GitLab projects and branches drive which
//! environments, and how its webhooks authenticate.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::Persisted;
use crate::config::EnvConfig;
use crate::env_settings::EnvSettings;
use crate::event::RepoKind;
use crate::id::{Domain, Environment, TenantId};
use crate::machine::Settings;
use crate::time::Timestamp;

/// How a tenant's webhooks authenticate. The secret token itself is never stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookAuth {
    /// Lowercase hex SHA-256 of the current `X-Gitlab-Token` secret.
    pub token_sha256: String,
    /// Hash of the previous secret, accepted until `previous_valid_until` after a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_sha256: Option<String>,
    /// End of the previous secret's grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<Timestamp>,
    /// Standard Webhooks signing secret (`whsec_…`), when the tenant signs its webhooks. An
    /// HMAC key must be kept to verify signatures, so unlike the token it is stored as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

// The signing secret never appears in `Debug` output (logs, panic messages).
impl std::fmt::Debug for WebhookAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAuth")
            .field("token_sha256", &self.token_sha256)
            .field("previous_token_sha256", &self.previous_token_sha256)
            .field("previous_valid_until", &self.previous_valid_until)
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A registered tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// The shape's version; see [`Persisted`].
    pub schema_version: u32,
    /// The tenant's id.
    pub id: TenantId,
    /// Environments are served at `<env>.<domain>`.
    pub domain: Domain,
    /// GitLab project id of the infrastructure repository.
    pub infra_project: u64,
    /// GitLab project id of the application repository.
    pub app_project: u64,
    /// Branch name (without `refs/heads/`) to environment.
    pub branches: BTreeMap<String, Environment>,
    /// Production runs wait for `approve` before rolling out.
    pub production_approval: bool,
    /// Webhook authentication.
    pub webhook: WebhookAuth,
    /// Each environment's config vars (absent: none; not in records of schema version 1).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<Environment, EnvConfig>,
    /// Each environment's settings: sizing, releases kept, decommissioned (absent: the
    /// defaults; not in records before schema version 3).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environments: BTreeMap<Environment, EnvSettings>,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl Persisted for Tenant {
    const KIND: &'static str = "tenant record";
    /// Version 2: each environment's config vars (`config`). Version 3: each environment's
    /// settings (`environments`).
    const SCHEMA_VERSION: u32 = 3;
    const OLDEST_SCHEMA_VERSION: u32 = 1;
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn upgrade(&mut self) {
        self.schema_version = Self::SCHEMA_VERSION;
    }
}

impl Tenant {
    /// A tenant of the current schema version with the default branch map, no production
    /// approval and no signing secret, whose webhook token hashes to `token_sha256`.
    pub fn new(
        id: TenantId,
        domain: Domain,
        infra_project: u64,
        app_project: u64,
        token_sha256: String,
        now: Timestamp,
    ) -> Self {
        Self {
            schema_version: Self::SCHEMA_VERSION,
            id,
            domain,
            infra_project,
            app_project,
            branches: Self::default_branches(),
            production_approval: false,
            webhook: WebhookAuth {
                token_sha256,
                previous_token_sha256: None,
                previous_valid_until: None,
                signing_secret: None,
            },
            config: BTreeMap::new(),
            environments: BTreeMap::new(),
            created_at: now,
            updated_at: now,
        }
    }

    /// The default branch map: `dev`, `staging`, and `master` or `main` to production.
    pub fn default_branches() -> BTreeMap<String, Environment> {
        [
            ("dev", Environment::Dev),
            ("staging", Environment::Staging),
            ("master", Environment::Production),
            ("main", Environment::Production),
        ]
        .into_iter()
        .map(|(b, e)| (b.to_owned(), e))
        .collect()
    }

    /// The config vars of `env` (an empty, version 0 config when it has none).
    pub fn config_of(&self, env: Environment) -> EnvConfig {
        self.config.get(&env).cloned().unwrap_or_default()
    }

    /// The environment a push to `git_ref` deploys, if the branch is mapped. Tags and other
    /// refs map to nothing.
    pub fn environment_for_ref(&self, git_ref: &str) -> Option<Environment> {
        let branch = git_ref.strip_prefix("refs/heads/")?;
        self.branches.get(branch).copied()
    }

    /// Which of the tenant's repositories GitLab project `project` is.
    pub fn repo_for_project(&self, project: u64) -> Option<RepoKind> {
        if project == self.infra_project {
            Some(RepoKind::Infra)
        } else if project == self.app_project {
            Some(RepoKind::App)
        } else {
            None
        }
    }

    /// The settings of `env` (the defaults when it has none).
    pub fn env_settings(&self, env: Environment) -> EnvSettings {
        self.environments.get(&env).cloned().unwrap_or_default()
    }

    /// Changes the settings of `env`; settings back at the defaults are not kept.
    pub fn set_env_settings(&mut self, env: Environment, settings: EnvSettings) {
        if settings.is_default() {
            self.environments.remove(&env);
        } else {
            self.environments.insert(env, settings);
        }
    }

    /// The settings the workflow of `env` runs with.
    pub fn settings(&self, env: Environment) -> Settings {
        Settings {
            production_approval: self.production_approval,
            keep_releases: self.env_settings(env).keep_releases(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_secret_never_appears_in_debug_output() {
        let mut tenant = Tenant::new(
            TenantId::new("acme").expect("valid"),
            Domain::new("acme.example").expect("valid"),
            1,
            2,
            "00".repeat(32),
            Timestamp::EPOCH,
        );
        tenant.webhook.signing_secret = Some("whsec_c2VjcmV0LWtleS1vZi1hY21l".into());
        let shown = format!("{tenant:?} {tenant:#?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("acme.example"),
            "{shown}"
        );
    }

    #[test]
    fn refs_map_through_the_branch_map() {
        let tenant = Tenant::new(
            TenantId::new("acme").expect("valid"),
            Domain::new("acme.example").expect("valid"),
            1,
            2,
            "00".repeat(32),
            Timestamp::EPOCH,
        );
        assert_eq!(
            tenant.environment_for_ref("refs/heads/main"),
            Some(Environment::Production)
        );
        assert_eq!(
            tenant.environment_for_ref("refs/heads/dev"),
            Some(Environment::Dev)
        );
        assert_eq!(tenant.environment_for_ref("refs/heads/feature"), None);
        assert_eq!(tenant.environment_for_ref("refs/tags/main"), None);
        assert_eq!(tenant.repo_for_project(2), Some(RepoKind::App));
        assert_eq!(tenant.repo_for_project(3), None);
    }
}
