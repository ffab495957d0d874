//! GitLab push payloads: what the ingress reads of them, and what it makes of them.
//!
//! Only the fields the workflow needs are read; everything else in the payload is ignored, so
//! GitLab adding fields changes nothing. Facts this relies on (GitLab's
//! `lib/gitlab/data_builder/push.rb` and webhook docs): `commits` holds at most the newest 20
//! commits, oldest first (`total_commits_count` is the real number), so the head commit is the
//! one whose id is `after`, else the last one; `after` is 40 zeros when a branch is deleted
//! (and `checkout_sha` is null); authors without a public email appear as `[REDACTED]`, which
//! does not matter here because emails are not read.

use serde::Deserialize;

use super::scan::Scanner;

/// The fields of a webhook body the ingress reads; all optional so that a missing one is
/// reported by name rather than as a parse error. Made by the [`Scanner`], which cuts free
/// text to [`MAX_TEXT_CHARS`] characters (a message to its first line) and keeps the newest 20
/// commits; `Deserialize` is the reference the scanner is tested against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Payload {
    /// `push`, `tag_push`, `merge_request`, ...
    pub object_kind: Option<String>,
    /// Push hooks carry the project id here.
    pub project_id: Option<u64>,
    /// Other hooks carry it in `project.id`.
    pub project: Option<Project>,
    /// The pushed ref.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit the ref pointed to before.
    pub before: Option<String>,
    /// The commit the ref points to now.
    pub after: Option<String>,
    /// The pusher's user name.
    pub user_username: Option<String>,
    /// The pusher's display name.
    pub user_name: Option<String>,
    /// The newest commits (at most 20), oldest first.
    #[serde(default)]
    pub commits: Vec<Commit>,
    /// How many commits the push really had.
    pub total_commits_count: Option<u64>,
    /// Whether the ref is protected (newer GitLab versions only).
    pub ref_protected: Option<bool>,
}

/// `project` of a payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Project {
    /// The project id.
    pub id: Option<u64>,
}

/// One entry of `commits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Commit {
    /// The commit id.
    #[serde(default)]
    pub id: String,
    /// The first line of the message (newer GitLab versions only).
    pub title: Option<String>,
    /// The message (its first line, as the scanner keeps it).
    pub message: Option<String>,
}

/// The most characters kept of a free-text field of an event (the author, the commit title):
/// they are for people, and a 300 KB author name must not make the message too large for the
/// queue (which would be answered 503, and GitLab would resend it forever).
pub const MAX_TEXT_CHARS: usize = 200;

/// `text` cut to [`MAX_TEXT_CHARS`] characters.
pub(crate) fn cut(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

/// The all-zero commit id GitLab uses for "no commit".
pub const NO_COMMIT: &str = "0000000000000000000000000000000000000000";

impl Payload {
    /// Parses a whole webhook body. The error names the place in the document that is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut scanner = Scanner::new();
        scanner.feed(body)?;
        scanner.finish()
    }

    /// The project the hook is about.
    pub fn project_id(&self) -> Option<u64> {
        self.project_id.or(self.project.as_ref().and_then(|p| p.id))
    }

    /// The title of the head commit: the commit whose id is `after`, else the newest listed.
    /// Older GitLab versions send no `title`: then the message's first line.
    pub fn head_title(&self) -> String {
        let after = self.after.as_deref().unwrap_or_default();
        let head = self
            .commits
            .iter()
            .find(|c| c.id == after)
            .or_else(|| self.commits.last());
        let Some(head) = head else {
            return String::new();
        };
        let title = match (&head.title, &head.message) {
            (Some(t), _) if !t.is_empty() => t.as_str(),
            (_, Some(m)) => m.lines().next().unwrap_or_default(),
            _ => "",
        };
        cut(title)
    }

    /// Who pushed: the user name, else the display name (cut to [`MAX_TEXT_CHARS`]).
    pub fn author(&self) -> String {
        self.user_username
            .as_deref()
            .or(self.user_name.as_deref())
            .map_or_else(|| "unknown".to_owned(), cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_docs_push_yields_its_fields() {
        let body = include_bytes!("../../tests/data/gitlab/gitlab-docs_push.json");
        let p = Payload::parse(body).expect("parses");
        assert_eq!(p.object_kind.as_deref(), Some("push"));
        assert_eq!(p.project_id(), Some(15));
        assert_eq!(p.git_ref.as_deref(), Some("refs/heads/master"));
        assert_eq!(p.author(), "jsmith");
        assert_eq!(p.ref_protected, Some(true));
        assert!(!p.head_title().is_empty());
    }

    #[test]
    fn older_payloads_without_titles_use_the_message() {
        let body = include_bytes!("../../tests/data/gitlab/drone-go-scm_push.json");
        let p = Payload::parse(body).expect("parses");
        assert_eq!(p.ref_protected, None);
        let title = p.head_title();
        assert!(!title.is_empty() && !title.contains('\n'), "{title:?}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = Payload::parse(br#"{"project_id": "fifteen"}"#).expect_err("bad type");
        assert!(e.contains("project_id"), "{e}");
        let e = Payload::parse(b"{not json").expect_err("not json");
        assert!(e.starts_with("malformed JSON"), "{e}");
    }

    #[test]
    fn the_head_is_the_after_commit_or_the_newest() {
        let p = Payload {
            after: Some("b".repeat(40)),
            commits: vec![
                Commit {
                    id: "b".repeat(40),
                    title: Some("head".into()),
                    message: None,
                },
                Commit {
                    id: "c".repeat(40),
                    title: Some("other".into()),
                    message: None,
                },
            ],
            ..Payload::default()
        };
        assert_eq!(p.head_title(), "head");
        let p = Payload {
            after: Some("f".repeat(40)),
            ..p
        };
        assert_eq!(p.head_title(), "other", "truncated list: the newest listed");
    }
}
