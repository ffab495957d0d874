//! Ports: the small traits behind which every external system sits ([`Queue`], [`Store`],
//! [`Journal`]), their value types and their one error type. The engine is generic over them;
//! the adapters are `crate::sqlite` and (feature `aws`) `crate::aws`, and `crate::stack` puts
//! ports together.

pub mod journal;
pub mod queue;
pub mod store;

use std::sync::Arc;

pub use journal::{Commit, Journal};
pub use queue::{DeadLetter, Delivery, Outgoing, Queue, QueueKind, QueueStats, Receipt};
pub use store::{
    RecordWrite, SlotEntry, SlotGrant, SlotsView, Store, Woken, WorkflowFilter, WorkflowSummary,
    WriteError,
};

/// The cause of a port error: the backend's own error (an SDK error, a SQLite error), kept as
/// it is. Shared, because one failed round of the SQLite writer fails every request in it.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a port operation failed. The message says what failed at the port; the backend's own
/// error is its `source()` (print the whole chain with [`chain`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The backend could not be reached or failed in a way that may pass.
    #[error("{backend} is unavailable: {what}")]
    Unavailable {
        /// Which backend ("sqlite", "sqs", ...).
        backend: &'static str,
        /// What failed.
        what: String,
        /// The backend's error.
        #[source]
        cause: Option<Cause>,
    },
    /// Stored data does not decode.
    #[error("{what} is corrupt")]
    Corrupt {
        /// What was being read ("record of acme#dev").
        what: String,
        /// The decoding error.
        #[source]
        source: workflows::codec::Error,
    },
    /// A message is larger than the queue accepts.
    #[error("a message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message's size.
        size: usize,
        /// The queue's limit.
        limit: usize,
    },
    /// Something with that identity exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request, the stored data or the backend's setup is wrong; trying again will not
    /// help (a missing table, denied access, a constraint the data breaks).
    #[error("{what}")]
    Invalid {
        /// What is wrong, and what to do about it when that is known.
        what: String,
        /// The backend's error.
        #[source]
        cause: Option<Cause>,
    },
}

impl Error {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// `backend` is unavailable: `what` failed, with no error of the backend's own.
    pub fn unavailable(backend: &'static str, what: impl Into<String>) -> Self {
        Error::Unavailable {
            backend,
            what: what.into(),
            cause: None,
        }
    }

    /// `backend` is unavailable: `what` failed because of `cause`.
    pub fn unavailable_by(
        backend: &'static str,
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Unavailable {
            backend,
            what: what.into(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// `what` is wrong, with no error of the backend's own.
    pub fn invalid(what: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            cause: None,
        }
    }

    /// `what` is wrong because of `cause`.
    pub fn invalid_by(
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Invalid {
            what: what.into(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// `what` does not decode, because of `source`.
    pub fn corrupt(what: impl Into<String>, source: workflows::codec::Error) -> Self {
        Error::Corrupt {
            what: what.into(),
            source,
        }
    }
}

/// `error` and its causes, outermost first, joined by `: ` (what a person reads in a log line
/// or an error message).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        // Some errors repeat their cause in their own message; say it once.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_every_cause_once() {
        let io = std::io::Error::other("disk full");
        let e = Error::unavailable_by("sqlite", "committing a write", io);
        assert_eq!(e.to_string(), "sqlite is unavailable: committing a write");
        assert_eq!(
            chain(&e),
            "sqlite is unavailable: committing a write: disk full"
        );
        assert!(std::error::Error::source(&e).is_some());
        let plain = Error::invalid("no such queue");
        assert_eq!(chain(&plain), "no such queue");
    }
}
