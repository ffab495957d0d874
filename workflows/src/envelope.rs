//! The queue envelope: the small typed message that travels on the events and steps queues.
//!
//! The events queue carries [`Body::Event`] (pushes, signals, provisioning, timers, re-arms);
//! the steps queue carries [`Body::Step`] (invoke an activity). Neither carries a raw webhook
//! payload.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::Persisted;
use crate::command::StepTask;
use crate::event::Event;
use crate::id::WorkflowKey;
use crate::time::Timestamp;

/// What a message asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Apply an event to the workflow.
    Event(Event),
    /// Invoke a step's activity and apply its report.
    Step(Box<StepTask>),
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The shape's version; see [`Persisted`].
    pub schema_version: u32,
    /// The workflow it is for (the FIFO group).
    pub key: WorkflowKey,
    /// When it was sent.
    pub sent_at: Timestamp,
    /// W3C trace context (`traceparent`, `tracestate`) of the span that sent it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trace: BTreeMap<String, String>,
    /// What it asks for.
    pub body: Body,
}

impl Envelope {
    /// An envelope of the current schema version without trace context.
    pub fn new(key: WorkflowKey, sent_at: Timestamp, body: Body) -> Self {
        Self {
            schema_version: Self::SCHEMA_VERSION,
            key,
            sent_at,
            trace: BTreeMap::new(),
            body,
        }
    }
}

impl Persisted for Envelope {
    const KIND: &'static str = "queue envelope";
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
