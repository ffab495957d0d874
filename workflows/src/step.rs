//! The steps of a run, the graph between them, and what each one produces.
//!
//! Preparation steps form a small graph (ARCHITECTURE.md, "Steps and the preparation graph"): source before image; network before
//! database, image and rollout; image, database and routing before rollout. A step whose
//! output for the run's inputs already exists is skipped.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{GitSha, RunId};
use crate::time::Timestamp;

/// One activity of a run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Security groups for the instances and the database.
    Network,
    /// Fetch the infrastructure repository at the pushed commit and store it as an artifact.
    SourceInfra,
    /// Fetch the application repository at the pushed commit and store it as an artifact.
    SourceApp,
    /// Build the machine image from the base image and the tenant's scripts.
    Image,
    /// The environment's MySQL database.
    Database,
    /// Target group and listener rule for `<env>.<domain>`.
    Routing,
    /// Blue/green replacement of the Auto Scaling group.
    Rollout,
    /// Release everything the environment holds.
    Decommission,
}

impl StepKind {
    /// The preparation steps, in a topological order of their graph.
    pub const PREPARATION: [StepKind; 6] = [
        Self::Network,
        Self::SourceInfra,
        Self::SourceApp,
        Self::Routing,
        Self::Image,
        Self::Database,
    ];

    /// Every step kind.
    pub const ALL: [StepKind; 8] = [
        Self::Network,
        Self::SourceInfra,
        Self::SourceApp,
        Self::Routing,
        Self::Image,
        Self::Database,
        Self::Rollout,
        Self::Decommission,
    ];

    /// The steps that must be done (or skipped) before this one may start.
    pub fn dependencies(self) -> &'static [StepKind] {
        match self {
            Self::Image => &[Self::SourceInfra, Self::Network],
            Self::Database => &[Self::Network],
            Self::Rollout => &[
                Self::Network,
                Self::SourceApp,
                Self::Image,
                Self::Database,
                Self::Routing,
            ],
            Self::Network
            | Self::SourceInfra
            | Self::SourceApp
            | Self::Routing
            | Self::Decommission => &[],
        }
    }

    /// The snake_case name used in messages, ids and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::SourceInfra => "source_infra",
            Self::SourceApp => "source_app",
            Self::Image => "image",
            Self::Database => "database",
            Self::Routing => "routing",
            Self::Rollout => "rollout",
            Self::Decommission => "decommission",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StepKind {
    type Err = crate::id::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| crate::id::Error::Invalid {
                kind: "step",
                value: s.chars().take(80).collect(),
                rule: "one of network, source_infra, source_app, image, database, routing, rollout, decommission",
            })
    }
}

/// Where a step of the current run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started: waiting for its dependencies, an approval, or a `retry`.
    Pending,
    /// Not needed: its output for this run's inputs already exists.
    Skipped,
    /// A step message with the step's current token is outstanding.
    Running,
    /// Failed retryably; a timer with the step's current token will start the next attempt.
    RetryWait,
    /// Finished with its output recorded.
    Done,
    /// Failed terminally or exhausted its retry policy; the run is paused in `failed`.
    Failed,
}

/// The progress of one step in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepProgress {
    /// Which step.
    pub kind: StepKind,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts started so far under the current retry budget (a `retry` signal starts a new one).
    pub attempt: u32,
    /// The token of the outstanding step message or timer; reports with another token are stale.
    pub token: u32,
    /// When the first attempt under the current retry budget started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<Timestamp>,
    /// When the step finished (done or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When the next attempt starts, while in `retry_wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// The last error the activity reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last progress note ("image pending", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl StepProgress {
    pub(crate) fn new(kind: StepKind, status: StepStatus) -> Self {
        Self {
            kind,
            status,
            attempt: 0,
            token: 0,
            first_attempt_at: None,
            finished_at: None,
            next_attempt_at: None,
            last_error: None,
            note: None,
        }
    }

    /// Done or skipped: dependants may start.
    pub fn is_complete(&self) -> bool {
        matches!(self.status, StepStatus::Done | StepStatus::Skipped)
    }

    /// A step message or timer for it is outstanding.
    pub fn is_outstanding(&self) -> bool {
        matches!(self.status, StepStatus::Running | StepStatus::RetryWait)
    }
}

/// The commits a run deploys. `None` means the repository has not been pushed yet: without an
/// infrastructure commit the base image is rolled out as it is, without an application commit
/// no application artifact is installed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Commit of the infrastructure repository (the image's provisioning scripts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra: Option<GitSha>,
    /// Commit of the application repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<GitSha>,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn short(s: &Option<GitSha>) -> &str {
            s.as_ref().map_or("-", GitSha::short)
        }
        write!(f, "infra {} app {}", short(&self.infra), short(&self.app))
    }
}

/// Security groups of one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkOutput {
    /// Admits traffic to the instances from the load balancer only.
    pub instance_security_group: String,
    /// Admits MySQL traffic from the instances only.
    pub database_security_group: String,
}

/// A source artifact in the artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceOutput {
    /// The commit packed.
    pub sha: GitSha,
    /// Content-addressed key of the packed source.
    pub artifact_key: String,
}

/// A built machine image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageOutput {
    /// The infrastructure commit the image was built from.
    pub infra_sha: GitSha,
    /// The image id (`ami-…`).
    pub image_id: String,
}

/// The environment's database. Credentials are never here: only where they live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabaseOutput {
    /// The database instance identifier.
    pub instance_id: String,
    /// Host name and port clients connect to.
    pub endpoint: String,
    /// ARN of the managed master-user secret.
    pub secret_arn: String,
}

/// Routing of `<env>.<domain>` to the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingOutput {
    /// The host name the listener rule matches.
    pub host: String,
    /// The environment's target group.
    pub target_group_arn: String,
    /// The listener rule.
    pub rule_arn: String,
    /// The rule's priority, held by no other rule.
    pub priority: u32,
    /// The Route 53 hosted zone holding the host's alias record (absent: none was written,
    /// no zone takes the host; and in records before schema version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_zone: Option<String>,
}

/// The Auto Scaling group currently serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentOutput {
    /// The Auto Scaling group's name.
    pub group_name: String,
    /// The image it runs.
    pub image_id: String,
    /// The run that created it.
    pub run: RunId,
    /// What it serves.
    pub release: Release,
}

/// What a finished step produced; the variant must match the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepOutput {
    /// From `network`.
    Network(NetworkOutput),
    /// From `source_infra` or `source_app`.
    Source(SourceOutput),
    /// From `image`.
    Image(ImageOutput),
    /// From `database`.
    Database(DatabaseOutput),
    /// From `routing`.
    Routing(RoutingOutput),
    /// From `rollout`.
    Rollout(DeploymentOutput),
    /// From `decommission`: nothing is left.
    Decommissioned,
}

/// Everything the environment holds, as far as finished steps have reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Security groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOutput>,
    /// The newest infrastructure source artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra_source: Option<SourceOutput>,
    /// The newest application source artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_source: Option<SourceOutput>,
    /// The newest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageOutput>,
    /// The database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseOutput>,
    /// Target group and rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingOutput>,
    /// The serving Auto Scaling group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentOutput>,
}

impl Resources {
    /// Whether `step` has nothing to do for `release` because its output already exists.
    pub fn satisfies(&self, step: StepKind, release: &Release) -> bool {
        let image_built = |sha: &GitSha| self.image.as_ref().is_some_and(|i| &i.infra_sha == sha);
        match step {
            StepKind::Network => self.network.is_some(),
            StepKind::Database => self.database.is_some(),
            StepKind::Routing => self.routing.is_some(),
            StepKind::SourceInfra => release.infra.as_ref().is_none_or(|sha| {
                image_built(sha) || self.infra_source.as_ref().is_some_and(|s| &s.sha == sha)
            }),
            StepKind::SourceApp => release
                .app
                .as_ref()
                .is_none_or(|sha| self.app_source.as_ref().is_some_and(|s| &s.sha == sha)),
            StepKind::Image => release.infra.as_ref().is_none_or(image_built),
            StepKind::Rollout | StepKind::Decommission => false,
        }
    }

    /// Records `output` of `step`; `Err` names the mismatch when the output is not of the step.
    pub(crate) fn record(&mut self, step: StepKind, output: &StepOutput) -> Result<(), String> {
        match (step, output) {
            (StepKind::Network, StepOutput::Network(o)) => self.network = Some(o.clone()),
            (StepKind::SourceInfra, StepOutput::Source(o)) => self.infra_source = Some(o.clone()),
            (StepKind::SourceApp, StepOutput::Source(o)) => self.app_source = Some(o.clone()),
            (StepKind::Image, StepOutput::Image(o)) => self.image = Some(o.clone()),
            (StepKind::Database, StepOutput::Database(o)) => self.database = Some(o.clone()),
            (StepKind::Routing, StepOutput::Routing(o)) => self.routing = Some(o.clone()),
            (StepKind::Rollout, StepOutput::Rollout(o)) => self.deployment = Some(o.clone()),
            (StepKind::Decommission, StepOutput::Decommissioned) => *self = Resources::default(),
            (step, output) => {
                return Err(format!(
                    "activity bug: step {step} reported an output of another step: {output:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> GitSha {
        GitSha::new(c.to_string().repeat(40)).expect("valid sha")
    }

    #[test]
    fn the_graph_is_acyclic_and_ordered() {
        // Every dependency of a preparation step comes earlier in PREPARATION.
        for (i, step) in StepKind::PREPARATION.iter().enumerate() {
            for dep in step.dependencies() {
                let at = StepKind::PREPARATION.iter().position(|s| s == dep);
                assert!(at.is_some_and(|at| at < i), "{dep} before {step}");
            }
        }
        for dep in StepKind::Rollout.dependencies() {
            assert!(StepKind::PREPARATION.contains(dep));
        }
    }

    #[test]
    fn steps_are_skipped_when_their_output_exists() {
        let release = Release {
            infra: Some(sha('a')),
            app: Some(sha('b')),
        };
        let mut res = Resources::default();
        for step in StepKind::PREPARATION {
            assert!(!res.satisfies(step, &release), "{step}");
        }
        res.image = Some(ImageOutput {
            infra_sha: sha('a'),
            image_id: "ami-1".into(),
        });
        assert!(res.satisfies(StepKind::Image, &release));
        assert!(
            res.satisfies(StepKind::SourceInfra, &release),
            "built image needs no source"
        );
        let newer = Release {
            infra: Some(sha('c')),
            app: None,
        };
        assert!(!res.satisfies(StepKind::Image, &newer));
        assert!(
            res.satisfies(StepKind::SourceApp, &newer),
            "no app commit, nothing to fetch"
        );
        assert!(
            res.satisfies(StepKind::Image, &Release::default()),
            "base image"
        );
    }

    #[test]
    fn outputs_must_match_their_step() {
        let mut res = Resources::default();
        let out = StepOutput::Source(SourceOutput {
            sha: sha('a'),
            artifact_key: "k".into(),
        });
        assert!(res.record(StepKind::Image, &out).is_err());
        assert_eq!(res, Resources::default());
        res.record(StepKind::SourceApp, &out).expect("matches");
        assert!(res.app_source.is_some() && res.infra_source.is_none());
    }

    #[test]
    fn step_names_parse() {
        for s in StepKind::ALL {
            assert_eq!(s.as_str().parse::<StepKind>(), Ok(s));
        }
        assert!("build".parse::<StepKind>().is_err());
    }
}
