//! One test per transition of the machine (ARCHITECTURE.md, "Transitions"), through the record as the engine
//! would use it.

use std::time::Duration;

use crate::command::Command;
use crate::event::{Event, RepoKind, Signal, StepOutcome};
use crate::id::Environment;
use crate::machine::{RunEnd, RunKind, Settings, State, Verdict};
use crate::step::{StepKind, StepOutput, StepStatus};
use crate::testing::{Driver, InFlight, sha};

use RepoKind::{App, Infra};
use StepKind::*;

fn run_steps(commands: &[Command]) -> Vec<StepKind> {
    let mut steps: Vec<StepKind> = commands
        .iter()
        .filter_map(|c| match c {
            Command::RunStep(t) => Some(t.step),
            _ => None,
        })
        .collect();
    steps.sort();
    steps
}

fn status(d: &Driver, step: StepKind) -> Option<StepStatus> {
    d.record
        .workflow()
        .run
        .as_ref()
        .and_then(|r| r.step(step))
        .map(|s| s.status)
}

/// Pushes infra 1 and app 1 to a fresh workflow and completes everything: live at r1.
fn live() -> Driver {
    let mut d = Driver::new(Environment::Staging);
    d.push(Infra, 1);
    d.push(App, 1);
    d.run_to_quiescence();
    // The app push arrived while r1 was preparing, so r2 deployed both.
    assert_eq!(d.state(), State::Live);
    d
}

fn refused(applied: &crate::Applied) -> bool {
    matches!(applied.verdict, Verdict::Refused(_))
}

fn ignored(applied: &crate::Applied) -> bool {
    matches!(applied.verdict, Verdict::Ignored(_))
}

#[test]
fn first_push_starts_a_run_with_independent_steps_concurrently() {
    let mut d = Driver::new(Environment::Dev);
    let a = d.push(Infra, 1);
    assert_eq!((a.from, a.to), (State::Unprovisioned, State::Preparing));
    assert_eq!(a.verdict, Verdict::Accepted);
    // network, infra source and routing need nothing; image and database wait for them.
    assert_eq!(run_steps(&a.commands), [Network, SourceInfra, Routing]);
    assert_eq!(
        status(&d, SourceApp),
        Some(StepStatus::Skipped),
        "no app commit yet"
    );
    assert_eq!(status(&d, Image), Some(StepStatus::Pending));
    assert_eq!(status(&d, Database), Some(StepStatus::Pending));
}

#[test]
fn provision_starts_a_run_without_commits() {
    let mut d = Driver::new(Environment::Dev);
    let id = d.fresh_id("provision");
    let a = d.apply(&Event::Provision {
        event_id: id,
        from_snapshot: false,
    });
    assert_eq!(a.to, State::Preparing);
    assert_eq!(run_steps(&a.commands), [Network, Routing]);
    assert_eq!(status(&d, Image), Some(StepStatus::Skipped), "base image");
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    let id = d.fresh_id("provision");
    assert!(ignored(&d.apply(&Event::Provision {
        event_id: id,
        from_snapshot: false,
    })));
}

#[test]
fn finished_steps_release_their_dependants() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let a = d.complete(Network).expect("network in flight");
    assert_eq!(a.to, State::Preparing);
    assert_eq!(
        run_steps(&a.commands),
        [Database],
        "image still waits for its source"
    );
    let a = d.complete(SourceInfra).expect("source in flight");
    assert_eq!(run_steps(&a.commands), [Image]);
    let task = match &a.commands[0] {
        Command::RunStep(t) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        task.resources.infra_source.is_some(),
        "the image step sees its source"
    );
    assert_eq!(task.attempt, 1);
}

#[test]
fn preparation_done_starts_the_rollout() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    for step in [Network, SourceInfra, Routing, Database] {
        d.complete(step);
    }
    assert_eq!(d.state(), State::Preparing);
    let a = d.complete(Image).expect("image in flight");
    assert_eq!((a.from, a.to), (State::Preparing, State::RollingOut));
    assert_eq!(run_steps(&a.commands), [Rollout]);
}

#[test]
fn rollout_done_makes_the_release_live() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    let w = d.record.workflow();
    let deployed = w.deployed.as_ref().expect("deployed");
    assert_eq!(deployed.release.infra, Some(sha(1)));
    assert_eq!(
        w.run.as_ref().and_then(|r| r.ended),
        Some(RunEnd::Succeeded)
    );
    assert_eq!(
        w.resources.deployment.as_ref().map(|d| d.image_id.as_str()),
        Some("ami-00000000")
    );
}

#[test]
fn production_waits_for_approval_when_the_tenant_asks() {
    let mut d = Driver::with_settings(
        Environment::Production,
        Settings {
            production_approval: true,
            ..Settings::default()
        },
    );
    d.push(App, 1);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::AwaitingApproval);
    assert!(
        d.in_flight.is_empty(),
        "nothing runs while a person decides"
    );
    let a = d.signal(Signal::Approve);
    assert_eq!((a.from, a.to), (State::AwaitingApproval, State::RollingOut));
    assert_eq!(run_steps(&a.commands), [Rollout]);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
}

#[test]
fn other_environments_skip_approval() {
    let mut d = Driver::with_settings(
        Environment::Staging,
        Settings {
            production_approval: true,
            ..Settings::default()
        },
    );
    d.push(App, 1);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
}

#[test]
fn approve_is_refused_when_nothing_awaits_it() {
    let mut d = live();
    let before = d.record.clone();
    let a = d.signal(Signal::Approve);
    assert!(refused(&a));
    assert_eq!(a.to, State::Live);
    assert!(a.commands.is_empty());
    assert_eq!(d.record.workflow(), before.workflow());
}

#[test]
fn pushes_while_deploying_wait_and_the_newest_wins() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let a = d.push(Infra, 2);
    assert_eq!(a.to, State::Preparing);
    assert!(a.commands.is_empty(), "nothing starts while a run is busy");
    let a = d.push(Infra, 3);
    match a.commands.as_slice() {
        [Command::RecordSuperseded { push, .. }] => assert_eq!(push.sha, sha(2)),
        other => panic!("expected the superseded push: {other:?}"),
    }
    let a = d.push(App, 9);
    assert!(
        a.commands.is_empty(),
        "another repository supersedes nothing"
    );
    let pending = &d.record.workflow().pending;
    assert_eq!(pending.infra.as_ref().map(|p| p.sha.clone()), Some(sha(3)));
    assert_eq!(pending.app.as_ref().map(|p| p.sha.clone()), Some(sha(9)));
}

#[test]
fn a_push_of_what_is_being_deployed_is_ignored() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    assert!(ignored(&d.push(Infra, 1)));
    d.push(Infra, 2);
    // Going back to the commit the run deploys drops the pending one.
    let a = d.push(Infra, 1);
    assert_eq!(a.verdict, Verdict::Accepted);
    assert!(matches!(
        a.commands.as_slice(),
        [Command::RecordSuperseded { .. }]
    ));
    assert!(d.record.workflow().pending.is_empty());
}

#[test]
fn the_end_of_a_run_starts_the_pending_push_at_once() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.push(App, 5);
    for step in [Network, SourceInfra, Routing, Database, Image] {
        d.complete(step);
    }
    let a = d.complete(Rollout).expect("rollout in flight");
    assert_eq!((a.from, a.to), (State::RollingOut, State::Preparing));
    assert_eq!(
        run_steps(&a.commands),
        [SourceApp],
        "only the app source is new"
    );
    let w = d.record.workflow();
    let run = w.run.as_ref().expect("run");
    assert_eq!(run.id.get(), 2);
    assert_eq!(run.release.app, Some(sha(5)));
    assert_eq!(run.release.infra, Some(sha(1)));
    assert!(w.pending.is_empty());
    assert_eq!(w.deployed.as_ref().map(|d| d.run.get()), Some(1));
}

#[test]
fn a_push_to_a_live_workflow_starts_a_run_that_skips_what_exists() {
    let mut d = live();
    let a = d.push(App, 2);
    assert_eq!((a.from, a.to), (State::Live, State::Preparing));
    assert_eq!(
        run_steps(&a.commands),
        [SourceApp],
        "an app push skips the image build"
    );
    d.complete(SourceApp);
    assert_eq!(d.state(), State::RollingOut);
    let a = d.push(Infra, 2);
    assert!(a.commands.is_empty());
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    let deployed = d.record.workflow().deployed.clone().expect("deployed");
    assert_eq!(deployed.release.infra, Some(sha(2)));
    assert_eq!(deployed.release.app, Some(sha(2)));
}

#[test]
fn a_push_of_the_live_commit_is_ignored() {
    let mut d = live();
    let a = d.push(Infra, 1);
    assert!(ignored(&a));
    assert_eq!(a.to, State::Live);
}

#[test]
fn progress_rechecks_later_under_a_new_token() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let old = d.take(Network).expect("network in flight");
    let event = Driver::delivery(&old, |_| StepOutcome::Progress {
        recheck_after: Duration::from_secs(30),
        note: "creating".into(),
    });
    let a = d.apply(&event);
    match a.commands.as_slice() {
        [Command::RunStep(t)] => {
            assert_eq!(t.delay, Duration::from_secs(30));
            assert_eq!(t.attempt, 1, "a recheck is not a new attempt");
        }
        other => panic!("{other:?}"),
    }
    // The old message, delivered again, is stale.
    let again = Driver::delivery(&old, |task| StepOutcome::Done {
        output: crate::testing::output_for(task),
    });
    let a = d.apply(&again);
    assert!(matches!(a.verdict, Verdict::Stale(_)));
    assert_eq!(status(&d, Network), Some(StepStatus::Running));
}

#[test]
fn retryable_failures_wait_on_a_timer_then_try_again() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let a = d
        .fail_retryably(Network, Some(Duration::from_secs(4)))
        .expect("in flight");
    match a.commands.as_slice() {
        [Command::ScheduleTimer { delay, .. }] => assert_eq!(*delay, Duration::from_secs(4)),
        other => panic!("{other:?}"),
    }
    assert_eq!(status(&d, Network), Some(StepStatus::RetryWait));
    let timer = d.take(Network).expect("timer in flight");
    assert!(matches!(timer, InFlight::Timer(_)));
    let a = d.apply(&Driver::delivery(&timer, |_| unreachable!()));
    match a.commands.as_slice() {
        [Command::RunStep(t)] => assert_eq!(t.attempt, 2),
        other => panic!("{other:?}"),
    }
    // The same timer again is stale.
    let a = d.apply(&Driver::delivery(&timer, |_| unreachable!()));
    assert!(matches!(a.verdict, Verdict::Stale(_)));
}

#[test]
fn an_exhausted_policy_fails_the_run_and_pauses_the_others() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let routing = d.take(Routing).expect("routing in flight");
    let a = d.fail_retryably(Network, None).expect("in flight");
    assert_eq!((a.from, a.to), (State::Preparing, State::Failed));
    assert!(a.commands.is_empty());
    let run = d.record.workflow().run.clone().expect("run");
    let failed = run.failed_step().expect("a failed step");
    assert_eq!(failed.kind, Network);
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("exhausted after 1 attempts"))
    );
    assert_eq!(run.outstanding().count(), 0, "failed is a paused state");
    // A late report of a step that was running is stale.
    let late = Driver::delivery(&routing, |task| StepOutcome::Done {
        output: crate::testing::output_for(task),
    });
    assert!(matches!(d.apply(&late).verdict, Verdict::Stale(_)));
}

#[test]
fn retry_resumes_the_failed_step_with_a_fresh_budget() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.complete(Network);
    d.deliver(Database, |_| StepOutcome::Terminal {
        error: "quota".into(),
    });
    assert_eq!(d.state(), State::Failed);
    d.in_flight.clear(); // what was running is stale now
    let a = d.signal(Signal::Retry);
    assert_eq!((a.from, a.to), (State::Failed, State::Preparing));
    // The failed database and the paused source and routing start again; network stays done.
    assert_eq!(run_steps(&a.commands), [SourceInfra, Database, Routing]);
    let db = d
        .record
        .workflow()
        .run
        .as_ref()
        .and_then(|r| r.step(Database).cloned())
        .expect("db");
    assert_eq!(db.attempt, 1);
    assert_eq!(
        db.last_error.as_deref(),
        Some("quota"),
        "kept until it succeeds"
    );
    // A paused step starts afresh too: the engine abandoned what it was doing.
    let run = d.record.workflow().run.clone().expect("run");
    let paused = run.step(Routing).expect("routing");
    assert_eq!(paused.attempt, 1);
    assert_eq!(paused.first_attempt_at, db.first_attempt_at);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
}

#[test]
fn retry_is_refused_unless_failed() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    assert!(refused(&d.signal(Signal::Retry)));
    assert_eq!(d.state(), State::Preparing);
}

#[test]
fn a_push_to_a_failed_workflow_starts_a_new_run() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.deliver(Network, |_| StepOutcome::Terminal {
        error: "denied".into(),
    });
    let a = d.push(Infra, 2);
    assert_eq!((a.from, a.to), (State::Failed, State::Preparing));
    let w = d.record.workflow();
    let run = w.run.as_ref().expect("run");
    assert_eq!(run.id.get(), 2);
    assert_eq!(run.release.infra, Some(sha(2)));
    assert!(run.step(Network).is_some_and(|s| s.attempt == 1));
}

#[test]
fn cancel_stops_a_failed_run() {
    let mut d = live();
    d.push(Infra, 7);
    d.deliver(SourceInfra, |_| StepOutcome::Terminal { error: "x".into() });
    assert_eq!(d.state(), State::Failed);
    let a = d.signal(Signal::Cancel);
    assert_eq!((a.from, a.to), (State::Failed, State::Live));
    let w = d.record.workflow();
    assert_eq!(w.desired.infra, Some(sha(1)), "back to what serves");
    assert_eq!(
        w.run.as_ref().and_then(|r| r.ended),
        Some(RunEnd::Cancelled)
    );
}

#[test]
fn redeploy_from_failed_rolls_back_to_the_deployed_release() {
    let mut d = live();
    d.push(Infra, 7);
    d.deliver(SourceInfra, |_| StepOutcome::Terminal { error: "x".into() });
    assert_eq!(d.state(), State::Failed);
    d.in_flight.clear();
    let a = d.signal(Signal::Redeploy);
    assert_eq!((a.from, a.to), (State::Failed, State::RollingOut));
    assert_eq!(run_steps(&a.commands), [Rollout]);
    let run = d.record.workflow().run.clone().expect("run");
    assert_eq!(run.release.infra, Some(sha(1)));
}

#[test]
fn redeploy_is_refused_when_nothing_was_deployed_or_a_run_is_busy() {
    let mut d = Driver::new(Environment::Dev);
    let a = d.signal(Signal::Redeploy);
    assert!(refused(&a));
    assert_eq!(a.to, State::Unprovisioned);
    d.push(Infra, 1);
    d.deliver(Network, |_| StepOutcome::Terminal { error: "x".into() });
    assert!(
        refused(&d.signal(Signal::Redeploy)),
        "failed, never deployed"
    );
    let mut d = live();
    d.push(App, 3);
    let a = d.signal(Signal::Redeploy);
    assert!(refused(&a));
    assert_eq!(a.to, State::Preparing);
}

#[test]
fn redeploy_of_a_live_workflow_rolls_out_again() {
    let mut d = live();
    let a = d.signal(Signal::Redeploy);
    assert_eq!((a.from, a.to), (State::Live, State::RollingOut));
    assert_eq!(
        run_steps(&a.commands),
        [Rollout],
        "every preparation step exists"
    );
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
}

#[test]
fn cancel_stops_the_run_keeps_outputs_and_drops_pending_pushes() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.complete(Network);
    d.push(Infra, 2);
    let a = d.signal(Signal::Cancel);
    assert_eq!((a.from, a.to), (State::Preparing, State::Unprovisioned));
    assert!(matches!(
        a.commands.as_slice(),
        [Command::RecordSuperseded { .. }]
    ));
    let w = d.record.workflow();
    assert!(w.pending.is_empty());
    assert!(w.resources.network.is_some(), "what was created stays");
    assert!(w.active_run().is_none());
    // A late report of the cancelled run is stale.
    let late = d.complete(Routing).expect("routing was in flight");
    assert!(matches!(late.verdict, Verdict::Stale(_)));
    // The next push starts a run that skips the network.
    let a = d.push(Infra, 3);
    assert_eq!(run_steps(&a.commands), [SourceInfra, Database, Routing]);
}

#[test]
fn cancel_is_refused_without_an_active_run() {
    let mut d = live();
    assert!(refused(&d.signal(Signal::Cancel)));
}

#[test]
fn cancel_of_an_awaited_approval_goes_back_to_live() {
    let mut d = Driver::with_settings(
        Environment::Production,
        Settings {
            production_approval: true,
            ..Settings::default()
        },
    );
    d.push(App, 1);
    d.run_to_quiescence();
    d.signal(Signal::Approve);
    d.run_to_quiescence();
    d.push(App, 2);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::AwaitingApproval);
    let a = d.signal(Signal::Cancel);
    assert_eq!((a.from, a.to), (State::AwaitingApproval, State::Live));
}

#[test]
fn decommission_releases_everything_and_is_final() {
    let mut d = live();
    let a = d.signal(Signal::Decommission);
    assert_eq!((a.from, a.to), (State::Live, State::Decommissioning));
    assert_eq!(run_steps(&a.commands), [Decommission]);
    assert!(refused(&d.signal(Signal::Redeploy)));
    assert!(ignored(&d.push(App, 9)));
    assert!(ignored(&d.signal(Signal::Decommission)));
    let a = d.complete(Decommission).expect("in flight");
    assert_eq!(
        (a.from, a.to),
        (State::Decommissioning, State::Decommissioned)
    );
    let w = d.record.workflow();
    assert_eq!(w.resources, crate::step::Resources::default());
    assert!(w.deployed.is_none());
    for signal in [
        Signal::Approve,
        Signal::Retry,
        Signal::Cancel,
        Signal::Redeploy,
    ] {
        assert!(refused(&d.signal(signal)), "{signal}");
    }
    assert!(ignored(&d.signal(Signal::Decommission)));
    assert!(ignored(&d.push(Infra, 9)));
    assert!(refused(&d.signal(Signal::Rollback { to: None })));
    assert_eq!(d.state(), State::Decommissioned);
}

#[test]
fn a_decommissioned_environment_is_provisioned_again_with_its_last_commits() {
    let mut d = live();
    d.signal(Signal::Decommission);
    d.complete(Decommission).expect("in flight");
    let id = d.fresh_id("p");
    let a = d.apply(&Event::Provision {
        event_id: id,
        from_snapshot: true,
    });
    assert_eq!((a.from, a.to), (State::Decommissioned, State::Preparing));
    let w = d.record.workflow();
    let run = w.active_run().expect("a run");
    assert_eq!(run.release.infra, Some(sha(1)), "the last accepted commits");
    assert_eq!(run.release.app, Some(sha(1)));
    assert!(run.restore_database);
    assert!(w.releases.is_empty(), "nothing kept from before");
    // Everything is built again, and the database task restores the final snapshot.
    assert_eq!(
        run_steps(&a.commands),
        [Network, SourceInfra, SourceApp, Routing]
    );
    d.complete(Network).expect("in flight");
    let database = d.in_flight.iter().find_map(|m| match m {
        InFlight::Step(t) if t.step == Database => Some(t.clone()),
        _ => None,
    });
    assert!(database.expect("database dispatched").restore_database);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
}

#[test]
fn kept_releases_are_the_newest_distinct_ones_up_to_the_setting() {
    let mut d = live();
    for n in 2..=5 {
        d.push(App, n);
        d.run_to_quiescence();
    }
    let w = d.record.workflow();
    let apps: Vec<_> = w.releases.iter().map(|r| r.release.app.clone()).collect();
    assert_eq!(
        apps,
        [Some(sha(3)), Some(sha(4)), Some(sha(5))],
        "the last 3"
    );
    assert_eq!(
        w.releases.last().map(|r| r.run),
        w.deployed.as_ref().map(|r| r.run)
    );
    // A rollout keeps its own release and the newest two before it.
    d.push(App, 6);
    let rollout = loop {
        if let Some(t) = d.in_flight.iter().find_map(|m| match m {
            InFlight::Step(t) if t.step == Rollout => Some(t.clone()),
            _ => None,
        }) {
            break t;
        }
        let message = d.in_flight.remove(0);
        let event = Driver::delivery(&message, |task| StepOutcome::Done {
            output: crate::testing::output_for(task),
        });
        d.apply(&event);
    };
    let kept: Vec<_> = rollout.keep.iter().map(|r| r.app.clone()).collect();
    assert_eq!(kept, [Some(sha(4)), Some(sha(5)), Some(sha(6))]);
    assert!(rollout.keep.iter().all(|r| r.infra == Some(sha(1))));
}

#[test]
fn rollback_rolls_out_the_release_before_or_a_named_one() {
    let mut d = live();
    d.push(App, 2);
    d.run_to_quiescence();
    d.push(App, 3);
    d.run_to_quiescence();
    let runs: Vec<_> = d.record.workflow().releases.iter().map(|r| r.run).collect();
    assert_eq!(runs.len(), 3);
    // Without --to: the release before what serves (app 2).
    let a = d.signal(Signal::Rollback { to: None });
    assert_eq!((a.from, a.to), (State::Live, State::Preparing));
    // The image is the one serving; the kept app artifact is found by its step at once.
    assert_eq!(run_steps(&a.commands), [SourceApp]);
    d.run_to_quiescence();
    let w = d.record.workflow();
    assert_eq!(
        w.deployed.as_ref().and_then(|x| x.release.app.clone()),
        Some(sha(2))
    );
    assert_eq!(w.desired.app, Some(sha(2)));
    // The rolled-back release moved to the end; the one it replaced is still kept.
    let apps: Vec<_> = w.releases.iter().map(|r| r.release.app.clone()).collect();
    assert_eq!(apps, [Some(sha(1)), Some(sha(3)), Some(sha(2))]);
    // With --to: the first release, by its run.
    let first = runs[0];
    d.signal(Signal::Rollback { to: Some(first) });
    d.run_to_quiescence();
    let w = d.record.workflow();
    assert_eq!(
        w.deployed.as_ref().and_then(|x| x.release.app.clone()),
        Some(sha(1))
    );
    // Refusals: a run that is not kept, the release serving, a busy workflow.
    let a = d.signal(Signal::Rollback {
        to: Some(crate::id::RunId::new(99).expect("run")),
    });
    assert!(
        matches!(&a.verdict, Verdict::Refused(r) if r.starts_with("r99 is not a kept release (kept: ")),
        "{:?}",
        a.verdict
    );
    let serving = d.record.workflow().releases.last().map(|r| r.run);
    let a = d.signal(Signal::Rollback { to: serving });
    assert!(
        matches!(&a.verdict, Verdict::Refused(r) if r.contains("is the release serving")),
        "{:?}",
        a.verdict
    );
    d.push(App, 9);
    assert!(refused(&d.signal(Signal::Rollback { to: None })));
}

#[test]
fn rollback_needs_a_deployment_and_goes_through_approval_in_production() {
    let mut d = Driver::new(Environment::Dev);
    assert!(refused(&d.signal(Signal::Rollback { to: None })));
    let mut d = Driver::with_settings(
        Environment::Production,
        Settings {
            production_approval: true,
            ..Settings::default()
        },
    );
    d.push(App, 1);
    d.run_to_quiescence();
    d.signal(Signal::Approve);
    d.run_to_quiescence();
    d.push(App, 2);
    d.run_to_quiescence();
    d.signal(Signal::Approve);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    d.signal(Signal::Rollback { to: None });
    d.run_to_quiescence();
    assert_eq!(
        d.state(),
        State::AwaitingApproval,
        "the same approval rules"
    );
}

#[test]
fn decommission_abandons_a_busy_run_and_its_pending_pushes() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.push(Infra, 2);
    let a = d.signal(Signal::Decommission);
    assert_eq!((a.from, a.to), (State::Preparing, State::Decommissioning));
    assert!(
        a.commands
            .iter()
            .any(|c| matches!(c, Command::RecordSuperseded { .. }))
    );
    let w = d.record.workflow();
    assert_eq!(w.run.as_ref().map(|r| r.kind), Some(RunKind::Decommission));
    assert!(w.pending.is_empty());
    let late = d.complete(Network).expect("network was in flight");
    assert!(matches!(late.verdict, Verdict::Stale(_)));
}

#[test]
fn a_failed_decommission_resumes_on_retry_and_ignores_pushes() {
    let mut d = live();
    d.signal(Signal::Decommission);
    d.deliver(Decommission, |_| StepOutcome::Terminal {
        error: "dependency violation".into(),
    });
    assert_eq!(d.state(), State::Failed);
    assert!(ignored(&d.push(Infra, 5)));
    assert!(refused(&d.signal(Signal::Redeploy)));
    assert!(refused(&d.signal(Signal::Cancel)));
    let a = d.signal(Signal::Retry);
    assert_eq!((a.from, a.to), (State::Failed, State::Decommissioning));
    assert_eq!(run_steps(&a.commands), [Decommission]);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Decommissioned);
}

#[test]
fn a_duplicate_event_changes_nothing() {
    let mut d = Driver::new(Environment::Dev);
    let push = d.push_event(Infra, 1);
    d.apply(&push);
    let before = d.record.clone();
    let a = d.apply(&push);
    assert_eq!(a.verdict, Verdict::Duplicate);
    assert!(a.commands.is_empty());
    assert_eq!(d.record, before);
}

#[test]
fn rearm_sends_outstanding_messages_again_under_new_tokens() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.fail_retryably(Routing, Some(Duration::from_secs(60)));
    let lost = d.in_flight.clone();
    d.in_flight.clear();
    let id = d.fresh_id("sweep");
    let a = d.apply(&Event::Rearm { event_id: id });
    assert_eq!(a.verdict, Verdict::Accepted);
    assert_eq!(a.to, State::Preparing);
    assert_eq!(run_steps(&a.commands), [Network, SourceInfra]);
    match a
        .commands
        .iter()
        .find(|c| matches!(c, Command::ScheduleTimer { .. }))
    {
        Some(Command::ScheduleTimer { delay, timer }) => {
            assert_eq!(timer.step, Routing);
            assert!(*delay <= Duration::from_secs(60) && *delay > Duration::ZERO);
        }
        other => panic!("{other:?}"),
    }
    for old in lost {
        let event = Driver::delivery(&old, |task| StepOutcome::Done {
            output: crate::testing::output_for(task),
        });
        assert!(matches!(d.apply(&event).verdict, Verdict::Stale(_)));
    }
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    let id = d.fresh_id("sweep");
    assert!(ignored(&d.apply(&Event::Rearm { event_id: id })));
}

#[test]
fn an_output_of_the_wrong_step_fails_the_step() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    let a = d
        .deliver(Network, |_| StepOutcome::Done {
            output: StepOutput::Decommissioned,
        })
        .expect("in flight");
    assert_eq!(a.to, State::Failed);
    let run = d.record.workflow().run.clone().expect("run");
    let err = run.failed_step().and_then(|s| s.last_error.clone());
    assert!(err.is_some_and(|e| e.contains("activity bug")));
}

#[test]
fn the_dedup_window_is_bounded() {
    let mut d = live();
    for i in 0..(crate::DEDUP_WINDOW as u32 + 10) {
        d.push(App, 100 + i);
    }
    assert_eq!(d.record.applied.len(), crate::DEDUP_WINDOW);
}

#[test]
fn a_restored_record_carries_on_and_restoring_runs_nothing() {
    let mut d = Driver::new(Environment::Dev);
    d.push(Infra, 1);
    d.complete(Network);
    let bytes = crate::encode(&d.record);
    let restored: crate::WorkflowRecord = crate::decode(&bytes).expect("decodes");
    assert_eq!(restored, d.record);
    assert_eq!(restored.state(), State::Preparing);
    // Applying a stale event to the restored record produces no command: restoring re-ran
    // nothing that sends messages.
    let mut r = d.clone();
    r.record = restored;
    let late = Event::Step(crate::event::StepReport {
        run: crate::id::RunId::FIRST,
        step: Network,
        token: 1,
        outcome: StepOutcome::Terminal {
            error: "late".into(),
        },
    });
    let a = r.apply(&late);
    assert!(matches!(a.verdict, Verdict::Stale(_)));
    assert!(a.commands.is_empty());
    assert_eq!(d.apply(&late), a);
    // And the restored machine goes on exactly like the original.
    let x = d.complete(SourceInfra).expect("in flight");
    let y = r.complete(SourceInfra).expect("in flight");
    assert_eq!(x.commands, y.commands);
    assert_eq!(d.record.workflow(), r.record.workflow());
}

#[test]
fn a_config_change_of_a_live_workflow_rolls_out_the_same_release() {
    let mut d = live();
    let before = d.record.workflow().deployed.clone().expect("deployed");
    let event = d.configure_event(2);
    let a = d.apply(&event);
    assert_eq!(a.verdict, Verdict::Accepted);
    assert_eq!((a.from, a.to), (State::Live, State::Preparing));
    // Routing looks again (the tenant's domain may have changed), then the rollout runs.
    assert_eq!(run_steps(&a.commands), [Routing]);
    assert_eq!(status(&d, Image), Some(StepStatus::Skipped));
    d.complete(Routing).expect("in flight");
    assert_eq!(d.state(), State::RollingOut);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    let after = d.record.workflow().deployed.clone().expect("deployed");
    assert_eq!(after.release, before.release);
    assert_ne!(after.run, before.run, "a new run rolled it out");
}

#[test]
fn a_config_change_during_a_run_waits_for_it_then_rolls_out() {
    let mut d = live();
    d.push(App, 2);
    assert_eq!(d.state(), State::Preparing);
    let first = d.configure_event(2);
    let a = d.apply(&first);
    assert_eq!(a.verdict, Verdict::Accepted);
    assert!(
        a.commands.is_empty(),
        "nothing starts while the run is busy"
    );
    let newest = d.configure_event(3);
    d.apply(&newest);
    assert_eq!(
        d.record
            .workflow()
            .pending
            .config
            .as_ref()
            .map(|c| c.version),
        Some(3),
        "the newest change waits"
    );
    let run = d.record.workflow().run.as_ref().map(|r| r.id);
    d.run_to_quiescence();
    assert_eq!(d.state(), State::Live);
    assert!(d.record.workflow().pending.is_empty());
    let last = d.record.workflow().run.as_ref().expect("run");
    assert!(Some(last.id) > run, "a run of its own followed");
    assert_eq!(last.trigger, newest.id());
}

#[test]
fn a_config_change_before_a_deployment_or_after_decommission_is_ignored() {
    let mut d = Driver::new(Environment::Dev);
    let event = d.configure_event(1);
    let a = d.apply(&event);
    assert!(ignored(&a));
    assert_eq!(a.to, State::Unprovisioned);
    let mut d = live();
    d.signal(Signal::Decommission);
    let event = d.configure_event(4);
    let a = d.apply(&event);
    assert!(ignored(&a));
    d.run_to_quiescence();
    let event = d.configure_event(5);
    assert!(ignored(&d.apply(&event)));
    assert_eq!(d.state(), State::Decommissioned);
}

#[test]
fn cancel_drops_a_waiting_config_change() {
    let mut d = live();
    d.push(App, 2);
    let event = d.configure_event(2);
    d.apply(&event);
    d.signal(Signal::Cancel);
    assert!(d.record.workflow().pending.is_empty());
    assert_eq!(d.state(), State::Live);
}
