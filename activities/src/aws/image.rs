//! `image`: the environment's machine image for the run's infrastructure commit.
//!
//! One invocation looks at the image `<t>-<e>-<sha>` and the builder instance
//! `<t>-<e>-builder-<short sha>` and takes the next action:
//!
//! | found | action |
//! |---|---|
//! | image available | terminate the builder if it is still there; done |
//! | image pending | wait |
//! | image failed | deregister it; retryable (the next attempt builds again) |
//! | no image, no builder | launch the builder from the base image with the user data below (client token from key, commit, run and the build's first attempt); wait |
//! | builder pending or running | wait; past `builder_timeout_secs` terminate it and fail terminally |
//! | builder stopping or stopped, its script report failed | terminate it; fail terminally with the failed script's name, exit code and last lines |
//! | builder stopping, no report yet | wait |
//! | builder stopped, its report passed | create the image from it (a duplicate name means another attempt did: adopt); wait |
//! | builder stopped, no report | terminate it; fail terminally (its start failed before it could report, or it was stopped by hand) |
//!
//! Before launching a builder, an available image of the same commit built for another of the
//! tenant's environments (tagged as the tenant's) is copied instead (`CopyImage`, minutes
//! instead of a build): build once, promote.
//!
//! The builder's user data fetches the infra artifact, runs `provision/*.sh` in name order,
//! uploads a script report (see [`crate::report`]) under the key its `report` tag names, and
//! powers off, at once after the first failure (its shutdown behaviour is `stop`, so the
//! stopped builder is what the image is made from). A failing script so fails the step within
//! one recheck of the builder powering off, not at `builder_timeout_secs`, which is left for
//! scripts that hang. A build its workflow abandons ([`abandon`]: failed, paused, superseded,
//! cancelled) has its builder terminated. With a KMS key configured its root volume, and so the image, is encrypted
//! with that key.

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Image, ImageState, Instance, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, ResourceType, ShutdownBehavior, TagSpecification,
};
use aws_smithy_types::error::metadata::ProvideErrorMetadata as _;
use base64::Engine as _;
use workflows::{GitSha, ImageOutput, RepoKind, StepKind, StepOutput};

use super::error::{classify, code};
use super::names::{TAG_ENV, TAG_INFRA_SHA, TAG_MANAGED_BY, TAG_NAME, TAG_REPORT, TAG_TENANT};
use super::network::{ec2_pairs, ec2_tags};
use super::{AwsCloud, Error, MANAGED_BY, Names, identity, ownership, reports, source};
use crate::{Invocation, Outcome};

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let sha =
        invocation.task.release.infra.as_ref().ok_or_else(|| {
            Error::Terminal("the release has no infra commit to build".to_owned())
        })?;
    let image_name = names.image(sha);
    let builder = find_builder(cloud, names, &names.builder(sha)).await?;
    if let Some(image) = find_image(cloud, &image_name).await? {
        let id = image.image_id().unwrap_or_default().to_owned();
        let what = format!("image {image_name} ({id})");
        ownership::check(names, &what, ec2_pairs(image.tags()))?;
        match image.state() {
            Some(ImageState::Available) => {
                tag_snapshots(cloud, names, invocation, &image, &image_name).await?;
                if let Some(b) = &builder {
                    terminate(cloud, b).await?;
                }
                return Ok(Outcome::Done(StepOutput::Image(ImageOutput {
                    infra_sha: sha.clone(),
                    image_id: id,
                })));
            }
            Some(ImageState::Pending) | None => {
                return Ok(cloud.progress(format!("image {id} pending")));
            }
            Some(state) => {
                let reason = image
                    .state_reason()
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given")
                    .to_owned();
                cloud
                    .clients
                    .ec2
                    .deregister_image()
                    .image_id(&id)
                    .send()
                    .await
                    .map_err(|e| classify("ec2:DeregisterImage", &id, &e))?;
                return Err(Error::Retryable(format!(
                    "image {id} ended {}: {reason}; deregistered, the next attempt builds again",
                    state.as_str()
                )));
            }
        }
    }
    let Some(builder) = builder else {
        // Build once, promote: the same commit built for another of the tenant's
        // environments is copied, not built again.
        if let Some(source) = promotable(cloud, names, sha).await? {
            let from = source.name().unwrap_or_default().to_owned();
            copy_image(cloud, names, invocation, &source, &image_name).await?;
            return Ok(cloud.progress(format!("image {image_name} copied from {from}")));
        }
        // Another environment is building the commit: its image is copied once it is there
        // (if that build fails, its builder goes and this one builds).
        if let Some(sibling) = sibling_build(cloud, names, sha).await? {
            return Ok(cloud.progress(format!(
                "waiting for {sibling}'s build of {}, to copy its image",
                sha.short()
            )));
        }
        launch_builder(cloud, names, invocation, sha).await?;
        return Ok(cloud.progress("builder launched"));
    };
    let builder_id = builder.instance_id().unwrap_or_default().to_owned();
    match builder.state().and_then(|s| s.name()) {
        state @ Some(InstanceStateName::Stopped | InstanceStateName::Stopping) => {
            let stopped = state == Some(&InstanceStateName::Stopped);
            let passed = match build_report(cloud, &builder).await? {
                Some(reports::Found::Failed(key, report)) => {
                    terminate(cloud, &builder).await?;
                    let failure = report
                        .failure(&format!("builder {builder_id}"))
                        .unwrap_or_else(|| "a provisioning step failed".to_owned());
                    return Err(Error::Terminal(format!(
                        "{failure}\n(the builder was terminated; the whole report is s3://{}/{key})",
                        cloud.infra.artifact_bucket
                    )));
                }
                Some(reports::Found::Passed(_)) => true,
                // Powered off without a report: it could not upload it, or it was stopped by
                // hand. An image of what it built cannot be trusted.
                Some(reports::Found::None) if stopped => {
                    terminate(cloud, &builder).await?;
                    return Err(Error::Terminal(format!(
                        "builder {builder_id} powered off without a script report under s3://{}/{}: its start failed before the scripts ran, or it was stopped by hand; it was terminated",
                        cloud.infra.artifact_bucket,
                        report_stem(&builder).unwrap_or_default()
                    )));
                }
                Some(reports::Found::None) => false,
                // A builder of an earlier version, launched without a report.
                None => stopped,
            };
            if !stopped {
                return Ok(cloud.progress(format!("builder {builder_id} powering off")));
            }
            create_image(cloud, names, invocation, &builder_id, &image_name).await?;
            let note = if passed {
                format!(
                    "provisioning scripts passed on builder {builder_id}; image {image_name} requested"
                )
            } else {
                format!("image {image_name} requested from builder {builder_id}")
            };
            Ok(cloud.progress(note))
        }
        _ => {
            let started = builder
                .launch_time()
                .map_or(i64::MAX, |t| t.to_millis().unwrap_or(i64::MAX));
            let now = cloud.clock.now().as_unix_millis();
            let limit = i64::try_from(cloud.infra.builder_timeout_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX);
            if now.saturating_sub(started) > limit {
                terminate(cloud, &builder).await?;
                return Err(Error::Terminal(format!(
                    "builder {builder_id} did not power off within {} s: a provisioning script hangs (a failing one would have reported and powered off); it was terminated",
                    cloud.infra.builder_timeout_secs
                )));
            }
            Ok(cloud.progress(format!(
                "builder {builder_id} running the provisioning scripts"
            )))
        }
    }
}

/// Gives up the build of the run's commit: its builder is terminated (an image already
/// requested from it stays, and the next build of the commit adopts it).
pub(super) async fn abandon(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<(), Error> {
    let Some(sha) = invocation.task.release.infra.as_ref() else {
        return Ok(());
    };
    match find_builder(cloud, names, &names.builder(sha)).await? {
        Some(builder) => terminate(cloud, &builder).await,
        None => Ok(()),
    }
}

/// An available image of `sha` built for another of the tenant's environments (named and
/// tagged as that environment's), if there is one.
async fn promotable(cloud: &AwsCloud, names: &Names, sha: &GitSha) -> Result<Option<Image>, Error> {
    let key = names.key();
    let candidates: Vec<String> = workflows::Environment::ALL
        .into_iter()
        .filter(|env| *env != key.env)
        .map(|env| Names::new(&workflows::WorkflowKey::new(key.tenant.clone(), env)).image(sha))
        .collect();
    let out = cloud
        .clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(
            Filter::builder()
                .name("name")
                .set_values(Some(candidates.clone()))
                .build(),
        )
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_TENANT}"))
                .values(key.tenant.as_str())
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeImages", &names.image(sha), &e))?;
    // Names and tags are checked here as well: not every endpoint applies every filter.
    Ok(out
        .images()
        .iter()
        .find(|i| {
            let tagged = |k: &str, v: &str| {
                i.tags()
                    .iter()
                    .any(|t| t.key() == Some(k) && t.value() == Some(v))
            };
            i.state() == Some(&ImageState::Available)
                && i.name().is_some_and(|n| candidates.iter().any(|c| c == n))
                && tagged(TAG_MANAGED_BY, MANAGED_BY)
                && tagged(TAG_TENANT, key.tenant.as_str())
        })
        .cloned())
}

/// The name of a builder of `sha` that another of the tenant's environments runs, if any.
async fn sibling_build(
    cloud: &AwsCloud,
    names: &Names,
    sha: &GitSha,
) -> Result<Option<String>, Error> {
    let tenant = names.key().tenant.as_str();
    let found = builders_tagged(
        cloud,
        &[
            (TAG_INFRA_SHA, sha.as_str()),
            (TAG_TENANT, tenant),
            (TAG_MANAGED_BY, MANAGED_BY),
        ],
        &names.builder(sha),
    )
    .await?;
    let env = names.key().env.as_str();
    Ok(found.iter().find_map(|i| {
        let tag = |k: &str| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
        };
        let theirs = tag(TAG_ENV).filter(|e| *e != env)?;
        (tag(TAG_TENANT) == Some(tenant)
            && tag(TAG_MANAGED_BY) == Some(MANAGED_BY)
            && tag(TAG_INFRA_SHA) == Some(sha.as_str()))
        .then(|| format!("{tenant}#{theirs}"))
    }))
}

/// The instances that are not terminated or being terminated and carry every tag of `tags`
/// (as far as the endpoint applies the filters: callers check the tags again).
async fn builders_tagged(
    cloud: &AwsCloud,
    tags: &[(&str, &str)],
    what: &str,
) -> Result<Vec<Instance>, Error> {
    let mut request = cloud.clients.ec2.describe_instances().filters(
        Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .values("stopping")
            .values("stopped")
            .build(),
    );
    for (key, value) in tags {
        request = request.filters(
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(*value)
                .build(),
        );
    }
    let out = request
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeInstances", what, &e))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .cloned()
        .collect())
}

/// Copies `source` (another environment's image of the commit) as this environment's image
/// `name`, tagged as its own (in the request, and again after it for endpoints that do not
/// take tags there), encrypted with the configured KMS key when there is one.
async fn copy_image(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    source: &Image,
    name: &str,
) -> Result<(), Error> {
    let source_id = source.image_id().unwrap_or_default();
    let tags = ec2_tags(names, invocation.task.run, name);
    let mut request = cloud
        .clients
        .ec2
        .copy_image()
        .source_image_id(source_id)
        .source_region(cloud.infra.region().unwrap_or("us-east-1"))
        .name(name)
        .description(format!(
            "{} at {} (copied from {source_id})",
            names.key(),
            invocation.task.release
        ))
        .client_token(names.token(
            StepKind::Image,
            &format!("copy|{source_id}|{}", invocation.task.run),
        ))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(tags.clone()))
                .build(),
        );
    if let Some(kms) = &cloud.infra.kms_key_id {
        request = request.encrypted(true).kms_key_id(kms);
    }
    let out = request
        .send()
        .await
        .map_err(|e| classify("ec2:CopyImage", name, &e))?;
    let id = out.image_id().unwrap_or_default();
    cloud
        .clients
        .ec2
        .create_tags()
        .resources(id)
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("ec2:CreateTags", name, &e))?;
    tracing::info!(image = %name, id, source = source_id, "image copied from another environment");
    Ok(())
}

/// The image named `name` owned by this account.
async fn find_image(cloud: &AwsCloud, name: &str) -> Result<Option<Image>, Error> {
    let out = cloud
        .clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeImages", name, &e))?;
    Ok(out.images().first().cloned())
}

/// The builder instance tagged `name` (and as the environment's) that is not terminated or
/// being terminated. An instance of that name of anyone else is never found, so never touched.
async fn find_builder(
    cloud: &AwsCloud,
    names: &Names,
    name: &str,
) -> Result<Option<Instance>, Error> {
    let key = names.key();
    let found = builders_tagged(
        cloud,
        &[
            (TAG_NAME, name),
            (TAG_MANAGED_BY, MANAGED_BY),
            (TAG_TENANT, key.tenant.as_str()),
            (TAG_ENV, key.env.as_str()),
        ],
        name,
    )
    .await?;
    // The tags are checked here as well: not every endpoint applies every filter.
    Ok(found
        .into_iter()
        .find(|i| ownership::is_ours(names, ec2_pairs(i.tags()))))
}

/// The key stem of `builder`'s script report (its `report` tag; builders of earlier versions
/// have none).
fn report_stem(builder: &Instance) -> Option<&str> {
    builder
        .tags()
        .iter()
        .find(|t| t.key() == Some(TAG_REPORT))
        .and_then(|t| t.value())
}

/// What `builder`'s script report says, `None` for a builder without one.
async fn build_report(
    cloud: &AwsCloud,
    builder: &Instance,
) -> Result<Option<reports::Found>, Error> {
    match report_stem(builder) {
        Some(stem) => Ok(Some(reports::under(cloud, stem).await?)),
        None => Ok(None),
    }
}

async fn terminate(cloud: &AwsCloud, builder: &Instance) -> Result<(), Error> {
    let Some(id) = builder.instance_id() else {
        return Ok(());
    };
    match cloud
        .clients
        .ec2
        .terminate_instances()
        .instance_ids(id)
        .send()
        .await
    {
        Ok(_) => {
            tracing::info!(builder = id, "builder terminated");
            Ok(())
        }
        Err(e) if code(&e) == Some("InvalidInstanceID.NotFound") => Ok(()),
        Err(e) => Err(classify("ec2:TerminateInstances", id, &e)),
    }
}

/// The builder's user data: fetch and unpack the infra artifact, run its provisioning scripts
/// in name order, each through [`report::runner_script`]'s `run_step`; upload the script report
/// to `<report>.ok.log` or, at the first failure, `<report>.failed.log`; power off either way.
pub(super) fn builder_user_data(bucket: &str, key: &str, report: &str) -> String {
    use crate::report::{FAILED_SUFFIX, OK_SUFFIX, runner_script};
    let log = "/var/log/tenant-image-build.log";
    let runner = runner_script("/var/log/tenant-image-build.report", log);
    format!(
        "#!/bin/bash\n\
         # Written by the tenant-host orchestrator: builds the image, reports, then powers off.\n\
         set -uo pipefail\n\
         exec >>{log} 2>&1\n\
         {runner}\
         finish() {{\n\
         \x20 aws s3 cp \"$report_file\" \"s3://{bucket}/{report}$1\" || echo 'the report could not be uploaded'\n\
         \x20 shutdown -h now\n\
         \x20 exit 0\n\
         }}\n\
         mkdir -p /opt/tenant/infra\n\
         run_step fetch aws s3 cp 's3://{bucket}/{key}' /tmp/infra.tar.gz || finish {FAILED_SUFFIX}\n\
         run_step unpack tar -xzf /tmp/infra.tar.gz -C /opt/tenant/infra || finish {FAILED_SUFFIX}\n\
         cd /opt/tenant/infra\n\
         for script in $(ls provision/*.sh 2>/dev/null | sort); do\n\
         \x20 run_step \"$script\" bash \"$script\" || finish {FAILED_SUFFIX}\n\
         done\n\
         finish {OK_SUFFIX}\n"
    )
}

async fn launch_builder(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    sha: &GitSha,
) -> Result<(), Error> {
    let infra = &cloud.infra;
    let name = names.builder(sha);
    // The environment's profile, made here too for environments whose network step ran
    // before there were per-environment roles.
    identity::ensure(cloud, names, invocation).await?;
    let recorded = invocation.task.resources.infra_source.as_ref();
    let key = source::in_prefix(cloud, names, RepoKind::Infra, sha, recorded).await?;
    let report = names.build_report(sha, &launch_token(names, invocation, sha));
    let user_data = builder_user_data(&infra.artifact_bucket, &key, &report);
    let mut tags = ec2_tags(names, invocation.task.run, &name);
    for (key, value) in [(TAG_INFRA_SHA, sha.as_str()), (TAG_REPORT, &report)] {
        tags.push(
            aws_sdk_ec2::types::Tag::builder()
                .key(key)
                .value(value)
                .build(),
        );
    }
    let mut request = cloud
        .clients
        .ec2
        .run_instances()
        .image_id(&infra.base_image_id)
        .instance_type(aws_sdk_ec2::types::InstanceType::from(
            infra.builder_instance_type.as_str(),
        ))
        .min_count(1)
        .max_count(1)
        .subnet_id(infra.subnet_ids.first().cloned().unwrap_or_default())
        .iam_instance_profile(
            IamInstanceProfileSpecification::builder()
                .name(names.instance_role())
                .build(),
        )
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_tokens(HttpTokensState::Required)
                .http_put_response_hop_limit(1)
                .build(),
        )
        .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Stop)
        .client_token(launch_token(names, invocation, sha))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags.clone()))
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                .set_tags(Some(tags))
                .build(),
        );
    if let Some(network) = &invocation.task.resources.network {
        request = request.security_group_ids(&network.instance_security_group);
    }
    if let Some(kms) = &infra.kms_key_id {
        let root = root_device(cloud, &infra.base_image_id).await?;
        request = request.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(root)
                .ebs(
                    EbsBlockDevice::builder()
                        .encrypted(true)
                        .kms_key_id(kms)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    let out = request.send().await.map_err(|e| {
        // A new instance profile takes a few seconds to reach EC2.
        if e.message()
            .is_some_and(|m| m.contains("iamInstanceProfile"))
        {
            Error::Retryable(format!(
                "ec2:RunInstances on {name}: instance profile {} not visible to EC2 yet",
                names.instance_role()
            ))
        } else {
            classify("ec2:RunInstances", &name, &e)
        }
    })?;
    let id = out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .unwrap_or("?");
    tracing::info!(builder = %name, instance = id, "builder launched");
    Ok(())
}

/// The idempotency token of a builder launch: the same for every retry of one build, new for
/// each build the workflow starts (a run, or a step resumed after it was abandoned), since EC2
/// answers a token it has seen with the instance it launched, terminated or not.
fn launch_token(names: &Names, invocation: Invocation<'_>, sha: &GitSha) -> String {
    let task = invocation.task;
    names.token(
        StepKind::Image,
        &format!(
            "{sha}|{}|{}",
            task.run,
            task.first_attempt_at.as_unix_millis()
        ),
    )
}

/// The root device name of `image` (where an encrypted volume must be mapped).
async fn root_device(cloud: &AwsCloud, image: &str) -> Result<String, Error> {
    let out = cloud
        .clients
        .ec2
        .describe_images()
        .image_ids(image)
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeImages", image, &e))?;
    out.images()
        .first()
        .and_then(|i| i.root_device_name())
        .map(str::to_owned)
        .ok_or_else(|| Error::Terminal(format!("base image {image} not found")))
}

/// Tags the EBS snapshots of `image` like the image, so that they are found (and deleted)
/// with it. Tagging what is tagged already changes nothing, so every look at an available
/// image may do it. (`CreateImage` can tag snapshots itself, but not every EC2 endpoint takes
/// that; tagging them once the image is available works everywhere.)
async fn tag_snapshots(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    image: &aws_sdk_ec2::types::Image,
    name: &str,
) -> Result<(), Error> {
    let snapshots: Vec<String> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .map(str::to_owned)
        .collect();
    if snapshots.is_empty() {
        return Ok(());
    }
    cloud
        .clients
        .ec2
        .create_tags()
        .set_resources(Some(snapshots))
        .set_tags(Some(ec2_tags(names, invocation.task.run, name)))
        .send()
        .await
        .map_err(|e| classify("ec2:CreateTags", name, &e))?;
    Ok(())
}

async fn create_image(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    builder: &str,
    name: &str,
) -> Result<(), Error> {
    let result = cloud
        .clients
        .ec2
        .create_image()
        .instance_id(builder)
        .name(name)
        .description(format!("{} at {}", names.key(), invocation.task.release))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(ec2_tags(names, invocation.task.run, name)))
                .build(),
        )
        .send()
        .await;
    match result {
        Ok(out) => {
            tracing::info!(image = %name, id = out.image_id().unwrap_or("?"), "image requested");
            Ok(())
        }
        // Another attempt asked for it already: the next look finds it.
        Err(e) if code(&e) == Some("InvalidAMIName.Duplicate") => Ok(()),
        Err(e) => Err(classify("ec2:CreateImage", name, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Report;

    /// Runs the builder's user data in bash with its paths moved into a temporary directory and
    /// stand-ins for `aws` (copies between the directory's `bucket/` and local files) and
    /// `shutdown`; returns the uploaded keys and the text of the first.
    fn build(scripts: &[(&str, &str)]) -> (Vec<String>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let src = root.join("src/provision");
        std::fs::create_dir_all(&src).expect("mkdir");
        for (name, body) in scripts {
            std::fs::write(src.join(name), body).expect("script");
        }
        std::fs::create_dir_all(root.join("bucket/acme/dev/infra")).expect("mkdir");
        let tarred = std::process::Command::new("tar")
            .args(["-czf", "bucket/acme/dev/infra/a.tar.gz", "-C", "src", "."])
            .current_dir(root)
            .status()
            .expect("tar");
        assert!(tarred.success());
        let data = builder_user_data("b", "acme/dev/infra/a.tar.gz", "_logs/acme/dev/image/a-t")
            // First: the temporary directory is under /tmp itself.
            .replace("/tmp/", &format!("{}/", root.display()))
            .replace("/var/log/", &format!("{}/", root.display()))
            .replace("/opt/tenant/", &format!("{}/opt/", root.display()));
        let fakes = format!(
            "aws() {{ local from=\"${{3/s3:\\/\\/b\\//{r}/bucket/}}\" to=\"${{4/s3:\\/\\/b\\//{r}/bucket/}}\"; mkdir -p \"$(dirname \"$to\")\"; cp \"$from\" \"$to\"; }}\n\
             shutdown() {{ touch {r}/powered-off; }}\n",
            r = root.display()
        );
        let status = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{fakes}{data}"))
            .status()
            .expect("bash runs");
        assert!(status.success());
        assert!(root.join("powered-off").exists(), "it powers off");
        let logs = root.join("bucket/_logs/acme/dev/image");
        let mut keys: Vec<String> = std::fs::read_dir(&logs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        let text = keys
            .first()
            .map(|k| std::fs::read_to_string(logs.join(k)).expect("report"))
            .unwrap_or_default();
        (keys, text)
    }

    #[test]
    fn a_builder_runs_every_script_in_order_and_reports_success() {
        let (keys, text) = build(&[
            ("20-app.sh", "echo two >> \"$(dirname \"$0\")/../order\""),
            ("10-base.sh", "echo one > \"$(dirname \"$0\")/../order\""),
        ]);
        assert_eq!(keys, ["a-t.ok.log"]);
        let report = Report::parse(&text);
        assert_eq!(
            report.summary(),
            "fetch, unpack, provision/10-base.sh, provision/20-app.sh"
        );
    }

    #[test]
    fn a_failing_script_stops_the_build_and_reports_its_output() {
        let (keys, text) = build(&[
            (
                "10-base.sh",
                "echo installing; echo 'E: no package nginxx' >&2; exit 100",
            ),
            ("20-app.sh", "echo never"),
        ]);
        assert_eq!(keys, ["a-t.failed.log"]);
        let report = Report::parse(&text);
        let message = report.failure("builder i-1").expect("failed");
        assert_eq!(
            message,
            "provision/10-base.sh exited 100 on builder i-1; its last lines:\n  installing\n  E: no package nginxx"
        );
        assert!(!text.contains("20-app.sh"), "nothing ran after it");
    }
    use workflows::{Domain, WorkflowKey};
    use workflows::{Environment, Release, Resources, RunId, StepTask, TenantId, Timestamp};

    #[test]
    fn a_launch_token_holds_across_retries_and_changes_with_each_build() {
        let key = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Dev);
        let domain = Domain::new("acme.example").expect("domain");
        let names = Names::new(&key);
        let sha = GitSha::new("a".repeat(40)).expect("sha");
        let task = StepTask {
            run: RunId::FIRST,
            step: StepKind::Image,
            token: 1,
            attempt: 1,
            first_attempt_at: Timestamp::from_unix_millis(1_000),
            delay: std::time::Duration::ZERO,
            release: Release {
                infra: Some(sha.clone()),
                app: None,
            },
            resources: Resources::default(),
            keep: Vec::new(),
            restore_database: false,
        };
        let token = |task: &StepTask| {
            launch_token(
                &names,
                Invocation {
                    key: &key,
                    domain: &domain,
                    task,
                    config: &crate::NO_CONFIG,
                    settings: &crate::NO_SETTINGS,
                },
                &sha,
            )
        };
        let first = token(&task);
        let retry = StepTask {
            token: 5,
            attempt: 3,
            ..task.clone()
        };
        assert_eq!(token(&retry), first, "a retry of the same build");
        let resumed = StepTask {
            first_attempt_at: Timestamp::from_unix_millis(9_000),
            ..task.clone()
        };
        assert_ne!(token(&resumed), first, "a build started again");
        let next_run = StepTask {
            run: RunId::FIRST.next(),
            ..task.clone()
        };
        assert_ne!(token(&next_run), first, "another run's build");
        assert!(first.len() <= 64);
    }
}
