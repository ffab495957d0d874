//! The environment's instance identity: an IAM role and an instance profile `<t>-<e>` under
//! the path [`IAM_PATH`], made by the `network` step and deleted by `decommission`. Its policy
//! reads the environment's artifacts and, once it has one, the environment's database secret.
//!
//! Builders run the tenant's provisioning scripts and instances run the tenant's app, so what
//! their credentials allow is what tenant code (or an SSRF in a tenant app) can do. The role of
//! one environment may only read that environment's artifacts (`<tenant>/<env>/…` of the
//! artifact bucket) and its own database's master-user secret; no two environments share a role, and the instances require IMDSv2 with a
//! hop limit of 1 (see the launch settings in `image` and `rollout`), so a container or a
//! forwarded request on the instance cannot reach the credentials either.
//!
//! The role's inline policy is written on every `network` step, so a changed bucket or a
//! policy edited by hand is put right by the next run. A role or profile of the same name that
//! is not tagged as the environment's is refused (see `ownership`).

use aws_sdk_iam::types::{InstanceProfile, Role, Tag};

use super::error::{classify, code};
use super::{AwsCloud, Error, Names, ownership, tags};
use crate::Invocation;

/// The IAM path of every role and instance profile the orchestrator makes, so that its own
/// permissions can be limited to them (`arn:aws:iam::<account>:role/tenant-host/*`).
pub const IAM_PATH: &str = "/tenant-host/";

/// The name of the role's inline policy (named when it held only the artifacts; kept so that
/// the next write replaces the policy of roles made before).
const POLICY_NAME: &str = "environment-artifacts";

/// EC2 may assume the role (for instances launched with the profile).
const TRUST_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

/// The inline policy of `names`' role: read the environment's artifacts in `bucket`, write its
/// script reports under `_logs/<tenant>/<env>/` (see [`crate::report`]), and read the
/// `secrets` its instances need (the database's master-user secret once there is one, and the
/// secrets its config vars reference), nothing else. `partition` is that of the account
/// (`aws`, `aws-cn`, `aws-us-gov`).
pub(super) fn policy(names: &Names, partition: &str, bucket: &str, secrets: &[&str]) -> String {
    let prefix = names.artifact_prefix();
    let mut statements = vec![
        serde_json::json!({
            "Sid": "ReadTheEnvironmentsArtifacts",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": format!("arn:{partition}:s3:::{bucket}/{prefix}*"),
        }),
        serde_json::json!({
            "Sid": "WriteTheEnvironmentsScriptReports",
            "Effect": "Allow",
            "Action": "s3:PutObject",
            "Resource": format!("arn:{partition}:s3:::{bucket}/{}*", names.logs_prefix()),
        }),
    ];
    if !secrets.is_empty() {
        statements.push(serde_json::json!({
            "Sid": "ReadTheEnvironmentsSecrets",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
            "Resource": secrets,
        }));
    }
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements }).to_string()
}

/// IAM tags as (key, value) pairs.
fn pairs(tags: &[Tag]) -> impl Iterator<Item = (Option<&str>, Option<&str>)> + Clone {
    tags.iter().map(|t| (Some(t.key()), Some(t.value())))
}

fn iam_tags(names: &Names, run: workflows::RunId) -> Vec<Tag> {
    tags(names, run)
        .into_iter()
        .filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok())
        .collect()
}

/// The role `name`, if it exists.
async fn role(cloud: &AwsCloud, name: &str) -> Result<Option<Role>, Error> {
    match cloud.clients.iam.get_role().role_name(name).send().await {
        Ok(out) => Ok(out.role().cloned()),
        Err(e) if code(&e) == Some("NoSuchEntity") => Ok(None),
        Err(e) => Err(classify("iam:GetRole", name, &e)),
    }
}

/// The instance profile `name`, if it exists.
async fn profile(cloud: &AwsCloud, name: &str) -> Result<Option<InstanceProfile>, Error> {
    let got = cloud
        .clients
        .iam
        .get_instance_profile()
        .instance_profile_name(name)
        .send()
        .await;
    match got {
        Ok(out) => Ok(out.instance_profile().cloned()),
        Err(e) if code(&e) == Some("NoSuchEntity") => Ok(None),
        Err(e) => Err(classify("iam:GetInstanceProfile", name, &e)),
    }
}

/// Makes (or finds) the environment's role, its policy and its instance profile. The policy
/// names the database secret of the task's resources when there is one, and the secrets the
/// invocation's config references: every step that writes it does so from what it was
/// dispatched with, so a later image build does not take a secret away from instances that
/// serve.
pub(super) async fn ensure(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<(), Error> {
    let (run, resources, config) = (
        invocation.task.run,
        &invocation.task.resources,
        invocation.config,
    );
    let name = names.instance_role();
    let iam = &cloud.clients.iam;
    if let Some(r) = role(cloud, &name).await? {
        ownership::check(names, &format!("IAM role {name}"), pairs(r.tags()))?;
    } else {
        match iam
            .create_role()
            .role_name(&name)
            .path(IAM_PATH)
            .assume_role_policy_document(TRUST_POLICY)
            .description(format!("instances of {}", names.key()))
            .set_tags(Some(iam_tags(names, run)))
            .send()
            .await
        {
            Ok(_) => tracing::info!(role = %name, "instance role created"),
            // Made meanwhile by another attempt; its tags are checked on the next one.
            Err(e) if code(&e) == Some("EntityAlreadyExists") => {}
            Err(e) => return Err(classify("iam:CreateRole", &name, &e)),
        }
    }
    for arn in config.secret_arns() {
        check_referenced_secret(cloud, names, arn).await?;
    }
    let mut secrets: Vec<&str> = resources
        .database
        .as_ref()
        .map(|d| d.secret_arn.as_str())
        .into_iter()
        .chain(config.secret_arns())
        .collect();
    secrets.sort_unstable();
    secrets.dedup();
    let document = policy(
        names,
        cloud.infra.partition(),
        &cloud.infra.artifact_bucket,
        &secrets,
    );
    iam.put_role_policy()
        .role_name(&name)
        .policy_name(POLICY_NAME)
        .policy_document(document)
        .send()
        .await
        .map_err(|e| classify("iam:PutRolePolicy", &name, &e))?;
    let roles: Vec<String> = if let Some(p) = profile(cloud, &name).await? {
        ownership::check(
            names,
            &format!("IAM instance profile {name}"),
            pairs(p.tags()),
        )?;
        p.roles().iter().map(|r| r.role_name().to_owned()).collect()
    } else {
        match iam
            .create_instance_profile()
            .instance_profile_name(&name)
            .path(IAM_PATH)
            .set_tags(Some(iam_tags(names, run)))
            .send()
            .await
        {
            Ok(_) => tracing::info!(profile = %name, "instance profile created"),
            Err(e) if code(&e) == Some("EntityAlreadyExists") => {}
            Err(e) => return Err(classify("iam:CreateInstanceProfile", &name, &e)),
        }
        Vec::new()
    };
    if let Some(other) = roles.iter().find(|r| **r != name) {
        return Err(Error::Terminal(format!(
            "IAM instance profile {name} holds role {other}, not the environment's role {name}; it is left as it is"
        )));
    }
    if roles.is_empty() {
        match iam
            .add_role_to_instance_profile()
            .instance_profile_name(&name)
            .role_name(&name)
            .send()
            .await
        {
            Ok(_) => {}
            // A profile holds one role: added meanwhile by another attempt.
            Err(e) if code(&e) == Some("LimitExceeded") => {}
            Err(e) => return Err(classify("iam:AddRoleToInstanceProfile", &name, &e)),
        }
    }
    Ok(())
}

/// A secret a config var references may be granted to the environment's role only if it is
/// the tenant's: tagged `tenant` with the tenant's id. Anything else (another tenant's secret,
/// a database secret of the platform, one that does not exist or cannot be read) is a
/// terminal error naming it, so that no config var can open another tenant's secret.
async fn check_referenced_secret(cloud: &AwsCloud, names: &Names, arn: &str) -> Result<(), Error> {
    secret_of_tenant(&cloud.clients.secrets, &names.key().tenant, arn).await
}

/// Checks, with `sdk`'s credentials, that secret `arn` exists, can be described, and is tagged
/// `tenant=<tenant>` (what [`ensure`] requires of a referenced secret); `wfctl config set`
/// refuses a `--secret` that is not, before anything is written.
pub async fn check_secret(
    sdk: &aws_config::SdkConfig,
    tenant: &workflows::TenantId,
    arn: &str,
) -> Result<(), Error> {
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    secret_of_tenant(&client, tenant, arn).await
}

async fn secret_of_tenant(
    client: &aws_sdk_secretsmanager::Client,
    tenant: &workflows::TenantId,
    arn: &str,
) -> Result<(), Error> {
    let described = client
        .describe_secret()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| classify("secretsmanager:DescribeSecret", arn, &e))?;
    let tenant = tenant.as_str();
    let owner = described
        .tags()
        .iter()
        .find(|t| t.key() == Some(super::names::TAG_TENANT))
        .and_then(|t| t.value());
    if owner == Some(tenant) {
        return Ok(());
    }
    Err(Error::Terminal(format!(
        "config var secret {arn} is not tenant {tenant}'s (its tag tenant is {}): only secrets \
         tagged tenant={tenant} may be referenced",
        owner.map_or_else(|| "missing".to_owned(), |o| format!("{o:?}"))
    )))
}

/// Deletes the environment's instance profile and role, if they are its own (tagged so).
pub(super) async fn delete(cloud: &AwsCloud, names: &Names) -> Result<(), Error> {
    let name = names.instance_role();
    let iam = &cloud.clients.iam;
    if let Some(p) = profile(cloud, &name).await? {
        if !ownership::is_ours(names, pairs(p.tags())) {
            tracing::warn!(profile = %name, "instance profile of this name is not the environment's; left as it is");
        } else {
            for r in p.roles() {
                match iam
                    .remove_role_from_instance_profile()
                    .instance_profile_name(&name)
                    .role_name(r.role_name())
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if code(&e) == Some("NoSuchEntity") => {}
                    Err(e) => return Err(classify("iam:RemoveRoleFromInstanceProfile", &name, &e)),
                }
            }
            match iam
                .delete_instance_profile()
                .instance_profile_name(&name)
                .send()
                .await
            {
                Ok(_) => tracing::info!(profile = %name, "instance profile deleted"),
                Err(e) if code(&e) == Some("NoSuchEntity") => {}
                Err(e) => return Err(classify("iam:DeleteInstanceProfile", &name, &e)),
            }
        }
    }
    let Some(r) = role(cloud, &name).await? else {
        return Ok(());
    };
    if !ownership::is_ours(names, pairs(r.tags())) {
        tracing::warn!(role = %name, "IAM role of this name is not the environment's; left as it is");
        return Ok(());
    }
    match iam
        .delete_role_policy()
        .role_name(&name)
        .policy_name(POLICY_NAME)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if code(&e) == Some("NoSuchEntity") => {}
        Err(e) => return Err(classify("iam:DeleteRolePolicy", &name, &e)),
    }
    match iam.delete_role().role_name(&name).send().await {
        Ok(_) => tracing::info!(role = %name, "instance role deleted"),
        Err(e) if code(&e) == Some("NoSuchEntity") => {}
        Err(e) => return Err(classify("iam:DeleteRole", &name, &e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflows::{Environment, TenantId, WorkflowKey};

    #[test]
    fn a_policy_reads_only_its_environments_artifacts() {
        let names = |t: &str, e| Names::new(&WorkflowKey::new(TenantId::new(t).expect("id"), e));
        let acme = policy(&names("acme", Environment::Dev), "aws", "bucket", &[]);
        let v: serde_json::Value = serde_json::from_str(&acme).expect("json");
        let statements = v["Statement"].as_array().expect("statements");
        assert_eq!(statements.len(), 2);
        assert_eq!(statements[0]["Action"], "s3:GetObject");
        assert_eq!(statements[0]["Resource"], "arn:aws:s3:::bucket/acme/dev/*");
        assert_eq!(statements[1]["Action"], "s3:PutObject");
        assert_eq!(
            statements[1]["Resource"], "arn:aws:s3:::bucket/_logs/acme/dev/*",
            "it writes only its own reports"
        );
        let prod = policy(
            &names("acme", Environment::Production),
            "aws-cn",
            "bucket",
            &[],
        );
        assert!(
            prod.contains("arn:aws-cn:s3:::bucket/acme/production/*"),
            "{prod}"
        );
        // A tenant whose id starts like another's cannot read the other's prefix.
        let short = policy(&names("acm", Environment::Dev), "aws", "bucket", &[]);
        assert!(short.contains("bucket/acm/dev/*"), "{short}");
    }

    #[test]
    fn the_policy_reads_exactly_the_secrets_it_is_given() {
        let names = Names::new(&WorkflowKey::new(
            TenantId::new("acme").expect("id"),
            Environment::Staging,
        ));
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-acme-AbC123";
        let doc = policy(&names, "aws", "bucket", &[arn]);
        let v: serde_json::Value = serde_json::from_str(&doc).expect("json");
        let statements = v["Statement"].as_array().expect("statements");
        assert_eq!(statements.len(), 3);
        assert_eq!(
            statements[2]["Resource"],
            serde_json::json!([arn]),
            "exactly this secret, no wildcard"
        );
        assert_eq!(
            statements[2]["Action"],
            serde_json::json!([
                "secretsmanager:GetSecretValue",
                "secretsmanager:DescribeSecret"
            ])
        );
    }
}
