//! Property tests over random event sequences: pushes, config changes, duplicates, step
//! outcomes in any order, stale and lost messages, operator signals at any time.
//!
//! After every event: at most one run is active and every valid message belongs to it; a
//! duplicate or stale event changes nothing; nothing leaves `decommissioned`; every
//! non-terminal state has an outstanding step or timer or waits for a person or a push; the
//! same record and event give the same result (also after a restore from JSON). After the
//! sequence, once every outstanding step completes, the deployed release holds the newest push
//! of each repository.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use workflows::testing::{Driver, InFlight, output_for};
use workflows::{
    Applied, Command, Environment, Event, Release, RepoKind, Settings, Signal, State, StepOutcome,
    StepStatus, Verdict, WorkflowRecord, decode, encode,
};

#[derive(Debug, Clone)]
enum Outcome {
    Done,
    Progress,
    Retry,
    Exhausted,
    Terminal,
}

#[derive(Debug, Clone)]
enum Action {
    Push {
        repo: RepoKind,
        n: u32,
    },
    /// Apply an external event applied earlier again.
    Duplicate(usize),
    /// Deliver an in-flight message.
    Deliver(usize, Outcome),
    /// Deliver a message that was delivered before.
    Redeliver(usize),
    /// Lose an in-flight message (the sweeper must re-arm).
    Lose(usize),
    Signal(Signal),
    Provision,
    Rearm,
    /// The environment's config changed (`wfctl config`).
    Configure,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        8 => Just(Outcome::Done),
        2 => Just(Outcome::Progress),
        2 => Just(Outcome::Retry),
        1 => Just(Outcome::Exhausted),
        1 => Just(Outcome::Terminal),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let repo = prop_oneof![Just(RepoKind::Infra), Just(RepoKind::App)];
    prop_oneof![
        6 => (repo, 1u32..5).prop_map(|(repo, n)| Action::Push { repo, n }),
        2 => any::<usize>().prop_map(Action::Duplicate),
        16 => (any::<usize>(), outcome()).prop_map(|(i, o)| Action::Deliver(i, o)),
        2 => any::<usize>().prop_map(Action::Redeliver),
        1 => any::<usize>().prop_map(Action::Lose),
        1 => Just(Action::Signal(Signal::Approve)),
        1 => Just(Action::Signal(Signal::Retry)),
        1 => Just(Action::Signal(Signal::Cancel)),
        1 => Just(Action::Signal(Signal::Redeploy)),
        1 => Just(Action::Signal(Signal::Rollback { to: None })),
        1 => prop_oneof![19 => Just(None), 1 => Just(Some(Signal::Decommission))]
            .prop_map(|s| s.map_or(Action::Rearm, Action::Signal)),
        1 => Just(Action::Provision),
        1 => Just(Action::Configure),
    ]
}

/// The test's own account of what should end up deployed.
struct Model {
    expected: Release,
    decommissioned: bool,
}

struct World {
    d: Driver,
    model: Model,
    external: Vec<Event>,
    delivered: Vec<InFlight>,
    lost: Vec<InFlight>,
    /// Config versions sent so far.
    configs: u64,
}

impl World {
    fn new(env: Environment, approval: bool) -> Self {
        Self {
            d: Driver::with_settings(
                env,
                Settings {
                    production_approval: approval,
                    ..Settings::default()
                },
            ),
            model: Model {
                expected: Release::default(),
                decommissioned: false,
            },
            external: Vec::new(),
            delivered: Vec::new(),
            lost: Vec::new(),
            configs: 0,
        }
    }

    /// Applies `event`, checking determinism against a twin and a restored copy.
    fn apply(&mut self, event: &Event) -> Applied {
        let mut twin = self.d.clone();
        let mut restored = self.d.clone();
        let bytes = encode(&self.d.record);
        restored.record = decode::<WorkflowRecord>(&bytes).expect("a record decodes");
        let before = self.d.record.clone();
        let applied = self.d.apply(event);
        assert_eq!(
            twin.apply(event),
            applied,
            "same record and event, same result"
        );
        assert_eq!(twin.record, self.d.record);
        assert_eq!(
            restored.apply(event),
            applied,
            "a restored record behaves the same"
        );
        assert_eq!(restored.record, self.d.record);
        if !applied.verdict.changes_record() {
            assert_eq!(
                self.d.record, before,
                "{:?} changed the record",
                applied.verdict
            );
            assert!(applied.commands.is_empty());
        }
        if before.state() == State::Decommissioned && self.d.state() != State::Decommissioned {
            assert!(
                matches!(event, Event::Provision { .. }) && applied.verdict == Verdict::Accepted,
                "only provision leaves decommissioned, not {event:?}"
            );
        }
        if event.is_external() && applied.verdict != Verdict::Duplicate {
            self.external.push(event.clone());
        }
        self.track_model(event, &applied);
        applied
    }

    fn track_model(&mut self, event: &Event, applied: &Applied) {
        let w = self.d.record.workflow();
        match (event, &applied.verdict) {
            (Event::Push(p), Verdict::Accepted | Verdict::Ignored(_))
                if !matches!(applied.from, State::Decommissioning | State::Decommissioned)
                    && !self.decommission_failed(applied.from) =>
            {
                match p.repo {
                    RepoKind::Infra => self.model.expected.infra = Some(p.sha.clone()),
                    RepoKind::App => self.model.expected.app = Some(p.sha.clone()),
                }
            }
            (
                Event::Signal {
                    signal: Signal::Cancel,
                    ..
                },
                Verdict::Accepted,
            ) => {
                self.model.expected = w.deployed.clone().map(|d| d.release).unwrap_or_default();
            }
            (
                Event::Signal {
                    signal: Signal::Redeploy,
                    ..
                },
                Verdict::Accepted,
            ) => {
                self.model.expected = w.deployed.clone().map(|d| d.release).unwrap_or_default();
            }
            (
                Event::Signal {
                    signal: Signal::Decommission,
                    ..
                },
                Verdict::Accepted,
            ) => self.model.decommissioned = true,
            // A rollback deploys the kept release it chose.
            (
                Event::Signal {
                    signal: Signal::Rollback { .. },
                    ..
                },
                Verdict::Accepted,
            ) => {
                let run = w.active_run().expect("a rollback starts a run");
                assert!(
                    w.releases.iter().any(|k| k.release == run.release),
                    "a rollback deploys a kept release"
                );
                self.model.expected = run.release.clone();
            }
            // Provisioned again: the newest commit of each branch, from scratch.
            (Event::Provision { .. }, Verdict::Accepted)
                if applied.from == State::Decommissioned =>
            {
                self.model.decommissioned = false;
                self.model.expected = Release {
                    infra: w.heads.get(RepoKind::Infra).map(|l| l.head.clone()),
                    app: w.heads.get(RepoKind::App).map(|l| l.head.clone()),
                };
                assert!(w.releases.is_empty() && w.deployed.is_none());
            }
            _ => {}
        }
    }

    fn decommission_failed(&self, from: State) -> bool {
        from == State::Failed && self.model.decommissioned
    }

    fn deliver(&mut self, message: &InFlight, outcome: &Outcome) -> Applied {
        let event = Driver::delivery(message, |task| match outcome {
            Outcome::Done => StepOutcome::Done {
                output: output_for(task),
            },
            Outcome::Progress => StepOutcome::Progress {
                recheck_after: Duration::from_secs(5),
                note: "pending".into(),
            },
            Outcome::Retry => StepOutcome::Retryable {
                error: "throttled".into(),
                retry_in: Some(Duration::from_secs(2)),
            },
            Outcome::Exhausted => StepOutcome::Retryable {
                error: "throttled".into(),
                retry_in: None,
            },
            Outcome::Terminal => StepOutcome::Terminal {
                error: "denied".into(),
            },
        });
        self.delivered.push(message.clone());
        self.apply(&event)
    }

    fn act(&mut self, action: &Action) {
        match action {
            Action::Push { repo, n } => {
                let event = self.d.push_event(*repo, *n);
                self.apply(&event);
            }
            Action::Duplicate(i) if !self.external.is_empty() => {
                let event = self.external[i % self.external.len()].clone();
                let applied = self.apply(&event);
                assert_eq!(applied.verdict, Verdict::Duplicate);
            }
            Action::Deliver(i, outcome) if !self.d.in_flight.is_empty() => {
                let message = self.d.in_flight.remove(i % self.d.in_flight.len());
                self.deliver(&message, outcome);
            }
            Action::Redeliver(i) if !self.delivered.is_empty() => {
                let message = self.delivered[i % self.delivered.len()].clone();
                let applied = self.deliver(&message, &Outcome::Done);
                assert!(
                    matches!(applied.verdict, Verdict::Stale(_)),
                    "a delivered message is stale when delivered again: {:?}",
                    applied.verdict
                );
            }
            Action::Lose(i) if !self.d.in_flight.is_empty() => {
                let message = self.d.in_flight.remove(i % self.d.in_flight.len());
                self.lost.push(message);
            }
            Action::Signal(signal) => {
                let event = self.d.signal_event(*signal);
                self.apply(&event);
            }
            Action::Provision => {
                let event_id = self.d.fresh_id("provision");
                self.apply(&Event::Provision {
                    event_id,
                    from_snapshot: false,
                });
            }
            Action::Rearm => self.rearm(),
            Action::Configure => {
                self.configs += 1;
                let event = self.d.configure_event(self.configs);
                self.apply(&event);
            }
            _ => {}
        }
    }

    fn rearm(&mut self) {
        let event_id = self.d.fresh_id("sweep");
        let applied = self.apply(&Event::Rearm { event_id });
        assert!(matches!(
            applied.verdict,
            Verdict::Accepted | Verdict::Ignored(_)
        ));
        // Everything outstanding was sent again (or nothing was outstanding): the lost copies
        // are stale now.
        self.delivered.append(&mut self.lost);
    }

    /// The invariants that hold between any two events.
    fn check(&self) {
        let state = self.d.state();
        let w = self.d.record.workflow();
        let waiting = w.is_waiting_on_something(state);
        assert!(waiting, "{state} waits on nothing: {w:?}");
        let active = w.active_run();
        match state {
            State::Unprovisioned | State::Live | State::Decommissioned => {
                assert!(active.is_none(), "{state} with an active run");
            }
            _ => assert!(active.is_some(), "{state} without an active run"),
        }
        if state.is_deploying() {
            assert!(self.d.record.workflow().pending.is_empty() || active.is_some());
        }
        // Every outstanding step has exactly one current message, in flight or lost; every
        // message in flight that is not stale belongs to the active run.
        let in_flight_or_lost = self.d.in_flight.iter().chain(&self.lost);
        let mut current = 0;
        for message in in_flight_or_lost {
            let (run, step, token) = match message {
                InFlight::Step(t) => (t.run, t.step, t.token),
                InFlight::Timer(t) => (t.run, t.step, t.token),
            };
            let valid = active
                .filter(|r| r.id == run)
                .and_then(|r| r.step(step))
                .is_some_and(|s| {
                    s.token == token
                        && match message {
                            InFlight::Step(_) => s.status == StepStatus::Running,
                            InFlight::Timer(_) => s.status == StepStatus::RetryWait,
                        }
                });
            current += usize::from(valid);
        }
        let outstanding = active.map_or(0, |r| r.outstanding().count());
        if matches!(state, State::Failed | State::AwaitingApproval) {
            assert_eq!(outstanding, 0, "{state} is paused: nothing runs");
        }
        assert_eq!(
            current, outstanding,
            "one current message per outstanding step"
        );
        // The record awaits a command exactly when delivering its message now would be
        // applied: what the engine relies on to re-send only what may have been lost.
        for command in self.d.log.iter().rev().take(24) {
            let message = match command {
                Command::RunStep(task) => InFlight::Step(task.clone()),
                Command::ScheduleTimer { timer, .. } => InFlight::Timer(*timer),
                Command::RecordSuperseded { .. } => {
                    assert!(!self.d.record.awaits(command));
                    continue;
                }
            };
            let mut probe = self.d.clone();
            let applied = probe.apply(&Driver::delivery(&message, |task| StepOutcome::Done {
                output: output_for(task),
            }));
            assert_eq!(
                self.d.record.awaits(command),
                applied.verdict == Verdict::Accepted,
                "{message:?} in {state}: {:?}",
                applied.verdict
            );
        }
    }

    /// Completes everything the way a healthy system would, with people approving and
    /// retrying, and returns the final state.
    fn drain(&mut self) -> State {
        for _ in 0..200 {
            if let Some(message) = self.d.in_flight.first().cloned() {
                self.d.in_flight.remove(0);
                self.deliver(&message, &Outcome::Done);
            } else if !self.lost.is_empty() {
                self.rearm();
            } else {
                match self.d.state() {
                    State::AwaitingApproval => {
                        let e = self.d.signal_event(Signal::Approve);
                        self.apply(&e);
                    }
                    State::Failed => {
                        let e = self.d.signal_event(Signal::Retry);
                        self.apply(&e);
                    }
                    state => return state,
                }
            }
            self.check();
        }
        panic!("did not settle: {:?}", self.d.record);
    }
}

fn env() -> impl Strategy<Value = (Environment, bool)> {
    (
        prop_oneof![
            Just(Environment::Dev),
            Just(Environment::Staging),
            Just(Environment::Production)
        ],
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        (env, approval) in env(),
        actions in prop::collection::vec(action(), 1..80),
    ) {
        let mut world = World::new(env, approval);
        for action in &actions {
            world.act(action);
            world.check();
        }
        let end = world.drain();
        if world.model.decommissioned {
            prop_assert_eq!(end, State::Decommissioned);
        } else {
            let w = world.d.record.workflow();
            match end {
                State::Live => {
                    let deployed = w.deployed.as_ref().map(|d| d.release.clone());
                    prop_assert_eq!(deployed, Some(world.model.expected.clone()));
                }
                State::Unprovisioned => {
                    prop_assert_eq!(&world.model.expected, &Release::default());
                }
                other => prop_assert!(false, "ended in {}", other),
            }
            prop_assert!(w.pending.is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<WorkflowRecord>(&bytes);
        let _ = decode::<workflows::Envelope>(&bytes);
        let _ = decode::<workflows::HistoryEntry>(&bytes);
        let _ = decode::<workflows::Tenant>(&bytes);
    }
}
