//! The environment's DNS record: an alias `A` record `<env>.<domain>` to the load balancer of
//! the configured listener, written by the routing step and deleted by decommission.
//!
//! The record goes into a hosted zone the host is under: the platform's zone
//! (`[infrastructure] hosted_zone_id`) when the host is a name in it, else a zone named exactly
//! the tenant's domain and tagged `tenant=<tenant id>` (a zone delegated for the tenant). A
//! zone of that name tagged for anyone else, or untagged, is never written to. With no zone,
//! no record is written and the step says so in its output (no zone recorded).

use aws_sdk_route53::types::{
    AliasTarget, Change, ChangeAction, ChangeBatch, ResourceRecordSet, RrType, TagResourceType,
};

use super::error::classify;
use super::names::TAG_TENANT;
use super::{AwsCloud, Error, Names};

/// A hosted zone's id without the `/hostedzone/` prefix.
pub(super) fn bare(id: &str) -> &str {
    id.trim_start_matches("/hostedzone/")
}

/// `name` without a trailing dot, lowercased.
fn plain(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The hosted zone the record of `host` (of the tenant's `domain`) goes into, if any.
pub(super) async fn zone_for(
    cloud: &AwsCloud,
    names: &Names,
    host: &str,
    domain: &str,
) -> Result<Option<String>, Error> {
    let r53 = &cloud.clients.route53;
    if let Some(zone) = &cloud.infra.hosted_zone_id {
        let out = r53
            .get_hosted_zone()
            .id(bare(zone))
            .send()
            .await
            .map_err(|e| classify("route53:GetHostedZone", zone, &e))?;
        if let Some(z) = out.hosted_zone()
            && host.ends_with(&format!(".{}", plain(z.name())))
        {
            return Ok(Some(bare(z.id()).to_owned()));
        }
    }
    let out = r53
        .list_hosted_zones_by_name()
        .dns_name(domain)
        .max_items(10)
        .send()
        .await
        .map_err(|e| classify("route53:ListHostedZonesByName", domain, &e))?;
    let tenant = names.key().tenant.as_str();
    for zone in out.hosted_zones() {
        if plain(zone.name()) != plain(domain) {
            continue;
        }
        let id = bare(zone.id());
        let tags = r53
            .list_tags_for_resource()
            .resource_type(TagResourceType::Hostedzone)
            .resource_id(id)
            .send()
            .await
            .map_err(|e| classify("route53:ListTagsForResource", id, &e))?;
        let owner = tags
            .resource_tag_set()
            .into_iter()
            .flat_map(|s| s.tags())
            .find(|t| t.key() == Some(TAG_TENANT))
            .and_then(|t| t.value());
        if owner == Some(tenant) {
            return Ok(Some(id.to_owned()));
        }
    }
    Ok(None)
}

/// The DNS name and canonical hosted zone of the configured listener's load balancer.
async fn load_balancer(cloud: &AwsCloud) -> Result<(String, String), Error> {
    let listener = &cloud.infra.listener_arn;
    let elb = &cloud.clients.elb;
    let out = elb
        .describe_listeners()
        .listener_arns(listener)
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:DescribeListeners", listener, &e))?;
    let lb = out
        .listeners()
        .first()
        .and_then(|l| l.load_balancer_arn())
        .ok_or_else(|| Error::Terminal(format!("listener {listener} has no load balancer")))?;
    let out = elb
        .describe_load_balancers()
        .load_balancer_arns(lb)
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:DescribeLoadBalancers", lb, &e))?;
    let found = out.load_balancers().first();
    match (
        found.and_then(|b| b.dns_name()),
        found.and_then(|b| b.canonical_hosted_zone_id()),
    ) {
        (Some(name), Some(zone)) => Ok((name.to_owned(), zone.to_owned())),
        _ => Err(Error::Retryable(format!(
            "load balancer {lb} has no DNS name yet"
        ))),
    }
}

/// Writes (or overwrites) the alias record of `host` in `zone` to the listener's load
/// balancer.
pub(super) async fn upsert(cloud: &AwsCloud, zone: &str, host: &str) -> Result<(), Error> {
    let (dns_name, lb_zone) = load_balancer(cloud).await?;
    change(cloud, zone, host, ChangeAction::Upsert, &dns_name, &lb_zone).await?;
    tracing::info!(host, zone, target = %dns_name, "alias record written");
    Ok(())
}

/// Deletes the alias record of `host` in `zone`, if it is there.
pub(super) async fn delete(cloud: &AwsCloud, zone: &str, host: &str) -> Result<(), Error> {
    let out = cloud
        .clients
        .route53
        .list_resource_record_sets()
        .hosted_zone_id(zone)
        .start_record_name(host)
        .start_record_type(RrType::A)
        .max_items(1)
        .send()
        .await
        .map_err(|e| classify("route53:ListResourceRecordSets", zone, &e))?;
    let Some(set) = out
        .resource_record_sets()
        .iter()
        .find(|s| plain(s.name()) == plain(host) && s.r#type() == &RrType::A)
    else {
        return Ok(());
    };
    let Some(alias) = set.alias_target() else {
        // Not an alias the platform wrote: left alone.
        return Ok(());
    };
    change(
        cloud,
        zone,
        host,
        ChangeAction::Delete,
        alias.dns_name(),
        alias.hosted_zone_id(),
    )
    .await?;
    tracing::info!(host, zone, "alias record deleted");
    Ok(())
}

async fn change(
    cloud: &AwsCloud,
    zone: &str,
    host: &str,
    action: ChangeAction,
    dns_name: &str,
    lb_zone: &str,
) -> Result<(), Error> {
    let built = |e: aws_sdk_route53::error::BuildError| {
        Error::Terminal(format!("the change of record {host}: {e}"))
    };
    let set = ResourceRecordSet::builder()
        .name(host)
        .r#type(RrType::A)
        .alias_target(
            AliasTarget::builder()
                .dns_name(dns_name)
                .hosted_zone_id(lb_zone)
                .evaluate_target_health(false)
                .build()
                .map_err(built)?,
        )
        .build()
        .map_err(built)?;
    let batch = ChangeBatch::builder()
        .changes(
            Change::builder()
                .action(action)
                .resource_record_set(set)
                .build()
                .map_err(built)?,
        )
        .build()
        .map_err(built)?;
    cloud
        .clients
        .route53
        .change_resource_record_sets()
        .hosted_zone_id(zone)
        .change_batch(batch)
        .send()
        .await
        .map_err(|e| classify("route53:ChangeResourceRecordSets", host, &e))?;
    Ok(())
}
