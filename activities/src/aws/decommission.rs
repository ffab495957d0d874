//! `decommission`: releases everything the environment holds, in an order the services
//! accept: groups (and so instances), launch template, listener rule (and its priority),
//! target group, the alias record, builders and images with their snapshots, the environment's source artifacts
//! and script reports in the artifact bucket, the database (with a final snapshot), then the
//! security groups once nothing uses them, and the instance role and profile. Each invocation deletes what it can and waits for
//! what is still going; the step is done when nothing is left.

use aws_sdk_ec2::types::Filter;
use workflows::StepOutput;

use super::error::{classify, code};
use super::names::{TAG_ENV, TAG_MANAGED_BY, TAG_TENANT};
use super::{
    AwsCloud, Error, MANAGED_BY, Names, database, dns, identity, network, ownership, rollout,
    routing,
};
use crate::{Invocation, Outcome};

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let mut going: Vec<String> = Vec::new();

    let groups = rollout::managed_groups(cloud, names).await?;
    for g in &groups {
        if let Some(name) = g.auto_scaling_group_name() {
            rollout::delete_group(cloud, name).await?;
            going.push(format!("group {name}"));
        }
    }
    delete_launch_templates(cloud, names).await?;

    let host = format!("{}.{}", names.key().env, invocation.domain);
    // Its alias record: in the zone the routing step wrote it to, else where it would go now.
    let recorded = invocation.task.resources.routing.as_ref();
    let zone = match recorded.and_then(|r| r.dns_zone.clone()) {
        Some(zone) => Some(zone),
        None => dns::zone_for(cloud, names, &host, invocation.domain.as_str()).await?,
    };
    if let Some(zone) = zone {
        let recorded_host = recorded.map_or(host.as_str(), |r| r.host.as_str());
        dns::delete(cloud, &zone, recorded_host).await?;
    }
    // A rule or a target group of the same host or name that is not ours stays as it is.
    if let Some(rule) = routing::find_rule(cloud, &host).await?
        && let Some(arn) = rule.rule_arn()
        && owned(cloud, names, &format!("listener rule {arn}"), arn).await?
    {
        match cloud.clients.elb.delete_rule().rule_arn(arn).send().await {
            Ok(_) => tracing::info!(host = %host, "listener rule deleted"),
            Err(e) if code(&e) == Some("RuleNotFound") => {}
            Err(e) => return Err(classify("elasticloadbalancing:DeleteRule", arn, &e)),
        }
    }
    let pool = cloud.priority_pool();
    let owner = names.key().to_string();
    if let Some(priority) = cloud.allocations.allocation_of(&pool, &owner).await? {
        cloud.allocations.release(&pool, priority, &owner).await?;
    }
    if let Some(arn) = routing::find_target_group(cloud, &names.target_group()).await?
        && owned(cloud, names, &format!("target group {arn}"), &arn).await?
    {
        match cloud
            .clients
            .elb
            .delete_target_group()
            .target_group_arn(&arn)
            .send()
            .await
        {
            Ok(_) => tracing::info!(target_group = %arn, "target group deleted"),
            Err(e) if code(&e) == Some("ResourceInUse") => {
                going.push(format!("target group {arn} (in use)"));
            }
            Err(e) if code(&e) == Some("TargetGroupNotFound") => {}
            Err(e) => return Err(classify("elasticloadbalancing:DeleteTargetGroup", &arn, &e)),
        }
    }

    going.extend(terminate_instances(cloud, names).await?);
    // Every image goes; the snapshots of those made before snapshots were tagged are found
    // only through their image.
    let (snapshots, _) = super::retention::deregister_images(cloud, names, |_| false).await?;
    going.extend(
        delete_snapshots(cloud, names, snapshots, |_| false)
            .await?
            .1,
    );
    // Its source artifacts and script reports: a provision from scratch fetches again.
    super::retention::prune_objects(cloud, &names.artifact_prefix()).await?;
    super::retention::prune_objects(cloud, &names.logs_prefix()).await?;

    let db = names.database();
    if let Some(instance) = database::find(cloud, &db).await?
        && database::is_ours(names, &instance)
    {
        let protected = instance.deletion_protection() == Some(true);
        if protected && going.is_empty() {
            // The last act before the final snapshot: only now that nothing else is left.
            cloud
                .clients
                .rds
                .modify_db_instance()
                .db_instance_identifier(&db)
                .deletion_protection(false)
                .apply_immediately(true)
                .send()
                .await
                .map_err(|e| classify("rds:ModifyDBInstance", &db, &e))?;
            tracing::info!(database = %db, "deletion protection lifted");
        } else if protected {
            tracing::debug!(database = %db, "deletion protection kept until the rest is gone");
        } else if instance.db_instance_status() != Some("deleting") {
            let snapshot = format!("{}-{}", names.final_snapshot(), invocation.task.run);
            match cloud
                .clients
                .rds
                .delete_db_instance()
                .db_instance_identifier(&db)
                .skip_final_snapshot(false)
                .final_db_snapshot_identifier(&snapshot)
                .delete_automated_backups(false)
                .send()
                .await
            {
                Ok(_) => {
                    tracing::info!(database = %db, snapshot = %snapshot, "database deletion requested")
                }
                Err(e) if code(&e) == Some("DBInstanceNotFound") => {}
                Err(e) => return Err(classify("rds:DeleteDBInstance", &db, &e)),
            }
        }
        going.push(format!("database {db}"));
    }

    if !going.is_empty() {
        return Ok(cloud.progress(format!("waiting for {} to go", going.join(", "))));
    }
    for name in [
        names.database_security_group(),
        names.instance_security_group(),
    ] {
        let Some(group) = network::find_group(cloud, &name).await? else {
            continue;
        };
        if !ownership::is_ours(names, network::ec2_pairs(group.tags())) {
            tracing::warn!(group = %name, "security group of this name is not the environment's; left as it is");
            continue;
        }
        let id = group.group_id().unwrap_or_default();
        match cloud
            .clients
            .ec2
            .delete_security_group()
            .group_id(id)
            .send()
            .await
        {
            Ok(_) => tracing::info!(group = %name, "security group deleted"),
            Err(e) if code(&e) == Some("InvalidGroup.NotFound") => {}
            // Network interfaces of terminated instances linger for a while.
            Err(e) if code(&e) == Some("DependencyViolation") => {
                return Ok(cloud.progress(format!("security group {name} still in use")));
            }
            Err(e) => return Err(classify("ec2:DeleteSecurityGroup", &name, &e)),
        }
    }
    identity::delete(cloud, names).await?;
    Ok(Outcome::Done(StepOutput::Decommissioned))
}

/// Whether the load balancer resource `arn` (`what`) is the environment's; logs it if not.
async fn owned(cloud: &AwsCloud, names: &Names, what: &str, arn: &str) -> Result<bool, Error> {
    let ours = routing::is_ours(cloud, names, arn).await?;
    if !ours {
        tracing::warn!(resource = %what, key = %names.key(), "not the environment's; left as it is");
    }
    Ok(ours)
}

/// Filters on the tags the orchestrator puts on everything of `names`' environment.
pub(super) fn env_filters(names: &Names) -> [Filter; 3] {
    [
        Filter::builder()
            .name(format!("tag:{TAG_MANAGED_BY}"))
            .values(MANAGED_BY)
            .build(),
        Filter::builder()
            .name(format!("tag:{TAG_TENANT}"))
            .values(names.key().tenant.as_str())
            .build(),
        Filter::builder()
            .name(format!("tag:{TAG_ENV}"))
            .values(names.key().env.to_string())
            .build(),
    ]
}

/// Deletes the environment's launch templates (one per run, tagged with tenant and env).
async fn delete_launch_templates(cloud: &AwsCloud, names: &Names) -> Result<(), Error> {
    let [managed, tenant, env] = env_filters(names);
    let out = cloud
        .clients
        .ec2
        .describe_launch_templates()
        .filters(managed)
        .filters(tenant)
        .filters(env)
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeLaunchTemplates", names.base(), &e))?;
    for t in out.launch_templates() {
        if let Some(name) = t.launch_template_name() {
            rollout::delete_template(cloud, name).await?;
        }
    }
    Ok(())
}

/// Terminates the environment's instances that are still there (builders; group instances
/// go with their groups). Returns what is still going.
async fn terminate_instances(cloud: &AwsCloud, names: &Names) -> Result<Vec<String>, Error> {
    let [managed, tenant, env] = env_filters(names);
    let out = cloud
        .clients
        .ec2
        .describe_instances()
        .filters(managed)
        .filters(tenant)
        .filters(env)
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .values("shutting-down")
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeInstances", names.base(), &e))?;
    let ids: Vec<String> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    match cloud
        .clients
        .ec2
        .terminate_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if code(&e) == Some("InvalidInstanceID.NotFound") => {}
        Err(e) => return Err(classify("ec2:TerminateInstances", names.base(), &e)),
    }
    Ok(ids.into_iter().map(|id| format!("instance {id}")).collect())
}

/// Deletes the snapshots of the environment's images: those tagged as its own (unless `kept`)
/// and those of the images just deregistered (`of_images`). Returns how many were deleted and
/// those still held by an image being deregistered, as still going.
pub(super) async fn delete_snapshots(
    cloud: &AwsCloud,
    names: &Names,
    of_images: Vec<String>,
    kept: impl Fn(&aws_sdk_ec2::types::Snapshot) -> bool,
) -> Result<(usize, Vec<String>), Error> {
    let [managed, tenant, env] = env_filters(names);
    let out = cloud
        .clients
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(managed)
        .filters(tenant)
        .filters(env)
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeSnapshots", names.base(), &e))?;
    let mut ids: Vec<String> = out
        .snapshots()
        .iter()
        .filter(|s| ownership::is_ours(names, network::ec2_pairs(s.tags())) && !kept(s))
        .filter_map(|s| s.snapshot_id())
        .map(str::to_owned)
        .chain(of_images)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut going = Vec::new();
    let mut deleted = 0;
    for id in ids {
        match cloud
            .clients
            .ec2
            .delete_snapshot()
            .snapshot_id(&id)
            .send()
            .await
        {
            Ok(_) => {
                deleted += 1;
                tracing::info!(snapshot = %id, "image snapshot deleted");
            }
            Err(e) if code(&e) == Some("InvalidSnapshot.NotFound") => {}
            Err(e) if code(&e) == Some("InvalidSnapshot.InUse") => {
                going.push(format!("snapshot {id} (its image is being deregistered)"));
            }
            Err(e) => return Err(classify("ec2:DeleteSnapshot", &id, &e)),
        }
    }
    Ok((deleted, going))
}
