//! The side effects of the orchestrator: one idempotent reconciler per activity kind
//! (network, source, image, database, routing, rollout, decommission), behind the
//! [`Activities`] trait.
//!
//! A reconciler is not a long call: each invocation observes the world, takes at most one
//! action, and says where things stand ([`Outcome`]): done with an output, progressing (look
//! again later), failed retryably or failed terminally. Waiting for an image or a database is a
//! chain of delayed step messages, so a worker holds no state between invocations and any
//! worker can continue any step. Every invocation is safe to repeat: resources are named
//! deterministically from tenant, environment and release and looked up before they are
//! created.
//!
//! Implementations: [`simulated`] (resources persisted in SQLite, AWS-like latencies scaled
//! down, fault injection) and, with the `aws` feature (on by default), `aws` (the reconcilers
//! on EC2, S3, RDS, ELBv2 and Auto Scaling).

use std::future::Future;
use std::time::Duration;

use workflows::{Domain, RetryPolicy, StepKind, StepOutput, StepTask, WorkflowKey};

pub mod app_env;
#[cfg(feature = "aws")]
pub mod aws;
pub mod clock;
pub mod gate;
pub mod infrastructure;
pub mod report;
pub mod simulated;

/// Where a step stands after one invocation of its reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finished; here is what it produced.
    Done(StepOutput),
    /// Under way (an image is pending); invoke again after `recheck_after`.
    Progress {
        /// When to look again.
        recheck_after: Duration,
        /// What is being waited for, for people.
        note: String,
    },
    /// Failed in a way that may pass (throttling, a 5xx); the step's retry policy decides.
    Retryable(String),
    /// Failed in a way that retrying will not fix.
    Terminal(String),
}

/// One invocation: which workflow, which tenant domain, which step message.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    /// The workflow (tenant and environment).
    pub key: &'a WorkflowKey,
    /// The tenant's domain; routing serves `<env>.<domain>`.
    pub domain: &'a Domain,
    /// The step message: run, step, attempt, release, resources.
    pub task: &'a StepTask,
    /// The environment's config vars as the tenant record holds them now (the rollout gives
    /// them to the app; [`NO_CONFIG`] when there are none).
    pub config: &'a workflows::EnvConfig,
    /// The environment's settings as the tenant record holds them now (the rollout sizes its
    /// group by them; [`NO_SETTINGS`] when there are none).
    pub settings: &'a workflows::EnvSettings,
}

/// An environment that takes every default.
pub static NO_SETTINGS: workflows::EnvSettings = workflows::EnvSettings {
    min_size: None,
    max_size: None,
    desired_size: None,
    instance_type: None,
    scaling: None,
    keep_releases: None,
    decommissioned: false,
};

/// An environment that has no config vars.
pub static NO_CONFIG: workflows::EnvConfig = workflows::EnvConfig {
    version: 0,
    vars: std::collections::BTreeMap::new(),
};

/// The reconcilers of every activity kind.
pub trait Activities: Send + Sync + 'static {
    /// Runs the reconciler of `invocation.task.step` once.
    fn invoke(&self, invocation: Invocation<'_>) -> impl Future<Output = Outcome> + Send;

    /// Gives up what `invocation`'s step holds only while it runs (an image build's builder
    /// instance) because the engine will not invoke it again: it failed terminally, or its run
    /// stopped driving it (paused by another step's failure, superseded by a push, cancelled).
    /// What the step exists to make (an image, a database) stays. The engine gives back the
    /// step's slot of a capped kind only after this succeeded, so what runs never outnumbers
    /// the cap. Safe to repeat; `Err` says why it could not, and the engine tries again later.
    fn abandon(
        &self,
        invocation: Invocation<'_>,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = invocation;
        std::future::ready(Ok(()))
    }

    /// The retry policy of `step`.
    fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        let _ = step;
        RetryPolicy::default()
    }
}
