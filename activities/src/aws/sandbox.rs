//! A sandbox of the shared infrastructure the reconcilers need, for trials and tests (on
//! moto, or an empty AWS account): a VPC with two subnets in two zones, a load balancer with
//! its security group and an HTTP listener (404 unless a rule matches), an artifact bucket
//! (with its lifecycle rules), a DB subnet group, a hosted zone `<name>.example` for the
//! platform's hosts, and the newest Amazon Linux 2023 image as the base image (instance roles
//! are per environment, made by the workflows). Every piece is looked up by name before it is created, so running it
//! again returns the same [`Infrastructure`].

use aws_config::SdkConfig;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, FixedResponseActionConfig, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, ProtocolEnum,
};

use super::error::{classify, code};
use super::{Clients, Error, Infrastructure, MANAGED_BY};

/// Creates (or finds) the sandbox named `prefix`; `source_url` goes into the result as it is.
pub async fn create(
    sdk: &SdkConfig,
    prefix: &str,
    source_url: &str,
) -> Result<Infrastructure, Error> {
    let clients = Clients::new(sdk);
    let region = sdk
        .region()
        .map_or_else(|| "us-east-1".to_owned(), |r| r.to_string());
    let vpc_id = vpc(&clients, prefix).await?;
    let mut subnet_ids = Vec::new();
    for (i, zone) in ["a", "b"].into_iter().enumerate() {
        subnet_ids.push(
            subnet(
                &clients,
                &vpc_id,
                &format!("{prefix}-{zone}"),
                &format!("10.0.{}.0/24", i + 1),
                &format!("{region}{zone}"),
            )
            .await?,
        );
    }
    let alb_group = alb_security_group(&clients, prefix, &vpc_id).await?;
    let listener_arn = load_balancer(&clients, prefix, &subnet_ids, &alb_group).await?;
    let artifact_bucket = format!("{prefix}-artifacts");
    bucket(&clients, &artifact_bucket).await?;
    let db_subnet_group = prefix.to_owned();
    db_subnets(&clients, &db_subnet_group, &subnet_ids).await?;
    let base_image_id = base_image(&clients).await?;
    let hosted_zone_id = Some(hosted_zone(&clients, &format!("{prefix}.example")).await?);
    Ok(Infrastructure {
        hosted_zone_id,
        vpc_id,
        subnet_ids,
        listener_arn,
        alb_security_group_id: alb_group,
        artifact_bucket,
        base_image_id,
        db_subnet_group,
        source_url: source_url.to_owned(),
        ..Infrastructure::default()
    })
}

fn name_tags(resource: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .tags(Tag::builder().key("Name").value(name).build())
        .tags(Tag::builder().key("managed-by").value(MANAGED_BY).build())
        .build()
}

fn by_name(name: &str) -> Filter {
    Filter::builder().name("tag:Name").values(name).build()
}

async fn vpc(clients: &Clients, name: &str) -> Result<String, Error> {
    let found = clients
        .ec2
        .describe_vpcs()
        .filters(by_name(name))
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeVpcs", name, &e))?;
    if let Some(id) = found.vpcs().first().and_then(|v| v.vpc_id()) {
        return Ok(id.to_owned());
    }
    let out = clients
        .ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .tag_specifications(name_tags(ResourceType::Vpc, name))
        .send()
        .await
        .map_err(|e| classify("ec2:CreateVpc", name, &e))?;
    out.vpc()
        .and_then(|v| v.vpc_id())
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable(format!("CreateVpc {name} returned no id")))
}

async fn subnet(
    clients: &Clients,
    vpc: &str,
    name: &str,
    cidr: &str,
    zone: &str,
) -> Result<String, Error> {
    let found = clients
        .ec2
        .describe_subnets()
        .filters(by_name(name))
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeSubnets", name, &e))?;
    if let Some(id) = found.subnets().first().and_then(|s| s.subnet_id()) {
        return Ok(id.to_owned());
    }
    let out = clients
        .ec2
        .create_subnet()
        .vpc_id(vpc)
        .cidr_block(cidr)
        .availability_zone(zone)
        .tag_specifications(name_tags(ResourceType::Subnet, name))
        .send()
        .await
        .map_err(|e| classify("ec2:CreateSubnet", name, &e))?;
    out.subnet()
        .and_then(|s| s.subnet_id())
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable(format!("CreateSubnet {name} returned no id")))
}

async fn alb_security_group(clients: &Clients, prefix: &str, vpc: &str) -> Result<String, Error> {
    let name = format!("{prefix}-alb");
    let found = clients
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(&name).build())
        .filters(Filter::builder().name("vpc-id").values(vpc).build())
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeSecurityGroups", &name, &e))?;
    if let Some(id) = found.security_groups().first().and_then(|g| g.group_id()) {
        return Ok(id.to_owned());
    }
    let out = clients
        .ec2
        .create_security_group()
        .group_name(&name)
        .description("the shared load balancer: HTTP from anywhere")
        .vpc_id(vpc)
        .tag_specifications(name_tags(ResourceType::SecurityGroup, &name))
        .send()
        .await
        .map_err(|e| classify("ec2:CreateSecurityGroup", &name, &e))?;
    let id = out
        .group_id()
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable(format!("CreateSecurityGroup {name} returned no id")))?;
    clients
        .ec2
        .authorize_security_group_ingress()
        .group_id(&id)
        .ip_permissions(
            aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(80)
                .to_port(80)
                .ip_ranges(
                    aws_sdk_ec2::types::IpRange::builder()
                        .cidr_ip("0.0.0.0/0")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("ec2:AuthorizeSecurityGroupIngress", &name, &e))?;
    Ok(id)
}

/// The load balancer `prefix` and its HTTP:80 listener; returns the listener's ARN.
async fn load_balancer(
    clients: &Clients,
    prefix: &str,
    subnets: &[String],
    group: &str,
) -> Result<String, Error> {
    let found = clients
        .elb
        .describe_load_balancers()
        .names(prefix)
        .send()
        .await;
    let arn = match found {
        Ok(out) => out
            .load_balancers()
            .first()
            .and_then(|l| l.load_balancer_arn())
            .map(str::to_owned),
        Err(e) if code(&e) == Some("LoadBalancerNotFound") => None,
        Err(e) => {
            return Err(classify(
                "elasticloadbalancing:DescribeLoadBalancers",
                prefix,
                &e,
            ));
        }
    };
    let arn = match arn {
        Some(arn) => arn,
        None => {
            let out = clients
                .elb
                .create_load_balancer()
                .name(prefix)
                .r#type(LoadBalancerTypeEnum::Application)
                .scheme(LoadBalancerSchemeEnum::InternetFacing)
                .set_subnets(Some(subnets.to_vec()))
                .security_groups(group)
                .send()
                .await
                .map_err(|e| classify("elasticloadbalancing:CreateLoadBalancer", prefix, &e))?;
            out.load_balancers()
                .first()
                .and_then(|l| l.load_balancer_arn())
                .map(str::to_owned)
                .ok_or_else(|| {
                    Error::Retryable(format!("CreateLoadBalancer {prefix} returned no ARN"))
                })?
        }
    };
    let listeners = clients
        .elb
        .describe_listeners()
        .load_balancer_arn(&arn)
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:DescribeListeners", &arn, &e))?;
    if let Some(l) = listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(80))
        .and_then(|l| l.listener_arn())
    {
        return Ok(l.to_owned());
    }
    let out = clients
        .elb
        .create_listener()
        .load_balancer_arn(&arn)
        .protocol(ProtocolEnum::Http)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::FixedResponse)
                .fixed_response_config(
                    FixedResponseActionConfig::builder()
                        .status_code("404")
                        .content_type("text/plain")
                        .message_body("no such host")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:CreateListener", &arn, &e))?;
    out.listeners()
        .first()
        .and_then(|l| l.listener_arn())
        .map(str::to_owned)
        .ok_or_else(|| Error::Retryable("CreateListener returned no ARN".to_owned()))
}

async fn bucket(clients: &Clients, name: &str) -> Result<(), Error> {
    match clients.s3.head_bucket().bucket(name).send().await {
        Ok(_) => return Ok(()),
        Err(e) if matches!(&e, aws_sdk_s3::error::SdkError::ServiceError(s) if s.err().is_not_found()) =>
            {}
        Err(e) => return Err(classify("s3:HeadBucket", name, &e)),
    }
    match clients.s3.create_bucket().bucket(name).send().await {
        Ok(_) => {}
        Err(e) if code(&e) == Some("BucketAlreadyOwnedByYou") => {}
        Err(e) => return Err(classify("s3:CreateBucket", name, &e)),
    }
    lifecycle(clients, name).await
}

/// How long script reports stay in the artifact bucket.
pub const REPORT_RETENTION_DAYS: i32 = 30;

/// The artifact bucket's lifecycle rules, a safety net under the rollout's own pruning:
/// script reports (`_logs/`) expire after [`REPORT_RETENTION_DAYS`] and incomplete multipart
/// uploads are aborted after a day. Source artifacts are not expired by age: the instances of
/// a kept release download theirs whenever their group scales out.
pub async fn lifecycle(clients: &Clients, bucket: &str) -> Result<(), Error> {
    use aws_sdk_s3::types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
        LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
    };
    let rule = |id: &str| {
        LifecycleRule::builder()
            .id(id)
            .status(ExpirationStatus::Enabled)
    };
    let reports = rule("expire-script-reports")
        .filter(
            LifecycleRuleFilter::builder()
                .prefix(super::LOGS_PREFIX)
                .build(),
        )
        .expiration(
            LifecycleExpiration::builder()
                .days(REPORT_RETENTION_DAYS)
                .build(),
        )
        .build()
        .map_err(|e| Error::Terminal(format!("lifecycle rule: {e}")))?;
    let uploads = rule("abort-incomplete-uploads")
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .abort_incomplete_multipart_upload(
            AbortIncompleteMultipartUpload::builder()
                .days_after_initiation(1)
                .build(),
        )
        .build()
        .map_err(|e| Error::Terminal(format!("lifecycle rule: {e}")))?;
    let config = BucketLifecycleConfiguration::builder()
        .rules(reports)
        .rules(uploads)
        .build()
        .map_err(|e| Error::Terminal(format!("lifecycle configuration: {e}")))?;
    clients
        .s3
        .put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(config)
        .send()
        .await
        .map_err(|e| classify("s3:PutBucketLifecycleConfiguration", bucket, &e))?;
    Ok(())
}

/// The platform's hosted zone `name` (found by name, else created): hosts under it get their
/// alias records there.
async fn hosted_zone(clients: &Clients, name: &str) -> Result<String, Error> {
    let out = clients
        .route53
        .list_hosted_zones_by_name()
        .dns_name(name)
        .max_items(1)
        .send()
        .await
        .map_err(|e| classify("route53:ListHostedZonesByName", name, &e))?;
    if let Some(zone) = out
        .hosted_zones()
        .iter()
        .find(|z| z.name().trim_end_matches('.') == name)
    {
        return Ok(super::dns::bare(zone.id()).to_owned());
    }
    let out = clients
        .route53
        .create_hosted_zone()
        .name(name)
        .caller_reference(name)
        .send()
        .await
        .map_err(|e| classify("route53:CreateHostedZone", name, &e))?;
    out.hosted_zone()
        .map(|z| super::dns::bare(z.id()).to_owned())
        .ok_or_else(|| Error::Retryable(format!("CreateHostedZone {name} returned no zone")))
}

async fn db_subnets(clients: &Clients, name: &str, subnets: &[String]) -> Result<(), Error> {
    match clients
        .rds
        .describe_db_subnet_groups()
        .db_subnet_group_name(name)
        .send()
        .await
    {
        Ok(out) if !out.db_subnet_groups().is_empty() => return Ok(()),
        Ok(_) => {}
        Err(e) if code(&e) == Some("DBSubnetGroupNotFoundFault") => {}
        Err(e) => return Err(classify("rds:DescribeDBSubnetGroups", name, &e)),
    }
    match clients
        .rds
        .create_db_subnet_group()
        .db_subnet_group_name(name)
        .db_subnet_group_description("tenant databases")
        .set_subnet_ids(Some(subnets.to_vec()))
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some("DBSubnetGroupAlreadyExists") => Ok(()),
        Err(e) => Err(classify("rds:CreateDBSubnetGroup", name, &e)),
    }
}

/// The newest Amazon Linux 2023 x86_64 image.
async fn base_image(clients: &Clients) -> Result<String, Error> {
    let out = clients
        .ec2
        .describe_images()
        .owners("amazon")
        .filters(
            Filter::builder()
                .name("name")
                .values("al2023-ami-2023*")
                .build(),
        )
        .filters(
            Filter::builder()
                .name("architecture")
                .values("x86_64")
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeImages", "al2023-ami-2023*", &e))?;
    let mut images: Vec<_> = out.images().iter().collect();
    images.sort_by_key(|i| i.creation_date().unwrap_or_default().to_owned());
    images
        .last()
        .and_then(|i| i.image_id())
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::Terminal("no Amazon Linux 2023 image found for the base image".to_owned())
        })
}
