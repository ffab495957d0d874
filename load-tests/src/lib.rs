//! Load generators for the orchestrator, driving it through its public interfaces and printing
//! figures: `ingress-load` (webhooks over HTTP to the GitLab ingress) and `deploy-time` (push to
//! live with the simulated cloud's latencies). The `loadgen` scenarios
//! and invariant checks come with the load-test issue.
