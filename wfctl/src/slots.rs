//! `wfctl slots`: the account-wide slots of capped step kinds (`[limits]`), who holds them
//! and who waits for them, in the order the line will be served.

use serde::Serialize;
use workflows::{StepKind, TenantId, Timestamp};

use crate::Error;
use crate::output::{Cell, Printer, Style, Table};
use orchestrator::ports::{SlotEntry, Store};

/// One holder of, or waiter for, a slot, for `-o json`.
#[derive(Debug, Serialize)]
pub struct SlotView {
    /// The step kind.
    pub kind: StepKind,
    /// `held` or `waiting`.
    pub status: &'static str,
    /// Place in line (1 is served next); absent for a holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// `<tenant>#<env>`.
    pub workflow: String,
    /// The run that holds or waits.
    pub run: String,
    /// Its tenant.
    pub tenant: TenantId,
    /// When it was granted the slot or joined the line.
    pub since: Timestamp,
    /// When the lease or the place lapses unless renewed.
    pub expires_at: Timestamp,
}

impl SlotView {
    fn new(kind: StepKind, entry: &SlotEntry, position: Option<usize>) -> Self {
        // Holders are `<workflow>/<run>`; anything else is shown whole.
        let (workflow, run) = entry
            .holder
            .rsplit_once('/')
            .unwrap_or((entry.holder.as_str(), ""));
        Self {
            kind,
            status: if position.is_some() {
                "waiting"
            } else {
                "held"
            },
            position,
            workflow: workflow.to_owned(),
            run: run.to_owned(),
            tenant: entry.tenant.clone(),
            since: entry.since,
            expires_at: entry.expires_at,
        }
    }
}

/// Lists the slots of `kinds` (every step kind when empty): holders first, then the line.
pub async fn slots<S: Store>(
    store: &S,
    kinds: &[StepKind],
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let kinds = if kinds.is_empty() {
        StepKind::ALL.to_vec()
    } else {
        kinds.to_vec()
    };
    let mut views = Vec::new();
    for kind in kinds {
        let view = store.slots(kind.as_str()).await?;
        views.extend(view.held.iter().map(|e| SlotView::new(kind, e, None)));
        views.extend(
            view.waiting
                .iter()
                .enumerate()
                .map(|(i, e)| SlotView::new(kind, e, Some(i + 1))),
        );
    }
    if p.is_json() {
        p.json(&views)?;
        return Ok(());
    }
    if views.is_empty() {
        p.note("no slot is held and nobody waits")?;
        return Ok(());
    }
    let mut table = Table::new(["KIND", "WORKFLOW", "RUN", "STATUS", "SINCE", "LAPSES"]);
    for v in &views {
        let status = match v.position {
            None => Cell::styled("held", Style::Green),
            Some(n) => Cell::styled(format!("waiting #{n}"), Style::Yellow),
        };
        table.row([
            Cell::from(v.kind.as_str()),
            Cell::from(v.workflow.clone()),
            Cell::from(v.run.clone()),
            status,
            Cell::from(p.ago(v.since)),
            Cell::from(p.ago(v.expires_at)),
        ]);
    }
    p.table(&table)?;
    Ok(())
}
