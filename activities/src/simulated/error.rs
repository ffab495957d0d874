//! What can go wrong in the simulated cloud, and whether trying again may help.

/// An error of the simulated cloud. Its message is what the step report carries, worded like
/// the AWS error it stands for where there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SQLite file failed (busy beyond the timeout, I/O, a constraint): retryable.
    #[error("simulated cloud storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The transaction that ran this invocation with others failed as a whole: retryable.
    #[error("simulated cloud storage: {0}")]
    Storage(String),
    /// The blocking task running the SQLite transaction panicked or was cancelled: retryable.
    #[error("simulated cloud storage task failed: {0}")]
    Blocking(String),
    /// Injected throttling: retryable.
    #[error("Throttling: Rate exceeded")]
    Throttling,
    /// Injected server error: retryable.
    #[error("InternalError (500): we encountered an internal error, please try again")]
    Internal,
    /// Injected lost response (the action took effect, its answer never came): retryable.
    #[error("RequestTimeout: the request took effect but its response was lost")]
    LostResponse,
    /// A parameter the cloud refuses (also the injected terminal failure): terminal.
    #[error("InvalidParameterValue: {0}")]
    InvalidParameter(String),
    /// The image a rollout names does not exist: terminal.
    #[error("InvalidAMIID.NotFound: the image id '{0}' does not exist")]
    ImageNotFound(String),
    /// Every listener rule priority is taken: terminal.
    #[error("TooManyRules: no listener rule priority is free from {first} to {max}")]
    NoFreePriority {
        /// The lowest priority considered.
        first: u32,
        /// The highest priority there is.
        max: u32,
    },
    /// The environment was decommissioned; a late step message must not bring anything of it
    /// back: terminal.
    #[error("environment {0} was decommissioned; nothing of it is created again")]
    Decommissioned(String),
    /// A rollout of an older run met the group of a newer one, which it must neither replace
    /// nor delete: terminal.
    #[error("rollout of {run} superseded: group {newer} of a newer run exists")]
    Superseded {
        /// The run of the invocation.
        run: String,
        /// The newer group.
        newer: String,
    },
    /// A stored resource could not be read back (a bug or a hand-edited file): terminal.
    #[error("simulated resource {kind} {name} is corrupt: {reason}")]
    Corrupt {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The `sim_` tables were written by a newer version of this code: terminal.
    #[error("the sim_ tables have schema version {found}; this code reads up to {supported}")]
    NewerSchema {
        /// The version in the file.
        found: i64,
        /// The newest version this code reads.
        supported: i64,
    },
    /// The configuration breaks a rule: terminal.
    #[error("invalid simulated cloud configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether trying again may succeed: storage failures and the injected retryable faults.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Sqlite(_)
                | Error::Storage(_)
                | Error::Blocking(_)
                | Error::Throttling
                | Error::Internal
                | Error::LostResponse
        )
    }
}
