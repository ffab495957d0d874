//! Documents that must not decode do not, with the error naming the version or the field, and
//! the committed schemas reject them too.

use crate::common::{current_version, fixture, read_json, round_trip, schema_errors, validator};
use serde_json::{Value, json};
use state_schemas::{HISTORY_ENTRY, QUEUE_ENVELOPE, TENANT_RECORD, WORKFLOW_RECORD};
use workflows::codec::Error;

/// A current fixture of `stem`, as JSON.
fn base(stem: &str, name: &str) -> Value {
    read_json(&fixture(stem, current_version(stem), name))
}

/// Decodes `doc` as the type of `stem`; it must fail.
fn decode_error(stem: &str, doc: &Value) -> Error {
    let bytes = serde_json::to_vec(doc).expect("prints");
    match round_trip(stem, &bytes) {
        Ok(_) => panic!("{stem} decoded although it must not: {doc:#}"),
        Err(e) => e,
    }
}

/// Validates `doc` against the committed schema of `stem`; it must fail, and some error must
/// be at `instance_path` (a JSON pointer).
fn assert_schema_rejects(stem: &str, doc: &Value, instance_path: &str) {
    let errors = schema_errors(&validator(stem, current_version(stem)), doc);
    assert!(!errors.is_empty(), "the {stem} schema accepts {doc:#}");
    let at = format!("at {instance_path:?}:");
    assert!(
        errors.iter().any(|e| e.starts_with(&at)),
        "no schema error {at} among {errors:#?}"
    );
}

/// Asserts that `error` is `Invalid` for `kind` at `path`, with a message containing `says`.
fn assert_invalid(error: &Error, kind: &str, path: &str, says: &str) {
    match error {
        Error::Invalid {
            kind: k,
            path: p,
            message,
        } => {
            assert_eq!((*k, p.as_str()), (kind, path), "{error}");
            assert!(message.contains(says), "{message:?} does not say {says:?}");
        }
        other => panic!("expected Invalid at {path}, got {other:?}"),
    }
}

#[test]
fn a_newer_schema_version_is_named_for_every_shape() {
    for (stem, name, kind) in [
        (QUEUE_ENVELOPE, "push", "queue envelope"),
        (WORKFLOW_RECORD, "live", "workflow record"),
        (HISTORY_ENTRY, "accepted-push", "history entry"),
        (TENANT_RECORD, "token-only", "tenant record"),
    ] {
        let supported = current_version(stem);
        let newer = u64::from(supported) + 1;
        let mut doc = base(stem, name);
        doc["schema_version"] = json!(newer);
        let error = decode_error(stem, &doc);
        assert_eq!(
            error,
            Error::NewerVersion {
                kind,
                found: newer,
                supported
            },
            "{stem}"
        );
        let text = error.to_string();
        assert!(text.contains(&format!("schema_version {newer}")), "{text}");
        assert!(text.contains("upgrade the workers"), "{text}");
        assert!(!error.is_retryable());
        assert_schema_rejects(stem, &doc, "/schema_version");
    }
}

#[test]
fn a_version_older_than_any_this_code_reads_is_named() {
    for (stem, name) in [(WORKFLOW_RECORD, "live"), (TENANT_RECORD, "token-only")] {
        let mut doc = base(stem, name);
        doc["schema_version"] = json!(0);
        assert!(
            matches!(
                decode_error(stem, &doc),
                Error::UnsupportedVersion { found: 0, .. }
            ),
            "{stem}"
        );
    }
}

#[test]
fn a_newer_version_is_reported_even_when_its_fields_do_not_decode() {
    let mut doc = base(WORKFLOW_RECORD, "live");
    let newer = u64::from(current_version(WORKFLOW_RECORD)) + 1;
    doc["schema_version"] = json!(newer);
    doc["machine"]["state"] = json!("sleeping");
    doc.as_object_mut().expect("object").remove("key");
    assert!(matches!(
        decode_error(WORKFLOW_RECORD, &doc),
        Error::NewerVersion { found, .. } if found == newer
    ));
}

#[test]
fn an_unknown_state_is_invalid_at_its_path() {
    let mut doc = base(WORKFLOW_RECORD, "live");
    doc["machine"]["state"] = json!("sleeping");
    let error = decode_error(WORKFLOW_RECORD, &doc);
    assert_invalid(
        &error,
        "workflow record",
        "machine.state",
        "unknown variant `sleeping`",
    );
    assert!(error.to_string().contains("machine.state"), "{error}");
    assert_schema_rejects(WORKFLOW_RECORD, &doc, "/machine/state");
}

#[test]
fn an_unknown_step_status_is_invalid_at_its_path() {
    let mut doc = base(WORKFLOW_RECORD, "failed");
    doc["machine"]["shared_storage"]["run"]["steps"][4]["status"] = json!("exploded");
    assert_invalid(
        &decode_error(WORKFLOW_RECORD, &doc),
        "workflow record",
        "machine.shared_storage.run.steps[4].status",
        "unknown variant `exploded`",
    );
    assert_schema_rejects(
        WORKFLOW_RECORD,
        &doc,
        "/machine/shared_storage/run/steps/4/status",
    );
}

#[test]
fn an_unknown_signal_is_invalid_at_its_path() {
    let mut doc = base(QUEUE_ENVELOPE, "signal");
    doc["body"]["event"]["signal"]["signal"] = json!("pause");
    assert_invalid(
        &decode_error(QUEUE_ENVELOPE, &doc),
        "queue envelope",
        "body.event.signal.signal",
        "unknown variant `pause`",
    );
    assert_schema_rejects(QUEUE_ENVELOPE, &doc, "/body/event/signal/signal");
}

#[test]
fn an_unknown_verdict_is_invalid_at_its_path() {
    let mut doc = base(HISTORY_ENTRY, "refused-signal");
    doc["verdict"]["kind"] = json!("postponed");
    assert_invalid(
        &decode_error(HISTORY_ENTRY, &doc),
        "history entry",
        "verdict.kind",
        "unknown variant `postponed`",
    );
    assert_schema_rejects(HISTORY_ENTRY, &doc, "/verdict/kind");
}

#[test]
fn a_missing_field_is_invalid_at_the_object_that_lacks_it() {
    // serde names the missing field in the message and the object that lacks it in the path.
    let mut doc = base(QUEUE_ENVELOPE, "push");
    doc.as_object_mut().expect("object").remove("sent_at");
    assert_invalid(
        &decode_error(QUEUE_ENVELOPE, &doc),
        "queue envelope",
        ".",
        "missing field `sent_at`",
    );
    assert_schema_rejects(QUEUE_ENVELOPE, &doc, "");

    let mut doc = base(WORKFLOW_RECORD, "failed");
    doc["machine"]["shared_storage"]["run"]["steps"][2]
        .as_object_mut()
        .expect("object")
        .remove("status");
    assert_invalid(
        &decode_error(WORKFLOW_RECORD, &doc),
        "workflow record",
        "machine.shared_storage.run.steps[2]",
        "missing field `status`",
    );
    assert_schema_rejects(WORKFLOW_RECORD, &doc, "/machine/shared_storage/run/steps/2");

    let mut doc = base(TENANT_RECORD, "rotated-token-signed");
    doc["webhook"]
        .as_object_mut()
        .expect("object")
        .remove("token_sha256");
    assert_invalid(
        &decode_error(TENANT_RECORD, &doc),
        "tenant record",
        "webhook",
        "missing field `token_sha256`",
    );
    assert_schema_rejects(TENANT_RECORD, &doc, "/webhook");
}

#[test]
fn a_broken_identifier_is_invalid_at_its_path() {
    let mut doc = base(HISTORY_ENTRY, "accepted-push");
    doc["key"] = json!("acme-shop#qa");
    assert_invalid(
        &decode_error(HISTORY_ENTRY, &doc),
        "history entry",
        "key",
        "invalid environment \"qa\"",
    );
    assert_schema_rejects(HISTORY_ENTRY, &doc, "/key");

    let mut doc = base(QUEUE_ENVELOPE, "push");
    doc["body"]["event"]["push"]["sha"] = json!("0b0450f");
    assert_invalid(
        &decode_error(QUEUE_ENVELOPE, &doc),
        "queue envelope",
        "body.event.push.sha",
        "40 or 64 hexadecimal digits",
    );
    assert_schema_rejects(QUEUE_ENVELOPE, &doc, "/body/event/push/sha");
}

#[test]
fn a_wrongly_typed_field_is_invalid_at_its_path() {
    let mut doc = base(TENANT_RECORD, "token-only");
    doc["infra_project"] = json!("39071");
    assert_invalid(
        &decode_error(TENANT_RECORD, &doc),
        "tenant record",
        "infra_project",
        "invalid type",
    );
    assert_schema_rejects(TENANT_RECORD, &doc, "/infra_project");

    let mut doc = base(WORKFLOW_RECORD, "unprovisioned");
    doc["created_at"] = json!("yesterday");
    assert_invalid(
        &decode_error(WORKFLOW_RECORD, &doc),
        "workflow record",
        "created_at",
        "year",
    );
    assert_schema_rejects(WORKFLOW_RECORD, &doc, "/created_at");
}

#[test]
fn bytes_that_are_not_json_are_invalid() {
    for stem in crate::common::STEMS {
        let error = round_trip(stem, b"{\"schema_version\": 1,").expect_err("truncated");
        // serde_path_to_error says "?" where the position is unknown (here: past the last key).
        assert!(
            matches!(&error, Error::Invalid { path, message, .. }
                if (path == "?" || path == ".") && message.contains("EOF")),
            "{error:?}"
        );
        let error = round_trip(stem, b"[]").expect_err("an array");
        assert!(
            matches!(&error, Error::Invalid { path, .. } if path == "."),
            "{error:?}"
        );
    }
}

#[test]
fn an_unknown_field_is_invalid_rather_than_silently_dropped() {
    // A field this code does not know would be lost when the record is written back, so it is
    // refused: a new field means a new schema_version.
    let mut doc = base(WORKFLOW_RECORD, "live");
    doc["machine"]["shared_storage"]["resources"]["load_balancer"] = json!("alb-1");
    let error = decode_error(WORKFLOW_RECORD, &doc);
    assert_invalid(
        &error,
        "workflow record",
        "machine.shared_storage.resources.load_balancer",
        "unknown field `load_balancer`",
    );
    assert_schema_rejects(WORKFLOW_RECORD, &doc, "/machine/shared_storage/resources");
}
