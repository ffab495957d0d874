//! The pure domain of the tenant-host orchestrator.
//!
//! One state machine per (tenant, environment) decides what to do with pushes, operator
//! signals and step reports; it does no I/O and reads no clock. The engine (in `orchestrator`)
//! loads a [`WorkflowRecord`], calls [`WorkflowRecord::apply`], writes the record and its
//! [`HistoryEntry`] in one conditional write, then carries out the returned [`Command`]s.
//!
//! Everything persisted or queued ([`WorkflowRecord`], [`HistoryEntry`], [`Envelope`],
//! [`Tenant`]) carries a `schema_version` and decodes through [`codec::decode`], which names the
//! field or version at fault instead of panicking.

pub mod codec;
pub mod command;
pub mod config;
pub mod env_settings;
pub mod envelope;
pub mod event;
pub mod history;
pub mod id;
pub mod lineage;
pub mod machine;
pub mod record;
pub mod retry;
pub mod step;
pub mod tenant;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;

pub use codec::{Persisted, decode, encode};
pub use command::{Command, StepTask};
pub use config::{ConfigValue, EnvConfig};
pub use env_settings::{EnvSettings, Scaling, Sizing};
pub use envelope::{Body, Envelope};
pub use event::{ConfigChange, Event, Push, RepoKind, Signal, StepOutcome, StepReport, TimerFired};
pub use history::HistoryEntry;
pub use id::{Domain, Environment, EventId, GitSha, RunId, TenantId, WorkflowKey};
pub use lineage::{Heads, LINEAGE_WINDOW, Lineage};
pub use machine::{
    Deployed, Input, Pending, Run, RunEnd, RunKind, Settings, State, Verdict, Workflow,
};
pub use record::{Applied, DEDUP_WINDOW, WorkflowRecord};
pub use retry::RetryPolicy;
pub use step::{
    DatabaseOutput, DeploymentOutput, ImageOutput, NetworkOutput, Release, Resources,
    RoutingOutput, SourceOutput, StepKind, StepOutput, StepProgress, StepStatus,
};
pub use tenant::{Tenant, WebhookAuth};
pub use time::Timestamp;
