//! `wfctl list|show|history`: reading workflows, their records and their history.
//!
//! Listings page through the store; nothing here decodes more than it shows. A record that does
//! not decode is shown as corrupt with the decoding error, never a panic, and the command exits
//! with `1` once everything else has been shown.

use workflows::{
    Environment, GitSha, HistoryEntry, Push, RunEnd, RunKind, State, StepKind, StepProgress,
    StepStatus, TenantId, WorkflowKey, WorkflowRecord,
};

use crate::output::{Cell, Printer, Style, Table, absolute, sanitize, state_style, step_style};
use crate::tenant::unknown_tenant;
use crate::views::{
    HistoryView, SummaryView, WorkflowView, describe_event, describe_release, verdict_parts,
};
use crate::{Error, list_some};
use orchestrator::ports::{self, Store, WorkflowFilter, WorkflowSummary};

/// How many workflows or history entries one store call fetches.
pub(crate) const PAGE: usize = 500;

/// Every workflow matching `filter`, paging through the store.
pub async fn all_workflows<S: Store>(
    store: &S,
    filter: &WorkflowFilter,
) -> Result<Vec<WorkflowSummary>, Error> {
    let mut out: Vec<WorkflowSummary> = Vec::new();
    loop {
        let after = out.last().map(|s| s.key.clone());
        let page = store.workflows(filter, after.as_ref(), PAGE).await?;
        let full = page.len() == PAGE;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

fn tenant_filter(tenant: &TenantId, env: Option<Environment>) -> WorkflowFilter {
    WorkflowFilter {
        tenant: Some(tenant.clone()),
        env,
        ..WorkflowFilter::default()
    }
}

/// Whether `tenant` is registered or has a workflow.
async fn tenant_known<S: Store>(store: &S, tenant: &TenantId) -> Result<bool, Error> {
    if store.tenant(tenant).await?.is_some() {
        return Ok(true);
    }
    let any = store
        .workflows(&tenant_filter(tenant, None), None, 1)
        .await?;
    Ok(!any.is_empty())
}

/// The error for `tenant#env` not existing, naming what does: the tenant's environments, or
/// the tenants.
pub(crate) async fn missing_workflow<S: Store>(
    store: &S,
    tenant: &TenantId,
    env: Environment,
) -> Error {
    let key = WorkflowKey::new(tenant.clone(), env);
    let others = match all_workflows(store, &tenant_filter(tenant, None)).await {
        Ok(others) => others,
        Err(e) => return e,
    };
    if !others.is_empty() {
        return Error::NotFound(format!(
            "no workflow {key}; {tenant} has workflows in: {}",
            list_some(others.iter().map(|s| s.key.env), 3)
        ));
    }
    match store.tenant(tenant).await {
        Ok(Some(_)) => Error::NotFound(format!(
            "no workflow {key}: tenant {tenant} has no workflows yet (nothing was pushed or provisioned)"
        )),
        Ok(None) => unknown_tenant(store, tenant).await,
        Err(e) => e.into(),
    }
}

/// Which workflows `list` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {
    /// Only in this state.
    pub state: Option<State>,
    /// Only of this environment.
    pub env: Option<Environment>,
    /// Only of this tenant.
    pub tenant: Option<TenantId>,
    /// Only workflows that are not at rest (not unprovisioned, live or decommissioned) and
    /// have not changed for longer than this, as of `now`.
    pub stuck: Option<(std::time::Duration, workflows::Timestamp)>,
}

/// Whether a workflow in `state` is at rest: nothing runs and nothing waits for anyone.
fn at_rest(state: State) -> bool {
    matches!(
        state,
        State::Unprovisioned | State::Live | State::Decommissioned
    )
}

/// Lists workflows.
pub async fn list<S: Store>(
    store: &S,
    req: &ListRequest,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let filter = WorkflowFilter {
        state: req.state,
        env: req.env,
        tenant: req.tenant.clone(),
        updated_before: req.stuck.map(|(idle, now)| {
            workflows::Timestamp::from_unix_millis(
                now.as_unix_millis()
                    .saturating_sub(i64::try_from(idle.as_millis()).unwrap_or(i64::MAX)),
            )
        }),
    };
    let mut rows = all_workflows(store, &filter).await?;
    if req.stuck.is_some() {
        rows.retain(|s| !at_rest(s.state) || s.corrupt.is_some());
    }
    if rows.is_empty()
        && let Some(tenant) = &req.tenant
        && !tenant_known(store, tenant).await?
    {
        return Err(unknown_tenant(store, tenant).await);
    }
    if p.is_json() {
        let views: Vec<SummaryView> = rows.iter().map(SummaryView::from).collect();
        p.json(&views)?;
        return Ok(());
    }
    if rows.is_empty() {
        p.note("no workflows match")?;
        return Ok(());
    }
    let mut table = Table::new(["KEY", "STATE", "VERSION", "UPDATED", "NOTE"]);
    for s in &rows {
        let note = match (&s.corrupt, s.state) {
            (Some(reason), _) => Cell::styled(format!("corrupt: {reason}"), Style::Red),
            (None, State::AwaitingApproval) if req.stuck.is_some() => {
                Cell::from("waits for `wfctl approve`")
            }
            (None, State::Failed) if req.stuck.is_some() => {
                Cell::from("waits for `wfctl retry` or a push")
            }
            (None, _) => Cell::default(),
        };
        table.row([
            Cell::from(s.key.to_string()),
            Cell::styled(s.state.as_str(), state_style(s.state)),
            Cell::from(s.version.to_string()),
            Cell::from(p.ago(s.updated_at)),
            note,
        ]);
    }
    p.table(&table)?;
    Ok(())
}

/// Shows the workflows of `tenant` (all its environments, or `env`).
pub async fn show<S: Store>(
    store: &S,
    tenant: &TenantId,
    env: Option<Environment>,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let summaries = all_workflows(store, &tenant_filter(tenant, env)).await?;
    if summaries.is_empty() {
        if let Some(env) = env {
            return Err(missing_workflow(store, tenant, env).await);
        }
        if store.tenant(tenant).await?.is_none() {
            return Err(unknown_tenant(store, tenant).await);
        }
        if p.is_json() {
            p.json(&Vec::<WorkflowView>::new())?;
        } else {
            p.note(&format!(
                "tenant {tenant} has no workflows yet (nothing was pushed or provisioned)"
            ))?;
        }
        return Ok(());
    }

    let mut shown: Vec<(WorkflowView, Option<WorkflowRecord>)> = Vec::new();
    let mut corrupt: Vec<String> = Vec::new();
    for s in &summaries {
        match store.workflow(&s.key).await {
            Ok(Some(record)) => shown.push((WorkflowView::from(&record), Some(record))),
            // Gone since it was listed; nothing to show.
            Ok(None) => {}
            Err(e @ ports::Error::Corrupt { .. }) => {
                let reason = ports::chain(&e);
                corrupt.push(reason.clone());
                shown.push((WorkflowView::corrupt(s, reason), None));
            }
            Err(e) => return Err(e.into()),
        }
    }

    if p.is_json() {
        let views: Vec<&WorkflowView> = shown.iter().map(|(v, _)| v).collect();
        p.json(&views)?;
    } else {
        let mut lines = std::collections::HashMap::new();
        for (i, (view, record)) in shown.iter().enumerate() {
            if i > 0 {
                p.line("")?;
            }
            match record {
                Some(record) => {
                    let waiting = waiting_steps(store, record, &mut lines).await?;
                    render_workflow(p, record, &waiting)?;
                }
                None => render_corrupt(p, view)?,
            }
        }
    }
    if corrupt.is_empty() {
        Ok(())
    } else {
        Err(Error::Corrupt(corrupt.join("; ")))
    }
}

fn heading(p: &Printer<'_>, text: &str) -> String {
    p.paint(text, Style::Bold)
}

fn render_corrupt(p: &mut Printer<'_>, view: &WorkflowView) -> std::io::Result<()> {
    let mut block = Table::headless();
    block.row([
        Cell::from("workflow"),
        Cell::styled(view.key.to_string(), Style::Bold),
    ]);
    block.row([
        Cell::from("state"),
        Cell::styled(
            format!("{} (as last written)", view.state),
            state_style(view.state),
        ),
    ]);
    block.row([Cell::from("version"), Cell::from(view.version.to_string())]);
    block.row([Cell::from("updated"), Cell::from(p.ago(view.updated_at))]);
    block.row([
        Cell::from("corrupt"),
        Cell::styled(view.corrupt.as_deref().unwrap_or("?"), Style::Red),
    ]);
    p.table(&block)
}

fn short(sha: &GitSha) -> &str {
    sha.short()
}

fn describe_push(p: &Printer<'_>, push: &Push) -> String {
    let branch = push
        .git_ref
        .strip_prefix("refs/heads/")
        .unwrap_or(&push.git_ref);
    format!(
        "{} {} by {} on {branch}, {}: {}",
        push.repo,
        short(&push.sha),
        push.author,
        p.ago(push.received_at),
        push.message
    )
}

/// The running steps of `record`'s active run that wait for a slot, with their place in line
/// (1 is served next); `lines` keeps each kind's line once read.
async fn waiting_steps<S: Store>(
    store: &S,
    record: &WorkflowRecord,
    lines: &mut std::collections::HashMap<StepKind, Vec<String>>,
) -> Result<Vec<(StepKind, usize)>, Error> {
    let Some(run) = record.workflow().active_run() else {
        return Ok(Vec::new());
    };
    let holder = orchestrator::engine::holder_of(&record.key, run.id);
    let mut waiting = Vec::new();
    for step in run.steps.iter().filter(|s| s.status == StepStatus::Running) {
        let line = match lines.entry(step.kind) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let view = store.slots(step.kind.as_str()).await?;
                e.insert(view.waiting.into_iter().map(|e| e.holder).collect())
            }
        };
        if let Some(i) = line.iter().position(|h| *h == holder) {
            waiting.push((step.kind, i + 1));
        }
    }
    Ok(waiting)
}

fn render_workflow(
    p: &mut Printer<'_>,
    record: &WorkflowRecord,
    waiting: &[(StepKind, usize)],
) -> std::io::Result<()> {
    let w = record.workflow();
    let state = record.state();
    let mut block = Table::headless();
    block.row([
        Cell::from("workflow"),
        Cell::styled(record.key.to_string(), Style::Bold),
    ]);
    block.row([
        Cell::from("state"),
        Cell::styled(state.as_str(), state_style(state)),
    ]);
    block.row([
        Cell::from("version"),
        Cell::from(record.version.to_string()),
    ]);
    block.row([
        Cell::from("updated"),
        Cell::from(format!(
            "{} (created {})",
            p.ago(record.updated_at),
            p.ago(record.created_at)
        )),
    ]);
    block.row([
        Cell::from("desired"),
        Cell::from(describe_release(&w.desired)),
    ]);
    block.row([
        Cell::from("deployed"),
        Cell::from(match &w.deployed {
            Some(d) => format!(
                "{} (run {}, {})",
                describe_release(&d.release),
                d.run,
                p.ago(d.at)
            ),
            None => "nothing yet".to_owned(),
        }),
    ]);
    if let Some(run) = &w.run {
        block.row([
            Cell::from("run"),
            Cell::from(format!(
                "{} {}: {}",
                run.id,
                run_kind_name(run.kind),
                describe_release(&run.release)
            )),
        ]);
        let mut status = format!("started {}", p.ago(run.started_at));
        match (run.ended, run.finished_at) {
            (Some(end), Some(at)) => {
                status.push_str(&format!(", {} {}", run_end_name(end), p.ago(at)));
            }
            (Some(end), None) => status.push_str(&format!(", {}", run_end_name(end))),
            (None, _) => match run.failed_step() {
                Some(step) => status.push_str(&format!(
                    ", paused: step {} failed (retry resumes it, a push starts a new run)",
                    step.kind
                )),
                None => status.push_str(", active"),
            },
        }
        if run.needs_approval {
            status.push_str(if run.approved {
                ", approved"
            } else {
                ", needs approval"
            });
        }
        block.row([Cell::from("run status"), Cell::from(status)]);
    } else {
        block.row(["run", "none yet"]);
    }
    p.table(&block)?;

    if let Some(run) = &w.run {
        p.line("")?;
        let h = heading(p, &format!("steps of {}", run.id));
        p.line(&h)?;
        let mut steps = Table::new([
            "STEP",
            "STATUS",
            "ATTEMPT",
            "NEXT RETRY",
            "NOTE",
            "LAST ERROR",
        ])
        .indent(2);
        for s in &run.steps {
            let mut row = step_row(p, s);
            if let Some((_, n)) = waiting.iter().find(|(kind, _)| *kind == s.kind) {
                row[4] = Cell::styled(
                    format!("waiting for a slot: #{n} in line (wfctl slots)"),
                    Style::Yellow,
                );
            }
            steps.row(row);
        }
        p.table(&steps)?;
        // A failure with more lines (a script's last lines) follows the table in full.
        for s in &run.steps {
            if let Some((first, rest)) = s.last_error.as_deref().and_then(|e| e.split_once('\n')) {
                p.line("")?;
                p.line(&format!(
                    "  {} {}",
                    p.paint(&format!("{}:", s.kind), Style::Red),
                    sanitize(first)
                ))?;
                for line in rest.lines() {
                    p.line(&format!("    {}", sanitize(line)))?;
                }
            }
        }
    }

    p.line("")?;
    let h = heading(p, "resources");
    p.line(&h)?;
    let r = &w.resources;
    let mut res = Table::headless().indent(2);
    if let Some(n) = &r.network {
        res.row(["instance security group", &n.instance_security_group]);
        res.row(["database security group", &n.database_security_group]);
    }
    if let Some(s) = &r.infra_source {
        res.row([
            "infra source".to_owned(),
            format!("{} ({})", s.artifact_key, short(&s.sha)),
        ]);
    }
    if let Some(s) = &r.app_source {
        res.row([
            "app source".to_owned(),
            format!("{} ({})", s.artifact_key, short(&s.sha)),
        ]);
    }
    if let Some(i) = &r.image {
        res.row([
            "image".to_owned(),
            format!("{} (infra {})", i.image_id, short(&i.infra_sha)),
        ]);
    }
    if let Some(d) = &r.database {
        res.row(["database", &d.instance_id]);
        res.row(["database endpoint", &d.endpoint]);
        res.row(["database secret", &d.secret_arn]);
    }
    if let Some(x) = &r.routing {
        res.row(["host", &x.host]);
        res.row(["target group", &x.target_group_arn]);
        res.row(["listener rule", &x.rule_arn]);
        res.row(["rule priority".to_owned(), x.priority.to_string()]);
        res.row([
            "dns record".to_owned(),
            match &x.dns_zone {
                Some(zone) => format!("{} (alias in zone {zone})", x.host),
                None => "none: no hosted zone takes the host".to_owned(),
            },
        ]);
    }
    if let Some(d) = &r.deployment {
        res.row(["auto scaling group".to_owned(), d.group_name.clone()]);
        res.row([
            "serving".to_owned(),
            format!(
                "{} with {} (run {})",
                describe_release(&d.release),
                d.image_id,
                d.run
            ),
        ]);
    }
    if !w.releases.is_empty() {
        let kept: Vec<String> = w
            .releases
            .iter()
            .rev()
            .map(|d| format!("{} ({})", d.run, describe_release(&d.release)))
            .collect();
        res.row(["kept for rollback".to_owned(), kept.join(", ")]);
    }
    if res.is_empty() {
        res.row(["none yet"]);
    }
    p.table(&res)?;

    p.line("")?;
    let h = heading(p, "pending pushes");
    p.line(&h)?;
    let mut pending = Table::headless().indent(2);
    for push in [w.pending.infra.as_ref(), w.pending.app.as_ref()]
        .into_iter()
        .flatten()
    {
        pending.row([describe_push(p, push)]);
    }
    if pending.is_empty() {
        pending.row(["none"]);
    }
    p.table(&pending)
}

fn step_row(p: &Printer<'_>, s: &StepProgress) -> Vec<Cell> {
    let dash = || Cell::from("-");
    vec![
        Cell::from(s.kind.as_str()),
        Cell::styled(status_name(s.status), step_style(s.status)),
        if s.attempt == 0 {
            dash()
        } else {
            Cell::from(s.attempt.to_string())
        },
        s.next_attempt_at
            .map_or_else(dash, |at| Cell::from(p.ago(at))),
        s.note.as_deref().map_or_else(dash, Cell::from),
        // Only the first line: the rest follows the table.
        s.last_error.as_deref().map_or_else(dash, |e| {
            let first = e.lines().next().unwrap_or_default();
            let more = if e.contains('\n') { " (below)" } else { "" };
            Cell::styled(format!("{first}{more}"), Style::Red)
        }),
    ]
}

fn run_kind_name(k: RunKind) -> &'static str {
    match k {
        RunKind::Deploy => "deploy",
        RunKind::Decommission => "decommission",
    }
}

fn run_end_name(e: RunEnd) -> &'static str {
    match e {
        RunEnd::Succeeded => "succeeded",
        RunEnd::Cancelled => "cancelled",
        RunEnd::Abandoned => "abandoned",
    }
}

fn status_name(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Pending => "pending",
        StepStatus::Skipped => "skipped",
        StepStatus::Running => "running",
        StepStatus::RetryWait => "retry_wait",
        StepStatus::Done => "done",
        StepStatus::Failed => "failed",
    }
}

/// Which history `history` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRequest {
    /// The tenant.
    pub tenant: TenantId,
    /// The environment.
    pub env: Environment,
    /// At most this many entries: with `after`, the first ones after it; without, the newest.
    pub limit: Option<usize>,
    /// Only entries with versions after this one.
    pub after: Option<u64>,
    /// After the entries so far, keep printing new ones as they are written (until the
    /// reader goes away or the process is interrupted). JSON becomes one object per line.
    pub follow: bool,
}

/// How often `history --follow` looks for new entries.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// One entry of a followed history: a JSON line, or a line with the table's columns.
fn follow_entry(p: &mut Printer<'_>, e: &HistoryEntry) -> Result<(), Error> {
    if p.is_json() {
        p.json_line(&HistoryView::from(e))?;
    } else {
        let (verdict, reason) = verdict_parts(&e.verdict);
        let verdict = match reason {
            Some(r) => format!("{verdict}: {r}"),
            None => verdict.to_owned(),
        };
        p.line(&format!(
            "v{:<5} {}  {:<4} {:<38} {:<9} {}  {}",
            e.version,
            absolute(e.at),
            e.run.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            format!("{} -> {}", e.from, e.to),
            e.event.kind(),
            sanitize(&verdict),
            sanitize(&describe_event(&e.event))
        ))?;
    }
    Ok(())
}

/// Shows a workflow's history, oldest first.
pub async fn history<S: Store>(
    store: &S,
    req: &HistoryRequest,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let key = WorkflowKey::new(req.tenant.clone(), req.env);
    let Some(summary) = store
        .workflows(&tenant_filter(&req.tenant, Some(req.env)), None, 1)
        .await?
        .pop()
    else {
        return Err(missing_workflow(store, &req.tenant, req.env).await);
    };
    let mut cursor = match (req.after, req.limit) {
        (Some(after), _) => after,
        (None, Some(n)) => summary
            .version
            .saturating_sub(u64::try_from(n).unwrap_or(u64::MAX)),
        (None, None) => 0,
    };
    let mut entries: Vec<HistoryEntry> = Vec::new();
    loop {
        let want = req
            .limit
            .map_or(PAGE, |l| l.saturating_sub(entries.len()).min(PAGE));
        if want == 0 {
            break;
        }
        let page = store.history(&key, cursor, want).await?;
        let full = page.len() == want;
        if let Some(last) = page.last() {
            cursor = last.version;
        }
        entries.extend(page);
        if !full {
            break;
        }
    }

    if req.follow {
        for e in &entries {
            follow_entry(p, e)?;
        }
        loop {
            p.flush()?;
            tokio::time::sleep(FOLLOW_POLL).await;
            for e in store.history(&key, cursor, PAGE).await? {
                cursor = e.version;
                follow_entry(p, &e)?;
            }
        }
    }
    if p.is_json() {
        let views: Vec<HistoryView> = entries.iter().map(HistoryView::from).collect();
        p.json(&views)?;
        return Ok(());
    }
    if entries.is_empty() {
        p.note(&format!("no history entries of {key} match"))?;
        return Ok(());
    }
    let mut table = Table::new([
        "VERSION",
        "AT (UTC)",
        "RUN",
        "TRANSITION",
        "EVENT",
        "VERDICT",
        "DESCRIPTION",
    ]);
    for e in &entries {
        let (verdict, reason) = verdict_parts(&e.verdict);
        let verdict_style = match verdict {
            "accepted" => Style::Plain,
            "refused" => Style::Red,
            _ => Style::Yellow,
        };
        let transition = Cell::styled(
            format!("{} -> {}", e.from, e.to),
            if e.from == e.to {
                Style::Dim
            } else {
                Style::Plain
            },
        );
        table.row([
            Cell::from(e.version.to_string()),
            Cell::from(absolute(e.at)),
            Cell::from(e.run.map_or_else(|| "-".to_owned(), |r| r.to_string())),
            transition,
            Cell::from(e.event.kind()),
            Cell::styled(
                match reason {
                    Some(r) => format!("{verdict}: {r}"),
                    None => verdict.to_owned(),
                },
                verdict_style,
            ),
            Cell::from(describe_event(&e.event)),
        ]);
    }
    p.table(&table)?;
    Ok(())
}
