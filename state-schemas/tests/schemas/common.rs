//! Helpers shared by the integration tests: where the committed files are, how to read them,
//! and which Rust type each shape's stem stands for.

use std::fs;
use std::path::{Path, PathBuf};

use jsonschema::Validator;
use serde_json::Value;
use state_schemas::{HISTORY_ENTRY, QUEUE_ENVELOPE, TENANT_RECORD, WORKFLOW_RECORD};
use workflows::codec::Error;
use workflows::{Envelope, HistoryEntry, Persisted, Tenant, WorkflowRecord, decode, encode};

/// Every shape's stem.
pub(crate) const STEMS: [&str; 4] = [
    QUEUE_ENVELOPE,
    WORKFLOW_RECORD,
    HISTORY_ENTRY,
    TENANT_RECORD,
];

/// The crate's directory, where `schemas/` and `fixtures/` are.
pub(crate) fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The bytes of a committed file.
pub(crate) fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A committed file as JSON.
pub(crate) fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&read(path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The committed schema file of `stem` at `version`.
pub(crate) fn schema_path(stem: &str, version: u32) -> PathBuf {
    crate_dir()
        .join("schemas")
        .join(format!("{stem}.v{version}.schema.json"))
}

/// A draft 2020-12 validator for the committed schema of `stem` at `version`, asserting
/// formats (`date-time`) too.
pub(crate) fn validator(stem: &str, version: u32) -> Validator {
    let path = schema_path(stem, version);
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&read_json(&path))
        .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", path.display()))
}

/// Why `instance` is not valid under `validator`, one line per error, each starting with
/// `at "<instance pointer>":`; empty when it is valid. The errors come from a full evaluation,
/// so that an error inside an `anyOf` (an optional field) is reported where it is, not only
/// at the `anyOf`.
pub(crate) fn schema_errors(validator: &Validator, instance: &Value) -> Vec<String> {
    if validator.is_valid(instance) {
        return Vec::new();
    }
    validator
        .evaluate(instance)
        .iter_errors()
        .map(|e| format!("at {:?}: {}", e.instance_location.as_str(), e.error))
        .collect()
}

/// The version directories under `fixtures/` (`v1`, ...), as numbers, ascending.
pub(crate) fn fixture_versions() -> Vec<u32> {
    let dir = crate_dir().join("fixtures");
    let mut versions: Vec<u32> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").file_name())
        .map(|name| {
            let name = name.to_string_lossy().into_owned();
            name.strip_prefix('v')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("fixtures/{name} is not a version directory (v<N>)"))
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// The fixtures of `stem` at `version`, sorted by path; none when the directory is missing.
pub(crate) fn fixtures(stem: &str, version: u32) -> Vec<PathBuf> {
    let dir = crate_dir()
        .join("fixtures")
        .join(format!("v{version}"))
        .join(stem);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .inspect(|path| {
            assert!(
                path.extension().is_some_and(|e| e == "json"),
                "{} is not a .json fixture",
                path.display()
            );
        })
        .collect();
    paths.sort();
    paths
}

/// The committed fixture `fixtures/v<version>/<stem>/<name>.json`.
pub(crate) fn fixture(stem: &str, version: u32, name: &str) -> PathBuf {
    crate_dir()
        .join("fixtures")
        .join(format!("v{version}"))
        .join(stem)
        .join(format!("{name}.json"))
}

/// The schema version this code writes for `stem`.
pub(crate) fn current_version(stem: &str) -> u32 {
    match stem {
        QUEUE_ENVELOPE => Envelope::SCHEMA_VERSION,
        WORKFLOW_RECORD => WorkflowRecord::SCHEMA_VERSION,
        HISTORY_ENTRY => HistoryEntry::SCHEMA_VERSION,
        TENANT_RECORD => Tenant::SCHEMA_VERSION,
        other => panic!("unknown stem {other}"),
    }
}

fn through<T: Persisted>(bytes: &[u8]) -> Result<Value, Error> {
    let value: T = decode(bytes)?;
    Ok(serde_json::from_slice(&encode(&value)).expect("encode gives JSON"))
}

/// Decodes `bytes` as the Rust type of `stem` and encodes it again, as JSON.
pub(crate) fn round_trip(stem: &str, bytes: &[u8]) -> Result<Value, Error> {
    match stem {
        QUEUE_ENVELOPE => through::<Envelope>(bytes),
        WORKFLOW_RECORD => through::<WorkflowRecord>(bytes),
        HISTORY_ENTRY => through::<HistoryEntry>(bytes),
        TENANT_RECORD => through::<Tenant>(bytes),
        other => panic!("unknown stem {other}"),
    }
}
