//! Commands: what the machine asks the engine to do after a transition is durable.
//!
//! Every command is safe to carry out twice: step messages and timers carry tokens, so a
//! repeated one is recognised as stale; a superseded push is only recorded.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{Push, TimerFired};
use crate::id::{EventId, RunId};
use crate::step::{Release, Resources, StepKind};
use crate::time::Timestamp;

/// What an activity needs to invoke one step, carried in the step message so that a worker
/// can run the activity without reading the workflow record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepTask {
    /// The run.
    pub run: RunId,
    /// The step.
    pub step: StepKind,
    /// The token the report must carry.
    pub token: u32,
    /// The attempt number under the current retry budget, from 1.
    pub attempt: u32,
    /// When the first attempt under the current retry budget started; the retry policy's
    /// maximum elapsed time counts from here.
    pub first_attempt_at: Timestamp,
    /// Deliver the step message only after this long (a progress recheck).
    #[serde(rename = "delay_ms", with = "crate::time::duration_ms")]
    #[schemars(with = "u64")]
    pub delay: Duration,
    /// The commits the run deploys.
    pub release: Release,
    /// The environment's resources as recorded when the step was dispatched.
    pub resources: Resources,
    /// Rollout only: the releases whose images and artifacts stay (the run's own and the
    /// newest deployed ones); the others of the environment are deleted once the rollout is
    /// done. Empty: nothing is deleted (tasks before schema version 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<Release>,
    /// Database only: restore the database from the environment's newest final snapshot
    /// instead of creating an empty one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_database: bool,
}

/// A command for the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Send a step message that makes a worker invoke the step's activity.
    RunStep(Box<StepTask>),
    /// Send a delayed message that delivers [`crate::Event::Timer`] after `delay`.
    ScheduleTimer {
        /// The event to deliver.
        timer: TimerFired,
        /// How long to wait.
        #[serde(rename = "delay_ms", with = "crate::time::duration_ms")]
        #[schemars(with = "u64")]
        delay: Duration,
    },
    /// Record that a push will never be deployed on its own: a newer push of the same
    /// repository replaced it, or a cancel or decommission dropped it.
    RecordSuperseded {
        /// The push that was dropped.
        push: Box<Push>,
        /// The event that dropped it.
        by: EventId,
        /// Why, for people.
        reason: String,
    },
}
