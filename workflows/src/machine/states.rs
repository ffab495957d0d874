//! The statig handlers of [`Workflow`]: which events each state accepts, refuses or defers.
//!
//! `#[state_machine]` generates the `Superstate` enum here, without docs of its own.
#![allow(missing_docs)]

use statig::Outcome::{self, Handled, Super, Transition};
use statig::state_machine;

use super::{Ctx, RunKind, RunOptions, State, Workflow, release_sha, set_release_sha};
use crate::event::{Event, Signal};

#[state_machine(
    initial = "State::unprovisioned()",
    state(custom, name = "State"),
    superstate(derive(Debug))
)]
impl Workflow {
    /// Root: step reports, timers, re-arming and the signals that apply everywhere.
    #[superstate]
    fn workflow(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Step(report) => self.on_step_report(report, context),
            Event::Timer(timer) => self.on_timer(timer, context),
            Event::Rearm { .. } => self.on_rearm(context),
            Event::Signal {
                event_id,
                signal: Signal::Decommission,
                ..
            } => self.start_run(RunKind::Decommission, event_id, context),
            Event::Signal { signal, .. } => {
                let reason = match signal {
                    Signal::Approve => "nothing is awaiting approval".to_owned(),
                    Signal::Retry => "nothing has failed: retry resumes a failed run".to_owned(),
                    Signal::Cancel => "no run is active".to_owned(),
                    Signal::Redeploy if self.deployed.is_none() => {
                        "nothing has been deployed yet".to_owned()
                    }
                    Signal::Redeploy => "a run is active: cancel it first".to_owned(),
                    Signal::Rollback { .. } if self.deployed.is_none() => {
                        "nothing has been deployed yet".to_owned()
                    }
                    Signal::Rollback { .. } => "a run is active: cancel it first".to_owned(),
                    Signal::Decommission => unreachable!("matched above"),
                };
                context.refuse(reason)
            }
            Event::Provision { .. } => context.ignore("already provisioned"),
            Event::Push(_) => context.ignore("pushes do not apply here"),
            Event::Configure(_) => context.ignore("config changes do not apply here"),
        }
    }

    #[state(superstate = "workflow")]
    fn unprovisioned(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Push(push) => match self.heads.admit(push) {
                Err(reason) => context.ignore(reason),
                Ok(()) => {
                    set_release_sha(&mut self.desired, push.repo, push.sha.clone());
                    self.start_run(RunKind::Deploy, &push.event_id, context)
                }
            },
            Event::Provision { event_id, .. } => self.start_run(RunKind::Deploy, event_id, context),
            Event::Configure(_) => context.ignore(
                "nothing is deployed yet: the first deployment gives the app the current config",
            ),
            _ => Super,
        }
    }

    /// A run is busy: pushes wait (newest wins), cancel stops it.
    #[superstate(superstate = "workflow")]
    fn deploying(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Push(push) => match self.heads.admit(push) {
                Err(reason) => context.ignore(reason),
                Ok(()) => self.keep_pending(push, context),
            },
            // Rolled out by a run of its own once this one is done (newest wins).
            Event::Configure(change) => {
                self.pending.config = Some(change.clone());
                Handled
            }
            Event::Signal {
                event_id,
                signal: Signal::Cancel,
                ..
            } => self.cancel(event_id, context),
            _ => Super,
        }
    }

    #[state(superstate = "deploying")]
    fn preparing(event: &Event) -> Outcome<State> {
        let _ = event;
        Super
    }

    #[state(superstate = "deploying")]
    fn awaiting_approval(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Signal {
                signal: Signal::Approve,
                ..
            } => {
                if let Some(run) = self.active_run_mut() {
                    run.approved = true;
                }
                Transition(self.advance(context))
            }
            _ => Super,
        }
    }

    #[state(superstate = "deploying")]
    fn rolling_out(event: &Event) -> Outcome<State> {
        let _ = event;
        Super
    }

    #[state(superstate = "workflow")]
    fn live(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Push(push) => {
                if let Err(reason) = self.heads.admit(push) {
                    return context.ignore(reason);
                }
                if release_sha(&self.desired, push.repo) == Some(&push.sha) {
                    return context.ignore(format!("{} {} is already live", push.repo, push.sha));
                }
                set_release_sha(&mut self.desired, push.repo, push.sha.clone());
                self.start_run(RunKind::Deploy, &push.event_id, context)
            }
            Event::Signal {
                event_id,
                signal: Signal::Redeploy,
                ..
            } => self.start_run(RunKind::Deploy, event_id, context),
            Event::Signal {
                event_id,
                signal: Signal::Rollback { to },
                ..
            } => self.rollback(*to, event_id, context),
            // Only the rollout runs: the same release, the new config.
            Event::Configure(change) => self.start_run_with(
                RunKind::Deploy,
                &change.event_id,
                RunOptions {
                    reroute: true,
                    ..RunOptions::default()
                },
                context,
            ),
            _ => Super,
        }
    }

    #[state(superstate = "workflow")]
    fn failed(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        let decommissioning = self
            .run
            .as_ref()
            .is_some_and(|r| r.kind == RunKind::Decommission);
        match event {
            Event::Signal {
                signal: Signal::Retry | Signal::Decommission,
                ..
            } if decommissioning => self.resume(context),
            Event::Signal {
                signal: Signal::Retry,
                ..
            } => self.resume(context),
            _ if decommissioning => match event {
                Event::Push(_) | Event::Configure(_) => {
                    context.ignore("the environment is being decommissioned")
                }
                Event::Signal { signal, .. } => context.refuse(format!(
                    "{signal} does not apply while decommissioning has failed: retry it"
                )),
                _ => Super,
            },
            Event::Push(push) => match self.heads.admit(push) {
                Err(reason) => context.ignore(reason),
                Ok(()) => {
                    set_release_sha(&mut self.desired, push.repo, push.sha.clone());
                    self.start_run(RunKind::Deploy, &push.event_id, context)
                }
            },
            // Like a push: the failed run is abandoned for a new one.
            Event::Configure(change) => self.start_run_with(
                RunKind::Deploy,
                &change.event_id,
                RunOptions {
                    reroute: true,
                    ..RunOptions::default()
                },
                context,
            ),
            Event::Signal {
                event_id,
                signal: Signal::Cancel,
                ..
            } => self.cancel(event_id, context),
            Event::Signal {
                event_id,
                signal: Signal::Redeploy,
                ..
            } => match self.deployed.as_ref().map(|d| d.release.clone()) {
                Some(release) => {
                    self.desired = release;
                    self.start_run(RunKind::Deploy, event_id, context)
                }
                None => context.refuse("nothing has been deployed yet"),
            },
            Event::Signal {
                event_id,
                signal: Signal::Rollback { to },
                ..
            } => self.rollback(*to, event_id, context),
            _ => Super,
        }
    }

    #[state(superstate = "workflow")]
    fn decommissioning(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Push(_) | Event::Configure(_) => {
                context.ignore("the environment is being decommissioned")
            }
            Event::Signal {
                signal: Signal::Decommission,
                ..
            } => context.ignore("already decommissioning"),
            Event::Signal { signal, .. } => {
                context.refuse(format!("{signal} does not apply while decommissioning"))
            }
            _ => Super,
        }
    }

    #[state(superstate = "workflow")]
    fn decommissioned(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Push(_) | Event::Configure(_) => context.ignore(
                "the environment is decommissioned: `wfctl provision` provisions it again",
            ),
            Event::Signal {
                signal: Signal::Decommission,
                ..
            } => context.ignore("already decommissioned"),
            Event::Signal { signal, .. } => context.refuse(format!(
                "{signal}: the environment is decommissioned (`wfctl provision` provisions it again)"
            )),
            Event::Provision {
                event_id,
                from_snapshot,
            } => self.provision_again(*from_snapshot, event_id, context),
            // Reports and timers can only be stale here; the root says so.
            _ => Super,
        }
    }
}
