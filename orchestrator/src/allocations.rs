//! The store's allocations as the AWS reconcilers' [`Allocations`]: a listener rule priority
//! is taken by the store's conditional write, so no two workflows, in any process, hold one.

use std::sync::Arc;

use activities::aws::{Allocations, Error};

use crate::ports::{self, Store};

/// [`Allocations`] on a [`Store`].
#[derive(Debug)]
pub struct StoreAllocations<S>(pub Arc<S>);

fn activity_error(e: ports::Error) -> Error {
    if e.is_retryable() {
        Error::Retryable(ports::chain(&e))
    } else {
        Error::Terminal(ports::chain(&e))
    }
}

impl<S: Store> Allocations for StoreAllocations<S> {
    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        self.0
            .allocate(pool, value, owner)
            .await
            .map_err(activity_error)
    }

    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        self.0
            .release(pool, value, owner)
            .await
            .map_err(activity_error)
    }

    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        self.0
            .allocation_of(pool, owner)
            .await
            .map_err(activity_error)
    }
}
