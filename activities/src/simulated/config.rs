//! The simulated cloud's settings: latencies, time scale, fault probabilities.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use workflows::{RetryPolicy, StepKind};

use super::Error;

/// The highest listener rule priority an Application Load Balancer accepts.
pub const MAX_LISTENER_PRIORITY: u32 = 50_000;

/// Settings of the simulated cloud, loadable from a TOML `[simulated]` section; every field
/// has a default, unknown fields are refused.
///
/// Latencies are whole milliseconds of simulated time (fields end in `_ms`), AWS-like by
/// default. Every latency, the progress recheck cap and the retry delays are divided by
/// `time_scale` before use: `600.0` makes ten minutes take one second. A latency of zero, or a
/// `time_scale` of zero, means ready at once.
///
/// ```toml
/// [simulated]
/// time_scale = 600.0
/// database_latency_ms = 600000
/// throttle_probability = 0.05
/// seed = 42
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Simulated time runs this many times faster than the clock; `0` means every latency is
    /// zero. Default `1.0` (real AWS pace).
    pub time_scale: f64,
    /// Security groups become usable after this long. Default 5 s.
    pub network_latency_ms: u64,
    /// A source artifact is uploaded after this long. Default 10 s.
    pub source_latency_ms: u64,
    /// An image is available this long after its builder was launched: the builder runs the
    /// first half, the image is pending for the second. Default 8 min.
    pub image_latency_ms: u64,
    /// A database is available after this long. Default 10 min.
    pub database_latency_ms: u64,
    /// Target group and listener rule are active after this long. Default 5 s.
    pub routing_latency_ms: u64,
    /// A new Auto Scaling group's targets are healthy after this long. Default 4 min.
    pub rollout_latency_ms: u64,
    /// A progress report asks to be invoked again after the time left, but never later than
    /// this (as AWS waiters poll). Default 30 s.
    pub max_recheck_ms: u64,
    /// Chance that an invocation fails with `Throttling: Rate exceeded` (retryable) before
    /// doing anything. Default 0.
    pub throttle_probability: f64,
    /// Chance that an invocation fails with `InternalError (500)` (retryable) before doing
    /// anything. Default 0.
    pub server_error_probability: f64,
    /// Chance that an invocation fails with `InvalidParameterValue` (terminal) before doing
    /// anything. Default 0.
    pub terminal_probability: f64,
    /// Chance that an invocation's action takes effect but its answer is lost: the
    /// invocation reports `RequestTimeout` (retryable), and the next one must find what this
    /// one created. Default 0.
    pub lost_response_probability: f64,
    /// Chance that an image build's provisioning scripts fail: the builder powers off with a
    /// failed script report and the image step fails terminally with its last lines, as on
    /// AWS. Default 0.
    pub script_failure_probability: f64,
    /// Chance that a rollout's `install.sh` fails on its instances: the new group is deleted
    /// at a quarter of the rollout latency and the step fails terminally with the output, as
    /// on AWS. Default 0.
    pub install_failure_probability: f64,
    /// Seed of the fault draws; `None` seeds from the system. Default `None`.
    pub seed: Option<u64>,
    /// The image rolled out while a release has no infrastructure commit. Default `ami-base`.
    pub base_image_id: String,
    /// The lowest listener rule priority handed out. Default 1.
    pub first_listener_priority: u32,
    /// How long an invocation waits for another connection's write lock on the SQLite file
    /// before it fails retryably. Default 5000 ms (not scaled).
    pub busy_timeout_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            network_latency_ms: 5_000,
            source_latency_ms: 10_000,
            image_latency_ms: 8 * 60_000,
            database_latency_ms: 10 * 60_000,
            routing_latency_ms: 5_000,
            rollout_latency_ms: 4 * 60_000,
            max_recheck_ms: 30_000,
            throttle_probability: 0.0,
            server_error_probability: 0.0,
            terminal_probability: 0.0,
            lost_response_probability: 0.0,
            script_failure_probability: 0.0,
            install_failure_probability: 0.0,
            seed: None,
            base_image_id: "ami-base".to_owned(),
            first_listener_priority: 1,
            busy_timeout_ms: 5_000,
        }
    }
}

impl SimConfig {
    /// Every resource ready at once and no faults: each step is done on its first invocation.
    pub fn instant() -> Self {
        Self {
            time_scale: 0.0,
            ..Self::default()
        }
    }

    /// Checks the probabilities, the time scale and the first priority.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::Config(reason));
        if self.time_scale.is_nan() || self.time_scale < 0.0 {
            return invalid(format!(
                "time_scale must be zero or positive, not {}",
                self.time_scale
            ));
        }
        let probabilities = [
            ("throttle_probability", self.throttle_probability),
            ("server_error_probability", self.server_error_probability),
            ("terminal_probability", self.terminal_probability),
            ("lost_response_probability", self.lost_response_probability),
            (
                "script_failure_probability",
                self.script_failure_probability,
            ),
            (
                "install_failure_probability",
                self.install_failure_probability,
            ),
        ];
        for (name, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return invalid(format!("{name} must be within 0 and 1, not {p}"));
            }
        }
        let failing =
            self.throttle_probability + self.server_error_probability + self.terminal_probability;
        if failing > 1.0 + 1e-9 {
            return invalid(format!(
                "throttle, server error and terminal probabilities add up to {failing}, more than 1"
            ));
        }
        if !(1..=MAX_LISTENER_PRIORITY).contains(&self.first_listener_priority) {
            return invalid(format!(
                "first_listener_priority must be within 1 and {MAX_LISTENER_PRIORITY}, not {}",
                self.first_listener_priority
            ));
        }
        if self.base_image_id.is_empty() {
            return invalid("base_image_id must not be empty".to_owned());
        }
        Ok(())
    }

    /// The unscaled latency of `step`'s resources (zero for decommission, which deletes at
    /// once).
    pub fn latency(&self, step: StepKind) -> Duration {
        Duration::from_millis(match step {
            StepKind::Network => self.network_latency_ms,
            StepKind::SourceInfra | StepKind::SourceApp => self.source_latency_ms,
            StepKind::Image => self.image_latency_ms,
            StepKind::Database => self.database_latency_ms,
            StepKind::Routing => self.routing_latency_ms,
            StepKind::Rollout => self.rollout_latency_ms,
            StepKind::Decommission => 0,
        })
    }

    /// `d` of simulated time in clock time: divided by `time_scale` and rounded up to whole
    /// milliseconds (so a nonzero latency stays nonzero); zero when `time_scale` is zero or
    /// infinite.
    pub fn scaled(&self, d: Duration) -> Duration {
        let scale = self.time_scale;
        if d.is_zero() || scale.is_nan() || scale <= 0.0 || scale.is_infinite() {
            return Duration::ZERO;
        }
        let ms = (d.as_secs_f64() * 1000.0 / scale).ceil();
        Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
    }

    /// The retry policy of `step`, in simulated time: delays are scaled like latencies (at
    /// least 1 ms); the maximum elapsed time is not, since it also bounds the clock time the
    /// engine and its queues take.
    ///
    /// | step | first delay | factor | largest delay | attempts | within |
    /// |---|---|---|---|---|---|
    /// | network, source_infra, source_app, routing | 1 s | 2 | 30 s | 6 | 15 min |
    /// | image | 5 s | 2 | 60 s | 12 | 1 h |
    /// | database | 5 s | 2 | 2 min | 12 | 1 h |
    /// | rollout | 2 s | 2 | 60 s | 10 | 30 min |
    /// | decommission (must finish) | 2 s | 2 | 2 min | 15 | 2 h |
    ///
    /// All with full jitter. The budget is for retryable failures only (a terminal failure
    /// is not retried), but it is shared by every invocation of the step, progress rechecks
    /// included: the workflow does not reset the attempt count on progress. The steps that
    /// wait long (image, database: some 20 invocations at the default recheck cap) get the
    /// most attempts, the quick ones (one or two invocations) the fewest. Likewise the
    /// elapsed bound counts from the first attempt, waiting included, so it is well above
    /// every latency.
    pub fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        let (initial_s, max_s, max_attempts, within_min) = match step {
            StepKind::Network | StepKind::SourceInfra | StepKind::SourceApp | StepKind::Routing => {
                (1, 30, 6, 15)
            }
            StepKind::Image => (5, 60, 12, 60),
            StepKind::Database => (5, 120, 12, 60),
            StepKind::Rollout => (2, 60, 10, 30),
            StepKind::Decommission => (2, 120, 15, 120),
        };
        let at_least_1ms = |d: Duration| self.scaled(d).max(Duration::from_millis(1));
        RetryPolicy {
            initial_delay: at_least_1ms(Duration::from_secs(initial_s)),
            factor: 2.0,
            max_delay: at_least_1ms(Duration::from_secs(max_s)),
            max_attempts,
            max_elapsed: Some(Duration::from_secs(within_min * 60)),
            full_jitter: true,
        }
    }
}
