//! Write capacity: what a transactional write costs, from the response or, where a response
//! reports nothing (moto's transactions), estimated from the items' sizes as AWS charges
//! them: two units per started KiB of each item.

use aws_sdk_dynamodb::types::{AttributeValue, ConsumedCapacity, TransactWriteItem};

use super::Item;

pub(super) fn capacity_units(c: &ConsumedCapacity) -> Option<f64> {
    c.capacity_units().or(c.write_capacity_units())
}

/// What AWS charges for one item of a transactional write: two units per started KiB.
pub(super) fn transactional_wcu(item: &TransactWriteItem) -> f64 {
    let size = if let Some(put) = item.put() {
        item_size(put.item())
    } else if let Some(delete) = item.delete() {
        item_size(delete.key())
    } else if let Some(update) = item.update() {
        item_size(update.key())
    } else {
        0
    };
    // Sizes are far below 2^52: the conversion is exact.
    2.0 * size.div_ceil(1024).max(1) as f64
}

/// An item's size as DynamoDB counts it: names plus values (numbers about a byte per two
/// digits).
fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => n.len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(v) => 3 + v.iter().map(|x| 1 + value_size(x)).sum::<usize>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, x)| 1 + k.len() + value_size(x))
                .sum::<usize>()
        }
        _ => 1,
    }
}
