//! The runtime of the orchestrator: the `Queue`, `Store` and `Journal` ports and their
//! adapters (SQLite; SQS and DynamoDB), the engine, configuration, and the
//! `orchestrator` and `wfctl` binaries.

pub mod allocations;
pub mod aws;
pub mod cli;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod engine;
pub mod ingress;
pub mod ports;
pub mod requests;
pub mod sqlite;
pub mod telemetry;
pub mod tenants;
