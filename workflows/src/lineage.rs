//! Which commits a branch has moved past: what keeps a late resend of an older push from
//! rolling an environment back.
//!
//! A GitLab push says where the branch was (`before`) and where it is now (`after`). Pushes
//! can arrive late and out of order: GitLab resends a push whose delivery failed, and anyone
//! holding an old signed payload can replay it once its event id has left the record's
//! deduplication window. Each repository's [`Lineage`] keeps the head the workflow last took
//! and a bounded list of commits it knows were superseded on that branch (earlier heads, and
//! the `before` of pushes that skipped ahead). A push is stale when it starts from a
//! superseded commit, or when it points at one without starting from the current head.
//!
//! A push that starts from the current head is always new, even when it goes back to an older
//! commit (a force push): going back on purpose stays possible. A push without `before` (sent
//! by an operator tool rather than GitLab) is taken as sent. What cannot be recognised is a
//! resend of a push none of whose commits the workflow ever saw: when GitLab failed to deliver
//! two or more consecutive pushes and resends one of the middle ones after a newer push
//! arrived, it looks like a new push.

use std::collections::VecDeque;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{Push, RepoKind};
use crate::id::GitSha;

/// How many superseded commits a lineage remembers per repository. A late resend arrives
/// within hours, a few pushes later; a replay of something older than this many pushes
/// points at commits this workflow no longer tracks and is taken as new.
pub const LINEAGE_WINDOW: usize = 48;

/// The branch history one repository's pushes have shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The ref the pushes were to. A push to another ref (the branch mapping changed) starts
    /// a new lineage.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit of the newest push taken.
    pub head: GitSha,
    /// Commits the branch has moved past, oldest first (at most [`LINEAGE_WINDOW`]).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub superseded: VecDeque<GitSha>,
}

/// The lineage of each repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heads {
    /// The infrastructure repository's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra: Option<Lineage>,
    /// The application repository's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Lineage>,
}

/// Whether `sha` is the all-zero id GitLab sends as `before` when a push creates the branch.
fn is_zero(sha: &GitSha) -> bool {
    sha.as_str().bytes().all(|b| b == b'0')
}

impl Lineage {
    fn start(push: &Push) -> Self {
        let mut superseded = VecDeque::new();
        if let Some(before) = push
            .before
            .as_ref()
            .filter(|b| !is_zero(b) && **b != push.sha)
        {
            superseded.push_back(before.clone());
        }
        Self {
            git_ref: push.git_ref.clone(),
            head: push.sha.clone(),
            superseded,
        }
    }

    /// Why `push` is stale, or `None` when it is new (or the head again).
    fn stale(&self, push: &Push) -> Option<String> {
        let before = push.before.as_ref()?;
        if push.git_ref != self.git_ref || *before == self.head || push.sha == self.head {
            return None;
        }
        let short = |sha: &GitSha| sha.short().to_owned();
        if self.superseded.contains(before) {
            return Some(format!(
                "a late or replayed push: it moves {} from {}, which {} already superseded",
                push.git_ref,
                short(before),
                short(&self.head)
            ));
        }
        if self.superseded.contains(&push.sha) {
            return Some(format!(
                "a late or replayed push: {} on {} was already superseded by {}",
                short(&push.sha),
                push.git_ref,
                short(&self.head)
            ));
        }
        None
    }

    fn remember(&mut self, sha: GitSha) {
        if is_zero(&sha) || sha == self.head || self.superseded.contains(&sha) {
            return;
        }
        if self.superseded.len() >= LINEAGE_WINDOW {
            self.superseded.pop_front();
        }
        self.superseded.push_back(sha);
    }

    fn take(&mut self, push: &Push) {
        if push.git_ref != self.git_ref {
            *self = Self::start(push);
            return;
        }
        if push.sha == self.head {
            return;
        }
        let old = std::mem::replace(&mut self.head, push.sha.clone());
        // The new head is current again, even if the branch was once past it (a force push).
        self.superseded.retain(|s| *s != push.sha);
        self.remember(old);
        if let Some(before) = &push.before {
            self.remember(before.clone());
        }
    }
}

impl Heads {
    /// Nothing pushed yet (or a record written before lineages were kept).
    pub fn is_empty(&self) -> bool {
        self.infra.is_none() && self.app.is_none()
    }

    /// The lineage of `repo`.
    pub fn get(&self, repo: RepoKind) -> Option<&Lineage> {
        match repo {
            RepoKind::Infra => self.infra.as_ref(),
            RepoKind::App => self.app.as_ref(),
        }
    }

    fn slot(&mut self, repo: RepoKind) -> &mut Option<Lineage> {
        match repo {
            RepoKind::Infra => &mut self.infra,
            RepoKind::App => &mut self.app,
        }
    }

    /// Takes `push` into its repository's lineage, or says why it is stale (a late resend or a
    /// replay of a push the branch has moved past), leaving the lineage as it was.
    pub fn admit(&mut self, push: &Push) -> Result<(), String> {
        match self.slot(push.repo) {
            None => {
                *self.slot(push.repo) = Some(Lineage::start(push));
                Ok(())
            }
            Some(lineage) => match lineage.stale(push) {
                Some(reason) => Err(reason),
                None => {
                    lineage.take(push);
                    Ok(())
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{event_id, sha};
    use crate::time::Timestamp;

    fn push(before: Option<u32>, after: u32) -> Push {
        Push {
            event_id: event_id(&format!("p{after}")),
            repo: RepoKind::App,
            sha: sha(after),
            before: before.map(sha),
            git_ref: "refs/heads/main".into(),
            author: "jane".into(),
            message: String::new(),
            received_at: Timestamp::from_unix_millis(0),
        }
    }

    fn heads(pushes: &[(Option<u32>, u32)]) -> Heads {
        let mut heads = Heads::default();
        for (before, after) in pushes {
            heads.admit(&push(*before, *after)).expect("in order");
        }
        heads
    }

    #[test]
    fn pushes_in_order_move_the_head() {
        let h = heads(&[(Some(0), 1), (Some(1), 2), (Some(2), 3)]);
        let l = h.get(RepoKind::App).expect("lineage");
        assert_eq!(l.head, sha(3));
        assert_eq!(l.superseded, [sha(1), sha(2)]);
    }

    #[test]
    fn a_resend_of_an_older_push_is_stale() {
        let mut h = heads(&[(Some(0), 1), (Some(1), 2), (Some(2), 3)]);
        let before = h.clone();
        let reason = h.admit(&push(Some(1), 2)).expect_err("stale");
        assert!(reason.contains("late or replayed"), "{reason}");
        assert_eq!(h, before, "a stale push changes nothing");
    }

    #[test]
    fn a_resend_of_a_push_never_seen_is_stale_when_its_start_was_superseded() {
        // 1 -> 2 was never delivered; 2 -> 3 was, after 0 -> 1.
        let mut h = heads(&[(Some(0), 1), (Some(2), 3)]);
        assert!(h.admit(&push(Some(1), 2)).is_err());
    }

    #[test]
    fn a_push_from_the_head_back_to_an_older_commit_is_new() {
        let mut h = heads(&[(Some(0), 1), (Some(1), 2)]);
        h.admit(&push(Some(2), 1)).expect("a force push back");
        let l = h.get(RepoKind::App).expect("lineage");
        assert_eq!(l.head, sha(1));
        assert!(!l.superseded.contains(&sha(1)));
        assert!(l.superseded.contains(&sha(2)));
    }

    #[test]
    fn pushes_without_before_and_the_head_again_are_taken() {
        let mut h = heads(&[(Some(0), 1), (Some(1), 2)]);
        h.admit(&push(Some(1), 2)).expect("the head again");
        h.admit(&push(None, 1))
            .expect("an operator's push is taken as sent");
    }

    #[test]
    fn another_ref_starts_a_new_lineage() {
        let mut h = heads(&[(Some(0), 1), (Some(1), 2)]);
        let mut other = push(Some(0), 1);
        other.git_ref = "refs/heads/release".into();
        h.admit(&other).expect("another branch");
        assert_eq!(
            h.get(RepoKind::App).map(|l| l.git_ref.as_str()),
            Some("refs/heads/release")
        );
    }

    #[test]
    fn the_window_is_bounded() {
        let mut h = Heads::default();
        for n in 1..=(LINEAGE_WINDOW as u32 + 10) {
            h.admit(&push(Some(n - 1), n)).expect("in order");
        }
        let l = h.get(RepoKind::App).expect("lineage");
        assert_eq!(l.superseded.len(), LINEAGE_WINDOW);
        assert!(!l.superseded.contains(&sha(1)), "the oldest are forgotten");
    }
}
