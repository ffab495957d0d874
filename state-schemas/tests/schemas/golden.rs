//! The committed schemas are what the code generates, and every committed fixture validates
//! against the committed schema of its shape and version and decodes and re-encodes unchanged.
//!
//! These tests only read `schemas/` and `fixtures/`; they never write them.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{
    STEMS, crate_dir, current_version, fixture_versions, fixtures, read, read_json, round_trip,
    schema_errors, schema_path, validator,
};
use serde_json::Value;
use state_schemas::{HISTORY_ENTRY, QUEUE_ENVELOPE, WORKFLOW_RECORD, schema_files};
use workflows::{WorkflowRecord, decode};

const REGENERATE: &str = "run `cargo run -p state-schemas --bin write-schemas` and commit the result \
     (and if a persisted shape changed: bump its schema_version, add fixtures and a migration test, \
     see state-schemas/README.md)";

fn relative(path: &Path) -> String {
    path.strip_prefix(crate_dir())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn committed_schemas_match_the_code() {
    let files = schema_files();
    assert_eq!(files.len(), STEMS.len());
    let mut stale = Vec::new();
    for file in files {
        let path = crate_dir().join("schemas").join(&file.file_name);
        assert_eq!(path, schema_path(file.stem, file.schema_version));
        match std::fs::read_to_string(&path) {
            Err(e) => stale.push(format!("{} cannot be read ({e})", relative(&path))),
            Ok(committed) if committed == file.contents => {}
            Ok(committed) => {
                let same_value = serde_json::from_str::<Value>(&committed).ok()
                    == serde_json::from_str::<Value>(&file.contents).ok();
                stale.push(if same_value {
                    format!("{} differs in formatting only", relative(&path))
                } else {
                    format!("{} differs from the generated schema", relative(&path))
                });
            }
        }
    }
    assert!(
        stale.is_empty(),
        "committed schemas are stale:\n  {}\n{REGENERATE}",
        stale.join("\n  ")
    );
}

#[test]
fn committed_schemas_are_draft_2020_12_schemas() {
    let dir = crate_dir().join("schemas");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("schemas/ exists") {
        let path = entry.expect("directory entry").path();
        let schema = read_json(&path);
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema",
            "{}",
            relative(&path)
        );
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!(
                "{} is not a valid draft 2020-12 schema: {e}",
                relative(&path)
            );
        }
        assert!(
            schema["title"].is_string(),
            "{} has a title",
            relative(&path)
        );
        seen += 1;
    }
    assert!(seen >= STEMS.len());
}

#[test]
fn every_shape_has_fixtures_of_its_current_version() {
    for stem in STEMS {
        let version = current_version(stem);
        let found = fixtures(stem, version);
        assert!(
            found.len() >= 2,
            "fixtures/v{version}/{stem}/ holds {} fixture(s); every shape needs several",
            found.len()
        );
    }
}

#[test]
fn every_fixture_validates_against_the_committed_schema_of_its_version() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for version in fixture_versions() {
        for stem in STEMS {
            let paths = fixtures(stem, version);
            if paths.is_empty() {
                continue;
            }
            let validator = validator(stem, version);
            for path in paths {
                checked += 1;
                let errors = schema_errors(&validator, &read_json(&path));
                if !errors.is_empty() {
                    failures.push(format!(
                        "{}:\n    {}",
                        relative(&path),
                        errors.join("\n    ")
                    ));
                }
            }
        }
    }
    assert!(checked >= 8, "only {checked} fixtures found");
    assert!(
        failures.is_empty(),
        "fixtures that do not validate:\n  {}",
        failures.join("\n  ")
    );
}

/// Appends to `out` where (as JSON pointers) `expected` and `actual` differ.
fn differ(at: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let keys: BTreeSet<&String> = e.keys().chain(a.keys()).collect();
            for key in keys {
                let here = format!("{at}/{key}");
                match (e.get(key), a.get(key)) {
                    (Some(e), Some(a)) => differ(&here, e, a, out),
                    (Some(e), None) => out.push(format!("{here}: {e} is dropped")),
                    (None, Some(a)) => out.push(format!("{here}: {a} is added")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                differ(&format!("{at}/{i}"), e, a, out);
            }
        }
        (e, a) if e != a => out.push(format!("{at}: {e} becomes {a}")),
        _ => {}
    }
}

#[test]
fn every_current_fixture_round_trips_through_its_rust_type() {
    // Fixtures of older versions are not read by this code directly: their migration tests
    // cover them.
    let mut failures = Vec::new();
    for stem in STEMS {
        for path in fixtures(stem, current_version(stem)) {
            let expected = read_json(&path);
            match round_trip(stem, &read(&path)) {
                Err(e) => failures.push(format!("{} does not decode: {e}", relative(&path))),
                Ok(actual) if actual == expected => {}
                Ok(actual) => {
                    let mut differences = Vec::new();
                    differ("", &expected, &actual, &mut differences);
                    failures.push(format!(
                        "{} re-encodes differently:\n    {}",
                        relative(&path),
                        differences.join("\n    ")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decoded_records_are_in_the_state_they_say() {
    for path in fixtures(WORKFLOW_RECORD, current_version(WORKFLOW_RECORD)) {
        let record: WorkflowRecord = decode(&read(&path)).expect("decodes");
        let said = read_json(&path)["machine"]["state"].clone();
        assert_eq!(
            Value::from(record.state().as_str()),
            said,
            "{}",
            relative(&path)
        );
    }
}

/// The set of `pointer`'s values over the current fixtures of `stem`, or of the key of the
/// single-key object found there (an externally tagged enum's variant).
fn variants(stem: &str, pointer: &str, tag: bool) -> BTreeSet<String> {
    fixtures(stem, current_version(stem))
        .iter()
        .filter_map(|path| {
            let value = read_json(path).pointer(pointer).cloned()?;
            if tag {
                value.as_object()?.keys().next().cloned()
            } else {
                value.as_str().map(str::to_owned)
            }
        })
        .collect()
}

#[test]
fn fixtures_cover_the_interesting_cases() {
    let states = variants(WORKFLOW_RECORD, "/machine/state", false);
    for state in [
        "unprovisioned",
        "preparing",
        "failed",
        "live",
        "decommissioned",
    ] {
        assert!(
            states.contains(state),
            "no workflow record in {state}: {states:?}"
        );
    }
    let events = variants(QUEUE_ENVELOPE, "/body/event", true);
    for event in ["push", "signal", "timer"] {
        assert!(
            events.contains(event),
            "no envelope with a {event} event: {events:?}"
        );
    }
    assert!(
        !variants(QUEUE_ENVELOPE, "/body/step", true).is_empty(),
        "no envelope with a step task"
    );
    let verdicts = variants(HISTORY_ENTRY, "/verdict/kind", false);
    for verdict in ["accepted", "refused", "ignored"] {
        assert!(
            verdicts.contains(verdict),
            "no {verdict} history entry: {verdicts:?}"
        );
    }
}
