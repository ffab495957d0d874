//! `network`: the environment's two security groups and its instance identity (an IAM role
//! and instance profile of its own: see `identity`). The instances' group admits the
//! application port from the load balancer's group only; the database's group admits MySQL
//! (3306) from the instances' group only. Both are found by name in the VPC before being
//! created (and adopted only when tagged as the environment's), and their one ingress rule is
//! added only when missing.

use aws_sdk_ec2::types::{
    Filter, IpPermission, ResourceType, SecurityGroup, Tag, TagSpecification, UserIdGroupPair,
};
use workflows::{NetworkOutput, RunId, StepOutput};

use super::error::{classify, code};
use super::{AwsCloud, Error, Names, identity, ownership, tags};
use crate::{Invocation, Outcome};

const MYSQL_PORT: i32 = 3306;

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let run = invocation.task.run;
    let instances = ensure_group(
        cloud,
        names,
        &names.instance_security_group(),
        "instances of one tenant environment: the application port from the load balancer only",
        run,
    )
    .await?;
    let instances_id = group_id(&instances)?;
    ensure_ingress(
        cloud,
        &instances,
        cloud.infra.app_port,
        &cloud.infra.alb_security_group_id,
    )
    .await?;
    let database = ensure_group(
        cloud,
        names,
        &names.database_security_group(),
        "database of one tenant environment: MySQL from the environment's instances only",
        run,
    )
    .await?;
    ensure_ingress(cloud, &database, MYSQL_PORT, &instances_id).await?;
    identity::ensure(cloud, names, invocation).await?;
    Ok(Outcome::Done(StepOutput::Network(NetworkOutput {
        instance_security_group: instances_id,
        database_security_group: group_id(&database)?,
    })))
}

fn group_id(g: &SecurityGroup) -> Result<String, Error> {
    g.group_id()
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable("a security group came back without an id".to_owned()))
}

/// The security group `name` of the VPC, if it exists.
pub(super) async fn find_group(
    cloud: &AwsCloud,
    name: &str,
) -> Result<Option<SecurityGroup>, Error> {
    let out = cloud
        .clients
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .filters(
            Filter::builder()
                .name("vpc-id")
                .values(&cloud.infra.vpc_id)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeSecurityGroups", name, &e))?;
    Ok(out.security_groups().first().cloned())
}

/// EC2 tags of `names`' environment.
pub(super) fn ec2_tags(names: &Names, run: RunId, name: &str) -> Vec<Tag> {
    let mut all: Vec<Tag> = tags(names, run)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    all.push(
        Tag::builder()
            .key(super::names::TAG_NAME)
            .value(name)
            .build(),
    );
    all
}

async fn ensure_group(
    cloud: &AwsCloud,
    names: &Names,
    name: &str,
    description: &str,
    run: RunId,
) -> Result<SecurityGroup, Error> {
    if let Some(g) = find_group(cloud, name).await? {
        ownership::check(
            names,
            &format!("security group {name}"),
            ec2_pairs(g.tags()),
        )?;
        return Ok(g);
    }
    let created = cloud
        .clients
        .ec2
        .create_security_group()
        .group_name(name)
        .description(description)
        .vpc_id(&cloud.infra.vpc_id)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .set_tags(Some(ec2_tags(names, run, name)))
                .build(),
        )
        .send()
        .await;
    match created {
        Ok(_) => {}
        // Created meanwhile by another attempt: adopt it.
        Err(e) if code(&e) == Some("InvalidGroup.Duplicate") => {}
        Err(e) => return Err(classify("ec2:CreateSecurityGroup", name, &e)),
    }
    tracing::info!(group = name, "security group created");
    let group = find_group(cloud, name).await?.ok_or_else(|| {
        Error::Retryable(format!(
            "security group {name} not visible yet after creation"
        ))
    })?;
    ownership::check(
        names,
        &format!("security group {name}"),
        ec2_pairs(group.tags()),
    )?;
    Ok(group)
}

/// EC2 tags as (key, value) pairs.
pub(super) fn ec2_pairs(
    tags: &[Tag],
) -> impl Iterator<Item = (Option<&str>, Option<&str>)> + Clone {
    tags.iter().map(|t| (t.key(), t.value()))
}

async fn ensure_ingress(
    cloud: &AwsCloud,
    group: &SecurityGroup,
    port: i32,
    source_group: &str,
) -> Result<(), Error> {
    let present = group.ip_permissions().iter().any(|p| {
        p.from_port() == Some(port)
            && p.to_port() == Some(port)
            && p.user_id_group_pairs()
                .iter()
                .any(|pair| pair.group_id() == Some(source_group))
    });
    if present {
        return Ok(());
    }
    let id = group_id(group)?;
    let result = cloud
        .clients
        .ec2
        .authorize_security_group_ingress()
        .group_id(&id)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(port)
                .to_port(port)
                .user_id_group_pairs(UserIdGroupPair::builder().group_id(source_group).build())
                .build(),
        )
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some("InvalidPermission.Duplicate") => Ok(()),
        Err(e) => Err(classify("ec2:AuthorizeSecurityGroupIngress", &id, &e)),
    }
}
