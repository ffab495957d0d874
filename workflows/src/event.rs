//! Events: everything that can happen to a workflow.
//!
//! Pushes, provisioning requests and operator signals come from outside through the events
//! queue and carry their own ids. Step reports and timers are produced by the engine from step
//! messages; their ids derive from (run, step, token), so redelivery is recognised as such.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{EventId, GitSha, RunId};
use crate::step::{StepKind, StepOutput};
use crate::time::Timestamp;

/// Which of a tenant's two repositories was pushed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RepoKind {
    /// Provisioning scripts: a push rebuilds the image.
    Infra,
    /// The application: a push rolls out the current image with the new revision.
    App,
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Infra => "infra",
            Self::App => "app",
        })
    }
}

/// A push to a mapped branch, as the ingress accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Push {
    /// Idempotency key, GitLab event UUID or digest (see the ingress).
    pub event_id: EventId,
    /// Which repository.
    pub repo: RepoKind,
    /// The pushed commit (`after`).
    pub sha: GitSha,
    /// The commit the branch pointed to before the push (GitLab's `before`; all zeros when the
    /// push created the branch). Absent for pushes an operator tool sent, which are taken as
    /// sent (see the `lineage` module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<GitSha>,
    /// The full ref, for example `refs/heads/main`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Who pushed (GitLab user name).
    pub author: String,
    /// Title of the head commit.
    pub message: String,
    /// When the ingress accepted it.
    pub received_at: Timestamp,
}

/// An operator's request, sent through the events queue like a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Let a run that awaits approval roll out.
    Approve,
    /// Resume a failed run at its failed step.
    Retry,
    /// Stop the active run; what it created stays.
    Cancel,
    /// Roll out the last deployed release again.
    Redeploy,
    /// Roll out a kept earlier release as a new run: run `to`'s, or the one before what
    /// serves.
    Rollback {
        /// The run whose release to roll out again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<RunId>,
    },
    /// Release everything the environment holds; final.
    Decommission,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Approve => "approve",
            Self::Retry => "retry",
            Self::Cancel => "cancel",
            Self::Redeploy => "redeploy",
            Self::Rollback { .. } => "rollback",
            Self::Decommission => "decommission",
        })
    }
}

/// How one invocation of an activity ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The step is finished; here is what it produced.
    Done {
        /// The step's output.
        output: StepOutput,
    },
    /// The world is moving (an image is pending); look again later.
    Progress {
        /// When to invoke the activity again.
        #[serde(rename = "recheck_after_ms", with = "crate::time::duration_ms")]
        #[schemars(with = "u64")]
        recheck_after: Duration,
        /// What is being waited for, for people.
        note: String,
    },
    /// A failure that may pass (throttling, 5xx).
    Retryable {
        /// What went wrong.
        error: String,
        /// The delay the step's retry policy computed for the next attempt; `None` when the
        /// policy is exhausted. Computed by the engine so that the machine stays deterministic.
        #[serde(
            rename = "retry_in_ms",
            default,
            with = "crate::time::opt_duration_ms",
            skip_serializing_if = "Option::is_none"
        )]
        #[schemars(with = "Option<u64>")]
        retry_in: Option<Duration>,
    },
    /// A failure that will not pass by retrying.
    Terminal {
        /// What went wrong.
        error: String,
    },
}

/// The result of one activity invocation for the step message `(run, step, token)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepReport {
    /// The run the step message belonged to.
    pub run: RunId,
    /// The step.
    pub step: StepKind,
    /// The step message's token.
    pub token: u32,
    /// How the invocation ended.
    pub outcome: StepOutcome,
}

/// A timer set by the machine came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimerFired {
    /// The run that set it.
    pub run: RunId,
    /// The step waiting to retry.
    pub step: StepKind,
    /// The token it was set with.
    pub token: u32,
}

/// A change of an environment's config vars, to be rolled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigChange {
    /// The request's id.
    pub event_id: EventId,
    /// The config's version after the change.
    pub version: u64,
    /// Who changed it, for the history.
    #[serde(default)]
    pub actor: String,
}

/// Everything that can happen to a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A push to a mapped branch of the tenant's infra or app repository.
    Push(Push),
    /// Create the environment without waiting for a push.
    Provision {
        /// The request's id.
        event_id: EventId,
        /// For a decommissioned environment: restore its database from the final snapshot
        /// instead of creating an empty one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_snapshot: bool,
    },
    /// An operator's signal.
    Signal {
        /// The request's id.
        event_id: EventId,
        /// Which signal.
        signal: Signal,
        /// Who sent it, for the history.
        #[serde(default)]
        actor: String,
    },
    /// An activity invocation finished.
    Step(StepReport),
    /// A retry timer came due.
    Timer(TimerFired),
    /// The environment's config vars changed (`wfctl config`): roll out again so that the app
    /// is given them, as an app push would.
    Configure(ConfigChange),
    /// The sweeper found the workflow without progress for too long: send its outstanding
    /// step messages and timers again with fresh tokens.
    Rearm {
        /// The sweep's id.
        event_id: EventId,
    },
}

impl Event {
    /// The event's id: its own for external events, derived from (run, step, token) for step
    /// reports and timers, so that a redelivered message has the same id.
    pub fn id(&self) -> EventId {
        match self {
            Event::Push(p) => p.event_id.clone(),
            Event::Configure(c) => c.event_id.clone(),
            Event::Provision { event_id, .. }
            | Event::Signal { event_id, .. }
            | Event::Rearm { event_id } => event_id.clone(),
            Event::Step(r) => step_event_id(r.run, r.step, r.token),
            Event::Timer(t) => derived_id("timer", t.run, t.step, t.token),
        }
    }

    /// Whether the event came from outside (and so must be remembered for deduplication);
    /// step reports and timers are recognised by their tokens instead.
    pub fn is_external(&self) -> bool {
        !matches!(self, Event::Step(_) | Event::Timer(_))
    }

    /// A short name of the event's kind, for logs and history tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Push(_) => "push",
            Event::Provision { .. } => "provision",
            Event::Signal { .. } => "signal",
            Event::Step(_) => "step",
            Event::Timer(_) => "timer",
            Event::Configure(_) => "configure",
            Event::Rearm { .. } => "rearm",
        }
    }
}

/// The id of the report of step message `(run, step, token)`, whatever its outcome: what the
/// history holds once the report was applied.
pub fn step_event_id(run: RunId, step: StepKind, token: u32) -> EventId {
    derived_id("step", run, step, token)
}

fn derived_id(prefix: &str, run: RunId, step: StepKind, token: u32) -> EventId {
    // Made only of ASCII letters, digits, ':' and '_', well under 128 characters.
    EventId::new(format!("{prefix}:{run}:{step}:{token}"))
        .unwrap_or_else(|_| unreachable!("derived ids always follow the event id rule"))
}
