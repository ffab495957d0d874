//! The runtime of the orchestrator: the `Queue` and `Store` ports and their adapters (SQLite,
//! SQS, DynamoDB), the engine, the GitLab ingress, configuration and telemetry, and the
//! `orchestrator` and `wfctl` binaries.
//!
//! Not built yet: the engine issue adds the ports, the SQLite adapters, the engine and the
//! first binaries. Until then this crate holds nothing.
