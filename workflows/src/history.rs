//! History entries: one per applied event, written atomically with the record it produced.
//!
//! The entry keeps the commands the event produced, so that a redelivered event (found in the
//! record's dedup list) can have its commands dispatched again without applying it twice.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::Persisted;
use crate::command::Command;
use crate::event::Event;
use crate::id::{RunId, WorkflowKey};
use crate::machine::{State, Verdict};
use crate::time::Timestamp;

/// One applied event of one workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// The shape's version; see [`Persisted`].
    pub schema_version: u32,
    /// The workflow.
    pub key: WorkflowKey,
    /// The record version this entry produced; entries of a workflow are ordered by it.
    pub version: u64,
    /// When it was applied.
    pub at: Timestamp,
    /// The event.
    pub event: Event,
    /// What became of it.
    pub verdict: Verdict,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// The run current after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunId>,
    /// The commands it produced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<Command>,
}

impl Persisted for HistoryEntry {
    const KIND: &'static str = "history entry";
    /// Version 2: a push may carry `before`. Version 3: the `rollback` signal, `provision`'s `from_snapshot`, and a
    /// rollout task's `keep` and a database task's `restore_database`.
    const SCHEMA_VERSION: u32 = 3;
    const OLDEST_SCHEMA_VERSION: u32 = 1;
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn upgrade(&mut self) {
        self.schema_version = Self::SCHEMA_VERSION;
    }
}
