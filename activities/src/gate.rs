//! Write gates: connections of one process to one SQLite file take turns writing through a
//! mutex, instead of meeting on SQLite's lock.
//!
//! When a write transaction finds the file locked, SQLite's busy handler sleeps and tries again
//! in steps of milliseconds; under load that sleeping, not the work, sets the pace. The
//! orchestrator's writer and the simulated cloud write to the same file, so each takes the
//! file's gate around its write transaction and the one waiting is woken as soon as the other
//! commits. Other processes sharing the file are still kept apart by SQLite's own lock and
//! busy timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

type Gates = Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>;

fn gates() -> &'static Gates {
    static GATES: OnceLock<Gates> = OnceLock::new();
    GATES.get_or_init(Default::default)
}

/// The gate of the SQLite file at `path` (the same gate for every spelling of the path once
/// the file exists).
pub fn write_gate(path: &Path) -> Arc<Mutex<()>> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    gates()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_default()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_one_gate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.sqlite");
        std::fs::write(&path, b"").expect("create");
        let a = write_gate(&path);
        let b = write_gate(&dir.path().join(".").join("g.sqlite"));
        assert!(Arc::ptr_eq(&a, &b));
        let other = write_gate(&dir.path().join("h.sqlite"));
        assert!(!Arc::ptr_eq(&a, &other));
    }
}
