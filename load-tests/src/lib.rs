//! Load generators for the orchestrator, driving it through its public interfaces and printing
//! figures: `ingress-load` (webhooks over HTTP to the GitLab ingress). The `loadgen` scenarios
//! and invariant checks come with the load-test issue.
