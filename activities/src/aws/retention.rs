//! Release retention: once a rollout is done, the environment keeps the images (with their EBS
//! snapshots) and the source artifacts of the releases its task names in `keep` (its own and
//! the newest deployed ones, `keep_releases` in all) and deletes the others, so that `rollback`
//! can roll out any kept release without building it again and nothing else is paid for.
//!
//! Only what is tagged as the environment's is looked at; an image or artifact of another
//! environment, or of another tenant, is never touched. Everything here is safe to repeat: a
//! rollout that fails half-way through pruning is retried and prunes the rest.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::Image;
use workflows::{GitSha, Release, RepoKind};

use super::decommission::{delete_snapshots, env_filters};
use super::error::{classify, code};
use super::{AwsCloud, Error, Names, ownership};
use crate::aws::network::ec2_pairs;

/// What a prune deleted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Pruned {
    /// Images deregistered.
    pub images: usize,
    /// Snapshots deleted.
    pub snapshots: usize,
    /// Artifacts deleted.
    pub artifacts: usize,
}

/// Deletes the environment's images and artifacts of releases not in `keep`.
pub(super) async fn prune(
    cloud: &AwsCloud,
    names: &Names,
    keep: &[Release],
) -> Result<Pruned, Error> {
    let kept_images: BTreeSet<String> = keep
        .iter()
        .filter_map(|r| r.infra.as_ref())
        .map(|sha| names.image(sha))
        .collect();
    let (snapshots, images) = deregister_images(cloud, names, |image| {
        image.name().is_some_and(|n| kept_images.contains(n))
    })
    .await?;
    // Snapshots are tagged with their image's name: those of images gone earlier (one still
    // held by an image being deregistered when it was last tried) go now.
    let (deleted, _held) = delete_snapshots(cloud, names, snapshots, |snapshot| {
        snapshot
            .tags()
            .iter()
            .any(|t| t.key() == Some("Name") && t.value().is_some_and(|n| kept_images.contains(n)))
    })
    .await?;
    let mut pruned = Pruned {
        images,
        snapshots: deleted,
        ..Pruned::default()
    };
    for repo in [RepoKind::Infra, RepoKind::App] {
        let kept: BTreeSet<String> = keep
            .iter()
            .filter_map(|r| match repo {
                RepoKind::Infra => r.infra.as_ref(),
                RepoKind::App => r.app.as_ref(),
            })
            .map(|sha: &GitSha| names.artifact_key(repo, sha))
            .collect();
        pruned.artifacts += delete_artifacts(cloud, names, repo, &kept).await?;
    }
    if pruned != Pruned::default() {
        tracing::info!(
            workflow = %names.key(),
            images = pruned.images,
            snapshots = pruned.snapshots,
            artifacts = pruned.artifacts,
            "releases past retention deleted"
        );
    }
    Ok(pruned)
}

/// Deregisters the environment's images for which `kept` is false; returns the ids of their
/// EBS snapshots (an image does not take them with it) and how many were deregistered.
pub(super) async fn deregister_images(
    cloud: &AwsCloud,
    names: &Names,
    kept: impl Fn(&Image) -> bool,
) -> Result<(Vec<String>, usize), Error> {
    let [managed, tenant, env] = env_filters(names);
    let out = cloud
        .clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(managed)
        .filters(tenant)
        .filters(env)
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeImages", names.base(), &e))?;
    let mut snapshots = Vec::new();
    let mut deregistered = 0;
    for image in out.images() {
        let Some(id) = image.image_id() else { continue };
        // The tags are checked here as well: not every endpoint applies the filters.
        if !ownership::is_ours(names, ec2_pairs(image.tags())) || kept(image) {
            continue;
        }
        snapshots.extend(
            image
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
                .map(str::to_owned),
        );
        match cloud
            .clients
            .ec2
            .deregister_image()
            .image_id(id)
            .send()
            .await
        {
            Ok(_) => {
                deregistered += 1;
                tracing::info!(image = id, "image deregistered");
            }
            Err(e) if code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => {}
            Err(e) => return Err(classify("ec2:DeregisterImage", id, &e)),
        }
    }
    Ok((snapshots, deregistered))
}

/// Deletes every object under `prefix` (a decommissioned environment's artifacts or
/// reports); returns how many.
pub(super) async fn prune_objects(cloud: &AwsCloud, prefix: &str) -> Result<usize, Error> {
    delete_objects(cloud, prefix, &BTreeSet::new()).await
}

/// Deletes the environment's artifacts of `repo` whose keys are not in `kept`; returns how
/// many.
async fn delete_artifacts(
    cloud: &AwsCloud,
    names: &Names,
    repo: RepoKind,
    kept: &BTreeSet<String>,
) -> Result<usize, Error> {
    let prefix = format!("{}{repo}/", names.artifact_prefix());
    delete_objects(cloud, &prefix, kept).await
}

/// Deletes the objects under `prefix` whose keys are not in `kept`; returns how many.
async fn delete_objects(
    cloud: &AwsCloud,
    prefix: &str,
    kept: &BTreeSet<String>,
) -> Result<usize, Error> {
    let bucket = &cloud.infra.artifact_bucket;
    let mut deleted = 0;
    let mut next: Option<String> = None;
    loop {
        let out = cloud
            .clients
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(next.clone())
            .send()
            .await
            .map_err(|e| classify("s3:ListObjectsV2", prefix, &e))?;
        for key in out.contents().iter().filter_map(|o| o.key()) {
            if kept.contains(key) {
                continue;
            }
            cloud
                .clients
                .s3
                .delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify("s3:DeleteObject", key, &e))?;
            deleted += 1;
        }
        match out.next_continuation_token() {
            Some(t) if out.is_truncated() == Some(true) => next = Some(t.to_owned()),
            _ => return Ok(deleted),
        }
    }
}
