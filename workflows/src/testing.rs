//! A deterministic driver for tests and benchmarks: it plays the engine and the workers
//! around one [`WorkflowRecord`], keeping the messages the machine asked for "in flight" and
//! delivering them on request, with a clock that advances one second per event.
//!
//! Compiled for this crate's tests and, with the `testing` feature, for other crates' tests.

use std::time::Duration;

use crate::command::{Command, StepTask};
use crate::event::{Event, Push, RepoKind, Signal, StepOutcome, StepReport, TimerFired};
use crate::id::{Environment, EventId, GitSha, TenantId, WorkflowKey};
use crate::machine::{Input, Settings, State};
use crate::record::{Applied, WorkflowRecord};
use crate::step::{
    DatabaseOutput, DeploymentOutput, ImageOutput, NetworkOutput, RoutingOutput, SourceOutput,
    StepKind, StepOutput,
};
use crate::time::Timestamp;

/// The commit numbered `n`, as 40 hex digits.
pub fn sha(n: u32) -> GitSha {
    GitSha::new(format!("{n:040x}")).unwrap_or_else(|_| unreachable!("40 hex digits"))
}

/// An event id from a string the tests choose.
pub fn event_id(s: &str) -> EventId {
    EventId::new(s).unwrap_or_else(|e| panic!("test event id: {e}"))
}

/// The workflow of tenant `acme` in `env`.
pub fn key(env: Environment) -> WorkflowKey {
    let tenant = TenantId::new("acme").unwrap_or_else(|_| unreachable!("valid tenant id"));
    WorkflowKey::new(tenant, env)
}

/// A plausible output of `task`'s step, named after the run and commits.
pub fn output_for(task: &StepTask) -> StepOutput {
    let run = task.run;
    let sha_of = |s: &Option<GitSha>| s.clone().unwrap_or_else(|| sha(0));
    match task.step {
        StepKind::Network => StepOutput::Network(NetworkOutput {
            instance_security_group: format!("sg-i-{run}"),
            database_security_group: format!("sg-d-{run}"),
        }),
        StepKind::SourceInfra => StepOutput::Source(SourceOutput {
            sha: sha_of(&task.release.infra),
            artifact_key: format!("src/{}", sha_of(&task.release.infra)),
        }),
        StepKind::SourceApp => StepOutput::Source(SourceOutput {
            sha: sha_of(&task.release.app),
            artifact_key: format!("src/{}", sha_of(&task.release.app)),
        }),
        StepKind::Image => StepOutput::Image(ImageOutput {
            infra_sha: sha_of(&task.release.infra),
            image_id: format!("ami-{}", sha_of(&task.release.infra).short()),
        }),
        StepKind::Database => StepOutput::Database(DatabaseOutput {
            instance_id: format!("db-{run}"),
            endpoint: format!("db-{run}.example:3306"),
            secret_arn: format!("arn:aws:secretsmanager:eu-west-1:1:secret:db-{run}"),
        }),
        StepKind::Routing => StepOutput::Routing(RoutingOutput {
            host: "production.acme.example".into(),
            target_group_arn: format!("arn:aws:elasticloadbalancing:tg/{run}"),
            rule_arn: format!("arn:aws:elasticloadbalancing:rule/{run}"),
            priority: 7,
            dns_zone: None,
        }),
        StepKind::Rollout => StepOutput::Rollout(DeploymentOutput {
            group_name: format!("acme-{run}"),
            image_id: task
                .resources
                .image
                .as_ref()
                .map_or_else(|| "ami-base".to_owned(), |i| i.image_id.clone()),
            run,
            release: task.release.clone(),
        }),
        StepKind::Decommission => StepOutput::Decommissioned,
    }
}

/// A message the machine asked for that has not been delivered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InFlight {
    /// A step message.
    Step(Box<StepTask>),
    /// A timer.
    Timer(TimerFired),
}

impl InFlight {
    /// The step it is about.
    pub fn step(&self) -> StepKind {
        match self {
            InFlight::Step(t) => t.step,
            InFlight::Timer(t) => t.step,
        }
    }
}

/// Drives one workflow record the way the engine would.
#[derive(Debug, Clone)]
pub struct Driver {
    /// The record under test.
    pub record: WorkflowRecord,
    /// Settings passed with every event.
    pub settings: Settings,
    /// Messages sent and not yet delivered, oldest first.
    pub in_flight: Vec<InFlight>,
    /// Every command ever returned, in order.
    pub log: Vec<Command>,
    clock_ms: i64,
    next_id: u64,
}

impl Driver {
    /// A fresh workflow in `env`.
    pub fn new(env: Environment) -> Self {
        Self::with_settings(env, Settings::default())
    }

    /// A fresh workflow in `env` with `settings`.
    pub fn with_settings(env: Environment, settings: Settings) -> Self {
        let start = 1_800_000_000_000;
        Self {
            record: WorkflowRecord::new(key(env), Timestamp::from_unix_millis(start)),
            settings,
            in_flight: Vec::new(),
            log: Vec::new(),
            clock_ms: start,
            next_id: 1,
        }
    }

    /// The record's state.
    pub fn state(&self) -> State {
        self.record.state()
    }

    /// The input for the next event (the clock moves one second per event).
    pub fn input(&mut self) -> Input {
        self.clock_ms += 1000;
        Input {
            now: Timestamp::from_unix_millis(self.clock_ms),
            settings: self.settings,
        }
    }

    /// Applies `event` and puts the messages it asked for in flight.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let input = self.input();
        let applied = self.record.apply(event, input);
        for command in &applied.commands {
            match command {
                Command::RunStep(task) => self.in_flight.push(InFlight::Step(task.clone())),
                Command::ScheduleTimer { timer, .. } => {
                    self.in_flight.push(InFlight::Timer(*timer));
                }
                Command::RecordSuperseded { .. } => {}
            }
        }
        self.log.extend(applied.commands.iter().cloned());
        applied
    }

    /// A fresh event id.
    pub fn fresh_id(&mut self, prefix: &str) -> EventId {
        self.next_id += 1;
        event_id(&format!("{prefix}-{}", self.next_id))
    }

    /// The push event of commit `n` to `repo`, with a fresh id and no `before` (as an operator
    /// tool sends it).
    pub fn push_event(&mut self, repo: RepoKind, n: u32) -> Event {
        self.push_event_from(repo, None, n)
    }

    /// The push event that moves `repo`'s branch from commit `before` to commit `n`, as GitLab
    /// sends it, with a fresh id.
    pub fn push_event_from(&mut self, repo: RepoKind, before: Option<u32>, n: u32) -> Event {
        let event_id = self.fresh_id("push");
        Event::Push(Push {
            event_id,
            repo,
            sha: sha(n),
            before: before.map(sha),
            git_ref: "refs/heads/main".into(),
            author: "jane".into(),
            message: format!("commit {n}"),
            received_at: Timestamp::from_unix_millis(self.clock_ms),
        })
    }

    /// Pushes commit `n` to `repo`.
    pub fn push(&mut self, repo: RepoKind, n: u32) -> Applied {
        let event = self.push_event(repo, n);
        self.apply(&event)
    }

    /// The event of a change of the environment's config to `version`, with a fresh id.
    pub fn configure_event(&mut self, version: u64) -> Event {
        let event_id = self.fresh_id("config");
        Event::Configure(crate::event::ConfigChange {
            event_id,
            version,
            actor: "ops".into(),
        })
    }

    /// The signal event `signal`, with a fresh id.
    pub fn signal_event(&mut self, signal: Signal) -> Event {
        let event_id = self.fresh_id("signal");
        Event::Signal {
            event_id,
            signal,
            actor: "ops".into(),
        }
    }

    /// Sends `signal`.
    pub fn signal(&mut self, signal: Signal) -> Applied {
        let event = self.signal_event(signal);
        self.apply(&event)
    }

    /// Removes and returns the newest in-flight message about `step`.
    pub fn take(&mut self, step: StepKind) -> Option<InFlight> {
        let i = self.in_flight.iter().rposition(|m| m.step() == step)?;
        Some(self.in_flight.remove(i))
    }

    /// The event that delivering `message` with `outcome` produces (timers ignore `outcome`).
    pub fn delivery(message: &InFlight, outcome: impl FnOnce(&StepTask) -> StepOutcome) -> Event {
        match message {
            InFlight::Step(task) => Event::Step(StepReport {
                run: task.run,
                step: task.step,
                token: task.token,
                outcome: outcome(task),
            }),
            InFlight::Timer(timer) => Event::Timer(*timer),
        }
    }

    /// Delivers the newest message about `step`, reporting `outcome` if it is a step message.
    pub fn deliver(
        &mut self,
        step: StepKind,
        outcome: impl FnOnce(&StepTask) -> StepOutcome,
    ) -> Option<Applied> {
        let message = self.take(step)?;
        let event = Self::delivery(&message, outcome);
        Some(self.apply(&event))
    }

    /// Completes `step` successfully with a plausible output.
    pub fn complete(&mut self, step: StepKind) -> Option<Applied> {
        self.deliver(step, |task| StepOutcome::Done {
            output: output_for(task),
        })
    }

    /// Reports `step` failing retryably, with the policy granting `retry_in`.
    pub fn fail_retryably(
        &mut self,
        step: StepKind,
        retry_in: Option<Duration>,
    ) -> Option<Applied> {
        self.deliver(step, |_| StepOutcome::Retryable {
            error: "throttled".into(),
            retry_in,
        })
    }

    /// Completes every in-flight message (timers fire, steps succeed) until none is left.
    /// Returns how many messages were delivered.
    pub fn run_to_quiescence(&mut self) -> usize {
        let mut delivered = 0;
        while let Some(message) = self.in_flight.first().cloned() {
            self.in_flight.remove(0);
            let event = Self::delivery(&message, |task| StepOutcome::Done {
                output: output_for(task),
            });
            self.apply(&event);
            delivered += 1;
        }
        delivered
    }
}
