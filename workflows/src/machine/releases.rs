//! The releases a workflow keeps for rollback, rolling one of them out again, and
//! provisioning a decommissioned environment anew.

use statig::Outcome;

use super::{Ctx, RunKind, RunOptions, State, Workflow};
use crate::event::RepoKind;
use crate::id::{EventId, RunId};
use crate::machine::Deployed;
use crate::step::{Release, Resources};

impl Workflow {
    /// The releases a rollout of `release` keeps: it and the newest kept ones before it,
    /// `keep_releases` in all.
    pub(super) fn keep_with(&self, release: &Release, keep_releases: u32) -> Vec<Release> {
        let keep = usize::try_from(keep_releases.max(1)).unwrap_or(1);
        let mut kept: Vec<Release> = self
            .releases
            .iter()
            .rev()
            .map(|d| d.release.clone())
            .filter(|r| r != release)
            .take(keep - 1)
            .collect();
        kept.reverse();
        kept.push(release.clone());
        kept
    }

    /// The kept release a `rollback` goes to: run `to`'s, or without it the newest one before
    /// what serves. Refused (with the reason) when there is none.
    pub fn rollback_target(&self, to: Option<RunId>) -> Result<&Deployed, String> {
        let kept = || {
            if self.releases.is_empty() {
                "none".to_owned()
            } else {
                self.releases
                    .iter()
                    .map(|d| d.run.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let serving = self.deployed.as_ref().map(|d| &d.release);
        let target = match to {
            Some(run) => self
                .releases
                .iter()
                .find(|d| d.run == run)
                .ok_or_else(|| format!("{run} is not a kept release (kept: {})", kept()))?,
            None => self
                .releases
                .iter()
                .rev()
                .find(|d| Some(&d.release) != serving)
                .ok_or_else(|| format!("no earlier release is kept (kept: {})", kept()))?,
        };
        if Some(&target.release) == serving {
            return Err(format!(
                "{} is the release serving: redeploy rolls it out again",
                target.run
            ));
        }
        Ok(target)
    }

    /// Starts a run that rolls out the kept release `to` (see [`Self::rollback_target`]).
    pub(super) fn rollback(
        &mut self,
        to: Option<RunId>,
        trigger: &EventId,
        ctx: &mut Ctx,
    ) -> Outcome<State> {
        match self.rollback_target(to) {
            Ok(target) => {
                self.desired = target.release.clone();
                self.start_run(RunKind::Deploy, trigger, ctx)
            }
            Err(reason) => ctx.refuse(reason),
        }
    }

    /// Makes a decommissioned environment new again and starts its first run: the newest
    /// commits it had accepted, everything built again, the database restored from its final
    /// snapshot with `from_snapshot`.
    pub(super) fn provision_again(
        &mut self,
        from_snapshot: bool,
        trigger: &EventId,
        ctx: &mut Ctx,
    ) -> Outcome<State> {
        self.resources = Resources::default();
        self.releases.clear();
        self.deployed = None;
        self.desired = Release {
            infra: self.heads.get(RepoKind::Infra).map(|l| l.head.clone()),
            app: self.heads.get(RepoKind::App).map(|l| l.head.clone()),
        };
        let options = RunOptions {
            restore_database: from_snapshot,
            reroute: false,
        };
        self.start_run_with(RunKind::Deploy, trigger, options, ctx)
    }
}
