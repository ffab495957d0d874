//! `rollout`: blue/green replacement of the environment's Auto Scaling group.
//!
//! Each run gets a launch template `<t>-<e>-<run>` (found by name on a retry) with the image
//! and user data that installs the app artifact, and a new group
//! `<t>-<e>-<run>` on the environment's target group. Once as many of its instances are
//! healthy targets as the group's size, and as many have reported a successful start, the groups of earlier runs are detached from the
//! target group and deleted, and the step is done. If the new group's targets are not healthy
//! within `rollout_timeout_secs` of the step's first attempt, the new group is deleted and the
//! step fails: the previous group never stopped serving. Each instance uploads a script report
//! of its start (see [`crate::report`]); every look lists the run's reports, and a failed one
//! (an `install.sh` that exits non-zero, a secret it may not read) deletes the new group at once
//! and fails the step with the failed part's name, exit code and last lines, instead of
//! waiting out `rollout_timeout_secs`.
//!
//! Once done, it deletes the environment's images (with their snapshots) and artifacts of
//! releases its task does not keep (`retention`).
//!
//! A step message of an older run that arrives late (redelivered, or of a cancelled run) finds
//! a group of a newer run and neither creates its own nor deletes the newer one.

use aws_sdk_autoscaling::types::{AutoScalingGroup, Filter, LaunchTemplateSpecification, Tag};
use aws_sdk_ec2::types::{
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType,
};
use aws_sdk_elasticloadbalancingv2::types::TargetHealthStateEnum;
use base64::Engine as _;
use workflows::{DeploymentOutput, RepoKind, RunId, StepKind, StepOutput};

use super::error::{classify, code};
use super::names::{TAG_ENV, TAG_MANAGED_BY, TAG_NAME, TAG_RUN, TAG_TENANT};
use super::network::ec2_tags;
use super::{
    AwsCloud, Error, MANAGED_BY, Names, identity, ownership, reports, retention, scaling, source,
    tags,
};
use crate::{Invocation, Outcome};

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let task = invocation.task;
    let run = task.run;
    let routing = task.resources.routing.as_ref().ok_or_else(|| {
        Error::Terminal("the rollout needs the routing step's target group".to_owned())
    })?;
    let image_id = match (&task.release.infra, &task.resources.image) {
        (Some(sha), Some(image)) if &image.infra_sha == sha => image.image_id.clone(),
        (Some(sha), _) => {
            return Err(Error::Terminal(format!(
                "the rollout needs the image of infra {sha}, which the image step has not recorded"
            )));
        }
        (None, _) => cloud.infra.base_image_id.clone(),
    };
    let name = names.group(run);
    let sizing = scaling::sizing(cloud, invocation)?;
    let groups = managed_groups(cloud, names).await?;
    if let Some(newer) = groups
        .iter()
        .filter_map(|g| group_run(g).map(|r| (r, g)))
        .filter(|(r, _)| *r > run)
        .map(|(_, g)| g.auto_scaling_group_name().unwrap_or_default())
        .next()
    {
        return Err(Error::Terminal(format!(
            "superseded: group {newer} of a newer run exists; {name} is neither created nor is the newer one touched"
        )));
    }
    let Some(mine) = groups
        .iter()
        .find(|g| g.auto_scaling_group_name() == Some(name.as_str()))
    else {
        // Not listed by its tags: someone else's group of that name is refused, not replaced
        // (some endpoints replace a group created again), and ours is just not listed yet.
        if group_named(cloud, names, &name).await? {
            return Ok(cloud.progress(format!("group {name} created; not listed yet")));
        }
        let template =
            ensure_template(cloud, names, invocation, &image_id, &sizing.instance_type).await?;
        create_group(
            cloud,
            names,
            run,
            &name,
            &template,
            &routing.target_group_arn,
            &sizing,
        )
        .await?;
        return Ok(cloud.progress(format!("group {name} created; waiting for healthy targets")));
    };
    let serving = || {
        task.resources
            .deployment
            .as_ref()
            .map_or("nothing (first rollout)".to_owned(), |d| {
                d.group_name.clone()
            })
    };
    let installed = match reports::under(cloud, &names.install_reports(run)).await? {
        reports::Found::Failed(key, report) => {
            delete_group(cloud, &name).await?;
            delete_template(cloud, &name).await?;
            let failure = report
                .failure(&format!("an instance of group {name}"))
                .unwrap_or_else(|| "the instance's start failed".to_owned());
            return Err(Error::Terminal(format!(
                "{failure}\ngroup {name} rolled back (deleted); {} keeps serving; the whole report is s3://{}/{key}",
                serving(),
                cloud.infra.artifact_bucket
            )));
        }
        reports::Found::Passed(keys) => keys.len(),
        reports::Found::None => 0,
    };
    let healthy = healthy_targets(cloud, mine, &routing.target_group_arn).await?;
    let size = usize::try_from(sizing.desired).unwrap_or(1);
    // Both: a target can pass its health check on what the image serves before (or
    // although) the release was installed.
    if healthy >= size && installed >= size {
        if let Some(policy) = sizing.scaling {
            scaling::ensure_policy(cloud, &name, policy, &routing.target_group_arn).await?;
        }
        for old in groups
            .iter()
            .filter(|g| g.auto_scaling_group_name() != Some(name.as_str()))
        {
            retire(cloud, old, &routing.target_group_arn).await?;
        }
        if !task.keep.is_empty() {
            retention::prune(cloud, names, &task.keep).await?;
        }
        return Ok(Outcome::Done(StepOutput::Rollout(DeploymentOutput {
            group_name: name,
            image_id,
            run,
            release: task.release.clone(),
        })));
    }
    let waited_ms = cloud
        .clock
        .now()
        .as_unix_millis()
        .saturating_sub(task.first_attempt_at.as_unix_millis());
    let limit_ms =
        i64::try_from(cloud.infra.rollout_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if waited_ms > limit_ms {
        delete_group(cloud, &name).await?;
        delete_template(cloud, &name).await?;
        return Err(Error::Terminal(format!(
            "group {name} had {healthy} of {size} healthy targets after {} s: rolled back (deleted); {} keeps serving",
            cloud.infra.rollout_timeout_secs,
            serving()
        )));
    }
    Ok(cloud.progress(format!(
        "group {name}: {healthy} of {size} targets healthy, {installed} instances installed"
    )))
}

/// The run a managed group belongs to (its `run` tag).
fn group_run(group: &AutoScalingGroup) -> Option<RunId> {
    group
        .tags()
        .iter()
        .find(|t| t.key() == Some(TAG_RUN))
        .and_then(|t| t.value())
        .and_then(|v| v.parse().ok())
}

/// The environment's groups (tagged with its tenant and env by the orchestrator) that are not
/// being deleted.
pub(super) async fn managed_groups(
    cloud: &AwsCloud,
    names: &Names,
) -> Result<Vec<AutoScalingGroup>, Error> {
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let out = cloud
            .clients
            .autoscaling
            .describe_auto_scaling_groups()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_TENANT}"))
                    .values(names.key().tenant.as_str())
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_ENV}"))
                    .values(names.key().env.to_string())
                    .build(),
            )
            .set_next_token(next.clone())
            .send()
            .await
            .map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", names.base(), &e))?;
        all.extend(out.auto_scaling_groups().iter().cloned());
        match out.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => break,
        }
    }
    // The tags are checked here as well: not every endpoint applies the filters.
    Ok(all
        .into_iter()
        .filter(|g| {
            let tagged = |key: &str, value: &str| {
                g.tags()
                    .iter()
                    .any(|t| t.key() == Some(key) && t.value() == Some(value))
            };
            tagged(TAG_MANAGED_BY, MANAGED_BY)
                && tagged(TAG_TENANT, names.key().tenant.as_str())
                && tagged(TAG_ENV, &names.key().env.to_string())
                && g.status().is_none_or(|s| !s.starts_with("Delete"))
        })
        .collect())
}

/// The app instance's user data, each part run through [`crate::report::runner_script`]'s
/// `run_step`: write the environment file (`app_env`, base64 in the script so that no value can
/// end it early; secret references resolved with the instance's role), then fetch the app
/// artifact, unpack it and run its `install.sh` with bash (as the provisioning scripts are run,
/// so it need not be executable) with the file's variables exported. The script report is
/// uploaded to `<reports><instance id>.ok.log`, or `.failed.log` at the first failure, which
/// the rollout reads to fail fast.
pub(super) fn app_user_data(
    bucket: &str,
    key: Option<&str>,
    env_file: &str,
    secrets: &[(&str, &str)],
    reports: &str,
) -> String {
    use crate::app_env::{APP_USER, ENV_FILE, secret_script};
    use crate::report::{FAILED_SUFFIX, OK_SUFFIX, runner_script};
    let log = "/var/log/tenant-app-install.log";
    let runner = runner_script("/var/log/tenant-app-install.report", log);
    let encoded = base64::engine::general_purpose::STANDARD.encode(env_file);
    let resolved = secret_script(secrets, ENV_FILE);
    let mut script = format!(
        "#!/bin/bash\n\
         # Written by the tenant-host orchestrator: the environment file, then the release.\n\
         set -uo pipefail\n\
         exec >>{log} 2>&1\n\
         {runner}\
         imds() {{\n\
         \x20 local token\n\
         \x20 token=\"$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')\" &&\n\
         \x20 curl -sf -H \"X-aws-ec2-metadata-token: $token\" \"http://169.254.169.254/latest/meta-data/$1\"\n\
         }}\n\
         instance=\"$(imds instance-id || hostname)\"\n\
         finish() {{\n\
         \x20 aws s3 cp \"$report_file\" \"s3://{bucket}/{reports}$instance$1\" || echo 'the report could not be uploaded'\n\
         \x20 [ \"$1\" = {OK_SUFFIX} ]\n\
         \x20 exit\n\
         }}\n\
         write_environment() {{\n\
         set -e\n\
         id -u {APP_USER} >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /sbin/nologin {APP_USER}\n\
         install -d -m 0755 \"$(dirname {ENV_FILE})\"\n\
         umask 077\n\
         echo '{encoded}' | base64 -d > {ENV_FILE}\n\
         {resolved}\
         umask 022\n\
         chown {APP_USER}:{APP_USER} {ENV_FILE}\n\
         chmod 0600 {ENV_FILE}\n\
         set +e\n\
         }}\n\
         run_step environment write_environment || finish {FAILED_SUFFIX}\n\
         set -a; . {ENV_FILE}; set +a\n"
    );
    if let Some(key) = key {
        script.push_str(&format!(
            "mkdir -p /opt/tenant/app\n\
             run_step fetch aws s3 cp 's3://{bucket}/{key}' /tmp/app.tar.gz || finish {FAILED_SUFFIX}\n\
             run_step unpack tar -xzf /tmp/app.tar.gz -C /opt/tenant/app || finish {FAILED_SUFFIX}\n\
             cd /opt/tenant/app\n\
             if [ -f install.sh ]; then run_step install.sh bash install.sh || finish {FAILED_SUFFIX}; fi\n"
        ));
    }
    script.push_str(&format!("finish {OK_SUFFIX}\n"));
    script
}

/// The launch template of this run (`<t>-<e>-<run>`, one version), creating it if needed; a
/// template per run keeps a release's settings immutable and goes with its group.
async fn ensure_template(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    image_id: &str,
    instance_type: &str,
) -> Result<String, Error> {
    let template = names.launch_template(invocation.task.run);
    if check_template(cloud, names, &template).await? {
        return Ok(template);
    }
    // The environment's profile, made here too for environments whose network step ran
    // before there were per-environment roles.
    identity::ensure(cloud, names, invocation).await?;
    let app_key = match &invocation.task.release.app {
        Some(sha) => {
            let recorded = invocation.task.resources.app_source.as_ref();
            Some(source::in_prefix(cloud, names, RepoKind::App, sha, recorded).await?)
        }
        None => None,
    };
    let data = template_data(
        cloud,
        names,
        invocation,
        image_id,
        instance_type,
        app_key.as_deref(),
    )?;
    let created = cloud
        .clients
        .ec2
        .create_launch_template()
        .launch_template_name(&template)
        .version_description(invocation.task.run.to_string())
        .launch_template_data(data)
        .client_token(names.token(StepKind::Rollout, &template))
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(ResourceType::LaunchTemplate)
                .set_tags(Some(ec2_tags(names, invocation.task.run, &template)))
                .build(),
        )
        .send()
        .await;
    match created {
        Ok(_) => {
            tracing::info!(launch_template = %template, "launch template created");
            Ok(template)
        }
        // Created meanwhile by another attempt: adopt it if it is ours.
        Err(e)
            if code(&e)
                .is_some_and(|c| c.starts_with("InvalidLaunchTemplateName.AlreadyExists")) =>
        {
            if check_template(cloud, names, &template).await? {
                Ok(template)
            } else {
                Err(Error::Retryable(format!(
                    "launch template {template} exists but is not visible yet"
                )))
            }
        }
        Err(e) => Err(classify("ec2:CreateLaunchTemplate", &template, &e)),
    }
}

/// Whether launch template `name` exists; one that is not tagged as the environment's is a
/// terminal error.
async fn check_template(cloud: &AwsCloud, names: &Names, name: &str) -> Result<bool, Error> {
    let described = cloud
        .clients
        .ec2
        .describe_launch_templates()
        .launch_template_names(name)
        .send()
        .await;
    let out = match described {
        Ok(out) => out,
        Err(e) if code(&e).is_some_and(|c| c.starts_with("InvalidLaunchTemplateName.NotFound")) => {
            return Ok(false);
        }
        Err(e) => return Err(classify("ec2:DescribeLaunchTemplates", name, &e)),
    };
    let Some(found) = out.launch_templates().first() else {
        return Ok(false);
    };
    let pairs = found.tags().iter().map(|t| (t.key(), t.value()));
    ownership::check(names, &format!("launch template {name}"), pairs)?;
    Ok(true)
}

/// Deletes launch template `name`; one already gone is fine.
pub(super) async fn delete_template(cloud: &AwsCloud, name: &str) -> Result<(), Error> {
    match cloud
        .clients
        .ec2
        .delete_launch_template()
        .launch_template_name(name)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if code(&e).is_some_and(|c| c.contains("NotFound")) => Ok(()),
        Err(e) => Err(classify("ec2:DeleteLaunchTemplate", name, &e)),
    }
}

fn template_data(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    image_id: &str,
    instance_type: &str,
    app_key: Option<&str>,
) -> Result<RequestLaunchTemplateData, Error> {
    let task = invocation.task;
    let network = task.resources.network.as_ref().ok_or_else(|| {
        Error::Terminal("the rollout needs the network step's security group".to_owned())
    })?;
    let region = cloud.infra.region();
    let env_file = crate::app_env::render(&crate::app_env::variables(
        names.key(),
        &task.resources,
        region,
        invocation.config,
    ));
    let secrets = crate::app_env::secret_refs(invocation.config);
    let user_data = app_user_data(
        &cloud.infra.artifact_bucket,
        app_key,
        &env_file,
        &secrets,
        &names.install_reports(task.run),
    );
    let group = names.group(task.run);
    Ok(RequestLaunchTemplateData::builder()
        .image_id(image_id)
        .instance_type(aws_sdk_ec2::types::InstanceType::from(instance_type))
        .security_group_ids(&network.instance_security_group)
        .iam_instance_profile(
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .name(names.instance_role())
                .build(),
        )
        .metadata_options(
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                .http_tokens(LaunchTemplateHttpTokensState::Required)
                .http_put_response_hop_limit(1)
                .build(),
        )
        .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
        .tag_specifications(
            LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(ec2_tags(names, task.run, &group)))
                .build(),
        )
        .build())
}

async fn create_group(
    cloud: &AwsCloud,
    names: &Names,
    run: RunId,
    name: &str,
    template: &str,
    target_group: &str,
    sizing: &workflows::Sizing,
) -> Result<(), Error> {
    let mut group_tags: Vec<Tag> = tags(names, run)
        .into_iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .propagate_at_launch(true)
                .resource_id(name)
                .resource_type("auto-scaling-group")
                .build()
        })
        .collect();
    group_tags.push(
        Tag::builder()
            .key(TAG_NAME)
            .value(name)
            .propagate_at_launch(true)
            .resource_id(name)
            .resource_type("auto-scaling-group")
            .build(),
    );
    let as_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let result = cloud
        .clients
        .autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_name(template)
                .version("1")
                .build(),
        )
        .min_size(as_i32(sizing.min))
        .max_size(as_i32(sizing.max))
        .desired_capacity(as_i32(sizing.desired))
        .vpc_zone_identifier(cloud.infra.subnet_ids.join(","))
        .target_group_arns(target_group)
        .health_check_type("ELB")
        .health_check_grace_period(300)
        .set_tags(Some(group_tags))
        .send()
        .await;
    match result {
        Ok(_) => {
            tracing::info!(group = name, "auto scaling group created");
            Ok(())
        }
        // Created meanwhile by another attempt (and not listed yet), or someone else's.
        Err(e) if code(&e) == Some("AlreadyExists") => {
            if group_named(cloud, names, name).await? {
                Ok(())
            } else {
                Err(Error::Retryable(format!(
                    "auto scaling group {name} exists but is not visible yet"
                )))
            }
        }
        Err(e) => Err(classify("autoscaling:CreateAutoScalingGroup", name, &e)),
    }
}

/// Whether group `name` exists; one that is not tagged as the environment's is a terminal
/// error.
async fn group_named(cloud: &AwsCloud, names: &Names, name: &str) -> Result<bool, Error> {
    let out = cloud
        .clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", name, &e))?;
    match out.auto_scaling_groups().first() {
        Some(g) => {
            let pairs = g.tags().iter().map(|t| (t.key(), t.value()));
            ownership::check(names, &format!("auto scaling group {name}"), pairs)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// How many of `group`'s instances are healthy targets of `target_group`.
async fn healthy_targets(
    cloud: &AwsCloud,
    group: &AutoScalingGroup,
    target_group: &str,
) -> Result<usize, Error> {
    let instances: Vec<&str> = group
        .instances()
        .iter()
        .filter_map(|i| i.instance_id())
        .collect();
    if instances.is_empty() {
        return Ok(0);
    }
    let out = cloud
        .clients
        .elb
        .describe_target_health()
        .target_group_arn(target_group)
        .send()
        .await
        .map_err(|e| {
            classify(
                "elasticloadbalancing:DescribeTargetHealth",
                target_group,
                &e,
            )
        })?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .filter(|d| {
            d.target()
                .and_then(|t| t.id())
                .is_some_and(|id| instances.contains(&id))
                && d.target_health().and_then(|h| h.state())
                    == Some(&TargetHealthStateEnum::Healthy)
        })
        .count())
}

/// Takes an earlier group out of the target group and deletes it.
async fn retire(
    cloud: &AwsCloud,
    group: &AutoScalingGroup,
    target_group: &str,
) -> Result<(), Error> {
    let Some(name) = group.auto_scaling_group_name() else {
        return Ok(());
    };
    if group.target_group_arns().iter().any(|t| t == target_group) {
        match cloud
            .clients
            .autoscaling
            .detach_load_balancer_target_groups()
            .auto_scaling_group_name(name)
            .target_group_arns(target_group)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if is_gone(code(&e)) => {}
            Err(e) => {
                return Err(classify(
                    "autoscaling:DetachLoadBalancerTargetGroups",
                    name,
                    &e,
                ));
            }
        }
    }
    delete_group(cloud, name).await?;
    // The group's template is named like the group.
    delete_template(cloud, name).await?;
    tracing::info!(group = name, "previous group detached and deleted");
    Ok(())
}

fn is_gone(code: Option<&str>) -> bool {
    code.is_some_and(|c| c == "ValidationError" || c.ends_with("NotFound"))
}

/// Deletes group `name` and its instances; a group already gone or going is fine.
pub(super) async fn delete_group(cloud: &AwsCloud, name: &str) -> Result<(), Error> {
    match cloud
        .clients
        .autoscaling
        .delete_auto_scaling_group()
        .auto_scaling_group_name(name)
        .force_delete(true)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_gone(code(&e)) || code(&e) == Some("ScalingActivityInProgress") => Ok(()),
        Err(e) => Err(classify("autoscaling:DeleteAutoScalingGroup", name, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_file_is_written_private_and_sourced_before_install() {
        let env_file = "DB_SECRET_ARN='arn:aws:secretsmanager:eu-west-1:1:secret:x'\n";
        let secret = (
            "STRIPE_KEY",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:s",
        );
        let script = app_user_data(
            "bucket",
            Some("acme/dev/app/1.tar.gz"),
            env_file,
            &[secret],
            "r/",
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(env_file);
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} in\n{script}"))
        };
        assert!(at(&encoded) < at("--secret-id 'arn:aws:secretsmanager"));
        assert!(at("--secret-id 'arn:aws:secretsmanager") < at("umask 022"));
        assert!(at("umask 022") < at("chmod 0600 /etc/tenant/app.env"));
        assert!(at("chown app:app /etc/tenant/app.env") < at("set -a; . /etc/tenant/app.env"));
        // Without an app release the file is still written.
        let bare = app_user_data("bucket", None, env_file, &[], "r/");
        assert!(bare.contains(&encoded) && !bare.contains("install.sh"));
    }

    /// Runs the app instance's user data in bash with its paths moved into a temporary
    /// directory and stand-ins for `aws`, `curl` (the instance metadata), `id` and `chown`;
    /// returns the uploaded report keys, the first report's text and the environment file.
    fn start(install: Option<&str>) -> (Vec<String>, String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("src")).expect("mkdir");
        if let Some(body) = install {
            std::fs::write(root.join("src/install.sh"), body).expect("install.sh");
        }
        std::fs::create_dir_all(root.join("bucket/acme/dev/app")).expect("mkdir");
        let tarred = std::process::Command::new("tar")
            .args(["-czf", "bucket/acme/dev/app/a.tar.gz", "-C", "src", "."])
            .current_dir(root)
            .status()
            .expect("tar");
        assert!(tarred.success());
        let env_file = "GREETING='hello there'\n";
        let data = app_user_data(
            "b",
            Some("acme/dev/app/a.tar.gz"),
            env_file,
            &[],
            "_logs/acme/dev/rollout/acme-dev-r2/",
        )
        // First: the temporary directory is under /tmp itself.
        .replace("/tmp/", &format!("{}/", root.display()))
        .replace("/var/log/", &format!("{}/", root.display()))
        .replace("/opt/tenant/", &format!("{}/opt/", root.display()))
        .replace("/etc/tenant/", &format!("{}/etc/", root.display()));
        let fakes = format!(
            "aws() {{ local from=\"${{3/s3:\\/\\/b\\//{r}/bucket/}}\" to=\"${{4/s3:\\/\\/b\\//{r}/bucket/}}\"; mkdir -p \"$(dirname \"$to\")\"; cp \"$from\" \"$to\"; }}\n\
             curl() {{ echo i-0abc; }}\n\
             id() {{ return 0; }}\n\
             chown() {{ return 0; }}\n",
            r = root.display()
        );
        let _ = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{fakes}{data}"))
            .status()
            .expect("bash runs");
        let logs = root.join("bucket/_logs/acme/dev/rollout/acme-dev-r2");
        let keys: Vec<String> = std::fs::read_dir(&logs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let text = keys
            .first()
            .map(|k| std::fs::read_to_string(logs.join(k)).expect("report"))
            .unwrap_or_default();
        let env = std::fs::read_to_string(root.join("etc/app.env")).unwrap_or_default();
        (keys, text, env)
    }

    #[test]
    fn install_runs_with_the_environment_and_reports_per_instance() {
        let (keys, text, env) = start(Some("[ \"$GREETING\" = 'hello there' ] || exit 7"));
        assert_eq!(keys, ["i-0abc.ok.log"], "{text}");
        assert_eq!(env, "GREETING='hello there'\n");
        assert_eq!(
            crate::report::Report::parse(&text).summary(),
            "environment, fetch, unpack, install.sh"
        );
    }

    #[test]
    fn a_failing_install_is_reported_with_its_output() {
        let (keys, text, _) = start(Some(
            "echo 'migrating'; echo 'table users exists' >&2; exit 2",
        ));
        assert_eq!(keys, ["i-0abc.failed.log"]);
        let message = crate::report::Report::parse(&text)
            .failure("instance i-0abc")
            .expect("failed");
        assert_eq!(
            message,
            "install.sh exited 2 on instance i-0abc; its last lines:\n  migrating\n  table users exists"
        );
    }
}
