//! Property tests of rollback protection: GitLab's pushes of one branch arrive with some lost,
//! some adjacent ones swapped, and late resends (with fresh event ids, as a replay outside the
//! deduplication window has) of any push already made, while steps complete in between.
//!
//! The environment never goes back: after every event the desired commit is the newest one
//! GitLab has delivered, and a resend is ignored with its reason in history. This holds while
//! no two consecutive pushes are lost (see `workflows::lineage` for the case it cannot tell).

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use workflows::testing::{Driver, output_for, sha};
use workflows::{Environment, Event, RepoKind, StepOutcome, Verdict};

#[derive(Debug, Clone)]
enum Action {
    /// GitLab delivers its next push.
    Next,
    /// A late resend of one of the pushes GitLab made so far.
    Resend(usize),
    /// A step message completes.
    Complete(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => Just(Action::Next),
        3 => any::<usize>().prop_map(Action::Resend),
        4 => any::<usize>().prop_map(Action::Complete),
    ]
}

/// The order GitLab delivers pushes `1..=n` in (push `i` moves the branch from commit `i - 1`
/// to `i`; commit 0 is the all-zero id of a branch creation): in order but for the adjacent
/// pairs `swaps` names, and without those `lost` names, never two consecutive ones and never
/// the first.
fn schedule(n: usize, swaps: &[bool], lost: &[bool]) -> Vec<u32> {
    let mut order: Vec<u32> = (1..=n as u32).collect();
    let mut i = 0;
    while i + 1 < order.len() {
        if swaps[i] {
            order.swap(i, i + 1);
            i += 2;
        } else {
            i += 1;
        }
    }
    let mut gone = vec![false; n + 1];
    for k in 2..=n {
        gone[k] = lost[k] && !gone[k - 1];
    }
    order.retain(|&k| !gone[k as usize]);
    order
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn late_resends_never_roll_an_environment_back(
        n in 2usize..12,
        swaps in prop::collection::vec(any::<bool>(), 12),
        lost in prop::collection::vec(any::<bool>(), 13),
        env in prop_oneof![Just(Environment::Dev), Just(Environment::Production)],
        actions in prop::collection::vec(action(), 1..80),
    ) {
        let order = schedule(n, &swaps, &lost);
        let mut d = Driver::new(env);
        let mut next = 0;
        // The newest commit GitLab has delivered, and every push it has made so far (delivered
        // or lost): a push is made once a later-numbered one was delivered.
        let mut newest = 0u32;
        for action in &actions {
            let (event, resend) = match action {
                Action::Next if next < order.len() => {
                    let k = order[next];
                    next += 1;
                    newest = newest.max(k);
                    (d.push_event_from(RepoKind::App, Some(k - 1), k), false)
                }
                Action::Resend(i) if newest > 0 => {
                    let k = (*i as u32 % newest) + 1;
                    (d.push_event_from(RepoKind::App, Some(k - 1), k), true)
                }
                Action::Complete(i) if !d.in_flight.is_empty() => {
                    let message = d.in_flight.remove(i % d.in_flight.len());
                    (Driver::delivery(&message, |task| StepOutcome::Done { output: output_for(task) }), false)
                }
                _ => continue,
            };
            let applied = d.apply(&event);
            if newest > 0 {
                prop_assert_eq!(
                    d.record.workflow().desired.app.clone(),
                    Some(sha(newest)),
                    "after {:?}: {:?}", event, applied.verdict
                );
            }
            if let (true, Event::Push(p)) = (resend, &event)
                && p.sha != sha(newest)
            {
                match &applied.verdict {
                    Verdict::Ignored(reason) => prop_assert!(reason.contains("late or replayed"), "{reason}"),
                    other => prop_assert!(false, "a resend of {} was {:?}", p.sha.short(), other),
                }
            }
        }
    }
}

#[test]
fn the_schedule_loses_no_two_consecutive_pushes() {
    let order = schedule(6, &[false; 12], &[true; 13]);
    assert_eq!(order, [1, 3, 5]);
    let order = schedule(4, &[true, false, true, false], &[false; 13]);
    assert_eq!(order, [2, 1, 4, 3]);
}
