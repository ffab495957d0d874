//! Load generators for the orchestrator, driving it through its public interfaces and printing
//! figures: `loadgen` (steady, storm and chaos scenarios with invariant checks and a report),
//! `ingress-load` (webhooks over HTTP to the GitLab ingress) and `deploy-time` (push to live
//! with the simulated cloud's latencies).

pub mod analysis;
pub mod report;
pub mod setup;
