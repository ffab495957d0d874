//! What a load run did, read back from the store's own records: push-to-live latency of every
//! push, throughput over time, and the invariants a run must keep. Pure functions over the
//! pushes sent and the histories and records found, so they are tested without a backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;
use workflows::{
    Event, EventId, GitSha, HistoryEntry, RepoKind, State, StepKind, StepOutcome, StepOutput,
    Timestamp, WorkflowKey, WorkflowRecord,
};

/// One push the load generator sent and the system accepted.
#[derive(Debug, Clone)]
pub struct Push {
    /// Its workflow.
    pub key: WorkflowKey,
    /// Which repository.
    pub repo: RepoKind,
    /// The commit.
    pub sha: GitSha,
    /// The id the system gave it (the ingress's answer, or the one enqueued).
    pub event_id: EventId,
    /// When it was sent.
    pub sent_at: Timestamp,
}

/// The push-to-live latency of each push (same order as `pushes`): from sending it to the
/// first rollout that put it, or a newer push of the same repository to the same workflow
/// (newest wins), live. `None`: never live.
pub fn latencies(
    pushes: &[Push],
    histories: &BTreeMap<WorkflowKey, Vec<HistoryEntry>>,
) -> Vec<Option<Duration>> {
    let mut out = vec![None; pushes.len()];
    // Per workflow and repository, the pushes in the order they were sent.
    let mut groups: HashMap<(&WorkflowKey, RepoKind), Vec<usize>> = HashMap::new();
    for (i, p) in pushes.iter().enumerate() {
        groups.entry((&p.key, p.repo)).or_default().push(i);
    }
    for ((key, repo), mut members) in groups {
        members.sort_by_key(|&i| (pushes[i].sent_at, i));
        let position: HashMap<&GitSha, usize> = members
            .iter()
            .enumerate()
            .map(|(pos, &i)| (&pushes[i].sha, pos))
            .collect();
        let mut served = 0;
        for (at, release) in rollouts(histories.get(key).map(Vec::as_slice).unwrap_or(&[])) {
            let sha = match repo {
                RepoKind::Infra => release.infra.as_ref(),
                RepoKind::App => release.app.as_ref(),
            };
            let Some(&pos) = sha.and_then(|s| position.get(s)) else {
                continue;
            };
            while served <= pos {
                let i = members[served];
                out[i] = Some(at.since(pushes[i].sent_at));
                served += 1;
            }
        }
    }
    out
}

/// When each release went live in `history`, oldest first.
fn rollouts(history: &[HistoryEntry]) -> impl Iterator<Item = (Timestamp, &workflows::Release)> {
    history.iter().filter_map(|e| match &e.event {
        Event::Step(r) if r.step == StepKind::Rollout && e.to == State::Live => match &r.outcome {
            StepOutcome::Done {
                output: StepOutput::Rollout(d),
            } => Some((e.at, &d.release)),
            _ => None,
        },
        _ => None,
    })
}

/// Transitions (history entries written) per whole second from `start`.
pub fn per_second(
    histories: &BTreeMap<WorkflowKey, Vec<HistoryEntry>>,
    start: Timestamp,
) -> Vec<u64> {
    let mut buckets: Vec<u64> = Vec::new();
    for e in histories.values().flatten() {
        if e.at < start {
            continue;
        }
        let s = e.at.since(start).as_secs() as usize;
        if buckets.len() <= s {
            buckets.resize(s + 1, 0);
        }
        buckets[s] += 1;
    }
    buckets
}

/// A checked property of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    /// Its name.
    pub name: &'static str,
    /// Whether it held.
    pub held: bool,
    /// The figure behind it, or what broke it (the first few cases).
    pub detail: String,
}

impl Invariant {
    fn new(name: &'static str, failures: &[String], ok: String) -> Self {
        Self {
            name,
            held: failures.is_empty(),
            detail: if failures.is_empty() {
                ok
            } else {
                let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
                format!("{} cases, first: {}", failures.len(), shown.join("; "))
            },
        }
    }
}

/// What the invariants are checked on.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// Every push accepted.
    pub pushes: &'a [Push],
    /// Every workflow's whole history.
    pub histories: &'a BTreeMap<WorkflowKey, Vec<HistoryEntry>>,
    /// Every workflow's record at the end.
    pub records: &'a BTreeMap<WorkflowKey, WorkflowRecord>,
    /// Resource names the cloud created more than once, with their counts.
    pub created_twice: Vec<(String, u64)>,
    /// Per capped step kind: the cap and the most that ran at once (as the cloud saw it).
    pub caps: Vec<(StepKind, u32, u64)>,
    /// Messages in the dead-letter queues.
    pub dead_letters: u64,
    /// Slot leases and places in line left when everything was live.
    pub slots_left: usize,
    /// Image builders still there when everything was live (abandoned builds' leaks).
    pub builders_left: Vec<String>,
}

/// Checks every invariant: no event lost, none applied twice, every workflow live at its
/// newest push, no resource created twice, nothing stuck, caps never exceeded.
pub fn check(o: &Outcome<'_>) -> Vec<Invariant> {
    let mut applied: HashMap<&WorkflowKey, BTreeSet<EventId>> = HashMap::new();
    let mut twice = Vec::new();
    for (key, history) in o.histories {
        let seen = applied.entry(key).or_default();
        for e in history {
            let id = e.event.id();
            if seen.contains(&id) {
                twice.push(format!("{id} in {key}"));
            } else {
                seen.insert(id);
            }
        }
    }
    let lost: Vec<String> = o
        .pushes
        .iter()
        .filter(|p| !applied.get(&p.key).is_some_and(|s| s.contains(&p.event_id)))
        .map(|p| format!("{} to {}", p.event_id, p.key))
        .collect();

    let mut newest: BTreeMap<&WorkflowKey, (Option<&Push>, Option<&Push>)> = BTreeMap::new();
    for p in o.pushes {
        let slot = newest.entry(&p.key).or_default();
        let current = match p.repo {
            RepoKind::Infra => &mut slot.0,
            RepoKind::App => &mut slot.1,
        };
        if current.is_none_or(|c| c.sent_at <= p.sent_at) {
            *current = Some(p);
        }
    }
    let mut not_live = Vec::new();
    let mut stuck = Vec::new();
    for (key, (infra, app)) in &newest {
        let Some(record) = o.records.get(*key) else {
            not_live.push(format!("{key}: no record"));
            continue;
        };
        let state = record.state();
        if state != State::Live {
            stuck.push(format!("{key} is {state}"));
        }
        let deployed = record.workflow().deployed.as_ref().map(|d| &d.release);
        let infra_ok =
            infra.is_none_or(|p| deployed.and_then(|r| r.infra.as_ref()) == Some(&p.sha));
        let app_ok = app.is_none_or(|p| deployed.and_then(|r| r.app.as_ref()) == Some(&p.sha));
        if state != State::Live || !infra_ok || !app_ok {
            not_live.push(format!(
                "{key} is {state} with {}",
                deployed.map_or("nothing deployed".to_owned(), |r| format!(
                    "infra {} app {}",
                    r.infra.as_ref().map_or("-", |s| s.short()),
                    r.app.as_ref().map_or("-", |s| s.short())
                ))
            ));
        }
    }
    if o.dead_letters > 0 {
        stuck.push(format!("{} dead letters", o.dead_letters));
    }
    if o.slots_left > 0 {
        stuck.push(format!("{} slot leases or places left", o.slots_left));
    }
    if !o.builders_left.is_empty() {
        stuck.push(format!(
            "{} builders left running, {}",
            o.builders_left.len(),
            o.builders_left.join(", ")
        ));
    }
    let over: Vec<String> = o
        .caps
        .iter()
        .filter(|(_, cap, peak)| *peak > u64::from(*cap))
        .map(|(kind, cap, peak)| format!("{kind}: {peak} at once, cap {cap}"))
        .collect();
    let created: Vec<String> = o
        .created_twice
        .iter()
        .map(|(name, n)| format!("{name} created {n} times"))
        .collect();
    let entries: usize = o.histories.values().map(Vec::len).sum();
    vec![
        Invariant::new(
            "no event lost",
            &lost,
            format!("{} pushes, each in its workflow's history", o.pushes.len()),
        ),
        Invariant::new(
            "none applied twice",
            &twice,
            format!("{entries} history entries, each event once"),
        ),
        Invariant::new(
            "every workflow live at its newest push",
            &not_live,
            format!("{} workflows", newest.len()),
        ),
        Invariant::new(
            "no resource created twice",
            &created,
            "every resource name created once".to_owned(),
        ),
        Invariant::new(
            "nothing stuck",
            &stuck,
            "every workflow at rest, no dead letters, no slot held, no builder left".to_owned(),
        ),
        Invariant::new(
            "caps never exceeded",
            &over,
            if o.caps.is_empty() {
                "no caps".to_owned()
            } else {
                o.caps
                    .iter()
                    .map(|(kind, cap, peak)| format!("{kind}: at most {peak} at once, cap {cap}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
    ]
}

/// AWS requests per transition over every worker, from the last `engine stats` line of each
/// worker's log (`transitions=N … requests=M`); `None` when no worker logged one or none made
/// a transition.
pub fn requests_per_transition(logs: &[String]) -> Option<f64> {
    let (mut transitions, mut requests) = (0u64, 0u64);
    for log in logs {
        let Some(line) = log.lines().rev().find(|l| l.contains("engine stats")) else {
            continue;
        };
        let line = strip_ansi(line);
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
        };
        transitions += field("transitions").unwrap_or(0);
        requests += field("requests").unwrap_or(0);
    }
    (transitions > 0).then(|| requests as f64 / transitions as f64)
}

/// `s` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `p`-quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_per_transition_sums_each_workers_last_count() {
        let a = "2026-11-27T10:00:00Z  INFO orchestrator: engine stats transitions=10 activities=4 requests=30 requests_per_transition=\"3.00\" by_operation=\"sqs:SendMessage=9\"\n\
                 2026-11-27T10:00:09Z  INFO orchestrator: engine stats transitions=100 activities=40 requests=250 requests_per_transition=\"2.50\" by_operation=\"\"\n\
                 2026-11-27T10:00:09Z  INFO orchestrator: worker stopped\n";
        let b = "\u{1b}[2m2026\u{1b}[0m INFO engine stats \u{1b}[3mtransitions\u{1b}[0m\u{1b}[2m=\u{1b}[0m50 \u{1b}[3mrequests\u{1b}[0m\u{1b}[2m=\u{1b}[0m200\n";
        let per = super::requests_per_transition(&[a.into(), b.into(), "no stats".into()]);
        assert_eq!(per, Some(450.0 / 150.0));
        assert_eq!(super::requests_per_transition(&["nothing".into()]), None);
    }

    use workflows::{DeploymentOutput, Environment, Release, RunId, StepReport, TenantId, Verdict};

    use super::*;

    fn key(t: &str) -> WorkflowKey {
        WorkflowKey::new(TenantId::new(t).expect("id"), Environment::Dev)
    }

    fn sha(n: u32) -> GitSha {
        GitSha::new(format!("{n:040x}")).expect("sha")
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn push(k: &WorkflowKey, repo: RepoKind, n: u32, sent: i64) -> Push {
        Push {
            key: k.clone(),
            repo,
            sha: sha(n),
            event_id: EventId::new(format!("p{n}")).expect("id"),
            sent_at: at(sent),
        }
    }

    fn entry(k: &WorkflowKey, version: u64, ms: i64, event: Event, to: State) -> HistoryEntry {
        HistoryEntry {
            schema_version: 1,
            key: k.clone(),
            version,
            at: at(ms),
            event,
            verdict: Verdict::Accepted,
            from: State::Preparing,
            to,
            run: None,
            commands: Vec::new(),
        }
    }

    fn push_event(p: &Push) -> Event {
        Event::Push(workflows::Push {
            event_id: p.event_id.clone(),
            repo: p.repo,
            sha: p.sha.clone(),
            before: None,
            git_ref: "refs/heads/dev".into(),
            author: "load".into(),
            message: "m".into(),
            received_at: p.sent_at,
        })
    }

    fn rollout(run: u32, infra: Option<u32>, app: Option<u32>) -> Event {
        Event::Step(StepReport {
            run: RunId::new(run).expect("run"),
            step: StepKind::Rollout,
            token: run,
            outcome: StepOutcome::Done {
                output: StepOutput::Rollout(DeploymentOutput {
                    group_name: format!("g{run}"),
                    image_id: "ami-1".into(),
                    run: RunId::new(run).expect("run"),
                    release: Release {
                        infra: infra.map(sha),
                        app: app.map(sha),
                    },
                }),
            },
        })
    }

    #[test]
    fn a_superseded_push_is_live_when_a_newer_one_is() {
        let k = key("acme");
        let pushes = vec![
            push(&k, RepoKind::App, 1, 1_000),
            push(&k, RepoKind::App, 2, 1_100),
            push(&k, RepoKind::App, 3, 1_200),
            push(&k, RepoKind::Infra, 9, 1_000),
        ];
        let history = vec![
            entry(&k, 1, 1_010, push_event(&pushes[0]), State::Preparing),
            entry(&k, 2, 2_000, rollout(1, Some(9), Some(1)), State::Live),
            entry(&k, 3, 3_000, rollout(2, Some(9), Some(3)), State::Live),
        ];
        let histories = BTreeMap::from([(k.clone(), history)]);
        let l = latencies(&pushes, &histories);
        assert_eq!(l[0], Some(Duration::from_millis(1_000)));
        // Push 2 never deployed itself: push 3, newer, did.
        assert_eq!(l[1], Some(Duration::from_millis(1_900)));
        assert_eq!(l[2], Some(Duration::from_millis(1_800)));
        assert_eq!(l[3], Some(Duration::from_millis(1_000)));
        assert_eq!(per_second(&histories, at(1_000)), vec![1, 1, 1]);
    }

    #[test]
    fn invariants_name_what_broke() {
        let k = key("acme");
        let other = key("globex");
        let pushes = vec![
            push(&k, RepoKind::App, 1, 1_000),
            push(&other, RepoKind::App, 2, 1_000),
        ];
        let applied = entry(&k, 1, 1_010, push_event(&pushes[0]), State::Preparing);
        let histories = BTreeMap::from([(
            k.clone(),
            vec![
                applied.clone(),
                entry(&k, 2, 1_020, push_event(&pushes[0]), State::Preparing),
            ],
        )]);
        let records = BTreeMap::from([(k.clone(), WorkflowRecord::new(k.clone(), at(0)))]);
        let o = Outcome {
            pushes: &pushes,
            histories: &histories,
            records: &records,
            created_twice: vec![("acme-dev-builder".into(), 2)],
            caps: vec![(StepKind::Image, 2, 3)],
            dead_letters: 1,
            slots_left: 0,
            builders_left: vec!["acme-dev-builder-1".into()],
        };
        let found = check(&o);
        let by_name = |n: &str| found.iter().find(|i| i.name == n).expect(n);
        assert!(!by_name("no event lost").held);
        assert!(by_name("no event lost").detail.contains("p2 to globex#dev"));
        assert!(!by_name("none applied twice").held);
        assert!(!by_name("every workflow live at its newest push").held);
        assert!(!by_name("no resource created twice").held);
        assert!(!by_name("nothing stuck").held);
        let stuck = &by_name("nothing stuck").detail;
        assert!(stuck.contains("1 dead letters"), "{stuck}");
        assert!(
            stuck.contains("1 builders left running, acme-dev-builder-1"),
            "{stuck}"
        );
        assert!(!by_name("caps never exceeded").held);

        let histories = BTreeMap::from([(k.clone(), vec![applied])]);
        let pushes = &pushes[..1];
        let o = Outcome {
            pushes,
            histories: &histories,
            records: &records,
            created_twice: Vec::new(),
            caps: vec![(StepKind::Image, 2, 2)],
            dead_letters: 0,
            slots_left: 0,
            builders_left: Vec::new(),
        };
        let found = check(&o);
        let held: Vec<&str> = found.iter().filter(|i| i.held).map(|i| i.name).collect();
        assert_eq!(
            held,
            [
                "no event lost",
                "none applied twice",
                "no resource created twice",
                "caps never exceeded"
            ],
            "a record never deployed is neither live nor at rest"
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
