//! Events and durations in words, for people: the lines `orchestrator dev` prints and the ones
//! `wfctl history` shows.

use std::time::Duration;

use workflows::{Event, StepOutcome};

/// An event in words, for a history line: `app 1a2b3c4d by jane`, `approve by ops`,
/// `image retryable: throttled (retry in 30s)`, `image timer`, `rearm`, `config v3 by ops`.
pub fn describe_event(event: &Event) -> String {
    match event {
        Event::Push(p) => {
            let branch = p.git_ref.strip_prefix("refs/heads/").unwrap_or(&p.git_ref);
            format!("{} {} by {} on {branch}", p.repo, p.sha.short(), p.author)
        }
        Event::Provision { .. } => "provision".to_owned(),
        Event::Signal { signal, actor, .. } if actor.is_empty() => signal.to_string(),
        Event::Signal { signal, actor, .. } => format!("{signal} by {actor}"),
        Event::Step(report) => {
            let step = report.step;
            match &report.outcome {
                StepOutcome::Done { .. } => format!("{step} done"),
                StepOutcome::Progress {
                    recheck_after,
                    note,
                } => format!(
                    "{step} progress: {note} (recheck in {})",
                    short_duration(*recheck_after)
                ),
                StepOutcome::Retryable {
                    error,
                    retry_in: Some(d),
                } => format!(
                    "{step} retryable: {error} (retry in {})",
                    short_duration(*d)
                ),
                StepOutcome::Retryable {
                    error,
                    retry_in: None,
                } => format!("{step} retryable: {error} (retries exhausted)"),
                StepOutcome::Terminal { error } => format!("{step} terminal: {error}"),
            }
        }
        Event::Timer(t) => format!("{} retry timer", t.step),
        Event::Rearm { .. } => "rearm".to_owned(),
        Event::Configure(c) if c.actor.is_empty() => format!("config v{}", c.version),
        Event::Configure(c) => format!("config v{} by {}", c.version, c.actor),
    }
}

/// `d` in one or two units, as people say it: `250ms`, `42s`, `3m`, `2h 5m`, `4d`, `3mo`, `2y`.
pub fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    match s {
        0..MIN => format!("{s}s"),
        MIN..HOUR => format!("{}m", s / MIN),
        HOUR..DAY => match (s % HOUR) / MIN {
            0 => format!("{}h", s / HOUR),
            m => format!("{}h {m}m", s / HOUR),
        },
        DAY..=5_184_000 => format!("{}d", s / DAY),
        5_184_001..31_536_000 => format!("{}mo", s / (30 * DAY)),
        _ => format!("{}y", s / (365 * DAY)),
    }
}
