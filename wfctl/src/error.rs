//! `wfctl`'s errors and the exit code of each.
//!
//! Exit codes ([`Error::exit_code`]): `0` success, `1` the operation failed (not found, already
//! exists, corrupt data), `2` usage or configuration error (clap uses `2` for its own), `3`
//! the backend cannot be reached.

use std::path::PathBuf;

use orchestrator::ports;

/// Exit code of a command that did what it was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code of an operation that failed (not found, already exists, corrupt data).
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the backend cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 3;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The arguments are wrong in a way the parser could not see.
    #[error("{0}")]
    Invalid(String),
    /// The configuration cannot be loaded.
    #[error(transparent)]
    Config(#[from] orchestrator::config::Error),
    /// What was asked for does not exist; the message lists what does.
    #[error("{0}")]
    NotFound(String),
    /// An operator's signal does not apply in the workflow's state; the message says why.
    #[error("{0}")]
    Refused(String),
    /// A signal was sent but no worker applied it in time.
    #[error("{0}")]
    TimedOut(String),
    /// The work a signal started (waited for with `--wait`) failed; the message names the step.
    #[error("{0}")]
    Failed(String),
    /// What was to be created exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Stored data does not decode.
    #[error("{0}")]
    Corrupt(String),
    /// The database file does not exist.
    #[error(
        "no database at {}: the file does not exist (pass --db PATH or --config PATH, or set ORCHESTRATOR__EMBEDDED__PATH)",
        path.display()
    )]
    NoDatabase {
        /// The path looked at.
        path: PathBuf,
    },
    /// The backend cannot be opened.
    #[error("cannot open the database {}: {reason}", path.display())]
    Unreachable {
        /// The database file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The AWS backend's tables cannot be used (unreachable, missing, or access denied).
    #[error("cannot use the AWS backend (prefix {prefix}): {reason}")]
    AwsUnreachable {
        /// The configured name prefix of the tables.
        prefix: String,
        /// Why, naming the table or permission.
        reason: String,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(ports::Error),
    /// The operating system's random source failed.
    #[error("cannot generate a secret: the operating system's random source failed: {0}")]
    Random(getrandom::Error),
    /// A new secret could not be written, so it was not stored either; the second field says
    /// what did not happen ("the tenant was not registered").
    #[error("cannot write the new secret ({0}); {1}")]
    SecretNotDelivered(std::io::Error, &'static str),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<ports::Error> for Error {
    fn from(e: ports::Error) -> Self {
        match e {
            ports::Error::Corrupt { .. } => Error::Corrupt(ports::chain(&e)),
            ports::Error::AlreadyExists(_) => Error::AlreadyExists(e.to_string()),
            e => Error::Store(e),
        }
    }
}

impl Error {
    /// The process exit code for this error: `1` the operation failed, `2` usage or
    /// configuration, `3` backend unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Invalid(_) | Error::Config(_) => EXIT_USAGE,
            Error::NoDatabase { .. } | Error::Unreachable { .. } | Error::AwsUnreachable { .. } => {
                EXIT_UNAVAILABLE
            }
            Error::Store(e) if e.is_retryable() => EXIT_UNAVAILABLE,
            Error::NotFound(_)
            | Error::Refused(_)
            | Error::TimedOut(_)
            | Error::Failed(_)
            | Error::AlreadyExists(_)
            | Error::Corrupt(_)
            | Error::Store(_)
            | Error::Random(_)
            | Error::SecretNotDelivered(..)
            | Error::Output(_) => EXIT_FAILED,
        }
    }

    /// Whether running the same command again may succeed (the backend was busy or down).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::AwsUnreachable { .. } | Error::TimedOut(_) => true,
            Error::Store(e) => e.is_retryable(),
            Error::Invalid(_)
            | Error::Config(_)
            | Error::NotFound(_)
            | Error::Refused(_)
            | Error::Failed(_)
            | Error::AlreadyExists(_)
            | Error::Corrupt(_)
            | Error::NoDatabase { .. }
            | Error::Random(_)
            | Error::SecretNotDelivered(..)
            | Error::Output(_) => false,
        }
    }

    /// Whether the error is only that the reader of stdout went away (`wfctl list | head`),
    /// which is no failure worth reporting.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(Error::Invalid("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(Error::NotFound("x".into()).exit_code(), EXIT_FAILED);
        let unavailable = ports::Error::unavailable("sqlite", "locked");
        let e = Error::from(unavailable);
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);
        assert!(e.is_retryable());
        let e = Error::from(ports::Error::AlreadyExists("tenant acme".into()));
        assert_eq!(e.to_string(), "tenant acme already exists");
        assert_eq!(e.exit_code(), EXIT_FAILED);
        assert!(!e.is_retryable());
        let e = Error::NoDatabase {
            path: "/nope.sqlite".into(),
        };
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);
        assert!(e.to_string().contains("/nope.sqlite"));
        let pipe = Error::Output(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(pipe.is_broken_pipe());
    }
}
