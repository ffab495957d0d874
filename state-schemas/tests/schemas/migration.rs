//! Documents of older schema versions that this code still reads: every committed fixture of
//! such a version decodes, comes out at the current version with nothing lost, and validates
//! against the current schema.
//!
//! Version 1 to 2 (queue envelope, workflow record, history entry): a push may carry `before`
//! and a workflow keeps each repository's lineage (`heads`); (tenant record): each environment's
//! config vars (`config`). All are optional, so a version 1 document is the version 2 document
//! with the same fields.
//!
//! Version 2 to 3: the `rollback` signal, `provision`'s `from_snapshot`, a rollout task's `keep`
//! and a database task's `restore_database`, a workflow's kept `releases` and a run's `keep`
//! and `restore_database`; (tenant record): each environment's settings (`environments`). All
//! are optional again, so an older document is the version 3 document with the same fields.

use serde_json::{Value, json};
use state_schemas::{HISTORY_ENTRY, QUEUE_ENVELOPE, TENANT_RECORD, WORKFLOW_RECORD};
use workflows::{
    Event, GitSha, Input, Push, RepoKind, Settings, State, Timestamp, Verdict, WorkflowRecord,
    decode,
};

use crate::common::{
    current_version, fixture, fixtures, read, read_json, round_trip, schema_errors, validator,
};

#[test]
fn older_documents_decode_as_the_current_version_with_nothing_lost() {
    let mut checked = [0; 2];
    for stem in [
        QUEUE_ENVELOPE,
        WORKFLOW_RECORD,
        HISTORY_ENTRY,
        TENANT_RECORD,
    ] {
        assert_eq!(
            current_version(stem),
            3,
            "{stem}: add the migration of the new version"
        );
        let current = validator(stem, 3);
        for (i, version) in [1, 2].into_iter().enumerate() {
            for path in fixtures(stem, version) {
                let mut expected = read_json(&path);
                let migrated = round_trip(stem, &read(&path))
                    .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
                expected["schema_version"] = json!(3);
                assert_eq!(migrated, expected, "{}", path.display());
                let errors = schema_errors(&current, &migrated);
                assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
                checked[i] += 1;
            }
        }
    }
    assert!(checked[0] >= 17, "only {} version 1 fixtures", checked[0]);
    assert!(checked[1] >= 17, "only {} version 2 fixtures", checked[1]);
}

#[test]
fn a_migrated_record_keeps_no_releases_until_its_next_deployment() {
    let path = fixture(WORKFLOW_RECORD, 2, "live");
    let record: WorkflowRecord = decode(&read(&path)).expect("a version 2 record decodes");
    assert_eq!(record.schema_version, 3);
    let w = record.workflow();
    assert!(w.deployed.is_some() && w.releases.is_empty());
    assert!(
        w.rollback_target(None)
            .expect_err("nothing kept")
            .starts_with("no earlier release is kept"),
    );
}

fn sha(n: u32) -> GitSha {
    GitSha::new(format!("{n:040x}")).expect("40 hex digits")
}

#[test]
fn a_migrated_record_starts_its_lineage_with_the_next_push() {
    let path = fixture(WORKFLOW_RECORD, 1, "live");
    let mut record: WorkflowRecord = decode(&read(&path)).expect("a version 1 record decodes");
    assert_eq!(record.schema_version, 3);
    assert!(
        record.workflow().heads.is_empty(),
        "version 1 kept no lineage"
    );
    let live_app = record.workflow().desired.app.clone();
    let input = |ms| Input {
        now: Timestamp::from_unix_millis(ms),
        settings: Settings::default(),
    };
    let push = |id: &str, before: u32, after: u32| {
        Event::Push(Push {
            event_id: workflows::EventId::new(id).expect("id"),
            repo: RepoKind::App,
            sha: sha(after),
            before: Some(sha(before)),
            git_ref: "refs/heads/main".into(),
            author: "jdoe".into(),
            message: String::new(),
            received_at: Timestamp::from_unix_millis(1_900_000_000_000),
        })
    };
    let applied = record.apply(&push("after-upgrade", 7, 8), input(1_900_000_000_000));
    assert_eq!(applied.verdict, Verdict::Accepted);
    assert_ne!(record.workflow().desired.app, live_app);
    assert!(record.workflow().heads.get(RepoKind::App).is_some());
    // From there on, a late resend of the push before it is recognised.
    let state = record.state();
    let applied = record.apply(&push("late", 6, 7), input(1_900_000_001_000));
    assert!(
        matches!(&applied.verdict, Verdict::Ignored(r) if r.contains("late or replayed")),
        "{:?}",
        applied.verdict
    );
    assert_eq!(record.state(), state);
    assert_ne!(state, State::Live, "the accepted push started a run");
    let _: Value = serde_json::from_slice(&workflows::encode(&record)).expect("encodes");
}
