//! `wfctl logs`: what the reconcilers captured of a run's steps, from the history. Each
//! applied step report is one entry: a progress note, the step's end, or a failure with what
//! the instance reported (a provisioning script's or `install.sh`'s name, exit code and last
//! lines). The whole script reports of instances stay in the artifact bucket under
//! `_logs/<tenant>/<env>/`; what is shown here is what the workflow recorded, so it needs
//! only read access to the tables.

use serde::Serialize;
use workflows::{
    Environment, Event, HistoryEntry, RunId, StepKind, StepOutcome, TenantId, Timestamp, Verdict,
    WorkflowKey,
};

use crate::Error;
use crate::output::{Printer, Style, absolute, sanitize};
use crate::workflow::{PAGE, missing_workflow};
use orchestrator::ports::Store;

/// Which captured output `logs` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsRequest {
    /// The tenant.
    pub tenant: TenantId,
    /// The environment.
    pub env: Environment,
    /// Only this step; `None`: the image and the rollout, whose instances run scripts.
    pub step: Option<StepKind>,
    /// Of this run; `None`: the newest run with reports of those steps.
    pub run: Option<RunId>,
}

/// One captured report, as `-o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// When it was applied.
    pub at: Timestamp,
    /// The run (`"r7"`).
    #[serde(serialize_with = "as_string")]
    pub run: RunId,
    /// The step.
    pub step: StepKind,
    /// `progress`, `done`, `retryable` or `failed`.
    pub outcome: &'static str,
    /// The note or error, all its lines (for `done`: empty).
    pub text: String,
}

fn as_string<S: serde::Serializer>(run: &RunId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(run)
}

impl LogLine {
    fn of(entry: &HistoryEntry, steps: &[StepKind]) -> Option<Self> {
        let Event::Step(report) = &entry.event else {
            return None;
        };
        if entry.verdict != Verdict::Accepted || !steps.contains(&report.step) {
            return None;
        }
        let (outcome, text) = match &report.outcome {
            StepOutcome::Done { .. } => ("done", String::new()),
            StepOutcome::Progress { note, .. } => ("progress", note.clone()),
            StepOutcome::Retryable { error, .. } => ("retryable", error.clone()),
            StepOutcome::Terminal { error } => ("failed", error.clone()),
        };
        Some(LogLine {
            at: entry.at,
            run: report.run,
            step: report.step,
            outcome,
            text,
        })
    }
}

/// The captured reports of `req`'s steps in its run, oldest first; the run they are of.
pub async fn captured<S: Store>(
    store: &S,
    req: &LogsRequest,
) -> Result<(Option<RunId>, Vec<LogLine>), Error> {
    let key = WorkflowKey::new(req.tenant.clone(), req.env);
    if store.workflow(&key).await?.is_none() {
        return Err(missing_workflow(store, &req.tenant, req.env).await);
    }
    let steps = match req.step {
        Some(step) => vec![step],
        None => vec![StepKind::Image, StepKind::Rollout],
    };
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let page = store.history(&key, after, PAGE).await?;
        let full = page.len() == PAGE;
        if let Some(last) = page.last() {
            after = last.version;
        }
        lines.extend(page.iter().filter_map(|e| LogLine::of(e, &steps)));
        if !full {
            break;
        }
    }
    let run = req.run.or_else(|| lines.iter().map(|l| l.run).max());
    lines.retain(|l| Some(l.run) == run);
    Ok((run, lines))
}

/// `wfctl logs`: prints the captured reports of `req`'s steps, each failure in full.
pub async fn logs<S: Store>(
    store: &S,
    req: &LogsRequest,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let (run, lines) = captured(store, req).await?;
    if p.is_json() {
        p.json(&lines)?;
        return Ok(());
    }
    let what = req
        .step
        .map_or_else(|| "image or rollout".to_owned(), |s| s.to_string());
    let Some(run) = run else {
        p.note(&format!(
            "nothing captured: no {what} step has reported in {}#{}",
            req.tenant, req.env
        ))?;
        return Ok(());
    };
    if lines.is_empty() {
        p.note(&format!("nothing captured of {what} in {run}"))?;
        return Ok(());
    }
    for line in &lines {
        let style = match line.outcome {
            "failed" => Style::Red,
            "retryable" => Style::Yellow,
            "done" => Style::Green,
            _ => Style::Plain,
        };
        let mut text = line.text.split('\n');
        p.line(&format!(
            "{}  {} {:<8} {} {}",
            absolute(line.at),
            line.run,
            line.step.as_str(),
            p.paint(&format!("{:<9}", line.outcome), style),
            sanitize(text.next().unwrap_or_default())
        ))?;
        for rest in text {
            p.line(&format!("    {}", sanitize(rest)))?;
        }
    }
    Ok(())
}
