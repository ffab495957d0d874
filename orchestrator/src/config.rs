//! Configuration of the `orchestrator` and `wfctl` binaries: a TOML file, then environment
//! variables, then command-line flags, each overriding the one before.
//!
//! Every setting has a default, so no file is needed. The file is `--config PATH` or
//! `$ORCHESTRATOR_CONFIG`. Any setting can also come from an environment variable named
//! `ORCHESTRATOR__<SECTION>__<KEY>` (double underscores), for example
//! `ORCHESTRATOR__ENGINE__CONCURRENCY=16` or `ORCHESTRATOR__EMBEDDED__PATH=/var/lib/o.sqlite`;
//! its value is read as a TOML value when it is one (numbers, booleans) and as a string
//! otherwise. Durations are written as `"250ms"`, `"30s"`, `"15m"`.
//!
//! ```toml
//! backend = "embedded"            # or "aws": SQS and DynamoDB
//! activities = "simulated"        # or "aws": the AWS reconcilers on [infrastructure]
//!
//! [aws]                           # region, endpoint and credentials: the standard AWS
//! prefix = "orchestrator"         # environment and profiles (AWS_REGION, AWS_ENDPOINT_URL, ...)
//! max_receives = 10               # the queues' maxReceiveCount, set by `orchestrator init`
//!
//! [embedded]
//! path = "orchestrator.sqlite"    # the SQLite file holding queues, records and the simulated cloud
//! max_receives = 10               # receives before a message is dead-lettered
//!
//! [engine]
//! concurrency = 64                # messages handled at once
//! batch = 32                      # messages per receive
//! visibility = "60s"              # visibility timeout of received messages
//! wait = "1s"                     # long-poll wait of a receive
//! heartbeat = "20s"               # how often a long handler extends visibility; default a
//!                                 # third of `visibility`, and it must be shorter than it
//! shutdown_grace = "10s"          # on SIGTERM/SIGINT, time for in-flight handlers
//! cache_records = 4096            # decoded records kept in memory
//! slot_ttl = "10m"                # lease of a slot under [limits], renewed by every invocation
//! slot_poll = "60s"               # how often a step waiting for a slot asks again (a slot
//!                                 # coming free wakes it at once); shorter than slot_ttl
//!
//! [limits]                        # account-wide caps on concurrent activities per step kind
//! image = 20                      # (network, source_infra, source_app, image, database,
//! database = 40                   # routing, rollout); none by default
//!
//! [sweeper]
//! interval = "60s"                # how often it looks for stuck workflows
//! deadline = "15m"                # idle time after which a workflow with outstanding steps is re-armed
//!
//! [ingress]
//! listen = "127.0.0.1:8080"       # where POST /hooks/gitlab is served
//! max_body_bytes = 1048576        # larger bodies at /hooks/gitlab get 413
//! tenant_max_body_bytes = 26214400 # ... at /hooks/gitlab/{tenant}, read after the token matched
//! tenant_ttl = "5s"               # how long a tenant found by project id or URL is cached
//! pushes_per_second = 10.0        # accepted pushes of one tenant, sustained (more: 429)
//! push_burst = 200                # ... and in a burst
//! auth_failures_per_second = 1.0  # failed authentications from one address (more: 429)
//! auth_failure_burst = 30
//! # client_address_header = "X-Forwarded-For"   # behind a proxy: its last address is the client
//! header_timeout = "10s"          # to send a request's headers (else the connection is closed)
//! body_timeout = "30s"            # to send its body (else 408)
//! request_timeout = "60s"         # for the whole request (else 503)
//! max_connections = 4096          # open at once; more wait in the listen backlog
//!
//! [simulated]                     # the simulated cloud; see `activities::simulated::SimConfig`
//! time_scale = 60.0
//!
//! [infrastructure]                # what they build on; `orchestrator init --sandbox` prints one
//! vpc_id = "vpc-..."
//! subnet_ids = ["subnet-...", "subnet-..."]
//! listener_arn = "arn:aws:elasticloadbalancing:..."
//! alb_security_group_id = "sg-..."
//! artifact_bucket = "..."
//! base_image_id = "ami-..."
//! db_subnet_group = "..."
//! source_url = "https://gitlab.example.com/{tenant}/{repo}.git"
//! # kms_key_id, deploy_token_secret, instance_type, builder_instance_type, db_instance_class,
//! # db_allocated_storage_gib, group_size, min_size, max_size, scaling, app_port,
//! # health_check_path, builder_timeout_secs,
//! # rollout_timeout_secs, recheck_secs, source_timeout_secs, source_max_mib: see `activities::infrastructure::Infrastructure`
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::engine::{EngineConfig, SweepConfig};
use crate::ingress::IngressConfig;
use crate::sqlite::SqliteConfig;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "ORCHESTRATOR_CONFIG";

/// The prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "ORCHESTRATOR__";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file or an environment variable holds something that is not a valid setting.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Error {
    /// A configuration does not fix itself.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Which backend holds queues and records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// One SQLite file.
    #[default]
    Embedded,
    /// SQS and DynamoDB.
    Aws,
}

/// Which activities run the steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivitiesKind {
    /// The simulated cloud, in the embedded file.
    #[default]
    Simulated,
    /// The AWS reconcilers, on `[infrastructure]`.
    Aws,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which backend.
    pub backend: Backend,
    /// Which activities.
    pub activities: ActivitiesKind,
    /// The shared AWS infrastructure the AWS activities build on.
    pub infrastructure: activities::infrastructure::Infrastructure,
    /// The embedded backend.
    pub embedded: Embedded,
    /// The AWS backend.
    pub aws: Aws,
    /// The engine.
    pub engine: Engine,
    /// The sweeper.
    pub sweeper: Sweeper,
    /// The GitLab webhook ingress.
    pub ingress: Ingress,
    /// Caps on concurrent activities per step kind, across all workers.
    pub limits: std::collections::BTreeMap<workflows::StepKind, u32>,
    /// The simulated cloud, as written (the binary interprets it).
    pub simulated: toml::Table,
}

/// `[embedded]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Embedded {
    /// The SQLite file.
    pub path: PathBuf,
    /// Receives before a message is dead-lettered.
    pub max_receives: u32,
}

impl Default for Embedded {
    fn default() -> Self {
        Self {
            path: PathBuf::from("orchestrator.sqlite"),
            max_receives: 10,
        }
    }
}

/// `[aws]`. Everything else AWS comes from the standard AWS environment and profiles.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Aws {
    /// Prefix of the queue and table names (`<prefix>-events.fifo`, `<prefix>-workflows`, ...).
    pub prefix: String,
    /// The queues' `maxReceiveCount`, set by `orchestrator init`.
    pub max_receives: u32,
}

impl Default for Aws {
    fn default() -> Self {
        Self {
            prefix: "orchestrator".to_owned(),
            max_receives: 10,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Engine {
    /// Messages handled at once.
    pub concurrency: usize,
    /// Messages per receive.
    pub batch: usize,
    /// Visibility timeout.
    #[serde(deserialize_with = "duration")]
    pub visibility: Duration,
    /// Long-poll wait.
    #[serde(deserialize_with = "duration")]
    pub wait: Duration,
    /// Visibility extension interval; `None` means a third of `visibility`.
    #[serde(deserialize_with = "some_duration")]
    pub heartbeat: Option<Duration>,
    /// Shutdown grace period.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Records cached.
    pub cache_records: usize,
    /// Slot lease lifetime.
    #[serde(deserialize_with = "duration")]
    pub slot_ttl: Duration,
    /// How often a waiting step asks again for a slot.
    #[serde(deserialize_with = "duration")]
    pub slot_poll: Duration,
}

impl Default for Engine {
    fn default() -> Self {
        let d = EngineConfig::default();
        Self {
            concurrency: d.concurrency,
            batch: d.batch,
            visibility: d.visibility,
            wait: d.wait,
            heartbeat: None,
            shutdown_grace: d.shutdown_grace,
            cache_records: d.cache_records,
            slot_ttl: d.slot_ttl,
            slot_poll: d.slot_poll,
        }
    }
}

/// `[sweeper]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sweeper {
    /// How often it looks.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Idle time before re-arming.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
}

impl Default for Sweeper {
    fn default() -> Self {
        let d = SweepConfig::default();
        Self {
            interval: d.interval,
            deadline: d.deadline,
        }
    }
}

/// `[ingress]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingress {
    /// Where to listen.
    pub listen: String,
    /// Largest body accepted at `/hooks/gitlab`.
    pub max_body_bytes: usize,
    /// Largest body accepted at `/hooks/gitlab/{tenant}` (read after the headers authenticated).
    pub tenant_max_body_bytes: usize,
    /// Tenant cache lifetime.
    #[serde(deserialize_with = "duration")]
    pub tenant_ttl: Duration,
    /// Accepted pushes per second of one tenant, sustained.
    pub pushes_per_second: f64,
    /// Accepted pushes of one tenant in a burst.
    pub push_burst: u32,
    /// Failed authentications per second from one address, sustained.
    pub auth_failures_per_second: f64,
    /// Failed authentications from one address in a burst.
    pub auth_failure_burst: u32,
    /// The header with the client's address behind a proxy (`X-Forwarded-For`).
    pub client_address_header: Option<String>,
    /// Time allowed for a request's headers.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time allowed for a request's body.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Time allowed for a whole request.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Ingress {
    fn default() -> Self {
        let d = IngressConfig::default();
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: d.max_body_bytes,
            tenant_max_body_bytes: d.tenant_max_body_bytes,
            tenant_ttl: d.tenant_ttl,
            pushes_per_second: d.push_rate.per_second,
            push_burst: d.push_rate.burst,
            auth_failures_per_second: d.auth_failure_rate.per_second,
            auth_failure_burst: d.auth_failure_rate.burst,
            client_address_header: d.client_address_header,
            header_timeout: d.header_timeout,
            body_timeout: d.body_timeout,
            request_timeout: d.request_timeout,
            max_connections: d.max_connections,
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration ({e})")))
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl Config {
    /// Loads the file at `path` (or `$ORCHESTRATOR_CONFIG`, or none) and applies the
    /// environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let env_path = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let text = match &path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.clone(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_parts(&text, std::env::vars())
    }

    /// The configuration from TOML `text` and `(name, value)` environment variables.
    pub fn from_parts(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Invalid(e.to_string()))?;
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            set(&mut table, &parts, parse_value(&value))
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        }
        let config: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Rejects settings that parse but cannot work together.
    fn check(&self) -> Result<(), Error> {
        let e = &self.engine;
        if e.visibility.is_zero() {
            return Err(Error::Invalid(
                "engine.visibility must be longer than zero".to_owned(),
            ));
        }
        if let Some(h) = e.heartbeat
            && (h.is_zero() || h >= e.visibility)
        {
            // A handler whose heartbeat comes after its visibility timeout is redelivered
            // while it runs, and each redelivery counts towards the dead-letter queue.
            return Err(Error::Invalid(format!(
                "engine.heartbeat ({}) must be shorter than engine.visibility ({}) and longer than zero",
                humantime::format_duration(h),
                humantime::format_duration(e.visibility)
            )));
        }
        if let Some((kind, _)) = self.limits.iter().find(|(_, cap)| **cap == 0) {
            return Err(Error::Invalid(format!(
                "limits.{kind} must be at least 1 (leave it out for no limit)"
            )));
        }
        if !self.limits.is_empty() && e.slot_ttl <= e.slot_poll {
            // A waiter that asks again only after its place in line lapsed loses it.
            return Err(Error::Invalid(format!(
                "engine.slot_ttl ({}) must be longer than engine.slot_poll ({})",
                humantime::format_duration(e.slot_ttl),
                humantime::format_duration(e.slot_poll)
            )));
        }
        Ok(())
    }

    /// The embedded backend's settings.
    pub fn sqlite(&self) -> SqliteConfig {
        let mut c = SqliteConfig::new(&self.embedded.path);
        c.max_receives = self.embedded.max_receives;
        c
    }

    /// The engine's settings.
    pub fn engine(&self) -> EngineConfig {
        let e = &self.engine;
        EngineConfig {
            concurrency: e.concurrency.max(1),
            batch: e.batch.max(1),
            visibility: e.visibility,
            wait: e.wait,
            heartbeat: e.heartbeat.unwrap_or(e.visibility / 3),
            shutdown_grace: e.shutdown_grace,
            cache_records: e.cache_records,
            limits: self.limits.clone(),
            slot_ttl: e.slot_ttl,
            slot_poll: e.slot_poll,
            ..EngineConfig::default()
        }
    }

    /// The ingress's settings.
    pub fn ingress(&self) -> IngressConfig {
        let i = &self.ingress;
        IngressConfig {
            max_body_bytes: i.max_body_bytes,
            tenant_max_body_bytes: i.tenant_max_body_bytes,
            tenant_ttl: i.tenant_ttl,
            push_rate: crate::ingress::Rate {
                per_second: i.pushes_per_second,
                burst: i.push_burst,
            },
            auth_failure_rate: crate::ingress::Rate {
                per_second: i.auth_failures_per_second,
                burst: i.auth_failure_burst,
            },
            client_address_header: i.client_address_header.clone(),
            header_timeout: i.header_timeout,
            body_timeout: i.body_timeout,
            request_timeout: i.request_timeout,
            max_connections: i.max_connections,
        }
    }

    /// The sweeper's settings.
    pub fn sweeper(&self) -> SweepConfig {
        SweepConfig {
            interval: self.sweeper.interval,
            deadline: self.sweeper.deadline,
        }
    }
}

fn parse_value(text: &str) -> toml::Value {
    // A bare TOML value ("16", "true", "1.5") keeps its type; anything else is a string.
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty setting name".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set(t, rest, value),
                _ => Err(format!("{first} is not a section")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_parts("", []).expect("defaults");
        assert_eq!(c.backend, Backend::Embedded);
        assert_eq!(c.embedded.path, PathBuf::from("orchestrator.sqlite"));
        assert_eq!(c.engine().concurrency, 64);
        assert_eq!(c.sweeper().deadline, Duration::from_secs(900));
    }

    #[test]
    fn the_file_then_the_environment() {
        let text = r#"
            [embedded]
            path = "/tmp/a.sqlite"
            [engine]
            concurrency = 8
            visibility = "2m"
        "#;
        let env = [
            (
                "ORCHESTRATOR__ENGINE__CONCURRENCY".to_owned(),
                "16".to_owned(),
            ),
            (
                "ORCHESTRATOR__SWEEPER__DEADLINE".to_owned(),
                "5m".to_owned(),
            ),
            (
                "ORCHESTRATOR__SIMULATED__TIME_SCALE".to_owned(),
                "600.0".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::from_parts(text, env).expect("valid");
        assert_eq!(c.engine().concurrency, 16, "the environment wins");
        assert_eq!(c.engine().visibility, Duration::from_secs(120));
        assert_eq!(c.sweeper().deadline, Duration::from_secs(300));
        assert_eq!(c.embedded.path, PathBuf::from("/tmp/a.sqlite"));
        assert_eq!(
            c.simulated
                .get("time_scale")
                .and_then(toml::Value::as_float),
            Some(600.0)
        );
    }

    #[test]
    fn limits_per_step_kind() {
        let c = Config::from_parts(
            "[limits]\nimage = 20\n",
            [("ORCHESTRATOR__LIMITS__DATABASE".to_owned(), "40".to_owned())],
        )
        .expect("valid");
        let limits = c.engine().limits;
        assert_eq!(limits.get(&workflows::StepKind::Image), Some(&20));
        assert_eq!(limits.get(&workflows::StepKind::Database), Some(&40));
        assert_eq!(limits.len(), 2);
        let e = Config::from_parts("[limits]\nimages = 20\n", []).expect_err("no such step");
        assert!(e.to_string().contains("images"), "{e}");
        let e = Config::from_parts("[limits]\nimage = 0\n", []).expect_err("zero");
        assert!(e.to_string().contains("limits.image"), "{e}");
        let e = Config::from_parts(
            "[engine]\nslot_ttl = \"30s\"\nslot_poll = \"1m\"\n[limits]\nimage = 2\n",
            [],
        )
        .expect_err("a place in line lapses between polls");
        assert!(e.to_string().contains("engine.slot_ttl"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let e = Config::from_parts("[engine]\nconcurency = 3\n", []).expect_err("typo");
        assert!(e.to_string().contains("concurency"), "{e}");
        let e = Config::from_parts("[engine]\nwait = \"soon\"\n", []).expect_err("bad duration");
        assert!(e.to_string().contains("soon"), "{e}");
        let env = [("ORCHESTRATOR__ENGINE__BATCH".to_owned(), "lots".to_owned())];
        assert!(Config::from_parts("", env).is_err());
    }

    #[test]
    fn the_heartbeat_follows_the_visibility_and_must_be_shorter() {
        let c = Config::from_parts("[engine]\nvisibility = \"3s\"\n", []).expect("valid");
        assert_eq!(c.engine().heartbeat, Duration::from_secs(1));
        let c = Config::from_parts("[engine]\nvisibility = \"3s\"\nheartbeat = \"2s\"\n", [])
            .expect("valid");
        assert_eq!(c.engine().heartbeat, Duration::from_secs(2));
        let e = Config::from_parts("[engine]\nvisibility = \"2s\"\nheartbeat = \"20s\"\n", [])
            .expect_err("a heartbeat after the timeout");
        assert!(e.to_string().contains("engine.heartbeat (20s)"), "{e}");
        let e = Config::from_parts("[engine]\nvisibility = \"0s\"\n", []).expect_err("zero");
        assert!(e.to_string().contains("engine.visibility"), "{e}");
    }
}
