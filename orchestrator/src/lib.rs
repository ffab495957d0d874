//! The runtime of the orchestrator: the `Queue`, `Store` and `Journal` ports ([`ports`]) and
//! their adapters ([`sqlite`]; with the `aws` feature, on by default, SQS and DynamoDB in
//! `aws`), ports put together ([`stack`]), the engine and sweeper ([`engine`]), the GitLab
//! ingress ([`ingress`]), the activities a worker runs ([`cloud`]), configuration
//! ([`config`]), telemetry, the demo of `orchestrator dev` ([`dev`]), and the `orchestrator`
//! binary. `wfctl` is a crate of its own on this library.

#[cfg(feature = "aws")]
pub mod allocations;
#[cfg(feature = "aws")]
pub mod aws;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod describe;
pub mod dev;
pub mod engine;
pub mod ingress;
pub mod ports;
pub mod requests;
pub mod sqlite;
pub mod stack;
pub mod telemetry;
pub mod tenants;
