//! `wfctl`, the operators' tool, as a library: the implementation of its commands over any
//! [`Store`](orchestrator::ports::Store) and [`Queue`](orchestrator::ports::Queue)
//! ([`tenant`], [`workflow`], [`signal`], [`slots`], [`dlq`]), their JSON shapes ([`views`]),
//! tables, colours and JSON output ([`output`]), opening the configured backend ([`backend`]),
//! and errors with exit codes ([`error`]). The binary (`src/main.rs`) parses the command line
//! and calls them.
//!
//! Exit codes ([`Error::exit_code`]): `0` success, `1` the operation failed (not found, already
//! exists, corrupt data), `2` usage or configuration error (clap uses `2` for its own), `3`
//! the backend cannot be reached.

pub mod backend;
pub mod config;
pub mod dlq;
pub mod error;
pub mod help;
pub mod logs;
pub mod output;
pub mod signal;
pub mod slots;
pub mod tenant;
pub mod views;
pub mod workflow;

use workflows::State;

pub use backend::{BackendArgs, open_backend};
#[cfg(feature = "aws")]
pub use backend::{connect_aws_queue, connect_aws_store};
pub use error::{EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Error};

/// Parses a workflow state by its snake_case name, naming the valid ones otherwise.
pub fn parse_state(s: &str) -> Result<State, String> {
    State::ALL
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = State::ALL.iter().map(|st| st.as_str()).collect();
            format!("unknown state {s:?}; states: {}", names.join(", "))
        })
}

/// `items` joined with ", ", at most `max` of them and a count of the rest.
pub fn list_some<I, T>(items: I, max: usize) -> String
where
    I: IntoIterator<Item = T>,
    T: std::fmt::Display,
{
    let all: Vec<String> = items.into_iter().map(|t| t.to_string()).collect();
    if all.len() <= max {
        all.join(", ")
    } else {
        format!("{} and {} more", all[..max].join(", "), all.len() - max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_by_name() {
        assert_eq!(
            parse_state("awaiting_approval"),
            Ok(State::AwaitingApproval)
        );
        let e = parse_state("stuck").expect_err("unknown");
        assert!(e.contains("live") && e.contains("\"stuck\""), "{e}");
    }

    #[test]
    fn long_lists_are_cut() {
        assert_eq!(list_some(["a", "b"], 3), "a, b");
        assert_eq!(list_some(["a", "b", "c", "d"], 2), "a, b and 2 more");
    }
}
