//! The workspace's binaries, for tests of one crate that run another crate's binary (the
//! `wfctl` tests run `orchestrator` workers). Cargo only builds a package's own binaries for
//! its tests; `cargo test --workspace` (the README's test command) builds them all.

use std::path::PathBuf;

/// The binary `name` in the target directory the running test was built in.
pub fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // Test binaries live in `target/<profile>/deps`, binaries in `target/<profile>`.
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it (cargo build -p {name}) or run cargo test --workspace",
        path.display()
    );
    path
}
