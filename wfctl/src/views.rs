//! What `-o json` prints: views of tenants, workflows and history entries with stable
//! snake_case field names, decoupled from the persisted shapes (which may gain fields or
//! versions) and free of secrets.
//!
//! Conventions: instants are RFC 3339 strings in UTC; commits are full 40 or 64 digit shas;
//! run ids are strings like `"r7"`; states, statuses, environments and kinds are their
//! snake_case names; a field that does not apply is `null` (never missing).

use std::collections::BTreeMap;

use serde::Serialize;
use workflows::{
    Deployed, Domain, Environment, EventId, GitSha, HistoryEntry, Push, Release, RepoKind,
    Resources, Run, RunEnd, RunKind, State, StepKind, StepProgress, StepStatus, Tenant, TenantId,
    Timestamp, Verdict, WorkflowKey, WorkflowRecord,
};

pub use orchestrator::describe::describe_event;
use orchestrator::ports::WorkflowSummary;

/// A tenant as shown: never its token hash or signing secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantView {
    /// The tenant's id.
    pub id: TenantId,
    /// Its domain; environments are served at `<env>.<domain>`.
    pub domain: Domain,
    /// GitLab project id of the infrastructure repository.
    pub infra_project: u64,
    /// GitLab project id of the application repository.
    pub app_project: u64,
    /// Branch name to environment.
    pub branches: BTreeMap<String, Environment>,
    /// Production runs wait for `approve`.
    pub production_approval: bool,
    /// Whether a Standard Webhooks signing secret is configured.
    pub signing_secret_set: bool,
    /// Until when the token before the last rotation is still accepted (`null`: it is not).
    pub previous_token_valid_until: Option<Timestamp>,
    /// Each environment's settings that are not all defaults: `min_size`, `max_size`,
    /// `desired_size`, `instance_type`, `scaling` (`{"cpu": 60}`, `{"requests_per_target":
    /// 1000}`), `keep_releases`, `decommissioned`; an unset one is absent.
    pub environments: BTreeMap<Environment, workflows::EnvSettings>,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl TenantView {
    /// The view of `tenant` at `now`.
    pub fn new(tenant: &Tenant, now: Timestamp) -> Self {
        let auth = &tenant.webhook;
        Self {
            id: tenant.id.clone(),
            domain: tenant.domain.clone(),
            infra_project: tenant.infra_project,
            app_project: tenant.app_project,
            branches: tenant.branches.clone(),
            production_approval: tenant.production_approval,
            signing_secret_set: auth.signing_secret.is_some(),
            previous_token_valid_until: auth
                .previous_valid_until
                .filter(|until| auth.previous_token_sha256.is_some() && now < *until),
            environments: tenant.environments.clone(),
            created_at: tenant.created_at,
            updated_at: tenant.updated_at,
        }
    }
}

/// What `tenant add -o json` prints: the tenant and, this once, its webhook secret token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewTenantView {
    /// The registered tenant.
    pub tenant: TenantView,
    /// The secret token to configure in GitLab; it is not stored and cannot be shown again.
    pub webhook_secret: String,
}

/// What `tenant rotate-token -o json` prints: the tenant and, this once, its new webhook secret
/// token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotatedTokenView {
    /// The tenant after the rotation.
    pub tenant: TenantView,
    /// The new secret token to configure in GitLab; it is not stored and cannot be shown again.
    pub webhook_secret: String,
    /// Until when the token before the rotation is still accepted (`null`: it no longer is).
    pub previous_valid_until: Option<Timestamp>,
}

/// What `tenant signing-secret -o json` prints: the tenant and, this once, its new signing
/// secret (`null` after `--remove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SigningSecretView {
    /// The tenant after the change.
    pub tenant: TenantView,
    /// The new Standard Webhooks signing secret (`whsec_…`), or `null` when it was removed.
    pub signing_secret: Option<String>,
}

/// A workflow as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryView {
    /// `tenant#env`.
    pub key: WorkflowKey,
    /// The tenant.
    pub tenant: TenantId,
    /// The environment.
    pub env: Environment,
    /// The state as of the last write.
    pub state: State,
    /// The record's version.
    pub version: u64,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Why the engine stopped it because its record does not decode (`null`: it did not).
    pub corrupt: Option<String>,
}

impl From<&WorkflowSummary> for SummaryView {
    fn from(s: &WorkflowSummary) -> Self {
        Self {
            key: s.key.clone(),
            tenant: s.key.tenant.clone(),
            env: s.key.env,
            state: s.state,
            version: s.version,
            updated_at: s.updated_at,
            corrupt: s.corrupt.clone(),
        }
    }
}

/// The commits of a release (`null`: that repository has not been pushed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseView {
    /// Infrastructure commit.
    pub infra: Option<GitSha>,
    /// Application commit.
    pub app: Option<GitSha>,
}

impl From<&Release> for ReleaseView {
    fn from(r: &Release) -> Self {
        Self {
            infra: r.infra.clone(),
            app: r.app.clone(),
        }
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepView {
    /// Which step (`network`, `source_infra`, `source_app`, `routing`, `image`, `database`,
    /// `rollout`, `decommission`).
    pub step: StepKind,
    /// `pending`, `skipped`, `running`, `retry_wait`, `done` or `failed`.
    pub status: StepStatus,
    /// Attempts started under the current retry budget.
    pub attempt: u32,
    /// When the first of them started.
    pub first_attempt_at: Option<Timestamp>,
    /// When the step finished.
    pub finished_at: Option<Timestamp>,
    /// When the next attempt starts (in `retry_wait`).
    pub next_attempt_at: Option<Timestamp>,
    /// The last error the activity reported.
    pub last_error: Option<String>,
    /// The last progress note.
    pub note: Option<String>,
}

impl From<&StepProgress> for StepView {
    fn from(s: &StepProgress) -> Self {
        Self {
            step: s.kind,
            status: s.status,
            attempt: s.attempt,
            first_attempt_at: s.first_attempt_at,
            finished_at: s.finished_at,
            next_attempt_at: s.next_attempt_at,
            last_error: s.last_error.clone(),
            note: s.note.clone(),
        }
    }
}

/// The current (or last) run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunView {
    /// `"r7"`.
    pub id: String,
    /// `deploy` or `decommission`.
    pub kind: RunKind,
    /// The commits it deploys.
    pub release: ReleaseView,
    /// The id of the event that started it.
    pub trigger: EventId,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// `succeeded`, `cancelled`, `abandoned`, or `null` while it has not ended.
    pub ended: Option<RunEnd>,
    /// Whether it must be approved before rolling out.
    pub needs_approval: bool,
    /// Whether it was approved.
    pub approved: bool,
    /// Its steps, in dependency order.
    pub steps: Vec<StepView>,
}

impl From<&Run> for RunView {
    fn from(r: &Run) -> Self {
        Self {
            id: r.id.to_string(),
            kind: r.kind,
            release: (&r.release).into(),
            trigger: r.trigger.clone(),
            started_at: r.started_at,
            finished_at: r.finished_at,
            ended: r.ended,
            needs_approval: r.needs_approval,
            approved: r.approved,
            steps: r.steps.iter().map(StepView::from).collect(),
        }
    }
}

/// What the environment holds (`null`: not created yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResourcesView {
    /// Security group of the instances.
    pub instance_security_group: Option<String>,
    /// Security group of the database.
    pub database_security_group: Option<String>,
    /// Artifact key of the newest infrastructure source.
    pub infra_artifact: Option<String>,
    /// Artifact key of the newest application source.
    pub app_artifact: Option<String>,
    /// The newest image.
    pub image_id: Option<String>,
    /// The infrastructure commit it was built from.
    pub image_infra_sha: Option<GitSha>,
    /// The database instance identifier.
    pub database_instance_id: Option<String>,
    /// Host and port of the database.
    pub database_endpoint: Option<String>,
    /// ARN of the secret holding the database credentials (the credentials are never shown).
    pub database_secret_arn: Option<String>,
    /// The host name routed to the environment.
    pub host: Option<String>,
    /// The target group.
    pub target_group_arn: Option<String>,
    /// The listener rule.
    pub rule_arn: Option<String>,
    /// The listener rule's priority.
    pub rule_priority: Option<u32>,
    /// The Route 53 hosted zone holding the host's alias record (`null`: none written).
    pub dns_zone: Option<String>,
    /// The serving Auto Scaling group.
    pub auto_scaling_group: Option<String>,
    /// The image the serving group runs.
    pub serving_image_id: Option<String>,
}

impl From<&Resources> for ResourcesView {
    fn from(r: &Resources) -> Self {
        Self {
            instance_security_group: r
                .network
                .as_ref()
                .map(|n| n.instance_security_group.clone()),
            database_security_group: r
                .network
                .as_ref()
                .map(|n| n.database_security_group.clone()),
            infra_artifact: r.infra_source.as_ref().map(|s| s.artifact_key.clone()),
            app_artifact: r.app_source.as_ref().map(|s| s.artifact_key.clone()),
            image_id: r.image.as_ref().map(|i| i.image_id.clone()),
            image_infra_sha: r.image.as_ref().map(|i| i.infra_sha.clone()),
            database_instance_id: r.database.as_ref().map(|d| d.instance_id.clone()),
            database_endpoint: r.database.as_ref().map(|d| d.endpoint.clone()),
            database_secret_arn: r.database.as_ref().map(|d| d.secret_arn.clone()),
            host: r.routing.as_ref().map(|x| x.host.clone()),
            target_group_arn: r.routing.as_ref().map(|x| x.target_group_arn.clone()),
            rule_arn: r.routing.as_ref().map(|x| x.rule_arn.clone()),
            rule_priority: r.routing.as_ref().map(|x| x.priority),
            dns_zone: r.routing.as_ref().and_then(|x| x.dns_zone.clone()),
            auto_scaling_group: r.deployment.as_ref().map(|d| d.group_name.clone()),
            serving_image_id: r.deployment.as_ref().map(|d| d.image_id.clone()),
        }
    }
}

/// What is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployedView {
    /// The release serving.
    pub release: ReleaseView,
    /// The run that rolled it out (`"r7"`).
    pub run: String,
    /// When its rollout finished.
    pub at: Timestamp,
}

impl From<&Deployed> for DeployedView {
    fn from(d: &Deployed) -> Self {
        Self {
            release: (&d.release).into(),
            run: d.run.to_string(),
            at: d.at,
        }
    }
}

/// A push waiting for the current run to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushView {
    /// `infra` or `app`.
    pub repo: RepoKind,
    /// The pushed commit.
    pub sha: GitSha,
    /// The pushed ref.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Who pushed.
    pub author: String,
    /// Title of the head commit.
    pub message: String,
    /// The push's event id.
    pub event_id: EventId,
    /// When the ingress accepted it.
    pub received_at: Timestamp,
}

impl From<&Push> for PushView {
    fn from(p: &Push) -> Self {
        Self {
            repo: p.repo,
            sha: p.sha.clone(),
            git_ref: p.git_ref.clone(),
            author: p.author.clone(),
            message: p.message.clone(),
            event_id: p.event_id.clone(),
            received_at: p.received_at,
        }
    }
}

/// One workflow in full. For a record that does not decode, `corrupt` says why and the
/// fields that come from the record are `null` (or empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowView {
    /// `tenant#env`.
    pub key: WorkflowKey,
    /// The tenant.
    pub tenant: TenantId,
    /// The environment.
    pub env: Environment,
    /// The state.
    pub state: State,
    /// The record's version.
    pub version: u64,
    /// When the record was created.
    pub created_at: Option<Timestamp>,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Why the record cannot be read (`null`: it can).
    pub corrupt: Option<String>,
    /// The newest commit of each repository accepted.
    pub desired: Option<ReleaseView>,
    /// The current run, or the last one.
    pub run: Option<RunView>,
    /// What the environment holds.
    pub resources: Option<ResourcesView>,
    /// What is serving.
    pub deployed: Option<DeployedView>,
    /// The releases kept for rollback, oldest first (the last one serves).
    pub releases: Vec<DeployedView>,
    /// Pushes waiting for the current run (infra first).
    pub pending: Vec<PushView>,
}

impl From<&WorkflowRecord> for WorkflowView {
    fn from(record: &WorkflowRecord) -> Self {
        let w = record.workflow();
        Self {
            key: record.key.clone(),
            tenant: record.key.tenant.clone(),
            env: record.key.env,
            state: record.state(),
            version: record.version,
            created_at: Some(record.created_at),
            updated_at: record.updated_at,
            corrupt: None,
            desired: Some((&w.desired).into()),
            run: w.run.as_ref().map(RunView::from),
            resources: Some((&w.resources).into()),
            deployed: w.deployed.as_ref().map(DeployedView::from),
            releases: w.releases.iter().map(DeployedView::from).collect(),
            pending: [w.pending.infra.as_ref(), w.pending.app.as_ref()]
                .into_iter()
                .flatten()
                .map(PushView::from)
                .collect(),
        }
    }
}

impl WorkflowView {
    /// The view of a workflow whose record does not decode, from its listing and the error.
    pub fn corrupt(summary: &WorkflowSummary, error: String) -> Self {
        Self {
            key: summary.key.clone(),
            tenant: summary.key.tenant.clone(),
            env: summary.key.env,
            state: summary.state,
            version: summary.version,
            created_at: None,
            updated_at: summary.updated_at,
            corrupt: Some(error),
            desired: None,
            run: None,
            resources: None,
            deployed: None,
            releases: Vec::new(),
            pending: Vec::new(),
        }
    }
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    /// The record version the entry produced.
    pub version: u64,
    /// When it was applied.
    pub at: Timestamp,
    /// The event's kind: `push`, `provision`, `signal`, `step`, `timer` or `rearm`.
    pub event: &'static str,
    /// The event's id.
    pub event_id: EventId,
    /// The event in words (as the table shows it).
    pub summary: String,
    /// `accepted`, `ignored`, `refused`, `stale` or `duplicate`.
    pub verdict: &'static str,
    /// Why, when the verdict is not `accepted` (`null` otherwise).
    pub reason: Option<String>,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// The run current after the event (`"r7"`).
    pub run: Option<String>,
    /// The event in full, as persisted (`{"push": {...}}`, `{"signal": {...}}`, ...).
    pub detail: serde_json::Value,
}

impl From<&HistoryEntry> for HistoryView {
    fn from(e: &HistoryEntry) -> Self {
        let (verdict, reason) = verdict_parts(&e.verdict);
        Self {
            version: e.version,
            at: e.at,
            event: e.event.kind(),
            event_id: e.event.id(),
            summary: describe_event(&e.event),
            verdict,
            reason: reason.map(str::to_owned),
            from: e.from,
            to: e.to,
            run: e.run.map(|r| r.to_string()),
            detail: serde_json::to_value(&e.event).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A verdict's name and reason.
pub fn verdict_parts(v: &Verdict) -> (&'static str, Option<&str>) {
    match v {
        Verdict::Accepted => ("accepted", None),
        Verdict::Ignored(r) => ("ignored", Some(r)),
        Verdict::Refused(r) => ("refused", Some(r)),
        Verdict::Stale(r) => ("stale", Some(r)),
        Verdict::Duplicate => ("duplicate", None),
    }
}

fn short_sha(sha: &Option<GitSha>) -> &str {
    sha.as_ref().map_or("-", GitSha::short)
}

/// A release in words: `infra 1a2b3c4d app -`.
pub fn describe_release(r: &Release) -> String {
    format!("infra {} app {}", short_sha(&r.infra), short_sha(&r.app))
}
