//! The per-(tenant, env) state machine (ARCHITECTURE.md, "The state machine"), built with
//! `statig` in blocking mode.
//!
//! Handlers are synchronous and pure: they change the workflow's data and push [`Command`]s
//! into the [`Ctx`]; they never read a clock or do I/O ("now" and the tenant's settings come in
//! through the context). The machine has no entry or exit actions, so restoring a persisted
//! machine (which makes statig run the entry actions of the current state) does nothing.
//!
//! State tree:
//! ```text
//! workflow
//! ├── unprovisioned
//! ├── deploying
//! │   ├── preparing           (network, sources, image, database, routing; concurrently)
//! │   ├── awaiting_approval   (production only, when the tenant asks for it)
//! │   └── rolling_out
//! ├── live
//! ├── failed                  (paused; `retry` resumes, a push starts a new run)
//! ├── decommissioning
//! └── decommissioned          (final)
//! ```
//! Which leaf a run is in follows from its steps: [`Workflow::advance`] dispatches the steps
//! whose dependencies are complete and names the state the data implies, so every handler that
//! changes a run ends the same way.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use statig::Outcome::{self, Handled, Transition};

use crate::command::{Command, StepTask};
use crate::event::{ConfigChange, Push, RepoKind, StepOutcome, StepReport, TimerFired};
use crate::id::{Environment, EventId, GitSha, RunId, WorkflowKey};
use crate::lineage::Heads;
use crate::step::{Release, Resources, StepKind, StepProgress, StepStatus};
use crate::time::Timestamp;

/// The tenant's settings that shape a workflow, supplied by the engine with every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Production runs wait for an `approve` signal before rolling out.
    pub production_approval: bool,
    /// How many deployed releases are kept for `rollback` (their images and artifacts stay).
    #[serde(default = "default_keep_releases")]
    pub keep_releases: u32,
}

fn default_keep_releases() -> u32 {
    crate::env_settings::DEFAULT_KEEP_RELEASES
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            production_approval: false,
            keep_releases: crate::env_settings::DEFAULT_KEEP_RELEASES,
        }
    }
}

/// What the engine passes in with an event: the time and the tenant's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// The engine's clock when it applies the event.
    pub now: Timestamp,
    /// The tenant's settings.
    pub settings: Settings,
}

/// What became of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum Verdict {
    /// The event was applied.
    Accepted,
    /// The event was valid but changes nothing (a push of what is already deployed, ...).
    Ignored(String),
    /// An operator signal that does not apply in the current state; the reason says why.
    Refused(String),
    /// A step report or timer of an older run or token; dropped.
    Stale(String),
    /// The event id was applied before.
    Duplicate,
}

impl Verdict {
    /// Whether applying the event changed the record (and so needs a write).
    pub fn changes_record(&self) -> bool {
        !matches!(self, Verdict::Stale(_) | Verdict::Duplicate)
    }
}

/// The handlers' context: input in, commands and verdict out.
#[derive(Debug)]
pub struct Ctx {
    now: Timestamp,
    settings: Settings,
    commands: Vec<Command>,
    verdict: Verdict,
}

impl Ctx {
    /// A context for one event.
    pub fn new(input: Input) -> Self {
        Self {
            now: input.now,
            settings: input.settings,
            commands: Vec::new(),
            verdict: Verdict::Accepted,
        }
    }

    /// The commands and verdict the handlers produced.
    pub fn finish(self) -> (Vec<Command>, Verdict) {
        (self.commands, self.verdict)
    }

    fn ignore(&mut self, reason: impl Into<String>) -> Outcome<State> {
        self.verdict = Verdict::Ignored(reason.into());
        Handled
    }

    fn refuse(&mut self, reason: impl Into<String>) -> Outcome<State> {
        self.verdict = Verdict::Refused(reason.into());
        Handled
    }

    fn stale(&mut self, reason: impl Into<String>) -> Outcome<State> {
        self.verdict = Verdict::Stale(reason.into());
        Handled
    }
}

/// The leaf states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Nothing was ever started; waits for a push or `provision`.
    Unprovisioned,
    /// Preparation steps run concurrently.
    Preparing,
    /// Preparation is complete; a production run waits for `approve`.
    AwaitingApproval,
    /// The new Auto Scaling group is being rolled out.
    RollingOut,
    /// Serving the deployed release; waits for a push.
    Live,
    /// A step failed terminally or exhausted its retries; waits for `retry` or a push.
    Failed,
    /// Everything is being released.
    Decommissioning,
    /// Nothing is left; final.
    Decommissioned,
}

#[allow(missing_docs)] // the constructors statig calls, one per state
impl State {
    pub const fn unprovisioned() -> Self {
        Self::Unprovisioned
    }
    pub const fn preparing() -> Self {
        Self::Preparing
    }
    pub const fn awaiting_approval() -> Self {
        Self::AwaitingApproval
    }
    pub const fn rolling_out() -> Self {
        Self::RollingOut
    }
    pub const fn live() -> Self {
        Self::Live
    }
    pub const fn failed() -> Self {
        Self::Failed
    }
    pub const fn decommissioning() -> Self {
        Self::Decommissioning
    }
    pub const fn decommissioned() -> Self {
        Self::Decommissioned
    }
}

impl State {
    /// Every state.
    pub const ALL: [State; 8] = [
        Self::Unprovisioned,
        Self::Preparing,
        Self::AwaitingApproval,
        Self::RollingOut,
        Self::Live,
        Self::Failed,
        Self::Decommissioning,
        Self::Decommissioned,
    ];

    /// The snake_case name used in tables, indexes and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unprovisioned => "unprovisioned",
            Self::Preparing => "preparing",
            Self::AwaitingApproval => "awaiting_approval",
            Self::RollingOut => "rolling_out",
            Self::Live => "live",
            Self::Failed => "failed",
            Self::Decommissioning => "decommissioning",
            Self::Decommissioned => "decommissioned",
        }
    }

    /// Nothing ever leaves this state.
    pub fn is_terminal(self) -> bool {
        self == Self::Decommissioned
    }

    /// A run is deploying (one of the leaves of `deploying`).
    pub fn is_deploying(self) -> bool {
        matches!(
            self,
            Self::Preparing | Self::AwaitingApproval | Self::RollingOut
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Prepare and roll out a release.
    Deploy,
    /// Release everything.
    Decommission,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunEnd {
    /// Every step finished.
    Succeeded,
    /// An operator cancelled it.
    Cancelled,
    /// A newer push, a redeploy or a decommission replaced it while it was failed or active.
    Abandoned,
}

/// One attempt to bring the environment to a release (or to release everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The run's number.
    pub id: RunId,
    /// Deploy or decommission.
    pub kind: RunKind,
    /// The commits it deploys.
    pub release: Release,
    /// The event that started it.
    pub trigger: EventId,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// How it ended, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<RunEnd>,
    /// It must be approved before rolling out.
    pub needs_approval: bool,
    /// It has been approved.
    pub approved: bool,
    /// The releases whose images and artifacts its rollout keeps: its own and the newest
    /// deployed ones, `keep_releases` in all (absent in records before schema version 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<Release>,
    /// Its database is restored from the environment's final snapshot (`wfctl provision
    /// --from-snapshot` of a decommissioned environment).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_database: bool,
    /// Its steps, in a topological order.
    pub steps: Vec<StepProgress>,
    /// The next token to hand out; tokens tell current step messages from stale ones.
    pub next_token: u32,
}

impl Run {
    /// The run has not ended (it may be paused in `failed`).
    pub fn is_active(&self) -> bool {
        self.ended.is_none()
    }

    /// The progress of `kind` in this run.
    pub fn step(&self, kind: StepKind) -> Option<&StepProgress> {
        self.steps.iter().find(|s| s.kind == kind)
    }

    fn step_index(&self, kind: StepKind) -> Option<usize> {
        self.steps.iter().position(|s| s.kind == kind)
    }

    /// The step that failed, if the run is paused on one.
    pub fn failed_step(&self) -> Option<&StepProgress> {
        self.steps.iter().find(|s| s.status == StepStatus::Failed)
    }

    /// Steps with a step message or timer outstanding.
    pub fn outstanding(&self) -> impl Iterator<Item = &StepProgress> {
        self.steps.iter().filter(|s| s.is_outstanding())
    }

    fn take_token(&mut self) -> u32 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        token
    }

    fn end(&mut self, how: RunEnd, now: Timestamp) {
        self.ended = Some(how);
        self.finished_at = Some(now);
        // Reports for an ended run are dropped anyway; this keeps `outstanding` truthful.
        self.pause_outstanding();
    }

    /// Puts back to pending every step with a message or timer outstanding, whose reports
    /// become stale; `retry` (or nothing, for an ended run) dispatches them again, as a fresh
    /// start with a fresh retry budget: the engine abandons what a paused step was doing (an
    /// image build's builder), so it begins again rather than continues.
    fn pause_outstanding(&mut self) {
        for step in &mut self.steps {
            if step.is_outstanding() {
                step.status = StepStatus::Pending;
                step.next_attempt_at = None;
                step.attempt = 0;
                step.first_attempt_at = None;
            }
        }
    }
}

/// The newest push of each repository that arrived while a run was busy (newest wins).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// Newest pending infrastructure push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra: Option<Push>,
    /// Newest pending application push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Push>,
    /// Newest config change that arrived while a run was busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigChange>,
}

impl Pending {
    /// Nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.infra.is_none() && self.app.is_none() && self.config.is_none()
    }

    fn slot(&mut self, repo: RepoKind) -> &mut Option<Push> {
        match repo {
            RepoKind::Infra => &mut self.infra,
            RepoKind::App => &mut self.app,
        }
    }

    fn get(&self, repo: RepoKind) -> Option<&Push> {
        match repo {
            RepoKind::Infra => self.infra.as_ref(),
            RepoKind::App => self.app.as_ref(),
        }
    }
}

/// What is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Deployed {
    /// The release serving.
    pub release: Release,
    /// The run that rolled it out.
    pub run: RunId,
    /// When its rollout finished.
    pub at: Timestamp,
}

/// The workflow's data: statig's shared storage, persisted in the workflow record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Whose workflow.
    pub key: WorkflowKey,
    /// The newest commit of each repository ever accepted (cancel resets it to what serves).
    pub desired: Release,
    /// The current run, or the last one if none is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
    /// Pushes that arrived while the current run was busy.
    #[serde(default, skip_serializing_if = "Pending::is_empty")]
    pub pending: Pending,
    /// Where each repository's branch is, and which commits it moved past (absent in records
    /// of schema version 1).
    #[serde(default, skip_serializing_if = "Heads::is_empty")]
    pub heads: Heads,
    /// What is serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<Deployed>,
    /// The releases kept for `rollback`, oldest first, each release once, at most
    /// `keep_releases` (the last one is what serves). Absent before schema version 3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<Deployed>,
    /// What the environment holds.
    pub resources: Resources,
}

fn release_sha(release: &Release, repo: RepoKind) -> Option<&GitSha> {
    match repo {
        RepoKind::Infra => release.infra.as_ref(),
        RepoKind::App => release.app.as_ref(),
    }
}

fn set_release_sha(release: &mut Release, repo: RepoKind, sha: GitSha) {
    match repo {
        RepoKind::Infra => release.infra = Some(sha),
        RepoKind::App => release.app = Some(sha),
    }
}

mod releases;
mod states;
pub use states::Superstate;

impl Workflow {
    /// A workflow that has seen nothing yet.
    pub fn new(key: WorkflowKey) -> Self {
        Self {
            key,
            desired: Release::default(),
            run: None,
            pending: Pending::default(),
            heads: Heads::default(),
            deployed: None,
            releases: Vec::new(),
            resources: Resources::default(),
        }
    }

    /// The current run if it has not ended.
    pub fn active_run(&self) -> Option<&Run> {
        self.run.as_ref().filter(|r| r.is_active())
    }

    fn active_run_mut(&mut self) -> Option<&mut Run> {
        self.run.as_mut().filter(|r| r.is_active())
    }

    /// Ends the active run (if any) and starts a new one of `kind` towards `desired`.
    fn start_run(&mut self, kind: RunKind, trigger: &EventId, ctx: &mut Ctx) -> Outcome<State> {
        self.start_run_with(kind, trigger, RunOptions::default(), ctx)
    }

    /// [`Self::start_run`] with `options`.
    pub(crate) fn start_run_with(
        &mut self,
        kind: RunKind,
        trigger: &EventId,
        options: RunOptions,
        ctx: &mut Ctx,
    ) -> Outcome<State> {
        let RunOptions {
            restore_database,
            reroute,
        } = options;
        if let Some(run) = self.active_run_mut() {
            run.end(RunEnd::Abandoned, ctx.now);
        }
        let id = self.run.as_ref().map_or(RunId::FIRST, |r| r.id.next());
        let (release, steps) = match kind {
            RunKind::Deploy => {
                // Pending pushes are folded into `desired` already; this run takes them.
                self.pending = Pending::default();
                let release = self.desired.clone();
                let mut steps: Vec<StepProgress> = StepKind::PREPARATION
                    .into_iter()
                    .map(|k| {
                        let rerouted = reroute && k == StepKind::Routing;
                        let status = if self.resources.satisfies(k, &release) && !rerouted {
                            StepStatus::Skipped
                        } else {
                            StepStatus::Pending
                        };
                        StepProgress::new(k, status)
                    })
                    .collect();
                steps.push(StepProgress::new(StepKind::Rollout, StepStatus::Pending));
                (release, steps)
            }
            RunKind::Decommission => {
                self.pending.config = None;
                for push in [self.pending.infra.take(), self.pending.app.take()]
                    .into_iter()
                    .flatten()
                {
                    supersede(
                        push,
                        trigger,
                        "the environment is being decommissioned",
                        ctx,
                    );
                }
                self.desired = Release::default();
                (
                    Release::default(),
                    vec![StepProgress::new(
                        StepKind::Decommission,
                        StepStatus::Pending,
                    )],
                )
            }
        };
        let keep = match kind {
            RunKind::Deploy => self.keep_with(&release, ctx.settings.keep_releases),
            RunKind::Decommission => Vec::new(),
        };
        self.run = Some(Run {
            id,
            kind,
            release,
            trigger: trigger.clone(),
            started_at: ctx.now,
            finished_at: None,
            ended: None,
            needs_approval: kind == RunKind::Deploy
                && self.key.env == Environment::Production
                && ctx.settings.production_approval,
            approved: false,
            keep,
            restore_database,
            steps,
            next_token: 1,
        });
        Transition(self.advance(ctx))
    }

    /// Keeps `push` as the pending push of its repository while a run is busy.
    fn keep_pending(&mut self, push: &Push, ctx: &mut Ctx) -> Outcome<State> {
        let in_run = self
            .active_run()
            .and_then(|r| release_sha(&r.release, push.repo))
            .cloned();
        let latest = self
            .pending
            .get(push.repo)
            .map(|p| p.sha.clone())
            .or_else(|| in_run.clone());
        if latest.as_ref() == Some(&push.sha) {
            return ctx.ignore(format!(
                "{} {} is already being deployed",
                push.repo, push.sha
            ));
        }
        if let Some(old) = self.pending.slot(push.repo).take() {
            supersede(
                old,
                &push.event_id,
                "a newer push of the same repository arrived",
                ctx,
            );
        }
        if in_run.as_ref() != Some(&push.sha) {
            *self.pending.slot(push.repo) = Some(push.clone());
        }
        set_release_sha(&mut self.desired, push.repo, push.sha.clone());
        Handled
    }

    /// Stops the active run now: its outstanding step messages become stale, what it created
    /// stays recorded, pending pushes are dropped, and the environment is back to what serves.
    fn cancel(&mut self, trigger: &EventId, ctx: &mut Ctx) -> Outcome<State> {
        let now = ctx.now;
        match self.active_run_mut() {
            Some(run) if run.kind == RunKind::Deploy => run.end(RunEnd::Cancelled, now),
            _ => return ctx.refuse("no deployment run is active"),
        }
        // A config change waiting for this run is dropped with it: `redeploy` rolls it out.
        self.pending.config = None;
        for push in [self.pending.infra.take(), self.pending.app.take()]
            .into_iter()
            .flatten()
        {
            supersede(push, trigger, "the run was cancelled", ctx);
        }
        self.desired = self
            .deployed
            .as_ref()
            .map(|d| d.release.clone())
            .unwrap_or_default();
        Transition(self.advance(ctx))
    }

    /// Resumes a failed run: the failed step gets a fresh retry budget.
    fn resume(&mut self, ctx: &mut Ctx) -> Outcome<State> {
        let Some(run) = self.active_run_mut() else {
            return ctx.refuse("no run is active");
        };
        for step in &mut run.steps {
            if step.status == StepStatus::Failed {
                step.status = StepStatus::Pending;
                step.attempt = 0;
                step.first_attempt_at = None;
                step.finished_at = None;
            }
        }
        Transition(self.advance(ctx))
    }

    fn on_step_report(&mut self, report: &StepReport, ctx: &mut Ctx) -> Outcome<State> {
        let now = ctx.now;
        let Some(run) = self
            .run
            .as_mut()
            .filter(|r| r.is_active() && r.id == report.run)
        else {
            return ctx.stale(format!("run {} is not active", report.run));
        };
        let Some(i) = run.step_index(report.step).filter(|&i| {
            run.steps[i].status == StepStatus::Running && run.steps[i].token == report.token
        }) else {
            return ctx.stale(format!(
                "step {} token {} is not outstanding",
                report.step, report.token
            ));
        };
        match &report.outcome {
            StepOutcome::Done { output } => {
                let step = &mut run.steps[i];
                step.finished_at = Some(now);
                step.note = None;
                match self.resources.record(report.step, output) {
                    Ok(()) => {
                        step.status = StepStatus::Done;
                        step.last_error = None;
                    }
                    Err(error) => {
                        step.status = StepStatus::Failed;
                        step.last_error = Some(error);
                    }
                }
            }
            StepOutcome::Progress {
                recheck_after,
                note,
            } => {
                run.steps[i].note = Some(note.clone());
                dispatch(run, i, &self.resources, Attempt::Same, *recheck_after, ctx);
            }
            StepOutcome::Retryable {
                error,
                retry_in: Some(delay),
            } => {
                let token = run.take_token();
                let step = &mut run.steps[i];
                step.status = StepStatus::RetryWait;
                step.token = token;
                step.last_error = Some(error.clone());
                step.next_attempt_at = Some(now.saturating_add(*delay));
                ctx.commands.push(Command::ScheduleTimer {
                    timer: TimerFired {
                        run: run.id,
                        step: report.step,
                        token,
                    },
                    delay: *delay,
                });
            }
            StepOutcome::Retryable {
                error,
                retry_in: None,
            } => {
                let step = &mut run.steps[i];
                step.status = StepStatus::Failed;
                step.finished_at = Some(now);
                step.last_error = Some(format!(
                    "{error} (retry policy exhausted after {} attempts)",
                    step.attempt
                ));
            }
            StepOutcome::Terminal { error } => {
                let step = &mut run.steps[i];
                step.status = StepStatus::Failed;
                step.finished_at = Some(now);
                step.last_error = Some(error.clone());
            }
        }
        Transition(self.advance(ctx))
    }

    fn on_timer(&mut self, timer: &TimerFired, ctx: &mut Ctx) -> Outcome<State> {
        let Some(run) = self
            .run
            .as_mut()
            .filter(|r| r.is_active() && r.id == timer.run)
        else {
            return ctx.stale(format!("run {} is not active", timer.run));
        };
        let Some(i) = run.step_index(timer.step).filter(|&i| {
            run.steps[i].status == StepStatus::RetryWait && run.steps[i].token == timer.token
        }) else {
            return ctx.stale(format!(
                "no retry of {} with token {} is waiting",
                timer.step, timer.token
            ));
        };
        dispatch(run, i, &self.resources, Attempt::Next, Duration::ZERO, ctx);
        Handled
    }

    /// Sends every outstanding step message and timer again with a fresh token, so that lost
    /// messages cannot leave the workflow stuck and late copies of the old ones are stale.
    fn on_rearm(&mut self, ctx: &mut Ctx) -> Outcome<State> {
        let now = ctx.now;
        let Some(run) = self.run.as_mut().filter(|r| r.is_active()) else {
            return ctx.ignore("no run is active");
        };
        let mut rearmed = false;
        for i in 0..run.steps.len() {
            match run.steps[i].status {
                StepStatus::Running => {
                    dispatch(run, i, &self.resources, Attempt::Same, Duration::ZERO, ctx);
                    rearmed = true;
                }
                StepStatus::RetryWait => {
                    let token = run.take_token();
                    let step = &mut run.steps[i];
                    step.token = token;
                    let delay = step
                        .next_attempt_at
                        .map_or(Duration::ZERO, |t| t.since(now));
                    ctx.commands.push(Command::ScheduleTimer {
                        timer: TimerFired {
                            run: run.id,
                            step: step.kind,
                            token,
                        },
                        delay,
                    });
                    rearmed = true;
                }
                _ => {}
            }
        }
        if rearmed {
            Handled
        } else {
            ctx.ignore("nothing is outstanding")
        }
    }

    /// Moves the active run as far as its data allows (dispatching every step whose
    /// dependencies are complete) and returns the state the data implies.
    fn advance(&mut self, ctx: &mut Ctx) -> State {
        let now = ctx.now;
        let Some(run) = self.run.as_mut().filter(|r| r.is_active()) else {
            return if self.deployed.is_some() {
                State::Live
            } else {
                State::Unprovisioned
            };
        };
        if run.failed_step().is_some() {
            // The run pauses as a whole: `retry` resumes the other outstanding steps too.
            run.pause_outstanding();
            return State::Failed;
        }
        if run.kind == RunKind::Decommission {
            let i = 0;
            return match run.steps[i].status {
                StepStatus::Done => {
                    run.end(RunEnd::Succeeded, now);
                    self.deployed = None;
                    State::Decommissioned
                }
                StepStatus::Pending => {
                    dispatch(run, i, &self.resources, Attempt::Next, Duration::ZERO, ctx);
                    State::Decommissioning
                }
                _ => State::Decommissioning,
            };
        }
        let mut preparing = false;
        for i in 0..run.steps.len() {
            let kind = run.steps[i].kind;
            if kind == StepKind::Rollout || run.steps[i].is_complete() {
                continue;
            }
            preparing = true;
            let ready = kind
                .dependencies()
                .iter()
                .all(|dep| run.step(*dep).is_none_or(|s| s.is_complete()));
            if ready && run.steps[i].status == StepStatus::Pending {
                dispatch(run, i, &self.resources, Attempt::Next, Duration::ZERO, ctx);
            }
        }
        if preparing {
            return State::Preparing;
        }
        if run.needs_approval && !run.approved {
            return State::AwaitingApproval;
        }
        let Some(i) = run.step_index(StepKind::Rollout) else {
            unreachable!("deploy runs always have a rollout step")
        };
        match run.steps[i].status {
            StepStatus::Pending => {
                dispatch(run, i, &self.resources, Attempt::Next, Duration::ZERO, ctx);
                State::RollingOut
            }
            StepStatus::Done | StepStatus::Skipped => {
                run.end(RunEnd::Succeeded, now);
                let deployed = Deployed {
                    release: run.release.clone(),
                    run: run.id,
                    at: now,
                };
                self.releases.retain(|r| r.release != deployed.release);
                self.releases.push(deployed.clone());
                let keep = usize::try_from(ctx.settings.keep_releases.max(1)).unwrap_or(1);
                let extra = self.releases.len().saturating_sub(keep);
                self.releases.drain(..extra);
                self.deployed = Some(deployed);
                if self.pending.is_empty() {
                    State::Live
                } else {
                    // The newest pending pushes (or a config change) start the next run
                    // at once.
                    let trigger = [&self.pending.infra, &self.pending.app]
                        .into_iter()
                        .flatten()
                        .max_by_key(|p| p.received_at)
                        .map(|p| p.event_id.clone())
                        .or_else(|| self.pending.config.as_ref().map(|c| c.event_id.clone()))
                        .unwrap_or_else(|| run.trigger.clone());
                    let options = RunOptions {
                        reroute: self.pending.config.is_some(),
                        ..RunOptions::default()
                    };
                    match self.start_run_with(RunKind::Deploy, &trigger, options, ctx) {
                        Transition(state) => state,
                        _ => unreachable!("start_run always transitions"),
                    }
                }
            }
            StepStatus::Running | StepStatus::RetryWait | StepStatus::Failed => State::RollingOut,
        }
    }

    /// Whether the workflow is waiting on something that will come: an outstanding step
    /// message or timer, a person (approval, retry), or a push. False means stuck.
    pub fn is_waiting_on_something(&self, state: State) -> bool {
        match state {
            State::Unprovisioned | State::Live | State::Decommissioned => true,
            State::AwaitingApproval | State::Failed => true,
            State::Preparing | State::RollingOut | State::Decommissioning => self
                .active_run()
                .is_some_and(|r| r.outstanding().next().is_some()),
        }
    }
}

/// How a run starts besides its kind.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RunOptions {
    /// Its database step restores the environment's final snapshot.
    pub(crate) restore_database: bool,
    /// Its routing step runs even though routing exists: a tenant's settings changed (its
    /// domain, so its host, may be new).
    pub(crate) reroute: bool,
}

/// Whether a dispatch starts a new attempt or repeats the current one (a progress recheck).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Next,
    Same,
}

/// Marks step `i` running with a fresh token and emits its step message.
fn dispatch(
    run: &mut Run,
    i: usize,
    resources: &Resources,
    attempt: Attempt,
    delay: Duration,
    ctx: &mut Ctx,
) {
    let token = run.take_token();
    let step = &mut run.steps[i];
    step.status = StepStatus::Running;
    step.token = token;
    step.next_attempt_at = None;
    if attempt == Attempt::Next {
        step.attempt = step.attempt.saturating_add(1);
    }
    let first_attempt_at = *step.first_attempt_at.get_or_insert(ctx.now);
    let (kind, step_attempt) = (step.kind, step.attempt);
    ctx.commands.push(Command::RunStep(Box::new(StepTask {
        run: run.id,
        step: kind,
        token,
        attempt: step_attempt,
        first_attempt_at,
        delay,
        release: run.release.clone(),
        resources: resources.clone(),
        keep: if kind == StepKind::Rollout {
            run.keep.clone()
        } else {
            Vec::new()
        },
        restore_database: kind == StepKind::Database && run.restore_database,
    })));
}

fn supersede(push: Push, by: &EventId, reason: &str, ctx: &mut Ctx) {
    ctx.commands.push(Command::RecordSuperseded {
        push: Box::new(push),
        by: by.clone(),
        reason: reason.to_owned(),
    });
}

/// The shape statig gives a serialized machine; only here to describe it in JSON Schema.
#[derive(JsonSchema)]
#[schemars(rename = "Machine")]
#[allow(dead_code)]
pub(crate) struct MachineDoc {
    /// The workflow's data.
    shared_storage: Workflow,
    /// The current leaf state.
    state: State,
}

#[cfg(test)]
mod tests;
