//! The side effects of the orchestrator: one idempotent reconciler per activity kind
//! (network, source, image, database, routing, rollout, decommission), behind traits, with
//! AWS implementations and a simulated cloud.
//!
//! Not built yet: the engine issue adds the reconciler traits and the simulated cloud, the AWS
//! activities issue the AWS implementations. Until then this crate holds nothing.
