//! Opening the backend from the configuration: the embedded file, or (feature `aws`) the AWS
//! tables and queues.

use std::path::PathBuf;

use orchestrator::config::Config;
use orchestrator::ports;
use orchestrator::sqlite::SqliteBackend;

use crate::Error;

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
        env = orchestrator::config::CONFIG_ENV,
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
        reason: open_reason(&e),
        path,
    })
}

#[cfg(feature = "aws")]
/// Connects to the workflow, history, tenant and allocation tables of the AWS backend of
/// `config` (standard AWS environment and profiles, `[aws] prefix`). Only the store: the
/// commands that read need read access to the tables and nothing else.
pub async fn connect_aws_store(
    config: &Config,
) -> Result<orchestrator::aws::dynamo::DynamoStore, Error> {
    let sdk = orchestrator::aws::load_sdk_config().await;
    let names = orchestrator::aws::Names::new(&config.aws.prefix);
    orchestrator::aws::dynamo::DynamoStore::connect(
        &sdk,
        &names,
        &orchestrator::aws::RequestCounter::new(),
    )
    .await
    .map_err(|e| Error::AwsUnreachable {
        prefix: config.aws.prefix.clone(),
        reason: ports::chain(&e),
    })
}

#[cfg(feature = "aws")]
/// Connects to the queues of the AWS backend of `config`, for the commands that send signals
/// (they need `sqs:GetQueueUrl`, `sqs:GetQueueAttributes` and `sqs:SendMessage`).
pub async fn connect_aws_queue(config: &Config) -> Result<orchestrator::aws::sqs::SqsQueue, Error> {
    let sdk = orchestrator::aws::load_sdk_config().await;
    let names = orchestrator::aws::Names::new(&config.aws.prefix);
    orchestrator::aws::sqs::SqsQueue::connect(
        &sdk,
        &names,
        &orchestrator::aws::RequestCounter::new(),
    )
    .await
    .map_err(|e| Error::AwsUnreachable {
        prefix: config.aws.prefix.clone(),
        reason: ports::chain(&e),
    })
}

/// The reason of an open failure: the database's own error, since the message names the path.
fn open_reason(e: &ports::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => ports::chain(cause),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EXIT_UNAVAILABLE;

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
