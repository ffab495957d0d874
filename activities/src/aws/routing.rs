//! `routing`: the environment's target group and its listener rule for `<env>.<domain>`.
//!
//! The rule's priority is held in the store's allocations (pool `listener-priority:<listener
//! ARN>`, owner the workflow key), taken by conditional write, so no two workflows ever hold
//! one. The first value tried is derived from the key (spreading tenants over the range), then
//! the next ones. A priority the load balancer says is in use by a rule the orchestrator does
//! not manage is marked as held by that rule, and another one is taken on the next attempt.
//! A retry finds its rule by host header on the listener before creating one; a rule or target
//! group found by host or name is adopted only when tagged as the environment's (see
//! `ownership`): another tenant's rule for the same host is never modified. When the tenant's
//! domain changed, the rule the environment has (recorded in its resources) is modified to the
//! new host and keeps its priority.

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, HostHeaderConditionConfig, ProtocolEnum, Rule, RuleCondition, Tag,
    TargetTypeEnum,
};
use sha2::{Digest, Sha256};
use workflows::{RoutingOutput, StepOutput};

use super::error::{classify, code};
use super::{AwsCloud, Error, Names, dns, ownership, tags};
use crate::{Invocation, Outcome};

/// Listener rule priorities range from 1 to 50,000.
const MAX_PRIORITY: u64 = 50_000;
/// How many values are tried from the derived one before giving up for this attempt.
const PROBES: u64 = 64;

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let host = format!("{}.{}", names.key().env, invocation.domain);
    let run = invocation.task.run;
    let target_group = ensure_target_group(cloud, names, run).await?;
    let owner = names.key().to_string();
    if let Some(rule) = find_rule(cloud, &host).await? {
        let arn = rule.rule_arn().unwrap_or_default().to_owned();
        check_tags(
            cloud,
            names,
            &format!("listener rule {arn} for host {host}"),
            &arn,
        )
        .await?;
        let priority: u32 = rule
            .priority()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::Retryable(format!("rule {arn} has no numeric priority")))?;
        if !forwards_to(&rule, &target_group) {
            cloud
                .clients
                .elb
                .modify_rule()
                .rule_arn(&arn)
                .actions(forward(&target_group))
                .send()
                .await
                .map_err(|e| classify("elasticloadbalancing:ModifyRule", &arn, &e))?;
        }
        return finish(cloud, names, invocation, host, target_group, arn, priority).await;
    }
    // The tenant's domain changed: the environment's rule is moved to the new host (it keeps
    // its priority), rather than a second rule made beside it.
    if let Some(recorded) = invocation
        .task
        .resources
        .routing
        .as_ref()
        .filter(|r| r.host != host)
    {
        let arn = &recorded.rule_arn;
        check_tags(
            cloud,
            names,
            &format!("listener rule {arn} for host {}", recorded.host),
            arn,
        )
        .await?;
        cloud
            .clients
            .elb
            .modify_rule()
            .rule_arn(arn)
            .conditions(host_condition(&host))
            .actions(forward(&target_group))
            .send()
            .await
            .map_err(|e| classify("elasticloadbalancing:ModifyRule", arn, &e))?;
        tracing::info!(from = %recorded.host, to = %host, rule = %arn, "listener rule moved to the new host");
        return finish(
            cloud,
            names,
            invocation,
            host,
            target_group,
            arn.clone(),
            recorded.priority,
        )
        .await;
    }
    let priority = acquire(cloud, &owner).await?;
    let created = cloud
        .clients
        .elb
        .create_rule()
        .listener_arn(&cloud.infra.listener_arn)
        .priority(i32::try_from(priority).unwrap_or(i32::MAX))
        .conditions(host_condition(&host))
        .actions(forward(&target_group))
        .set_tags(Some(elb_tags(names, run)))
        .send()
        .await;
    match created {
        Ok(out) => {
            let arn = out
                .rules()
                .first()
                .and_then(Rule::rule_arn)
                .map(str::to_owned)
                .ok_or_else(|| Error::Retryable("CreateRule returned no rule".to_owned()))?;
            tracing::info!(host = %host, priority, "listener rule created");
            finish(cloud, names, invocation, host, target_group, arn, priority).await
        }
        Err(e) if code(&e) == Some("PriorityInUse") => {
            // Held by a rule we do not manage: keep it marked as such, free ours, try another.
            let pool = cloud.priority_pool();
            cloud
                .allocations
                .release(&pool, u64::from(priority), &owner)
                .await?;
            cloud
                .allocations
                .allocate(
                    &pool,
                    u64::from(priority),
                    &format!("foreign-rule:{priority}"),
                )
                .await?;
            Err(Error::Retryable(format!(
                "listener priority {priority} is in use by a rule the orchestrator does not manage; another is taken next"
            )))
        }
        Err(e) => Err(classify(
            "elasticloadbalancing:CreateRule",
            &cloud.infra.listener_arn,
            &e,
        )),
    }
}

/// The step's end once the rule serves `host`: the alias record written where a zone takes
/// it (see `dns`), then the output.
async fn finish(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    host: String,
    target_group: String,
    rule: String,
    priority: u32,
) -> Result<Outcome, Error> {
    let zone = dns::zone_for(cloud, names, &host, invocation.domain.as_str()).await?;
    if let Some(zone) = &zone {
        dns::upsert(cloud, zone, &host).await?;
    }
    Ok(Outcome::Done(StepOutput::Routing(RoutingOutput {
        host,
        target_group_arn: target_group,
        rule_arn: rule,
        priority,
        dns_zone: zone,
    })))
}

pub(super) fn elb_tags(names: &Names, run: workflows::RunId) -> Vec<Tag> {
    tags(names, run)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn host_condition(host: &str) -> RuleCondition {
    RuleCondition::builder()
        .field("host-header")
        .host_header_config(HostHeaderConditionConfig::builder().values(host).build())
        .build()
}

fn forward(target_group: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(target_group)
        .build()
}

fn forwards_to(rule: &Rule, target_group: &str) -> bool {
    rule.actions()
        .iter()
        .any(|a| a.target_group_arn() == Some(target_group))
}

/// The rule of the listener whose host header is `host`.
pub(super) async fn find_rule(cloud: &AwsCloud, host: &str) -> Result<Option<Rule>, Error> {
    let listener = &cloud.infra.listener_arn;
    let mut marker: Option<String> = None;
    loop {
        let out = cloud
            .clients
            .elb
            .describe_rules()
            .listener_arn(listener)
            .set_marker(marker.clone())
            .send()
            .await
            .map_err(|e| classify("elasticloadbalancing:DescribeRules", listener, &e))?;
        let found = out.rules().iter().find(|r| {
            r.conditions().iter().any(|c| {
                c.field() == Some("host-header")
                    && (c.values().iter().any(|v| v == host)
                        || c.host_header_config()
                            .is_some_and(|h| h.values().iter().any(|v| v == host)))
            })
        });
        if let Some(rule) = found {
            return Ok(Some(rule.clone()));
        }
        match out.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_owned()),
            _ => return Ok(None),
        }
    }
}

/// The target group's ARN, creating it if it does not exist.
pub(super) async fn find_target_group(
    cloud: &AwsCloud,
    name: &str,
) -> Result<Option<String>, Error> {
    let found = cloud
        .clients
        .elb
        .describe_target_groups()
        .names(name)
        .send()
        .await;
    match found {
        Ok(out) => Ok(out
            .target_groups()
            .first()
            .and_then(|g| g.target_group_arn())
            .map(str::to_owned)),
        Err(e) if code(&e) == Some("TargetGroupNotFound") => Ok(None),
        Err(e) => Err(classify(
            "elasticloadbalancing:DescribeTargetGroups",
            name,
            &e,
        )),
    }
}

async fn ensure_target_group(
    cloud: &AwsCloud,
    names: &Names,
    run: workflows::RunId,
) -> Result<String, Error> {
    let name = names.target_group();
    if let Some(arn) = find_target_group(cloud, &name).await? {
        check_tags(cloud, names, &format!("target group {name}"), &arn).await?;
        return Ok(arn);
    }
    // AWS returns an existing group with the same settings; some endpoints answer
    // DuplicateTargetGroupName instead: adopt it either way.
    let created = cloud
        .clients
        .elb
        .create_target_group()
        .name(&name)
        .protocol(ProtocolEnum::Http)
        .port(cloud.infra.app_port)
        .vpc_id(&cloud.infra.vpc_id)
        .target_type(TargetTypeEnum::Instance)
        .health_check_path(&cloud.infra.health_check_path)
        .set_tags(Some(elb_tags(names, run)))
        .send()
        .await;
    let out = match created {
        Ok(out) => out,
        Err(e) if code(&e) == Some("DuplicateTargetGroupName") => {
            let arn = find_target_group(cloud, &name).await?.ok_or_else(|| {
                Error::Retryable(format!("target group {name} exists but is not visible yet"))
            })?;
            check_tags(cloud, names, &format!("target group {name}"), &arn).await?;
            return Ok(arn);
        }
        Err(e) => {
            return Err(classify(
                "elasticloadbalancing:CreateTargetGroup",
                &name,
                &e,
            ));
        }
    };
    tracing::info!(target_group = %name, "target group created");
    out.target_groups()
        .first()
        .and_then(|g| g.target_group_arn())
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable(format!("CreateTargetGroup {name} returned no group")))
}

/// The tags of the load balancer resource `arn` (a rule or a target group).
pub(super) async fn tags_of(cloud: &AwsCloud, arn: &str) -> Result<Vec<Tag>, Error> {
    let out = cloud
        .clients
        .elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:DescribeTags", arn, &e))?;
    Ok(out
        .tag_descriptions()
        .iter()
        .filter(|d| d.resource_arn() == Some(arn))
        .flat_map(|d| d.tags().iter().cloned())
        .collect())
}

/// Whether the load balancer resource `arn` is tagged as `names`' environment's.
pub(super) async fn is_ours(cloud: &AwsCloud, names: &Names, arn: &str) -> Result<bool, Error> {
    let tags = tags_of(cloud, arn).await?;
    Ok(ownership::is_ours(
        names,
        tags.iter().map(|t| (t.key(), t.value())),
    ))
}

/// `Ok` if the load balancer resource `arn` (`what`) is tagged as `names`' environment's.
async fn check_tags(cloud: &AwsCloud, names: &Names, what: &str, arn: &str) -> Result<(), Error> {
    let tags = tags_of(cloud, arn).await?;
    ownership::check(names, what, tags.iter().map(|t| (t.key(), t.value())))
}

/// The priority `owner` holds, taking a free one if it holds none.
async fn acquire(cloud: &AwsCloud, owner: &str) -> Result<u32, Error> {
    let pool = cloud.priority_pool();
    if let Some(v) = cloud.allocations.allocation_of(&pool, owner).await? {
        return u32::try_from(v).map_err(|_| Error::Terminal(format!("priority {v} out of range")));
    }
    let start = first_choice(owner);
    for i in 0..PROBES {
        let value = (start - 1 + i) % MAX_PRIORITY + 1;
        if cloud.allocations.allocate(&pool, value, owner).await? {
            return u32::try_from(value)
                .map_err(|_| Error::Terminal(format!("priority {value} out of range")));
        }
    }
    Err(Error::Retryable(format!(
        "no free listener priority among {PROBES} tried from {start}"
    )))
}

/// Where `owner` starts looking for a priority: spread over the range by a digest.
fn first_choice(owner: &str) -> u64 {
    let d = Sha256::digest(owner.as_bytes());
    let mut n = [0_u8; 8];
    n.copy_from_slice(&d[..8]);
    u64::from_be_bytes(n) % MAX_PRIORITY + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_choices_are_in_range_and_spread() {
        let picks: std::collections::BTreeSet<u64> = (0..100)
            .map(|i| first_choice(&format!("tenant{i}#dev")))
            .collect();
        assert!(picks.iter().all(|p| (1..=MAX_PRIORITY).contains(p)));
        assert!(picks.len() > 95, "{}", picks.len());
    }
}
