//! Ports: the small traits behind which every external system sits. The engine is generic over
//! them; the binaries wire real adapters (SQLite now; SQS and DynamoDB later).

pub mod batched;
pub mod journal;
pub mod queue;
pub mod stack;
pub mod store;

pub use batched::Batched;
pub use journal::{Commit, Journal, Sequential};
pub use queue::{DeadLetter, Delivery, Outgoing, Queue, QueueKind, QueueStats, Receipt};
pub use stack::Stack;
pub use store::{
    RecordWrite, SlotEntry, SlotGrant, SlotsView, Store, Woken, WorkflowFilter, WorkflowSummary,
    WriteError,
};

/// Why a port operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend could not be reached or failed in a way that may pass.
    #[error("{backend} is unavailable: {message}")]
    Unavailable {
        /// Which backend ("sqlite", "sqs", ...).
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Stored data does not decode.
    #[error("{what} is corrupt: {source}")]
    Corrupt {
        /// What was being read ("record of acme#dev").
        what: String,
        /// The decoding error.
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
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
