//! The engine's OpenTelemetry instruments, from the global meter provider (a no-op unless the
//! binary installed an exporting one; see `crate::telemetry`).
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `orchestrator.events` | counter | `verdict` (accepted, ignored, refused, stale, duplicate), `event.kind` |
//! | `orchestrator.transitions` | counter | `from_state`, `to_state` |
//! | `orchestrator.step.duration` | histogram, seconds | `step`, `outcome` (done, progress, retryable, terminal) |
//! | `orchestrator.step.retries` | counter | `step` |
//! | `orchestrator.step.slot_waits` | counter | `step` |
//! | `orchestrator.messages.dead_lettered` | counter | `messaging.destination.name` |
//! | `orchestrator.queue.oldest_age` | gauge, seconds | `messaging.destination.name` |
//! | `orchestrator.workflows` | gauge | `state` |

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};

/// The instruments.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) events: Counter<u64>,
    pub(crate) transitions: Counter<u64>,
    pub(crate) step_duration: Histogram<f64>,
    pub(crate) retries: Counter<u64>,
    pub(crate) slot_waits: Counter<u64>,
    pub(crate) dead_lettered: Counter<u64>,
    pub(crate) oldest_age: Gauge<f64>,
    pub(crate) workflows: Gauge<u64>,
}

impl Metrics {
    /// Instruments of the global meter provider as it is now.
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("orchestrator");
        Self {
            events: meter
                .u64_counter("orchestrator.events")
                .with_description("events applied to workflows, by verdict")
                .build(),
            transitions: meter
                .u64_counter("orchestrator.transitions")
                .with_description("state changes of workflows")
                .build(),
            step_duration: meter
                .f64_histogram("orchestrator.step.duration")
                .with_unit("s")
                .with_description("time of one activity invocation")
                .build(),
            retries: meter
                .u64_counter("orchestrator.step.retries")
                .with_description("activity invocations that failed retryably")
                .build(),
            slot_waits: meter
                .u64_counter("orchestrator.step.slot_waits")
                .with_description(
                    "step messages put back because every slot of their kind was taken",
                )
                .build(),
            dead_lettered: meter
                .u64_counter("orchestrator.messages.dead_lettered")
                .with_description("messages the engine moved to a dead-letter queue")
                .build(),
            oldest_age: meter
                .f64_gauge("orchestrator.queue.oldest_age")
                .with_unit("s")
                .with_description("age of the oldest message of a queue that is not dead")
                .build(),
            workflows: meter
                .u64_gauge("orchestrator.workflows")
                .with_description("workflows per state")
                .build(),
        }
    }

    pub(crate) fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
        KeyValue::new(key, value)
    }
}
