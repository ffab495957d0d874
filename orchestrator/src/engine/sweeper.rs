//! The sweeper: finds workflows that should be making progress but have not changed for
//! longer than a deadline, and re-arms them (ARCHITECTURE.md, "The engine").
//!
//! A workflow in `preparing`, `rolling_out` or `decommissioning` always has a step message or
//! timer outstanding. If one was lost, the workflow would wait forever; the sweeper sends it
//! an `Event::Rearm`, and the machine sends every outstanding message again under a new token.
//! Re-arm ids carry the record version, so several sweepers re-arm a version once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use workflows::{Event, EventId, State, WorkflowKey};

use super::enqueue;
use crate::clock::SharedClock;
use crate::ports::{Error, Queue, Store, WorkflowFilter};

/// How the sweeper runs.
#[derive(Debug, Clone, Copy)]
pub struct SweepConfig {
    /// How often it looks.
    pub interval: Duration,
    /// How long a workflow with outstanding steps may go without a change. Must exceed the
    /// longest retry delay and progress recheck, or healthy workflows get re-armed (harmlessly,
    /// but for nothing).
    pub deadline: Duration,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            deadline: Duration::from_secs(15 * 60),
        }
    }
}

/// The states in which a workflow must have a step message or timer outstanding.
pub const ARMED_STATES: [State; 3] = [State::Preparing, State::RollingOut, State::Decommissioning];

/// Re-arms every workflow in an armed state unchanged for longer than `deadline`. Returns
/// the workflows re-armed.
pub async fn sweep_once<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    clock: &SharedClock,
    deadline: Duration,
) -> Result<Vec<WorkflowKey>, Error> {
    let now = clock.now();
    let before = workflows::Timestamp::from_unix_millis(
        now.as_unix_millis()
            .saturating_sub(i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX)),
    );
    let mut rearmed = Vec::new();
    for state in ARMED_STATES {
        let filter = WorkflowFilter {
            state: Some(state),
            updated_before: Some(before),
            ..WorkflowFilter::default()
        };
        let mut after: Option<WorkflowKey> = None;
        loop {
            let page = store.workflows(&filter, after.as_ref(), 200).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for summary in page {
                if summary.corrupt.is_some() {
                    continue;
                }
                let id = format!("rearm:{}:v{}", summary.key, summary.version);
                let event_id = EventId::new(id).map_err(|e| Error::invalid(e.to_string()))?;
                enqueue(queue, &summary.key, Event::Rearm { event_id }, now).await?;
                info!(workflow.key = %summary.key, state = %summary.state, idle_since = %summary.updated_at, "workflow re-armed");
                rearmed.push(summary.key);
            }
        }
    }
    Ok(rearmed)
}

/// Sweeps every `config.interval` until `shutdown`.
pub async fn run_sweeper<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    clock: SharedClock,
    config: SweepConfig,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
        if let Err(e) = sweep_once(store, queue, &clock, config.deadline).await {
            warn!(error = %crate::ports::chain(&e), "sweep failed; trying again next interval");
        }
    }
}
