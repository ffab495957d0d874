//! The load generator and invariant checker (`loadgen`) that drives the whole system through
//! its public interfaces and prints a report.
//!
//! Not built yet: the load-test issue builds it. Until then this crate holds nothing.
