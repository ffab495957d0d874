//! `database`: the environment's RDS MySQL instance.
//!
//! Created encrypted (with the configured KMS key, or RDS's default key), with
//! `ManageMasterUserPassword` (RDS keeps the master password in a Secrets Manager secret and
//! the orchestrator never sees it), in the configured DB subnet group, behind the network
//! step's database security group, not publicly accessible. The step is done when the
//! instance is available; its output is the endpoint and the secret's ARN. A database task of
//! an environment provisioned again with `--from-snapshot` restores the newest final snapshot
//! of the environment's database (tagged as its own) with the same settings instead.

use aws_sdk_rds::types::{DbInstance, Tag};
use workflows::{DatabaseOutput, StepOutput};

use super::error::{classify, code};
use super::{AwsCloud, Error, Names, ownership, tags};
use crate::{Invocation, Outcome};

/// Statuses that end by themselves.
const SETTLING: &[&str] = &[
    "creating",
    "backing-up",
    "modifying",
    "configuring-enhanced-monitoring",
    "configuring-iam-database-auth",
    "configuring-log-exports",
    "rebooting",
    "starting",
    "maintenance",
    "upgrading",
    "storage-optimization",
    "renaming",
    "resetting-master-credentials",
    "converting-to-vpc",
    "moving-to-vpc",
];

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
) -> Result<Outcome, Error> {
    let id = names.database();
    let Some(db) = find(cloud, &id).await? else {
        if invocation.task.restore_database {
            let snapshot = restore(cloud, names, invocation, &id).await?;
            return Ok(cloud.progress(format!("database {id} restoring from {snapshot}")));
        }
        create(cloud, names, invocation, &id).await?;
        return Ok(cloud.progress(format!("database {id} creating")));
    };
    ownership::check(names, &format!("database {id}"), pairs(&db))?;
    let status = db.db_instance_status().unwrap_or("unknown");
    match status {
        "available" => {
            let endpoint = db.endpoint().and_then(|e| {
                e.address()
                    .map(|a| format!("{a}:{}", e.port().unwrap_or(3306)))
            });
            let Some(endpoint) = endpoint else {
                return Ok(
                    cloud.progress(format!("database {id} available without an endpoint yet"))
                );
            };
            let secret = db
                .master_user_secret()
                .and_then(|s| s.secret_arn())
                .ok_or_else(|| {
                    Error::Terminal(format!(
                        "database {id} has no RDS-managed master secret (it was not created with ManageMasterUserPassword)"
                    ))
                })?;
            Ok(Outcome::Done(StepOutput::Database(DatabaseOutput {
                instance_id: id,
                endpoint,
                secret_arn: secret.to_owned(),
            })))
        }
        s if SETTLING.contains(&s) => Ok(cloud.progress(format!("database {id} {s}"))),
        "deleting" => Err(Error::Retryable(format!(
            "database {id} is being deleted; it is created again once it is gone"
        ))),
        other => Err(Error::Terminal(format!(
            "database {id} is {other}: it needs an operator"
        ))),
    }
}

/// The instance's tags as (key, value) pairs.
fn pairs(db: &DbInstance) -> impl Iterator<Item = (Option<&str>, Option<&str>)> + Clone {
    db.tag_list().iter().map(|t| (t.key(), t.value()))
}

/// Whether `db` is tagged as `names`' environment's.
pub(super) fn is_ours(names: &Names, db: &DbInstance) -> bool {
    let ours = ownership::is_ours(names, pairs(db));
    if !ours {
        tracing::warn!(database = ?db.db_instance_identifier(), key = %names.key(),
            "database of this name is not the environment's; left as it is");
    }
    ours
}

/// The instance `id`, if it exists.
pub(super) async fn find(cloud: &AwsCloud, id: &str) -> Result<Option<DbInstance>, Error> {
    match cloud
        .clients
        .rds
        .describe_db_instances()
        .db_instance_identifier(id)
        .send()
        .await
    {
        Ok(out) => Ok(out.db_instances().first().cloned()),
        Err(e) if code(&e) == Some("DBInstanceNotFound") => Ok(None),
        Err(e) => Err(classify("rds:DescribeDBInstances", id, &e)),
    }
}

/// The newest final snapshot of the environment's database (tagged as its own), made when it
/// was decommissioned.
async fn final_snapshot(cloud: &AwsCloud, names: &Names) -> Result<Option<String>, Error> {
    let out = cloud
        .clients
        .rds
        .describe_db_snapshots()
        .snapshot_type("manual")
        .send()
        .await
        .map_err(|e| classify("rds:DescribeDBSnapshots", names.base(), &e))?;
    let stem = names.final_snapshot();
    let mut ours: Vec<_> = out
        .db_snapshots()
        .iter()
        .filter(|s| {
            s.db_snapshot_identifier()
                .is_some_and(|id| id.starts_with(&stem))
                && s.status() == Some("available")
                && ownership::is_ours(names, s.tag_list().iter().map(|t| (t.key(), t.value())))
        })
        .collect();
    ours.sort_by_key(|s| {
        s.snapshot_create_time()
            .map(|t| (t.secs(), t.subsec_nanos()))
    });
    Ok(ours
        .last()
        .and_then(|s| s.db_snapshot_identifier())
        .map(str::to_owned))
}

/// Restores the database from its newest final snapshot, with the settings it is created
/// with; returns the snapshot's identifier. No snapshot is a terminal error.
async fn restore(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    id: &str,
) -> Result<String, Error> {
    let infra = &cloud.infra;
    let snapshot = final_snapshot(cloud, names).await?.ok_or_else(|| {
        Error::Terminal(format!(
            "no available final snapshot {}-* of the environment to restore from: provision without --from-snapshot",
            names.final_snapshot()
        ))
    })?;
    let group = security_group(invocation)?;
    let production = names.key().env == workflows::Environment::Production;
    let result = cloud
        .clients
        .rds
        .restore_db_instance_from_db_snapshot()
        .db_snapshot_identifier(&snapshot)
        .db_instance_identifier(id)
        .multi_az(production && infra.production_db_multi_az)
        .deletion_protection(production && infra.production_db_deletion_protection)
        .backup_retention_period(if production {
            infra.production_db_backup_days
        } else {
            infra.db_backup_days
        })
        .db_instance_class(&infra.db_instance_class)
        .manage_master_user_password(true)
        .set_master_user_secret_kms_key_id(infra.kms_key_id.clone())
        .db_subnet_group_name(&infra.db_subnet_group)
        .vpc_security_group_ids(group)
        .publicly_accessible(false)
        .copy_tags_to_snapshot(true)
        .set_tags(Some(rds_tags(names, invocation)))
        .send()
        .await;
    match result {
        Ok(_) => {
            tracing::info!(database = id, snapshot = %snapshot, "database restore requested");
            Ok(snapshot)
        }
        Err(e) if code(&e) == Some("DBInstanceAlreadyExists") => Ok(snapshot),
        Err(e) => Err(classify("rds:RestoreDBInstanceFromDBSnapshot", id, &e)),
    }
}

fn security_group(invocation: Invocation<'_>) -> Result<String, Error> {
    invocation
        .task
        .resources
        .network
        .as_ref()
        .map(|n| n.database_security_group.clone())
        .ok_or_else(|| {
            Error::Terminal("the database needs the network step's security group".to_owned())
        })
}

fn rds_tags(names: &Names, invocation: Invocation<'_>) -> Vec<Tag> {
    tags(names, invocation.task.run)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

async fn create(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    id: &str,
) -> Result<(), Error> {
    let infra = &cloud.infra;
    let group = security_group(invocation)?;
    let rds_tags = rds_tags(names, invocation);
    let production = names.key().env == workflows::Environment::Production;
    let result = cloud
        .clients
        .rds
        .create_db_instance()
        .multi_az(production && infra.production_db_multi_az)
        .deletion_protection(production && infra.production_db_deletion_protection)
        .backup_retention_period(if production {
            infra.production_db_backup_days
        } else {
            infra.db_backup_days
        })
        .db_instance_identifier(id)
        .engine("mysql")
        .db_instance_class(&infra.db_instance_class)
        .allocated_storage(infra.db_allocated_storage_gib)
        .master_username("admin")
        .db_name(crate::app_env::DATABASE_NAME)
        .manage_master_user_password(true)
        .set_master_user_secret_kms_key_id(infra.kms_key_id.clone())
        .storage_encrypted(true)
        .set_kms_key_id(infra.kms_key_id.clone())
        .db_subnet_group_name(&infra.db_subnet_group)
        .vpc_security_group_ids(group)
        .publicly_accessible(false)
        .copy_tags_to_snapshot(true)
        .set_tags(Some(rds_tags))
        .send()
        .await;
    match result {
        Ok(_) => {
            tracing::info!(database = id, "database creation requested");
            Ok(())
        }
        // Another attempt created it: the next look adopts it.
        Err(e) if code(&e) == Some("DBInstanceAlreadyExists") => Ok(()),
        Err(e) => Err(classify("rds:CreateDBInstance", id, &e)),
    }
}
