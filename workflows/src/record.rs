//! The workflow record: the persisted form of one workflow, and applying events to it.
//!
//! A record is the machine (statig's serialized form: the workflow's data and the leaf state)
//! plus what the engine needs around it: the optimistic-lock `version`, the ids of recently
//! applied external events, and timestamps. [`WorkflowRecord::apply`] is the one way to change
//! it; restoring a record runs nothing but serde.

use std::collections::VecDeque;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use statig::blocking::{IntoStateMachineExt, StateMachine};

use crate::codec::Persisted;
use crate::command::Command;
use crate::event::Event;
use crate::history::HistoryEntry;
use crate::id::{EventId, WorkflowKey};
use crate::machine::{Ctx, Input, State, Verdict, Workflow};
use crate::time::Timestamp;

/// How many external event ids a record remembers for deduplication. Redelivery by the queue
/// happens within minutes; by then a workflow sees far fewer events than this.
pub const DEDUP_WINDOW: usize = 64;

/// The persisted form of one workflow.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRecord {
    /// The shape's version; see [`Persisted`].
    pub schema_version: u32,
    /// The workflow's key.
    pub key: WorkflowKey,
    /// Optimistic-lock counter: a write of version `v + 1` succeeds only over version `v`.
    pub version: u64,
    /// When the record was created.
    pub created_at: Timestamp,
    /// When an event last changed it.
    pub updated_at: Timestamp,
    /// Ids of recently applied external events, oldest first (at most [`DEDUP_WINDOW`]).
    #[serde(default)]
    pub applied: VecDeque<EventId>,
    /// The state machine.
    #[schemars(with = "crate::machine::MachineDoc")]
    machine: StateMachine<Workflow>,
}

impl Persisted for WorkflowRecord {
    const KIND: &'static str = "workflow record";
    /// Version 2: pushes may carry `before`, and the machine keeps each repository's lineage
    /// (`heads`); a version 1 record starts with none, so its protection against late
    /// resends begins with the first push after the upgrade. Version 3: the kept releases
    /// (`releases`; a version 2 record starts with none, so its first rollback target is the
    /// release deployed after the upgrade), a run's `keep` and `restore_database`, and the
    /// event and task fields of the envelope's version 3.
    const SCHEMA_VERSION: u32 = 3;
    const OLDEST_SCHEMA_VERSION: u32 = 1;
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn upgrade(&mut self) {
        self.schema_version = Self::SCHEMA_VERSION;
    }
}

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Accepted, ignored, refused, stale or duplicate.
    pub verdict: Verdict,
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// What the engine must do once the record is written.
    pub commands: Vec<Command>,
}

impl WorkflowRecord {
    /// A new workflow in `unprovisioned`, at version 0 (not yet written).
    pub fn new(key: WorkflowKey, now: Timestamp) -> Self {
        Self {
            schema_version: Self::SCHEMA_VERSION,
            machine: Workflow::new(key.clone()).state_machine(),
            key,
            version: 0,
            created_at: now,
            updated_at: now,
            applied: VecDeque::new(),
        }
    }

    /// The current leaf state.
    pub fn state(&self) -> State {
        *self.machine.state()
    }

    /// The workflow's data.
    pub fn workflow(&self) -> &Workflow {
        &self.machine
    }

    /// Whether the workflow still waits for what `command` starts: a step message whose run,
    /// step and token are the step's current `running` ones, or a timer for a step in
    /// `retry_wait` with that token. Once the workflow has moved past a command, the message
    /// it sent was delivered (its report or timer was applied), so sending it again is only
    /// useful while this holds.
    pub fn awaits(&self, command: &Command) -> bool {
        let status = |run, step, token| {
            self.machine
                .active_run()
                .filter(|r| r.id == run)
                .and_then(|r| r.step(step))
                .filter(|s| s.token == token)
                .map(|s| s.status)
        };
        match command {
            Command::RunStep(task) => {
                status(task.run, task.step, task.token) == Some(crate::step::StepStatus::Running)
            }
            Command::ScheduleTimer { timer, .. } => {
                status(timer.run, timer.step, timer.token)
                    == Some(crate::step::StepStatus::RetryWait)
            }
            Command::RecordSuperseded { .. } => false,
        }
    }

    /// Whether `id` was applied recently.
    pub fn has_applied(&self, id: &EventId) -> bool {
        self.applied.contains(id)
    }

    /// Applies `event`. When the verdict [changes the record](Verdict::changes_record), the
    /// version is incremented and the caller must write the record (conditionally on the
    /// previous version) before carrying out the commands.
    pub fn apply(&mut self, event: &Event, input: Input) -> Applied {
        let from = self.state();
        if event.is_external() && self.has_applied(&event.id()) {
            return Applied {
                verdict: Verdict::Duplicate,
                from,
                to: from,
                commands: Vec::new(),
            };
        }
        let mut ctx = Ctx::new(input);
        self.machine.handle_with_context(event, &mut ctx);
        let (commands, verdict) = ctx.finish();
        if verdict.changes_record() {
            if event.is_external() {
                if self.applied.len() >= DEDUP_WINDOW {
                    self.applied.pop_front();
                }
                self.applied.push_back(event.id());
            }
            self.version += 1;
            self.updated_at = input.now;
        }
        Applied {
            verdict,
            from,
            to: self.state(),
            commands,
        }
    }

    /// The history entry that records `applied` (the result of applying `event` to this record).
    pub fn history_entry(&self, event: &Event, applied: &Applied) -> HistoryEntry {
        HistoryEntry {
            schema_version: HistoryEntry::SCHEMA_VERSION,
            key: self.key.clone(),
            version: self.version,
            at: self.updated_at,
            event: event.clone(),
            verdict: applied.verdict.clone(),
            from: applied.from,
            to: applied.to,
            run: self.workflow().run.as_ref().map(|r| r.id),
            commands: applied.commands.clone(),
        }
    }
}

/// Equal when they hold the same data and state, whether or not statig has initialized the
/// machine yet (a decoded machine is initialized lazily by its first event).
impl PartialEq for WorkflowRecord {
    fn eq(&self, other: &Self) -> bool {
        self.schema_version == other.schema_version
            && self.key == other.key
            && self.version == other.version
            && self.created_at == other.created_at
            && self.updated_at == other.updated_at
            && self.applied == other.applied
            && self.state() == other.state()
            && self.workflow() == other.workflow()
    }
}

impl fmt::Debug for WorkflowRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowRecord")
            .field("key", &self.key)
            .field("version", &self.version)
            .field("state", &self.state())
            .field("workflow", self.workflow())
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}
