//! The four tables: created by `orchestrator init` ([`create_tables`]), checked when a store
//! connects ([`check_tables`]).

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, TableStatus,
};

use super::{BACKEND, BY_STATE, DynamoStore, build_error};
use crate::aws::Names;
use crate::aws::sdk_error;
use crate::ports::Error;

/// How long [`create_tables`] waits for the tables to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Creates the four tables of `names` (see the [module docs](self)) unless they exist, and
/// waits until they and their indexes are active. Running it again changes nothing.
pub async fn create_tables(client: &Client, names: &Names) -> Result<(), Error> {
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build_error)
    };
    let attr = |name: &str, kind: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(kind)
            .build()
            .map_err(build_error)
    };
    let by_state = GlobalSecondaryIndex::builder()
        .index_name(BY_STATE)
        .key_schema(key("state", KeyType::Hash)?)
        .key_schema(key("key", KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::Include)
                .set_non_key_attributes(Some(
                    ["version", "updated_at", "corrupt", "tenant", "env"]
                        .map(str::to_owned)
                        .to_vec(),
                ))
                .build(),
        )
        .build()
        .map_err(build_error)?;
    let tables = [
        (
            &names.workflows_table,
            vec![
                attr("key", ScalarAttributeType::S)?,
                attr("state", ScalarAttributeType::S)?,
            ],
            vec![key("key", KeyType::Hash)?],
            Some(by_state),
        ),
        (
            &names.history_table,
            vec![
                attr("key", ScalarAttributeType::S)?,
                attr("version", ScalarAttributeType::N)?,
            ],
            vec![key("key", KeyType::Hash)?, key("version", KeyType::Range)?],
            None,
        ),
        (
            &names.tenants_table,
            vec![attr("pk", ScalarAttributeType::S)?],
            vec![key("pk", KeyType::Hash)?],
            None,
        ),
        (
            &names.allocations_table,
            vec![
                attr("pool", ScalarAttributeType::S)?,
                attr("slot", ScalarAttributeType::S)?,
            ],
            vec![key("pool", KeyType::Hash)?, key("slot", KeyType::Range)?],
            None,
        ),
    ];
    for (table, attributes, key_schema, index) in tables {
        let sent = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(attributes))
            .set_key_schema(Some(key_schema))
            .set_global_secondary_indexes(index.map(|i| vec![i]))
            .send()
            .await;
        match sent {
            Ok(_) => tracing::info!(%table, "created table"),
            Err(SdkError::ServiceError(e)) if e.err().is_resource_in_use_exception() => {
                tracing::info!(%table, "table exists already");
            }
            Err(e) => {
                return Err(sdk_error(
                    BACKEND,
                    "CreateTable",
                    &format!("table {table}"),
                    e,
                ));
            }
        }
    }
    for table in [
        &names.workflows_table,
        &names.history_table,
        &names.tenants_table,
        &names.allocations_table,
    ] {
        wait_until_active(client, table).await?;
    }
    Ok(())
}

/// Waits until `table` and its indexes are active.
async fn wait_until_active(client: &Client, table: &str) -> Result<(), Error> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "DescribeTable", &format!("table {table}"), e))?;
        let active = out.table().is_some_and(|t| {
            t.table_status() == Some(&TableStatus::Active)
                && t.global_secondary_indexes()
                    .iter()
                    .all(|i| i.index_status() == Some(&IndexStatus::Active))
        });
        if active {
            return Ok(());
        }
        if started.elapsed() > ACTIVE_TIMEOUT {
            return Err(Error::unavailable(
                BACKEND,
                format!(
                    "table {table} is not active after {}s",
                    ACTIVE_TIMEOUT.as_secs()
                ),
            ));
        }
        tracing::debug!(%table, "waiting for the table to become active");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Checks that the four tables of `store` exist (and the workflows table its index): a missing
/// table, a missing index or denied access is one error naming the table (and the permission,
/// or `orchestrator init`).
pub(super) async fn check_tables(store: &DynamoStore) -> Result<(), Error> {
    for (table, index) in [
        (&store.workflows, Some(BY_STATE)),
        (&store.history, None),
        (&store.tenants, None),
        (&store.allocations, None),
    ] {
        let out = store
            .client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "DescribeTable", &format!("table {table}"), e))?;
        if let Some(index) = index {
            let has_index = out.table().is_some_and(|t| {
                t.global_secondary_indexes()
                    .iter()
                    .any(|i| i.index_name() == Some(index))
            });
            if !has_index {
                return Err(Error::invalid(format!(
                    "table {table} has no index {index}: it was not created by \
                     `orchestrator init`; delete it and run `orchestrator init`"
                )));
            }
        }
    }
    Ok(())
}
