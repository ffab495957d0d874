//! Points in time and durations as the persisted types carry them.
//!
//! The domain never reads a clock: the engine passes "now" in, so applying the same event to
//! the same record always gives the same result.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// An instant, persisted as an RFC 3339 string in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(jiff::Timestamp);

impl Timestamp {
    /// The Unix epoch; a neutral value for tests and defaults.
    pub const EPOCH: Timestamp = Timestamp(jiff::Timestamp::UNIX_EPOCH);

    /// The instant `ms` milliseconds after the Unix epoch (clamped to jiff's range).
    pub fn from_unix_millis(ms: i64) -> Self {
        Self(jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::MAX))
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_unix_millis(self) -> i64 {
        self.0.as_millisecond()
    }

    /// This instant plus `d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Self {
        self.0
            .checked_add(d)
            .map(Self)
            .unwrap_or(Self(jiff::Timestamp::MAX))
    }

    /// How long after `earlier` this instant is (zero if it is not after it).
    pub fn since(self, earlier: Timestamp) -> Duration {
        let ms = self
            .as_unix_millis()
            .saturating_sub(earlier.as_unix_millis());
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

impl From<jiff::Timestamp> for Timestamp {
    fn from(t: jiff::Timestamp) -> Self {
        Self(t)
    }
}

impl From<Timestamp> for jiff::Timestamp {
    fn from(t: Timestamp) -> Self {
        t.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "an RFC 3339 instant in UTC",
        })
    }
}

/// Serde for a `Duration` as whole milliseconds; fields using it end in `_ms`.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Serde for an optional `Duration` as whole milliseconds.
pub(crate) mod opt_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_ms::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_and_do_arithmetic() {
        let t = Timestamp::from_unix_millis(1_700_000_000_123);
        let json = serde_json::to_string(&t).expect("encode");
        assert_eq!(json, "\"2023-11-14T22:13:20.123Z\"");
        let back: Timestamp = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, t);
        let later = t.saturating_add(Duration::from_secs(90));
        assert_eq!(later.since(t), Duration::from_secs(90));
        assert_eq!(t.since(later), Duration::ZERO);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
