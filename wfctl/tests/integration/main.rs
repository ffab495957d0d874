//! The integration tests of `wfctl`, one test binary with a module per area: its commands on
//! the embedded file (`commands`), on DynamoDB and SQS (`aws`), signals applied by an
//! `orchestrator worker` (`signals`), dead letters handled beside a running engine
//! (`redrive`), and the documented flows end to end (`flows`: `orchestrator dev` then
//! `wfctl show`; GitLab payloads over HTTP to live on AWS), and a tenant's runtime on AWS
//! through config, failing scripts, retention, rollback and scaling (`runtime`). They run the workspace's
//! `orchestrator` binary, which `cargo test --workspace` builds.

mod aws;
mod commands;
mod e2e;
mod flows;
mod redrive;
mod runtime;
mod signals;
