//! Retry policies: exponential backoff with a cap and full jitter, computed with `backon`.
//!
//! The engine computes the delay (it owns the randomness) and hands it to the machine as data
//! in [`crate::StepOutcome::Retryable`], so replaying an event gives the same result.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a step is retried after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the second attempt (before jitter).
    #[serde(rename = "initial_delay_ms", with = "crate::time::duration_ms")]
    #[schemars(with = "u64")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this factor.
    pub factor: f32,
    /// No delay exceeds this (before jitter).
    #[serde(rename = "max_delay_ms", with = "crate::time::duration_ms")]
    #[schemars(with = "u64")]
    pub max_delay: Duration,
    /// Attempts in all, the first included; after the last one fails, the step fails.
    pub max_attempts: u32,
    /// No attempt starts later than this after the first one.
    #[serde(
        rename = "max_elapsed_ms",
        default,
        with = "crate::time::opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<u64>")]
    pub max_elapsed: Option<Duration>,
    /// Full jitter: the delay is drawn uniformly from zero to the computed delay, so that
    /// many workflows failing together do not retry together.
    pub full_jitter: bool,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, at most 5 min apart, 8 attempts, within 30 min, full jitter.
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 8,
            max_elapsed: Some(Duration::from_secs(1800)),
            full_jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `failed_attempt` (counting from 1), or `None` when the
    /// policy is exhausted. `elapsed` is the time since the first attempt started; `jitter` is
    /// a sample from `[0, 1)` (ignored without full jitter).
    pub fn next_delay(
        &self,
        failed_attempt: u32,
        elapsed: Duration,
        jitter: f64,
    ) -> Option<Duration> {
        if failed_attempt == 0 || failed_attempt >= self.max_attempts {
            return None;
        }
        let nth = usize::try_from(failed_attempt - 1).ok()?;
        let backoff = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_factor(self.factor)
            .with_max_delay(self.max_delay)
            .without_max_times()
            .build();
        let ceiling = backoff.into_iter().nth(nth)?;
        let delay = if self.full_jitter {
            ceiling.mul_f64(jitter.clamp(0.0, 1.0))
        } else {
            ceiling
        };
        match self.max_elapsed {
            Some(max) if elapsed.saturating_add(delay) > max => None,
            _ => Some(delay),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(10),
            max_attempts: 6,
            max_elapsed: Some(Duration::from_secs(60)),
            full_jitter: false,
        }
    }

    #[test]
    fn delays_grow_by_the_factor_up_to_the_cap() {
        let p = policy();
        let delays: Vec<_> = (1..6)
            .map(|n| p.next_delay(n, Duration::ZERO, 0.5).map(|d| d.as_secs()))
            .collect();
        assert_eq!(delays, [Some(1), Some(2), Some(4), Some(8), Some(10)]);
    }

    #[test]
    fn attempts_and_elapsed_time_are_bounded() {
        let p = policy();
        assert_eq!(
            p.next_delay(6, Duration::ZERO, 0.5),
            None,
            "6 attempts in all"
        );
        assert_eq!(p.next_delay(0, Duration::ZERO, 0.5), None);
        assert_eq!(
            p.next_delay(3, Duration::from_secs(57), 0.5),
            None,
            "57 + 4 > 60"
        );
        assert!(p.next_delay(3, Duration::from_secs(56), 0.5).is_some());
    }

    #[test]
    fn full_jitter_draws_below_the_ceiling() {
        let p = RetryPolicy {
            full_jitter: true,
            ..policy()
        };
        assert_eq!(p.next_delay(3, Duration::ZERO, 0.0), Some(Duration::ZERO));
        assert_eq!(
            p.next_delay(3, Duration::ZERO, 0.25),
            Some(Duration::from_secs(1))
        );
        let top = p
            .next_delay(3, Duration::ZERO, 0.999_999)
            .expect("within budget");
        assert!(top < Duration::from_secs(4));
    }

    #[test]
    fn policies_serialize_in_milliseconds() {
        let json = serde_json::to_value(policy()).expect("encode");
        assert_eq!(json["initial_delay_ms"], 1000);
        assert_eq!(json["max_elapsed_ms"], 60_000);
        let back: RetryPolicy = serde_json::from_value(json).expect("decode");
        assert_eq!(back, policy());
    }
}
