//! JSON Schemas of everything the orchestrator persists or queues.
//!
//! The four shapes ([`Envelope`], [`WorkflowRecord`], [`HistoryEntry`], [`Tenant`]) are defined
//! in the `workflows` crate; this crate turns their `schemars` descriptions into JSON Schema
//! (draft 2020-12) documents, one file per shape and schema version, for people and tools that
//! read the tables and queues without the Rust code.
//!
//! The committed files live in `schemas/` and are written by
//! `cargo run -p state-schemas --bin write-schemas`; golden documents of every shape live in
//! `fixtures/v<version>/<stem>/`. The tests check that the committed schemas are what
//! [`schema_files`] generates now, and that every fixture validates against its schema and
//! decodes and re-encodes unchanged.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use workflows::{Envelope, HistoryEntry, Persisted, Tenant, WorkflowRecord};

/// One generated schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaFile {
    /// The shape's stem, for example `workflow-record`; also the name of its fixtures'
    /// directory under `fixtures/v<version>/`.
    pub stem: &'static str,
    /// What the shape is, as its decode errors name it ([`Persisted::KIND`]).
    pub kind: &'static str,
    /// The schema version the file describes ([`Persisted::SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The file name: `<stem>.v<version>.schema.json`.
    pub file_name: String,
    /// The schema, pretty-printed JSON with a trailing newline.
    pub contents: String,
}

/// The stem of the queue envelope's files ([`Envelope`]).
pub const QUEUE_ENVELOPE: &str = "queue-envelope";
/// The stem of the workflow record's files ([`WorkflowRecord`]).
pub const WORKFLOW_RECORD: &str = "workflow-record";
/// The stem of the history entry's files ([`HistoryEntry`]).
pub const HISTORY_ENTRY: &str = "history-entry";
/// The stem of the tenant record's files ([`Tenant`]).
pub const TENANT_RECORD: &str = "tenant-record";

/// The JSON Schema of `T` at the version this code writes: what schemars generates with its
/// draft 2020-12 settings, with `schema_version` pinned to [`Persisted::SCHEMA_VERSION`]
/// (`"const"`), so that a document of another version does not pass as this one.
pub fn schema_for<T: Persisted + JsonSchema>() -> serde_json::Value {
    let mut schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    if let Some(field) = schema
        .pointer_mut("/properties/schema_version")
        .and_then(serde_json::Value::as_object_mut)
    {
        field.insert("const".into(), T::SCHEMA_VERSION.into());
    }
    schema
}

/// The name of the schema file of `T` with stem `stem`: `<stem>.v<version>.schema.json`.
pub fn file_name<T: Persisted>(stem: &str) -> String {
    format!("{stem}.v{}.schema.json", T::SCHEMA_VERSION)
}

/// `value` with the keys of every object in sorted order. serde_json keeps insertion order when
/// any crate of the build enables its `preserve_order` feature (some AWS SDK crates do), so the
/// printed schema is made independent of which crates are built together.
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

fn schema_file<T: Persisted + JsonSchema>(stem: &'static str) -> SchemaFile {
    let mut contents = serde_json::to_string_pretty(&sorted(schema_for::<T>()))
        .unwrap_or_else(|e| unreachable!("a JSON value always prints: {e}"));
    contents.push('\n');
    SchemaFile {
        stem,
        kind: T::KIND,
        schema_version: T::SCHEMA_VERSION,
        file_name: file_name::<T>(stem),
        contents,
    }
}

/// The schema files of the four persisted and queued shapes, at the versions this code writes:
/// queue envelope, workflow record, history entry, tenant record.
pub fn schema_files() -> Vec<SchemaFile> {
    vec![
        schema_file::<Envelope>(QUEUE_ENVELOPE),
        schema_file::<WorkflowRecord>(WORKFLOW_RECORD),
        schema_file::<HistoryEntry>(HISTORY_ENTRY),
        schema_file::<Tenant>(TENANT_RECORD),
    ]
}
