//! The command-line tools' shared parts: errors with exit codes, opening the backend from the
//! configuration (the embedded file, or the AWS tables), output (tables, JSON, colour), JSON
//! views, and the implementation of `wfctl`'s commands over any [`Store`](crate::ports::Store).
//!
//! Exit codes ([`Error::exit_code`]): `0` success, `1` the operation failed (not found, already
//! exists, corrupt data), `2` usage or configuration error (clap uses `2` for its own), `3`
//! the backend cannot be reached.

pub mod dlq;
pub mod output;
pub mod signal;
pub mod slots;
pub mod tenant;
pub mod views;
pub mod workflow;

use std::path::{Path, PathBuf};

use workflows::State;

use crate::config::Config;
use crate::ports;
use crate::sqlite::SqliteBackend;

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
    Config(#[from] crate::config::Error),
    /// What was asked for does not exist; the message lists what does.
    #[error("{0}")]
    NotFound(String),
    /// An operator's signal does not apply in the workflow's state; the message says why.
    #[error("{0}")]
    Refused(String),
    /// A signal was sent but no worker applied it in time.
    #[error("{0}")]
    TimedOut(String),
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
            ports::Error::Corrupt { .. } => Error::Corrupt(e.to_string()),
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

/// Where the backend is: the configuration file and an override of the database path. Both
/// binaries take these flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackendArgs {
    /// Configuration file (TOML); settings can also come from ORCHESTRATOR__SECTION__KEY
    /// environment variables.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = crate::config::CONFIG_ENV,
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    /// The SQLite database file; overrides `embedded.path` of the configuration.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        help_heading = "Global options"
    )]
    pub db: Option<PathBuf>,
}

impl BackendArgs {
    /// The configuration: the file (if any) with the environment's overrides, and `--db`.
    pub fn config(&self) -> Result<Config, Error> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(db) = &self.db {
            config.embedded.path.clone_from(db);
        }
        Ok(config)
    }

    /// Opens the backend. With `create`, a missing database file is created; without, it is
    /// [`Error::NoDatabase`] (a reading command must not leave an empty file behind a typo).
    pub fn open(&self, create: bool) -> Result<SqliteBackend, Error> {
        let config = self.config()?;
        open_backend(&config, create)
    }
}

/// Opens the embedded backend of `config`; see [`BackendArgs::open`].
pub fn open_backend(config: &Config, create: bool) -> Result<SqliteBackend, Error> {
    let path = config.embedded.path.clone();
    if !create && !path.exists() {
        return Err(Error::NoDatabase { path });
    }
    SqliteBackend::open(config.sqlite()).map_err(|e| Error::Unreachable {
        reason: open_reason(&path, e),
        path,
    })
}

/// Connects to the workflow, history, tenant and allocation tables of the AWS backend of
/// `config` (standard AWS environment and profiles, `[aws] prefix`). Only the store: the
/// commands that read need read access to the tables and nothing else.
pub async fn connect_aws_store(config: &Config) -> Result<crate::aws::dynamo::DynamoStore, Error> {
    let sdk = crate::aws::load_sdk_config().await;
    let names = crate::aws::Names::new(&config.aws.prefix);
    crate::aws::dynamo::DynamoStore::connect(&sdk, &names, &crate::aws::RequestCounter::new())
        .await
        .map_err(|e| Error::AwsUnreachable {
            prefix: config.aws.prefix.clone(),
            reason: e.to_string(),
        })
}

/// Connects to the queues of the AWS backend of `config`, for the commands that send signals
/// (they need `sqs:GetQueueUrl`, `sqs:GetQueueAttributes` and `sqs:SendMessage`).
pub async fn connect_aws_queue(config: &Config) -> Result<crate::aws::sqs::SqsQueue, Error> {
    let sdk = crate::aws::load_sdk_config().await;
    let names = crate::aws::Names::new(&config.aws.prefix);
    crate::aws::sqs::SqsQueue::connect(&sdk, &names, &crate::aws::RequestCounter::new())
        .await
        .map_err(|e| Error::AwsUnreachable {
            prefix: config.aws.prefix.clone(),
            reason: e.to_string(),
        })
}

/// The reason of an open failure without repeating the path the message already names.
fn open_reason(path: &Path, e: ports::Error) -> String {
    match e {
        ports::Error::Unavailable { message, .. } => {
            let prefix = format!("cannot open {}: ", path.display());
            message
                .strip_prefix(&prefix)
                .map(str::to_owned)
                .unwrap_or(message)
        }
        other => other.to_string(),
    }
}

/// Parses a workflow state by its snake_case name, naming the valid ones otherwise.
pub fn parse_state(s: &str) -> Result<State, String> {
    State::ALL
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = State::ALL.iter().map(|st| st.as_str()).collect();
            format!("unknown state {s:?}; states: {}", names.join(", "))
        })
}

/// `items` joined with ", ", at most `max` of them and a count of the rest.
pub fn list_some<I, T>(items: I, max: usize) -> String
where
    I: IntoIterator<Item = T>,
    T: std::fmt::Display,
{
    let all: Vec<String> = items.into_iter().map(|t| t.to_string()).collect();
    if all.len() <= max {
        all.join(", ")
    } else {
        format!("{} and {} more", all[..max].join(", "), all.len() - max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(Error::Invalid("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(Error::NotFound("x".into()).exit_code(), EXIT_FAILED);
        let unavailable = ports::Error::Unavailable {
            backend: "sqlite",
            message: "locked".into(),
        };
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

    #[test]
    fn states_parse_by_name() {
        assert_eq!(
            parse_state("awaiting_approval"),
            Ok(State::AwaitingApproval)
        );
        let e = parse_state("stuck").expect_err("unknown");
        assert!(e.contains("live") && e.contains("\"stuck\""), "{e}");
    }

    #[test]
    fn long_lists_are_cut() {
        assert_eq!(list_some(["a", "b"], 3), "a, b");
        assert_eq!(list_some(["a", "b", "c", "d"], 2), "a, b and 2 more");
    }

    #[test]
    fn a_missing_database_is_not_created_by_readers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.sqlite");
        let args = BackendArgs {
            config: None,
            db: Some(path.clone()),
        };
        let e = args.open(false).expect_err("missing");
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);
        assert!(!path.exists());
        let garbage = dir.path().join("garbage.sqlite");
        std::fs::write(&garbage, b"this is not a database, not even close to one").expect("write");
        let args = BackendArgs {
            config: None,
            db: Some(garbage.clone()),
        };
        let e = args.open(false).expect_err("garbage");
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);
        let text = e.to_string();
        assert!(
            text.contains("garbage.sqlite") && text.contains("not a database"),
            "{text}"
        );
    }
}
