//! Token buckets per key: the ingress's rate limits (accepted pushes per tenant, failed
//! authentications per source address) and the rate of its refusal log lines.
//!
//! A bucket holds up to `burst` tokens and gains `per_second` of them each second; taking one
//! from an empty bucket says how long until one is there (the `Retry-After` of a `429`). Time
//! is the caller's (the ingress's clock), so the limits are tested without sleeping. Memory is
//! bounded: past `max_keys` keys, full buckets (which remember nothing) are forgotten, then, if
//! that is not enough, all of them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use workflows::Timestamp;

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens gained per second.
    pub per_second: f64,
    /// Tokens held at most (and at first).
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Token buckets keyed by `K`.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets refilling at `rate`, remembering at most about `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `key`'s bucket at `now`; `Err` holds how long until one is there.
    pub fn take(&self, key: &K, now: Timestamp) -> Result<(), Duration> {
        self.with(key, now, true)
    }

    /// Whether `key`'s bucket has a token at `now`, without taking it; `Err` as [`Self::take`].
    pub fn check(&self, key: &K, now: Timestamp) -> Result<(), Duration> {
        self.with(key, now, false)
    }

    fn with(&self, key: &K, now: Timestamp, take: bool) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst);
        let now_ms = now.as_unix_millis();
        // A poisoned lock only means another request panicked mid-update: the numbers are
        // still numbers.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            let rate = self.rate;
            buckets.retain(|_, b| refilled(*b, rate, now_ms) < burst);
            if buckets.len() >= self.max_keys {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        bucket.tokens = refilled(*bucket, self.rate, now_ms);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            return Ok(());
        }
        let missing = 1.0 - bucket.tokens;
        let secs = if self.rate.per_second > 0.0 {
            missing / self.rate.per_second
        } else {
            f64::from(u32::MAX)
        };
        Err(Duration::from_secs_f64(
            secs.clamp(0.001, f64::from(u32::MAX)),
        ))
    }
}

/// `b`'s tokens at `now_ms` (a clock going backwards adds nothing).
fn refilled(b: Bucket, rate: Rate, now_ms: i64) -> f64 {
    let elapsed_ms = now_ms.saturating_sub(b.at_ms).max(0);
    // Milliseconds fit an f64 exactly far beyond any uptime.
    #[allow(clippy::cast_precision_loss)]
    let gained = elapsed_ms as f64 / 1000.0 * rate.per_second;
    (b.tokens + gained).min(f64::from(rate.burst))
}

/// Whole seconds to wait (at least 1): the `Retry-After` of a wait.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000 + ms)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = Buckets::new(
            Rate {
                per_second: 2.0,
                burst: 3,
            },
            100,
        );
        for _ in 0..3 {
            assert!(b.take(&"acme", at(0)).is_ok());
        }
        let wait = b.take(&"acme", at(0)).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        assert!(b.take(&"globex", at(0)).is_ok(), "buckets are per key");
        assert!(b.check(&"acme", at(499)).is_err());
        assert!(
            b.take(&"acme", at(500)).is_ok(),
            "one token per half second"
        );
        assert!(b.take(&"acme", at(500)).is_err());
        assert!(b.check(&"acme", at(10_000)).is_ok());
        for _ in 0..3 {
            assert!(b.take(&"acme", at(10_000)).is_ok());
        }
        assert!(
            b.take(&"acme", at(10_000)).is_err(),
            "never more than the burst"
        );
        assert!(
            b.take(&"acme", at(5_000)).is_err(),
            "a clock going back adds nothing"
        );
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_are_forgotten_first() {
        let b = Buckets::new(
            Rate {
                per_second: 1.0,
                burst: 2,
            },
            10,
        );
        b.take(&0, at(0)).expect("token");
        b.take(&0, at(0)).expect("token");
        for k in 1..1_000 {
            b.check(&k, at(0)).expect("a new key has its burst");
        }
        assert!(b.buckets.lock().expect("lock").len() <= 10);
        assert!(b.take(&0, at(0)).is_err(), "the empty bucket is remembered");
    }
}
