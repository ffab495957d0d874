//! Allocations in the allocations table: exclusive values of named pools (listener rule
//! priorities), one owner per value and one value per owner.
//!
//! - **`allocate`** is one `TransactWriteItems` of two puts conditional on
//!   `attribute_not_exists`: the value's item (one owner per value) and the owner's item (one
//!   value per owner per pool).
//! - **`release`** deletes both, conditional on the owner.
//! - **`allocation_of`** reads the owner's item.
//!
//! The sort key is a string so that one partition per pool holds both kinds of items (a
//! numeric sort key could not hold the owners); the value is zero-padded so a query of a pool
//! lists its values in order.

use aws_sdk_dynamodb::types::{
    CancellationReason, Delete, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};

use super::{DynamoStore, Item, build_error, failed, n, num, s, text};
use crate::ports::Error;

impl DynamoStore {
    pub(super) async fn allocate_value(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> Result<bool, Error> {
        let item = |slot: String| {
            Put::builder()
                .table_name(&self.allocations)
                .item("pool", s(pool))
                .item("slot", s(slot))
                .item("value", n(value))
                .item("owner", s(owner))
                .condition_expression("attribute_not_exists(#p)")
                .expression_attribute_names("#p", "pool")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .put(item(value_slot(value))?)
                .build(),
            TransactWriteItem::builder()
                .put(item(owner_slot(owner))?)
                .build(),
        ];
        let what = format!("value {value} of pool {pool} (table {})", self.allocations);
        let reasons = match self.transact(&what, items).await? {
            Ok(()) => return Ok(true),
            Err(reasons) => reasons,
        };
        if failed(&reasons, 0) {
            let holder = match reasons.first().and_then(CancellationReason::item) {
                Some(old) => text(old, "owner").map(str::to_owned),
                None => self
                    .get_item(
                        &self.allocations,
                        allocation_key(pool, value_slot(value)),
                        &what,
                    )
                    .await?
                    .as_ref()
                    .and_then(|i| text(i, "owner"))
                    .map(str::to_owned),
            };
            return Ok(holder.as_deref() == Some(owner));
        }
        // The value is free but the owner holds another value of the pool.
        Ok(false)
    }

    pub(super) async fn release_value(
        &self,
        pool: &str,
        value: u64,
        owner: &str,
    ) -> Result<(), Error> {
        let delete = |slot: String, condition: &str, placeholder: &str, attribute: &str, v| {
            Delete::builder()
                .table_name(&self.allocations)
                .set_key(Some(allocation_key(pool, slot)))
                .condition_expression(condition)
                .expression_attribute_names(placeholder, attribute)
                .expression_attribute_values(":x", v)
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .delete(delete(
                    value_slot(value),
                    "#o = :x",
                    "#o",
                    "owner",
                    s(owner),
                )?)
                .build(),
            TransactWriteItem::builder()
                .delete(delete(
                    owner_slot(owner),
                    "#v = :x",
                    "#v",
                    "value",
                    n(value),
                )?)
                .build(),
        ];
        match self
            .transact(&format!("value {value} of pool {pool}"), items)
            .await?
        {
            Ok(()) => Ok(()),
            // Not held by `owner`: nothing to release.
            Err(_) => Ok(()),
        }
    }

    pub(super) async fn read_allocation(
        &self,
        pool: &str,
        owner: &str,
    ) -> Result<Option<u64>, Error> {
        let item = self
            .get_item(
                &self.allocations,
                allocation_key(pool, owner_slot(owner)),
                &format!("allocation of {owner} in pool {pool}"),
            )
            .await?;
        Ok(item.as_ref().and_then(|i| num(i, "value")))
    }
}

pub(super) fn value_slot(value: u64) -> String {
    format!("value#{value:020}")
}

fn owner_slot(owner: &str) -> String {
    format!("owner#{owner}")
}

pub(super) fn allocation_key(pool: &str, slot: String) -> Item {
    Item::from([("pool".to_owned(), s(pool)), ("slot".to_owned(), s(slot))])
}
