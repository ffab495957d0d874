//! Decoding and encoding of persisted and queued types, with schema versions.
//!
//! Every persisted type carries `schema_version`. Decoding gives a typed [`Error`] naming the
//! field path or the version; it never panics, whatever the bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A type that is persisted or queued as JSON with a `schema_version`.
pub trait Persisted: Serialize + DeserializeOwned {
    /// What it is, for error messages ("workflow record").
    const KIND: &'static str;
    /// The version this code writes (and the newest it reads).
    const SCHEMA_VERSION: u32;
    /// The oldest version this code reads. Fields added since then are optional, so an older
    /// document decodes with them at their defaults and [`Persisted::upgrade`] finishes the
    /// migration.
    const OLDEST_SCHEMA_VERSION: u32 = Self::SCHEMA_VERSION;
    /// The version a decoded value says it has.
    fn schema_version(&self) -> u32;
    /// Brings a value decoded from an older version to [`Persisted::SCHEMA_VERSION`]; what a
    /// later write stores is then the current shape.
    fn upgrade(&mut self);
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not JSON at all, or JSON of the wrong shape; `path` names the field (`.` for the root).
    #[error("{kind} does not decode at {path}: {message}")]
    Invalid {
        /// What was being decoded.
        kind: &'static str,
        /// Where in the document, for example `machine.shared_storage.run.steps[2].status`
        /// (`.` is the root, `?` a place the parser could not reach: the document ended early).
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// Written by newer code than this one.
    #[error(
        "{kind} has schema_version {found}, newer than the {supported} this code reads: upgrade the workers"
    )]
    NewerVersion {
        /// What was being decoded.
        kind: &'static str,
        /// The version found.
        found: u64,
        /// The newest version this code reads.
        supported: u32,
    },
    /// Older than any version this code can migrate.
    #[error("{kind} has schema_version {found}, which this code no longer reads")]
    UnsupportedVersion {
        /// What was being decoded.
        kind: &'static str,
        /// The version found.
        found: u64,
    },
}

impl Error {
    /// Bad bytes stay bad: decoding again will not help.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Decodes a `T` from JSON bytes.
pub fn decode<T: Persisted>(bytes: &[u8]) -> Result<T, Error> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(mut value) => {
            check_version::<T>(u64::from(value.schema_version()))?;
            if value.schema_version() < T::SCHEMA_VERSION {
                value.upgrade();
            }
            Ok(value)
        }
        // The fast path failed; spend time on a precise error.
        Err(_) => Err(explain::<T>(bytes)),
    }
}

/// Encodes a `T` as JSON bytes.
pub fn encode<T: Persisted>(value: &T) -> Vec<u8> {
    // Serializing these types cannot fail: string keys only, no non-finite floats.
    serde_json::to_vec(value).unwrap_or_else(|e| unreachable!("{} encodes: {e}", T::KIND))
}

fn check_version<T: Persisted>(found: u64) -> Result<(), Error> {
    match found {
        v if v > u64::from(T::SCHEMA_VERSION) => Err(Error::NewerVersion {
            kind: T::KIND,
            found: v,
            supported: T::SCHEMA_VERSION,
        }),
        v if v < u64::from(T::OLDEST_SCHEMA_VERSION) => Err(Error::UnsupportedVersion {
            kind: T::KIND,
            found: v,
        }),
        _ => Ok(()),
    }
}

fn explain<T: Persisted>(bytes: &[u8]) -> Error {
    // A newer writer may have changed any field: report the version, not the field.
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Some(found) = value
            .get("schema_version")
            .and_then(serde_json::Value::as_u64)
        && let Err(e) = check_version::<T>(found)
    {
        return e;
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Err(e) => Error::Invalid {
            kind: T::KIND,
            path: e.path().to_string(),
            message: e.inner().to_string(),
        },
        // The fast path and this one disagree only if the bytes have trailing garbage.
        Ok(_) => Error::Invalid {
            kind: T::KIND,
            path: ".".into(),
            message: "trailing characters after the JSON document".into(),
        },
    }
}
