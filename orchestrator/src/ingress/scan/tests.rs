//! The scanner against serde_json: the same answers on real payloads and on random documents
//! cut into random chunks, errors that name the field, and memory bounded by what is kept.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::ingress::gitlab::cut;

/// What serde_json makes of `body`, cut as the scanner cuts: the reference.
fn reference(body: &[u8]) -> Result<Payload, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    // serde also reads a struct from an array of its fields; a webhook body never has one.
    let arrays = [&value, &value["project"]]
        .into_iter()
        .chain(value["commits"].as_array().into_iter().flatten())
        .any(Value::is_array);
    if arrays {
        return Err("an array where an object belongs".into());
    }
    let mut p: Payload = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let ids = [&p.object_kind, &p.git_ref, &p.before, &p.after];
    let too_long = ids
        .iter()
        .filter_map(|s| s.as_ref())
        .chain(p.commits.iter().map(|c| &c.id))
        .any(|s| s.len() > MAX_ID_BYTES);
    if too_long {
        return Err("an identifier is too long".into());
    }
    for name in [&mut p.user_username, &mut p.user_name] {
        *name = name.as_deref().map(cut);
    }
    for c in &mut p.commits {
        c.title = c.title.as_deref().map(cut);
        c.message = c
            .message
            .as_deref()
            .map(|m| cut(m.lines().next().unwrap_or_default()));
    }
    let extra = p.commits.len().saturating_sub(MAX_COMMITS_KEPT);
    p.commits.drain(..extra);
    Ok(p)
}

/// The scanner's answer for `body` fed in pieces ending at `cuts`.
fn scanned(body: &[u8], cuts: &[usize]) -> Result<Payload, String> {
    let mut scanner = Scanner::new();
    let mut at = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    ends.sort_unstable();
    ends.push(body.len());
    for end in ends {
        if end > at {
            scanner.feed(&body[at..end])?;
            at = end;
        }
    }
    scanner.finish()
}

fn docs_push() -> &'static [u8] {
    include_bytes!("../../../tests/data/gitlab/gitlab-docs_push.json")
}

#[test]
fn real_payloads_scan_as_serde_reads_them_in_any_chunks() {
    for body in [
        docs_push(),
        include_bytes!("../../../tests/data/gitlab/drone-go-scm_push.json"),
    ] {
        let expected = reference(body).expect("the reference reads it");
        assert_eq!(scanned(body, &[]), Ok(expected.clone()));
        for split in 0..body.len() {
            assert_eq!(
                scanned(body, &[split]),
                Ok(expected.clone()),
                "split at {split}"
            );
        }
        let bytewise: Vec<usize> = (0..body.len()).collect();
        assert_eq!(scanned(body, &bytewise), Ok(expected));
    }
}

#[test]
fn escapes_decode_as_serde_decodes_them() {
    let body = br#"{"user_name": "J\u00e9r\u00f4me \ud83d\ude00 \"q\" \\ \/ \b\f\n\r\t",
        "commits": [{"id": "x", "message": "first\r\nsecond"}]}"#;
    let p = Payload::parse(body).expect("scans");
    assert_eq!(Ok(p.clone()), reference(body));
    assert_eq!(
        p.user_name.as_deref(),
        Some("Jérôme 😀 \"q\" \\ / \u{8}\u{c}\n\r\t")
    );
    assert_eq!(p.commits[0].message.as_deref(), Some("first"));
}

#[test]
fn wrong_types_and_duplicates_are_named_by_path() {
    for (body, says) in [
        (
            r#"{"project_id": "fifteen"}"#,
            "at project_id: invalid type: a string",
        ),
        (
            r#"{"project": {"id": true}}"#,
            "at project.id: invalid type: a boolean",
        ),
        (
            r#"{"commits": "many"}"#,
            "at commits: invalid type: a string, expected an array",
        ),
        (
            r#"{"commits": [{"id": "a"}, 5]}"#,
            "at commits[1]: invalid type: a number",
        ),
        (
            r#"{"commits": [{}, {"title": 1}]}"#,
            "at commits[1].title: invalid type",
        ),
        (
            r#"{"commits": [{"id": null}]}"#,
            "at commits[0].id: invalid type: null",
        ),
        (
            r#"{"after": "a", "after": "b"}"#,
            "at after: duplicate field",
        ),
        (
            r#"{"project": null, "project": {}}"#,
            "at project: duplicate field",
        ),
        (
            r#"{"total_commits_count": 1.5}"#,
            "at total_commits_count: 1.5 is not",
        ),
        (r#"{"project_id": 18446744073709551616}"#, "at project_id"),
        (
            r#"{"ref_protected": "yes"}"#,
            "at ref_protected: invalid type: a string",
        ),
        (r#"[1, 2]"#, "is an array, not an object"),
    ] {
        let e = Payload::parse(body.as_bytes()).expect_err(body);
        assert!(e.contains(says), "{body}: {e}");
        assert!(
            reference(body.as_bytes()).is_err(),
            "serde agrees about {body}"
        );
    }
}

#[test]
fn malformed_documents_are_refused_with_a_position() {
    for body in [
        &b"{not json"[..],
        b"{\"a\": 1,}",
        b"{\"a\": [1,]}",
        b"{\"a\": 01}",
        b"{\"a\": -}",
        b"{\"a\": 1.}",
        b"{\"a\": tru}",
        b"{\"a\": \"\\x\"}",
        b"{\"a\": \"\\ud800\"}",
        b"{\"a\": \"\\udc00\"}",
        b"{\"a\": \"\x01\"}",
        b"{\"a\": \"\xff\"}",
        b"{\"a\": \"\xed\xa0\x80\"}",
        b"{\"a\": 1} x",
        b"{\"a\": 1]",
        b"{\"a\" 1}",
        b"{\"a\": 1",
        b"",
    ] {
        let e = Payload::parse(body).expect_err(&String::from_utf8_lossy(body));
        assert!(e.starts_with("malformed JSON"), "{e}");
        assert!(
            serde_json::from_slice::<Value>(body).is_err(),
            "serde agrees"
        );
    }
    let deep = format!("{{\"a\": {}{}}}", "[".repeat(200), "]".repeat(200));
    let e = Payload::parse(deep.as_bytes()).expect_err("too deep");
    assert!(e.contains("nesting deeper than 128"), "{e}");
}

#[test]
fn long_identifiers_are_refused_and_free_text_is_cut() {
    let body = json!({"ref": "r".repeat(MAX_ID_BYTES + 1)}).to_string();
    let e = Payload::parse(body.as_bytes()).expect_err("too long");
    assert!(e.contains("at ref: longer than 1024 bytes"), "{e}");
    let body = json!({
        "user_username": "é".repeat(1000),
        "commits": [{"id": "a", "title": "t".repeat(5000), "message": "m".repeat(5000)}],
    })
    .to_string();
    let p = Payload::parse(body.as_bytes()).expect("scans");
    assert_eq!(
        p.user_username.map(|u| u.chars().count()),
        Some(MAX_TEXT_CHARS)
    );
    assert_eq!(
        p.commits[0].title.as_ref().map(String::len),
        Some(MAX_TEXT_CHARS)
    );
    assert_eq!(
        p.commits[0].message.as_ref().map(String::len),
        Some(MAX_TEXT_CHARS)
    );
}

/// Feeds a push of about 24 MiB in 64 KiB chunks, as a large body arrives: 100,000 changed
/// files, 30 commits and a 4 MB commit message.
#[test]
fn memory_is_bounded_by_what_is_kept_not_by_the_body() {
    let files: Vec<String> = (0..100_000)
        .map(|i| format!("src/module_{i}/file_{i}.rs"))
        .collect();
    let commits: Vec<Value> = (0..30)
        .map(|i| {
            json!({
                "id": format!("{i:040x}"),
                "title": format!("commit {i}"),
                "message": "x".repeat(if i == 29 { 4_000_000 } else { 100 }),
                "added": files,
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({
        "object_kind": "push",
        "project_id": 15,
        "ref": "refs/heads/main",
        "after": format!("{:040x}", 29),
        "commits": commits,
    }))
    .expect("json");
    assert!(body.len() > 20 * 1024 * 1024, "{} bytes", body.len());
    let mut scanner = Scanner::new();
    let mut most = 0;
    for chunk in body.chunks(64 * 1024) {
        scanner.feed(chunk).expect("scans");
        most = most.max(scanner.retained());
    }
    assert!(most < 32 * 1024, "held {most} bytes at most");
    let p = scanner.finish().expect("a document");
    assert_eq!(p.commits.len(), MAX_COMMITS_KEPT, "the newest 20");
    assert_eq!(
        p.commits.last().map(|c| c.id.clone()),
        Some(format!("{:040x}", 29))
    );
    assert_eq!(p.head_title(), "commit 29");
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/_.-]{0,12}",
        2 => any::<String>(),
        1 => "[\\x00-\\x1f\"\\\\é😀\\r\\n]{0,8}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        text().prop_map(Value::from),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for a field that is mostly of the right kind.
fn field(right: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![6 => right, 1 => Just(Value::Null), 1 => any_json()].boxed()
}

fn commit() -> impl Strategy<Value = Value> {
    (
        field(text().prop_map(Value::from).boxed()),
        field(text().prop_map(Value::from).boxed()),
        field(text().prop_map(Value::from).boxed()),
        any_json(),
    )
        .prop_map(|(id, title, message, other)| {
            json!({"id": id, "title": title, "message": message, "added": other})
        })
}

fn document() -> impl Strategy<Value = Value> {
    let id = || field(text().prop_map(Value::from).boxed());
    let number = || field(any::<u64>().prop_map(Value::from).boxed());
    (
        (id(), number(), id(), id(), id(), id(), id()),
        (
            field(
                prop::collection::vec(commit(), 0..25)
                    .prop_map(Value::Array)
                    .boxed(),
            ),
            field(number().prop_map(|n| json!({"id": n, "name": "p"})).boxed()),
            number(),
            field(any::<bool>().prop_map(Value::from).boxed()),
            any_json(),
            prop::collection::vec(any::<bool>(), 11),
        ),
    )
        .prop_map(
            |(
                (kind, pid, r, before, after, uu, un),
                (commits, project, total, protected, other, keep),
            )| {
                let mut doc = serde_json::Map::new();
                let fields = [
                    ("object_kind", kind),
                    ("project_id", pid),
                    ("ref", r),
                    ("before", before),
                    ("after", after),
                    ("user_username", uu),
                    ("user_name", un),
                    ("commits", commits),
                    ("project", project),
                    ("total_commits_count", total),
                    ("ref_protected", protected),
                ];
                for ((name, value), kept) in fields.into_iter().zip(keep) {
                    if kept {
                        doc.insert(name.into(), value);
                    }
                }
                doc.insert("repository".into(), other);
                Value::Object(doc)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_documents_in_random_chunks_scan_as_serde_reads_them(
        doc in document(),
        pretty in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let body = if pretty {
            serde_json::to_vec_pretty(&doc)
        } else {
            serde_json::to_vec(&doc)
        }.expect("json");
        let expected = reference(&body);
        let got = scanned(&body, &cuts);
        prop_assert_eq!(got.is_ok(), expected.is_ok(), "{:?} vs {:?}", got, expected);
        if let (Ok(got), Ok(expected)) = (got, expected) {
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn damaged_documents_are_refused_exactly_when_serde_refuses_them(
        doc in document(),
        at in any::<usize>(),
        byte in any::<u8>(),
        truncate in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut body = serde_json::to_vec(&doc).expect("json");
        let at = at % body.len();
        if truncate {
            body.truncate(at);
        } else {
            body[at] = byte;
        }
        let expected = reference(&body);
        // serde_json refuses a number beyond f64's range; JSON's grammar has no range, and
        // the scanner reads such a number where it reads no field.
        prop_assume!(!matches!(&expected, Err(e) if e.contains("number out of range")));
        let got = scanned(&body, &cuts);
        prop_assert_eq!(got.is_ok(), expected.is_ok(), "{:?} vs {:?} for {:?}", got, expected, String::from_utf8_lossy(&body));
        if let (Ok(got), Ok(expected)) = (got, expected) {
            prop_assert_eq!(got, expected);
        }
    }
}
